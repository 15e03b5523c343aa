"""Masks applied in place and undone bit-exactly.

A pruned component's parameters are zeroed so that its output is exactly zero; which
slices those are is the model family's answer (`Family.mask_targets`, built from
`pxopt.prune.targets`):
- conv / hidden linear / MLP fc1: the weight row and bias, and the channel's BatchNorm
  weight and bias when one follows (so BN's shift cannot leak a constant);
- attention head: the head's rows of the value projection and their bias, so the head's
  output (A @ V) is exactly zero whatever the attention weights are.
Only the zeroed rows are copied; undo writes them back with `index_copy_`, which leaves
every parameter bit-identical.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from pxopt.errors import ConfigError
from pxopt.families import family_of, heads_family
from pxopt.families.base import Target
from pxopt.prune._layers import prunable_layers

_Target = Target  # the older name


def head_value_targets(module: nn.Module, name: str = "") -> tuple[list[Target], int, int]:
    """Value-projection rows per head of an attention module, from the family that knows it
    (`Family.head_targets`). Returns (targets, num_heads, head_dim)."""
    from pxopt.layermap import Layer

    layer = Layer(name, module, "heads", "", 0, 0)
    return heads_family(layer).head_targets(layer)


def component_targets(model: nn.Module, layer: Any) -> list[Target]:
    """Tensors to zero so that `layer`'s components output exactly zero (the family's
    `mask_targets`: channels of conv / linear layers, value rows of attention heads)."""
    family = getattr(layer, "family", None)
    if family is None:  # a hand-made layer map: heads by their module, channels by the model
        family = heads_family(layer) if layer.kind == "heads" else family_of(model)
    return family.mask_targets(model, layer)


class Masker:
    """Context manager that zeroes pruned components in place and restores them exactly.

    `set_pruned` may be called repeatedly; growing (nested) sets only touch the new
    components, shrinking sets first restore everything. Exiting the context (even by an
    exception) restores all parameters bit-identically.
    """

    def __init__(self, model: nn.Module, layer_map: Iterable[Any], kinds: str | Sequence[str] | None = None):
        self.model = model
        self._layers = {layer.name: layer for layer in prunable_layers(layer_map, kinds)}
        self._targets = {name: component_targets(model, layer) for name, layer in self._layers.items()}
        self._current: dict[str, torch.Tensor] = {}
        # Saved original slices: per (layer, target index): (indices, values).
        self._saved: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def layer_names(self) -> list[str]:
        return list(self._layers)

    def __enter__(self) -> Masker:
        return self

    def fully_pruned(self) -> list[str]:
        """Layers whose every component is currently pruned (they output exact zeros)."""
        return [name for name, mask in self._current.items() if mask.numel() and bool(mask.all())]

    def tensors_written(self, pruned: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """The tensors `set_pruned(pruned)` writes to (every layer with a pruned component)."""
        return [tg.tensor for name, mask in pruned.items() if bool(mask.any())
                for tg in self._targets.get(name, ())]

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def pruned(self) -> dict[str, torch.Tensor]:
        """Current boolean masks (True = pruned), on the CPU."""
        return {k: v.clone() for k, v in self._current.items()}

    @torch.no_grad()
    def set_pruned(self, pruned: Mapping[str, torch.Tensor]) -> None:
        unknown = set(pruned) - set(self._layers)
        if unknown:
            raise ConfigError(f"cannot mask unknown or non-prunable layers: {sorted(unknown)}")
        new: dict[str, torch.Tensor] = {}
        for name, mask in pruned.items():
            mask = mask.detach().to("cpu", torch.bool).flatten()
            if mask.numel() != self._layers[name].n_components:
                raise ConfigError(
                    f"mask for {name!r} has {mask.numel()} entries, the layer has "
                    f"{self._layers[name].n_components} components"
                )
            new[name] = mask
        shrinks = any(
            bool((cur & ~new.get(name, torch.zeros_like(cur))).any()) for name, cur in self._current.items()
        )
        if shrinks:
            self.restore()
        for name, mask in new.items():
            cur = self._current.get(name)
            add = mask if cur is None else mask & ~cur
            idx = add.nonzero().flatten()
            if idx.numel():
                self._zero(name, idx)
            self._current[name] = mask | cur if cur is not None else mask

    def _zero(self, name: str, comps: torch.Tensor) -> None:
        for t_i, tg in enumerate(self._targets[name]):
            idx = tg.index_map(comps.to(tg.tensor.device))
            vals = tg.tensor.index_select(tg.dim, idx).clone()
            key = (name, t_i)
            if key in self._saved:
                old_idx, old_vals = self._saved[key]
                self._saved[key] = (torch.cat([old_idx, idx]), torch.cat([old_vals, vals], tg.dim))
            else:
                self._saved[key] = (idx, vals)
            tg.tensor.index_fill_(tg.dim, idx, 0)

    @torch.no_grad()
    def restore(self) -> None:
        """Write every saved slice back: parameters become bit-identical to the originals."""
        # Reverse order so a slice saved twice (shared tensors) ends with its oldest value.
        for (name, t_i), (idx, vals) in reversed(list(self._saved.items())):
            tg = self._targets[name][t_i]
            tg.tensor.index_copy_(tg.dim, idx, vals)
        self._saved.clear()
        self._current.clear()
