"""Which tensor slices silence a component: the generic pieces families build masks from.

- `channel_targets`: a conv / linear output channel: its weight row and bias, and the
  channel of the BatchNorm that follows it (affine parameters, or the running mean of a
  non-affine one, so BN's shift cannot leak a constant);
- `value_rows`: an attention head: its rows of the value projection (and their bias), so
  the head's output A @ V is exactly zero whatever the attention weights are. Each family
  says where its value projection lives (`Family.head_targets`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pxopt.errors import UnsupportedLayerError
from pxopt.families.base import IndexMap, Target
from pxopt.prune.graph import find_following

__all__ = ["Target", "channel_targets", "head_rows", "identity", "value_rows"]


def identity(idx: torch.Tensor) -> torch.Tensor:
    return idx


def head_rows(offset: int, head_dim: int) -> IndexMap:
    """Component (head) indices -> the rows offset + head * head_dim + [0, head_dim)."""
    def rows(heads: torch.Tensor) -> torch.Tensor:
        base = offset + heads.unsqueeze(1) * head_dim
        return (base + torch.arange(head_dim, device=heads.device)).flatten()

    return rows


def value_rows(weight: torch.Tensor, bias: torch.Tensor | None, offset: int,
               head_dim: int) -> list[Target]:
    """The value rows of every head in a (packed) projection whose value section starts at
    row `offset`, and the same entries of its bias."""
    out = [Target(weight, 0, head_rows(offset, head_dim))]
    if bias is not None:
        out.append(Target(bias, 0, head_rows(offset, head_dim)))
    return out


def channel_targets(model: nn.Module, layer: Any) -> list[Target]:
    """Tensors to zero so that a Conv2d / Linear layer's output channels are exactly zero."""
    mod = layer.module
    if not isinstance(mod, (nn.Conv2d, nn.Linear)):
        raise UnsupportedLayerError(
            f"cannot mask {layer.name} ({type(mod).__name__}) as kind {layer.kind!r}: expected Conv2d or Linear"
        )
    tg = [Target(mod.weight, 0, identity)]
    if mod.bias is not None:
        tg.append(Target(mod.bias, 0, identity))
    fol = find_following(model, layer.name, layer.n_components)
    if fol.bn is not None:
        if fol.bn.weight is not None:
            tg.append(Target(fol.bn.weight, 0, identity))
        if fol.bn.bias is not None:
            tg.append(Target(fol.bn.bias, 0, identity))
        if fol.bn.weight is None and fol.bn.bias is None:
            # Non-affine BN: its output is -mean/std for a zero channel; pin it to zero by
            # making mean 0 (the running mean is a buffer and restored like a parameter).
            tg.append(Target(fol.bn.running_mean, 0, identity))
    return tg
