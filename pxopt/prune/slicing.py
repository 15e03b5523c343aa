"""Evaluate a masked model faster by temporarily slicing zeroed channels out.

A masked channel is exactly zero after its layer (and BatchNorm), so it need not be computed:
- pairs: where a pruned layer feeds another weight layer through only its BatchNorm and
  element-wise / pooling ops (conv -> BN -> ReLU -> conv; fc1 -> GELU -> fc2), the channel
  is dropped from the producer's output and the consumer's input (both cost ~(1 - p));
- scatter: any other pruned conv / linear (e.g. a ResNet block's last conv, whose output
  joins the residual sum) computes only its kept channels and a forward hook writes them
  into a zero tensor of the full width (exact: the dropped channels are zeros anyway);
- heads: where the model's family can slice its attention (`Family.slice_heads`; timm
  `Attention` without gate or scale-norm: q/k/v rows and output-projection columns sliced,
  `num_heads` / `attn_dim` set), it runs with only its kept heads.
- plans: a family that knows how channels travel through its own structure (DenseNet's
  concatenations) slices them itself (`Family.slice_plan`); its layers leave the cases above.
Results agree with the masked model up to float summation order. The original Parameter
objects and attributes are put back on `undo`, so nothing is copied back and masks stay valid.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pxopt.families import heads_family
from pxopt.prune._layers import prunable_layers
from pxopt.prune.graph import find_following
from pxopt.vocab import CHANNEL_KINDS

_MISSING = object()


def _keep(mask: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Indices of kept channels; one (zeroed) channel if all are pruned (no empty tensors)."""
    keep = (~mask.to("cpu", torch.bool)).nonzero().flatten()
    if keep.numel() == 0:
        keep = torch.zeros(1, dtype=torch.long)
    return keep.to(device)


