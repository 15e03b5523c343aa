"""Where a component's activation lives, so criteria can read, scale and differentiate it.

A `Site` hooks one layer of the layer map and hands its component tensor to a callback
that may return a replacement (used by integrated gradients to scale it):
- conv: the conv output (batch, C, H, W), components on dim 1;
- linear / mlp: the output (batch, [tokens,] F), components on the last dim;
- heads: the concatenated head outputs before the output projection, viewed as
  (batch, tokens, heads, head_dim), read where the model's family says
  (`Family.read_heads`: a forward pre-hook on timm's `attn.proj`, an explicit forward of
  torchvision's fused `nn.MultiheadAttention`, ...).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pxopt.families import heads_family
from pxopt.vocab import CHANNEL_KINDS

Callback = Callable[[Tensor], Tensor | None]


class _Handle:
    def __init__(self, undo: Callable[[], None]):
        self._undo = undo

    def remove(self) -> None:
        self._undo()


@dataclass
class Site:
    """One layer's component tensor: how to reach it and how to reduce it per component."""

    name: str
    kind: str
    n: int
    module: nn.Module
    num_heads: int = 0
    family: Any = None  # the model's family (`Layer.family`); found from the module if None

    def per_component(self, t: Tensor) -> Tensor:
        """(batch, n): sum over everything but batch and component (space, tokens, head dims)."""
        if self.kind == "conv":
            return t.sum(dim=tuple(range(2, t.ndim))) if t.ndim > 2 else t
        if self.kind == "heads":
            b = t.shape[0]
            return t.reshape(b, -1, self.num_heads, t.shape[-1] // self.num_heads).sum(dim=(1, 3))
        return t.reshape(t.shape[0], -1, t.shape[-1]).sum(1)

    def positions(self, t: Tensor) -> int:
        """How many values each component has per sample (for means over positions)."""
        return t[0].numel() // self.n

    def register(self, fn: Callback) -> _Handle:
        mod = self.module
        if self.kind in CHANNEL_KINDS:
            h = mod.register_forward_hook(lambda m, a, out: fn(out))
            return _Handle(h.remove)
        family = self.family if self.family is not None else heads_family(self)
        return _Handle(family.read_heads(self, fn))


def make_sites(layers: list[Any]) -> list[Site]:
    out = []
    for layer in layers:
        family = getattr(layer, "family", None)
        if family is not None:  # the family may read its components elsewhere
            out.append(family.site(layer))
            continue
        heads = getattr(layer.module, "num_heads", 0) if layer.kind == "heads" else 0
        out.append(Site(layer.name, layer.kind, int(layer.n_components), layer.module, int(heads)))
    return out


def to_grad_input(x: Tensor) -> Tensor:
    """A leaf copy of the inputs that requires grad (inference tensors cannot)."""
    x = x.detach()
    if x.is_inference():
        x = x.clone()
    return x.requires_grad_(True)


def target_logits(out: Tensor, labels: Tensor, objective: str) -> Tensor:
    """Scalar whose gradient is each sample's: sum of target logits, or the summed CE loss."""
    if objective == "logit":
        return out.gather(1, labels.long().view(-1, 1)).sum()
    if objective == "loss":
        return -F.cross_entropy(out, labels.long(), reduction="sum")
    raise ValueError(objective)


def assert_finite(name: str, t: torch.Tensor) -> None:
    from pxopt.errors import NonFiniteRelevanceError

    if not bool(torch.isfinite(t).all()):
        raise NonFiniteRelevanceError(f"criterion {name}: scores became NaN or infinite")
