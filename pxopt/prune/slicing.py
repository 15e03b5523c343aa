"""Evaluate a masked model faster by temporarily slicing zeroed channels out.

Where a pruned layer feeds another weight layer through only its BatchNorm and
element-wise / pooling ops (conv -> BN -> ReLU -> conv; fc1 -> GELU -> fc2), a masked
channel is exactly zero there, so dropping it from the producer's output and from the
consumer's input changes nothing but the summation order (results agree to float
rounding). Both sides then cost about (1 - p) of their FLOPs. The original Parameter
objects are put back on `undo`, so nothing is copied back and masks stay valid.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pxopt.prune._layers import prunable_layers
from pxopt.prune.graph import find_following


@dataclass
class _Pair:
    name: str
    producer: nn.Module
    bn: nn.Module | None
    consumer: nn.Module
    consumer_name: str


class Slicer:
    """Swaps in sliced weights for the current masks; `undo` restores the originals exactly."""

    def __init__(self, model: nn.Module, layer_map: Iterable[Any], kinds: str | Sequence[str] | None = None):
        self.pairs: list[_Pair] = []
        for layer in prunable_layers(layer_map, kinds):
            if layer.kind not in ("conv", "linear", "mlp"):
                continue
            if not isinstance(layer.module, (nn.Conv2d, nn.Linear)):
                continue
            if isinstance(layer.module, nn.Conv2d) and layer.module.groups != 1:
                continue
            fol = find_following(model, layer.name, layer.n_components)
            if fol.consumer is not None:
                self.pairs.append(_Pair(layer.name, layer.module, fol.bn, fol.consumer, fol.consumer_name or ""))
        # (module, kind, attribute) -> original object, for undo.
        self._orig: dict[tuple[int, str, str], tuple[nn.Module, str, str, Any]] = {}

    @property
    def sliceable(self) -> list[str]:
        """Names of the layers whose pruned channels are sliced out during evaluation."""
        return [p.name for p in self.pairs]

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

        for p in self.pairs:
            mask = pruned.get(p.name)
            if mask is None or not bool(mask.any()):
                continue
            keep = (~mask.to("cpu", torch.bool)).nonzero().flatten()
            if keep.numel() == 0:  # keep one (zeroed) channel rather than build empty tensors
                keep = torch.zeros(1, dtype=torch.long)
            keep = keep.to(p.producer.weight.device)
            add(p.producer, "_parameters", "weight", 0, keep)
            add(p.producer, "_parameters", "bias", 0, keep)
            if p.bn is not None:
                for attr in ("weight", "bias"):
                    add(p.bn, "_parameters", attr, 0, keep)
                for attr in ("running_mean", "running_var"):
                    add(p.bn, "_buffers", attr, 0, keep)
            add(p.consumer, "_parameters", "weight", 1, keep)
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

    def __enter__(self) -> Slicer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.undo()