def _scatter(keep: torch.Tensor, n: int, dim: int) -> Any:
    """Forward hook: write the kept channels into zeros of the full width."""
    def hook(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        shape = list(out.shape)
        shape[dim] = n
        return out.new_zeros(shape).index_copy_(dim % out.ndim, keep, out)

    return hook


@dataclass
class _Pair:
    name: str
    producer: nn.Module
    bn: nn.Module | None
    consumer: nn.Module
    consumer_name: str


@dataclass
class _Out:
    name: str
    producer: nn.Module
    bn: nn.Module | None


class Slicer:
    """Swaps in sliced weights for the current masks; `undo` restores the originals exactly."""

    def __init__(self, model: nn.Module, layer_map: Iterable[Any], kinds: str | Sequence[str] | None = None):
        self.pairs: list[_Pair] = []
        self.outs: list[_Out] = []
        self.heads: list[tuple[str, Any, Any]] = []  # (name, layer, family)
        layers = prunable_layers(layer_map, kinds)
        family = next((la.family for la in layers if getattr(la, "family", None) is not None), None)
        plan = family.slice_plan(model, {la.name for la in layers}) if family is not None else None
        self.plans = [plan] if plan is not None else []
        planned = {n for p in self.plans for n in p.names}
        for layer in layers:
            if layer.name in planned:
                continue
            if layer.kind == "heads":
                family = heads_family(layer)  # the layer's own, or the one knowing its module
                if family.slice_heads(layer, torch.arange(int(layer.n_components))) is not None:
                    self.heads.append((layer.name, layer, family))
            if layer.kind not in CHANNEL_KINDS:
                continue
            if not isinstance(layer.module, (nn.Conv2d, nn.Linear)):
                continue
            if isinstance(layer.module, nn.Conv2d) and layer.module.groups != 1:
                continue
            fol = find_following(model, layer.name, layer.n_components)
            if fol.consumer is not None:
                self.pairs.append(_Pair(layer.name, layer.module, fol.bn, fol.consumer, fol.consumer_name or ""))
            else:
                self.outs.append(_Out(layer.name, layer.module, fol.bn))
        # (module, kind, attribute) -> original object, for undo.
        self._orig: dict[tuple[int, str, str], tuple[nn.Module, str, str, Any]] = {}
        self._hooks: list[Any] = []
        self._attrs: list[tuple[nn.Module, str, Any]] = []

    @property
    def sliceable(self) -> list[str]:
        """Names of the layers whose pruned channels are sliced out during evaluation."""
        return [p.name for p in self.pairs] + [o.name for o in self.outs] + [h[0] for h in self.heads] + \
            [n for p in self.plans for n in p.names]

    def apply(self, pruned: Mapping[str, torch.Tensor]) -> None:
        """Slice out the pruned channels of every sliceable layer (masks must already be applied)."""
        self.undo()
        ops: dict[tuple[int, str, str], list[tuple[int, torch.Tensor]]] = {}
        mods: dict[int, nn.Module] = {}

        def add(mod: nn.Module, store: str, attr: str, dim: int, keep: torch.Tensor) -> None:
            if (store == "_parameters" and mod._parameters.get(attr) is None) or \
                    (store == "_buffers" and mod._buffers.get(attr) is None):
                return
            mods[id(mod)] = mod
            ops.setdefault((id(mod), store, attr), []).append((dim, keep))

        def slice_outputs(producer: nn.Module, bn: nn.Module | None, keep: torch.Tensor) -> None:
            """Keep only `keep` output channels of a layer and of its BatchNorm."""
            add(producer, "_parameters", "weight", 0, keep)
            add(producer, "_parameters", "bias", 0, keep)
            if bn is not None:
                for attr in ("weight", "bias"):
                    add(bn, "_parameters", attr, 0, keep)
                for attr in ("running_mean", "running_var"):
                    add(bn, "_buffers", attr, 0, keep)

        for p in self.pairs:
            mask = pruned.get(p.name)
            if mask is None or not bool(mask.any()):
                continue
            keep = _keep(mask, p.producer.weight.device)
            slice_outputs(p.producer, p.bn, keep)
            add(p.consumer, "_parameters", "weight", 1, keep)
        for o in self.outs:
            mask = pruned.get(o.name)
            if mask is None or not bool(mask.any()):
                continue
            keep = _keep(mask, o.producer.weight.device)
            slice_outputs(o.producer, o.bn, keep)
            last = o.bn if o.bn is not None else o.producer
            dim = 1 if isinstance(o.producer, nn.Conv2d) else -1
            self._hooks.append(last.register_forward_hook(_scatter(keep, int(mask.numel()), dim)))
        for slice_plan in self.plans:
            for e in slice_plan.edits(pruned):
                add(e.module, e.store, e.attr, e.dim, e.index)
        for name, layer, family in self.heads:
            mask = pruned.get(name)
            if mask is None or not bool(mask.any()):
                continue
            kept = (~mask.to("cpu", torch.bool)).nonzero().flatten()
            if kept.numel() == 0:
                kept = torch.zeros(1, dtype=torch.long)
            plan = family.slice_heads(layer, kept)  # the family knows its attention's layout
            for e in plan.edits:
                add(e.module, e.store, e.attr, e.dim, e.index)
            for mod, attr, val in plan.attrs:
                self._attrs.append((mod, attr, mod.__dict__.get(attr, _MISSING)))
                setattr(mod, attr, val)
        with torch.no_grad():
            for (mid, store, attr), steps in ops.items():
                mod = mods[mid]
                orig = getattr(mod, store)[attr]
                new = orig.detach()
                for dim, keep in steps:
                    new = new.index_select(dim, keep)
                self._orig[(mid, store, attr)] = (mod, store, attr, orig)
                getattr(mod, store)[attr] = nn.Parameter(new, requires_grad=False) if store == "_parameters" else new

    def undo(self) -> None:
        """Put the original Parameter / buffer objects back (bit-identical by construction)."""
        for mod, store, attr, orig in self._orig.values():
            getattr(mod, store)[attr] = orig
        self._orig.clear()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for mod, attr, old in reversed(self._attrs):
            if old is _MISSING:
                mod.__dict__.pop(attr, None)
            else:
                setattr(mod, attr, old)
        self._attrs.clear()

    def __enter__(self) -> Slicer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.undo()
