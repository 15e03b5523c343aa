"""The held-out split: validation images the search objective never sees.

One implementation for `make_task(n_heldout=...)` (the product) and the benchmarks: a
task's validation draw is extended per class and its tail cut off as the held-out set,
so the validation images themselves are exactly those of a task drawn without one.
"""

from __future__ import annotations

import torch

from pxopt.data.tensorset import TensorSet
from pxopt.errors import DataError
from pxopt.vocab import DEFAULT_N_HELDOUT

__all__ = ["DEFAULT_N_HELDOUT", "heldout_per_class", "split_indices_per_class", "split_per_class"]


def heldout_per_class(n_heldout: int, n_classes: int, available: int) -> int:
    """Held-out images per class for a per-task total, at most `available` (0: none).

    The total is split evenly over the classes (at least one each when asked for any), so
    every class weighs the same in the held-out accuracy, as in the validation set.
    """
    if n_heldout < 0:
        raise DataError(f"n_heldout must be >= 0 (0: no held-out split), got {n_heldout}")
    if n_heldout == 0:
        return 0
    return max(0, min(max(1, n_heldout // max(n_classes, 1)), available))


def split_per_class(
    images: TensorSet, n_first: int | None = None, *, n_last: int | None = None
) -> tuple[TensorSet, TensorSet]:
    """Split every class in two, keeping the order: its first `n_first` images (or all but its
    last `n_last`) and the rest. Two disjoint sets; each class must leave >= 1 image in both."""
    if (n_first is None) == (n_last is None):
        raise ValueError("give exactly one of n_first and n_last")
    head, tail = split_indices_per_class(images.labels, n_first, n_last=n_last)
    return (TensorSet(images.images[head], images.labels[head]),
            TensorSet(images.images[tail], images.labels[tail]))


def split_indices_per_class(
    labels: torch.Tensor, n_first: int | None = None, *, n_last: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of `split_per_class`'s two sets (classes in ascending order)."""
    head: list[torch.Tensor] = []
    tail: list[torch.Tensor] = []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        cut = n_first if n_first is not None else len(idx) - int(n_last or 0)
        if not 1 <= cut < len(idx):
            need = f"{n_first} + at least 1" if n_first is not None else f"{n_last} + at least 1"
            raise DataError(f"class {c} has {len(idx)} validation images; {need} needed")
        head.append(idx[:cut])
        tail.append(idx[cut:])
    return torch.cat(head), torch.cat(tail)
