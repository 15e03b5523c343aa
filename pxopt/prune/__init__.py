"""Pruning: global ranking, nested masks per rate, in-place masks, physical removal.

`physical_prune` / `load_pruned` / `PhysicalResult` (Torch-Pruning) are imported lazily.
"""

from __future__ import annotations

from typing import Any

from pxopt.prune.masking import Masker
from pxopt.prune.ranking import Cap, PruneOrder, count_at, global_order

__all__ = ["Cap", "Masker", "PhysicalResult", "PruneOrder", "count_at", "global_order", "load_pruned",
           "physical_prune"]


def __getattr__(name: str) -> Any:
    if name in ("PhysicalResult", "load_pruned", "physical_prune"):
        from pxopt.prune import physical

        return getattr(physical, name)
    raise AttributeError(f"module 'pxopt.prune' has no attribute {name!r}")
