"""Where computation runs: CUDA when present, else the CPU."""

from __future__ import annotations

import os

import torch

from pxopt.errors import ConfigError


def resolve_device(spec: str | torch.device | None = None) -> torch.device:
    """Turn 'auto' / None / 'cpu' / 'cuda' / 'cuda:1' into a usable device.

    'auto' picks CUDA when it is available so the same command runs on a laptop and a
    GPU server; an explicit CUDA request on a machine without one is a user error.
    """
    if spec is None or str(spec) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"invalid device {spec!r}: use 'auto', 'cpu' or 'cuda[:N]'") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {spec!r} requested but CUDA is not available on this machine")
    return device


def configure_threads(threads: int | None = None) -> int:
    """Set torch's CPU thread count (env PXOPT_THREADS, else torch's default).

    On small shared machines several OpenMP threads can collapse under contention,
    so the count is configurable rather than left to OpenMP.
    """
    if threads is None:
        env = os.environ.get("PXOPT_THREADS")
        threads = int(env) if env else None
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()
