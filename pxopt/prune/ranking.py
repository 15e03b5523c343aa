"""Global ranking of components across the network, and the nested prune sets it implies.

One sort over all components of the chosen kind(s): the set pruned at rate p is the prefix
of length floor(p * N) of that order, so rates are nested by construction and a whole
curve needs one ranking and no model copies.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from pxopt.errors import ConfigError
from pxopt.prune._layers import normalise_kinds, prunable_layers


@dataclass(frozen=True)
class Cap:
    """Per-layer guard: keep at least `min_keep` components and prune at most `max_fraction`
    of each layer. Components beyond the cap are left out of the order (never pruned)."""

    min_keep: int = 1
    max_fraction: float = 1.0

    def __post_init__(self) -> None:
        if self.min_keep < 0:
            raise ConfigError(f"cap.min_keep must be >= 0, got {self.min_keep}")
        if not 0.0 <= self.max_fraction <= 1.0:
            raise ConfigError(f"cap.max_fraction must be in [0, 1], got {self.max_fraction}")

    def max_pruned(self, n: int) -> int:
        """How many of a layer's n components may be pruned."""
        by_fraction = math.floor(self.max_fraction * n + 1e-9)
        return max(0, min(n - self.min_keep, by_fraction))

    def to_dict(self) -> dict[str, Any]:
        return {"min_keep": self.min_keep, "max_fraction": self.max_fraction}


def count_at(rate: float, n_total: int) -> int:
    """Number of components pruned at `rate` (floor, robust to float noise like 0.7 * 10)."""
    if not 0.0 <= rate <= 1.0:
        raise ConfigError(f"pruning rate must be in [0, 1], got {rate}")
    return min(n_total, math.floor(rate * n_total + 1e-9))


@dataclass
class PruneOrder:
    """Components in pruning order (first pruned first).

    `layer_index[i]` indexes `names`, `component_index[i]` the component inside that layer.
    The rate is a fraction of `n_total` (all components of the kinds, capped ones included),
    so a cap only ever removes components from the order, never shifts rates.
    """

    names: list[str]
    n_components: dict[str, int]
    layer_index: torch.Tensor
    component_index: torch.Tensor
    n_total: int
    capped: dict[str, int] = field(default_factory=dict)  # layer -> components protected
    cap: Cap | None = None
    most_relevant_first: bool = False

    def __len__(self) -> int:
        return int(self.layer_index.numel())

    def count(self, rate: float) -> int:
        """Components actually pruned at `rate` (saturates at the cap)."""
        return min(len(self), count_at(rate, self.n_total))

    def pruned_at(self, rate: float) -> dict[str, torch.Tensor]:
        """Boolean mask per layer (True = pruned) for `rate`; the prefix property makes these nested."""
        return self.pruned_first(self.count(rate))

    def pruned_first(self, k: int) -> dict[str, torch.Tensor]:
        li, ci = self.layer_index[:k], self.component_index[:k]
        out: dict[str, torch.Tensor] = {}
        for j, name in enumerate(self.names):
            mask = torch.zeros(self.n_components[name], dtype=torch.bool)
            mask[ci[li == j]] = True
            out[name] = mask
        return out

    def per_layer_counts(self, rate: float) -> dict[str, int]:
        k = self.count(rate)
        counts = torch.bincount(self.layer_index[:k], minlength=len(self.names))
        return {name: int(counts[j]) for j, name in enumerate(self.names)}


def global_order(
    scores: Mapping[str, torch.Tensor],
    layer_map: Iterable[Any],
    kinds: str | Sequence[str] | None,
    *,
    most_relevant_first: bool = False,
    cap: Cap | None = None,
) -> PruneOrder:
    """Rank every component of `kinds` globally by score, least relevant first.

    `scores` are already the values to sort by (e.g. `ComponentScores.select("abs")`):
    ascending, so near-zero |R| (abs) or most negative R (signed) go first. Ties keep layer
    order then component order (stable sort), so the order is deterministic.
    """
    normalise_kinds(kinds)
    layers = prunable_layers(layer_map, kinds)
    if not layers:
        raise ConfigError(f"the model has no prunable components of kind(s) {kinds}")
    vals, lidx, cidx = [], [], []
    names: list[str] = []
    n_comp: dict[str, int] = {}
    for j, layer in enumerate(layers):
        if layer.name not in scores:
            raise ConfigError(f"no scores for layer {layer.name!r} (criterion did not cover kind {layer.kind!r})")
        s = scores[layer.name].detach().flatten().to("cpu", torch.float64)
        if s.numel() != layer.n_components:
            raise ConfigError(
                f"scores for {layer.name!r} have {s.numel()} entries, the layer has {layer.n_components} components"
            )
        if not bool(torch.isfinite(s).all()):
            raise ConfigError(f"scores for {layer.name!r} contain NaN or infinite values")
        names.append(layer.name)
        n_comp[layer.name] = layer.n_components
        vals.append(s)
        lidx.append(torch.full((s.numel(),), j, dtype=torch.long))
        cidx.append(torch.arange(s.numel()))
    v, li, ci = torch.cat(vals), torch.cat(lidx), torch.cat(cidx)
    perm = torch.sort(v, descending=most_relevant_first, stable=True).indices
    li, ci = li[perm], ci[perm]
    capped: dict[str, int] = {}
    if cap is not None:
        # Walk the order and drop each layer's components beyond its allowance.
        by_layer = torch.sort(li, stable=True).indices
        counts = torch.bincount(li, minlength=len(names))
        starts = torch.cumsum(counts, 0) - counts
        rank_in_layer = torch.empty_like(li)
        rank_in_layer[by_layer] = torch.arange(li.numel()) - starts[li[by_layer]]
        allow = torch.tensor([cap.max_pruned(n_comp[n]) for n in names], dtype=torch.long)
        keep = rank_in_layer < allow[li]
        li, ci = li[keep], ci[keep]
        capped = {n: n_comp[n] - int(allow[j]) for j, n in enumerate(names) if n_comp[n] > int(allow[j])}
    return PruneOrder(
        names=names, n_components=n_comp, layer_index=li, component_index=ci,
        n_total=int(v.numel()), capped=capped, cap=cap, most_relevant_first=most_relevant_first,
    )
