"""Small helpers over the layer map, so pruning code accepts any `LayerMap`-like object.

The layer map (`pxopt.layers`) is written in parallel; these helpers only rely on the
contract in docs/INTERFACES.md section 2: an iterable of `Layer` with `name`, `module`,
`kind`, `n_components`, and optionally `prunable(kinds)`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from pxopt.errors import ConfigError
from pxopt.vocab import PRUNABLE_KINDS


def normalise_kinds(kinds: str | Sequence[str] | None) -> tuple[str, ...]:
    """One kind or a stated combination; the classifier ("head") is never prunable."""
    if kinds is None:
        return PRUNABLE_KINDS
    if isinstance(kinds, str):
        kinds = (kinds,)
    out = tuple(dict.fromkeys(kinds))
    bad = [k for k in out if k not in PRUNABLE_KINDS]
    if bad:
        raise ConfigError(
            f"cannot prune component kind(s) {bad}: choose from {list(PRUNABLE_KINDS)}"
            " (the classifier head is never pruned)"
        )
    if not out:
        raise ConfigError("kinds must name at least one component kind")
    return out


def prunable_layers(layer_map: Iterable[Any], kinds: str | Sequence[str] | None) -> list[Any]:
    """Layers whose components may be pruned, in forward order, never the classifier."""
    ks = normalise_kinds(kinds)
    if hasattr(layer_map, "prunable"):
        layers = list(layer_map.prunable(ks))
    else:
        layers = [layer for layer in layer_map if layer.kind in ks]
    return [layer for layer in layers
            if layer.kind in ks and layer.kind != "head" and getattr(layer, "prunable", True)]
