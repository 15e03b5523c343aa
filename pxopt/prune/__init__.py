"""Pruning: global ranking, nested masks per rate, in-place masks, physical removal."""

from __future__ import annotations

from pxopt.prune.masking import Masker
from pxopt.prune.ranking import Cap, PruneOrder, count_at, global_order

__all__ = ["Cap", "Masker", "PruneOrder", "count_at", "global_order"]
