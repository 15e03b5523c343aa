"""Latency of models compared fairly on a busy machine.

`compare_latency({"before": a, "after": b}, x)` warms every model up, then times them in
turns (a b, b a, a b, ...) so that a load spike on a shared host hits both alike, and
reports each one's median with its spread (interquartile range, min, max). The CPU thread
count is fixed while timing (`threads`, default env PXOPT_THREADS, else 1), because
several OpenMP threads collapse when other jobs hold the cores; the caller's count is
restored afterwards. CUDA is synchronised before every clock reading.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from pxopt.errors import ConfigError

Clock = Callable[[], float]


@dataclass(frozen=True)
class Latency:
    """One model's time per call (ms) over `runs` samples of `number` calls each."""

    median_ms: float
    q1_ms: float
    q3_ms: float
    min_ms: float
    max_ms: float
    runs: int
    number: int
    threads: int

    @classmethod
    def from_samples(cls, samples_ms: list[float], *, number: int, threads: int) -> Latency:
        if not samples_ms:
            raise ValueError("no latency samples")
        xs = sorted(samples_ms)
        if len(xs) > 1:
            q1, median, q3 = statistics.quantiles(xs, n=4, method="inclusive")
        else:
            q1 = median = q3 = xs[0]
        return cls(median, q1, q3, xs[0], xs[-1], len(xs), number, threads)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:  # "0.74 ms [0.72-0.77]"
        return f"{self.median_ms:.3g} ms [{self.q1_ms:.3g}-{self.q3_ms:.3g}]"


def latency_threads(threads: int | None = None) -> int:
    """The timing thread count: `threads`, else env PXOPT_THREADS, else 1."""
    if threads is None:
        env = os.environ.get("PXOPT_THREADS", "").strip()
        try:
            threads = int(env) if env else 1
        except ValueError:
            raise ConfigError(f"PXOPT_THREADS must be a positive integer, got {env!r}") from None
    if threads < 1:
        raise ConfigError(f"threads must be >= 1, got {threads}")
    return threads


def _sync_for(example: Any) -> Callable[[], None]:
    if isinstance(example, torch.Tensor) and example.device.type == "cuda":
        device = example.device
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def compare_latency(
    models: Mapping[str, Callable[[Any], Any]],
    example: Any,
    *,
    threads: int | None = None,
    warmup: int = 3,
    repeats: int = 15,
    min_sample_s: float = 0.01,
    max_number: int = 1000,
    clock: Clock = time.perf_counter,
    sync: Callable[[], None] | None = None,
) -> dict[str, Latency]:
    """Time each model's `model(example)`, interleaved; returns {name: Latency}.

    warmup: untimed calls of each model (in turns) before timing; the last one sizes the
    inner loop: each sample repeats the call `number` times (the same for every model, at
    most `max_number`) so that the fastest model's sample lasts about `min_sample_s`.
    repeats: samples per model; the order of the models alternates from one round to the
    next (a b, b a, ...), so neither always runs right after the other.
    """
    if not models:
        raise ValueError("no models to time")
    if warmup < 1 or repeats < 1:
        raise ValueError("warmup and repeats must be >= 1")
    names = list(models)
    n_threads = latency_threads(threads)
    sync = sync or _sync_for(example)
    previous = torch.get_num_threads()

    def run(name: str, number: int) -> float:
        fn = models[name]
        sync()
        start = clock()
        for _ in range(number):
            fn(example)
        sync()
        return (clock() - start) / number

    torch.set_num_threads(n_threads)
    try:
        with torch.inference_mode():
            last: dict[str, float] = {}
            for _ in range(warmup):
                for name in names:
                    last[name] = run(name, 1)
            fastest = min(last.values())
            number = max(1, min(max_number, math.ceil(min_sample_s / fastest) if fastest > 0 else max_number))
            samples: dict[str, list[float]] = {name: [] for name in names}
            for r in range(repeats):
                for name in names if r % 2 == 0 else names[::-1]:
                    samples[name].append(run(name, number) * 1e3)
    finally:
        torch.set_num_threads(previous)
    return {name: Latency.from_samples(s, number=number, threads=n_threads) for name, s in samples.items()}
