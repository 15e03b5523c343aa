"""Library versions recorded with every trial and export (results depend on them)."""

from __future__ import annotations

from functools import cache
from importlib import metadata

_PACKAGES = ("pxopt", "torch", "torchvision", "timm", "optuna", "numpy", "torch-pruning")


@cache
def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that shape a result ('missing' if absent)."""
    out: dict[str, str] = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "missing"
    return out
