"""Where a component's activation lives, so criteria can read, scale and differentiate it.

A `Site` hooks one layer of the layer map and hands its component tensor to a callback
that may return a replacement (used by integrated gradients to scale it):
- conv: the conv output (batch, C, H, W), components on dim 1;
- linear / mlp: the output (batch, [tokens,] F), components on the last dim;
- heads: the concatenated head outputs before the output projection, viewed as
  (batch, tokens, heads, head_dim): a forward pre-hook on timm's `attn.proj`, or an
  explicit forward for torchvision's fused `nn.MultiheadAttention` (self-attention,
  batch_first, no masks: what torchvision's ViT uses).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pxopt.errors import UnsupportedLayerError

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
        if self.kind in ("conv", "linear", "mlp"):
            h = mod.register_forward_hook(lambda m, a, out: fn(out))
            return _Handle(h.remove)
        if isinstance(mod, nn.MultiheadAttention):
            return _patch_mha(mod, fn, self.name)
        from pxopt.families import swin  # windowed heads: per-image regrouping (lazy import)

        if swin.is_window_attention(mod):
            return _Handle(swin.read_heads_module(mod, fn, self.name))
        proj = getattr(mod, "proj", None)
        if isinstance(proj, nn.Module):
            def pre(m: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
                new = fn(args[0])
                return None if new is None else (new, *args[1:])

            h = proj.register_forward_pre_hook(pre)
            return _Handle(h.remove)
        raise UnsupportedLayerError(
            f"cannot read head outputs of {self.name} ({type(mod).__name__}): expected timm Attention"
            " (attn.proj) or nn.MultiheadAttention"
        )


def _patch_mha(mha: nn.MultiheadAttention, fn: Callback, name: str) -> _Handle:
    if not (mha.batch_first and mha._qkv_same_embed_dim):
        raise UnsupportedLayerError(
            f"{name}: only batch_first self-attention with a fused in_proj is supported for head criteria"
        )
    h, e = mha.num_heads, mha.embed_dim
    hd = e // h

    def forward(query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None,
                average_attn_weights: bool = True, is_causal: bool = False) -> tuple[Tensor, None]:
        if key is not query or value is not query or key_padding_mask is not None or attn_mask is not None:
            raise UnsupportedLayerError(f"{name}: head criteria need plain self-attention without masks")
        b, n, _ = query.shape
        qkv = F.linear(query, mha.in_proj_weight, mha.in_proj_bias)
        q, k, v = qkv.reshape(b, n, 3, h, hd).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=is_causal)
        o = o.transpose(1, 2).reshape(b, n, e)
        new = fn(o)
        o = o if new is None else new
        return F.linear(o, mha.out_proj.weight, mha.out_proj.bias), None

    mha.forward = forward  # instance attribute shadows the class method; removed on undo

    def undo() -> None:
        if "forward" in mha.__dict__:
            del mha.__dict__["forward"]

    return _Handle(undo)


def make_sites(layers: list[Any]) -> list[Site]:
    out = []
    for layer in layers:
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
