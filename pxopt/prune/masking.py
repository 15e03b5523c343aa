"""Masks applied in place and undone bit-exactly.

A pruned component's parameters are zeroed so that its output is exactly zero:
- conv / hidden linear / MLP fc1: the weight row and bias, and the channel's BatchNorm
  weight and bias when one follows (so BN's shift cannot leak a constant);
- attention head: the head's rows of the value projection and their bias, so the head's
  output (A @ V) is exactly zero whatever the attention weights are.
Only the zeroed rows are copied; undo writes them back with `index_copy_`, which leaves
every parameter bit-identical.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pxopt.errors import ConfigError, UnsupportedLayerError
from pxopt.prune._layers import prunable_layers
from pxopt.prune.graph import find_following

IndexMap = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class _Target:
    """One tensor slice that must be zero for a component to be silent."""

    tensor: torch.Tensor
    dim: int
    index_map: IndexMap


def _identity(idx: torch.Tensor) -> torch.Tensor:
    return idx


def _head_rows(offset: int, head_dim: int) -> IndexMap:
    def rows(heads: torch.Tensor) -> torch.Tensor:
        base = offset + heads.unsqueeze(1) * head_dim
        return (base + torch.arange(head_dim, device=heads.device)).flatten()

    return rows


def head_value_targets(module: nn.Module, name: str = "") -> tuple[list[_Target], int, int]:
    """Value-projection rows per head for timm `Attention` and `nn.MultiheadAttention`.

    Returns (targets, num_heads, head_dim).
    """
    if isinstance(module, nn.MultiheadAttention):
        e, h = module.embed_dim, module.num_heads
        hd = e // h
        tg: list[_Target] = []
        if module._qkv_same_embed_dim:
            tg.append(_Target(module.in_proj_weight, 0, _head_rows(2 * e, hd)))
        else:
            tg.append(_Target(module.v_proj_weight, 0, _head_rows(0, hd)))
        if module.in_proj_bias is not None:
            tg.append(_Target(module.in_proj_bias, 0, _head_rows(2 * e, hd)))
        return tg, h, hd
    qkv = getattr(module, "qkv", None)
    h = getattr(module, "num_heads", None)
    if isinstance(qkv, nn.Linear) and h:
        dim = qkv.out_features // 3
        hd = getattr(module, "head_dim", dim // h)
        tg = [_Target(qkv.weight, 0, _head_rows(2 * h * hd, hd))]
        if qkv.bias is not None:
            tg.append(_Target(qkv.bias, 0, _head_rows(2 * h * hd, hd)))
        v_bias = getattr(module, "v_bias", None)
        if isinstance(v_bias, torch.Tensor):
            tg.append(_Target(v_bias, 0, _head_rows(0, hd)))
        return tg, h, hd
    v_proj = getattr(module, "v_proj", None)
    if isinstance(v_proj, nn.Linear) and h:
        hd = v_proj.out_features // h
        tg = [_Target(v_proj.weight, 0, _head_rows(0, hd))]
        if v_proj.bias is not None:
            tg.append(_Target(v_proj.bias, 0, _head_rows(0, hd)))
        return tg, h, hd
    raise UnsupportedLayerError(
        f"cannot mask heads of {name or type(module).__name__} ({type(module).__name__}):"
        " expected timm Attention (qkv), nn.MultiheadAttention or a module with v_proj and num_heads"
    )


#: Family hooks: (model, layer) -> [(tensor, dim)] more slices to zero with a component
#: (e.g. the depthwise conv and BatchNorm after a MobileNet expansion channel).
_FOLLOWERS: list[Callable[[nn.Module, Any], list[tuple[torch.Tensor, int]]]] = []


def register_mask_followers(fn: Callable[[nn.Module, Any], list[tuple[torch.Tensor, int]]]) -> None:
    """Add a family hook giving extra tensors to zero with each masked component."""
    _FOLLOWERS.append(fn)


def component_targets(model: nn.Module, layer: Any) -> list[_Target]:
    """Tensors to zero so that `layer`'s components output exactly zero."""
    mod = layer.module
    if layer.kind == "heads":
        return head_value_targets(mod, layer.name)[0]
    if not isinstance(mod, (nn.Conv2d, nn.Linear)):
        raise UnsupportedLayerError(
            f"cannot mask {layer.name} ({type(mod).__name__}) as kind {layer.kind!r}: expected Conv2d or Linear"
        )
    tg = [_Target(mod.weight, 0, _identity)]
    if mod.bias is not None:
        tg.append(_Target(mod.bias, 0, _identity))
    fol = find_following(model, layer.name, layer.n_components)
    if fol.bn is not None:
        if fol.bn.weight is not None:
            tg.append(_Target(fol.bn.weight, 0, _identity))
        if fol.bn.bias is not None:
            tg.append(_Target(fol.bn.bias, 0, _identity))
        if fol.bn.weight is None and fol.bn.bias is None:
            # Non-affine BN: its output is -mean/std for a zero channel; pin it to zero by
            # making mean 0 (the running mean is a buffer and restored like a parameter).
            tg.append(_Target(fol.bn.running_mean, 0, _identity))
    for fn in _FOLLOWERS:
        tg += [_Target(t, dim, _identity) for t, dim in fn(model, layer)]
    return tg


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
