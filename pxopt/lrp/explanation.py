"""The result type of every LRP engine, and the starting relevance at the logits (a leaf
module: the engines and the families import it, it imports none of them)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from pxopt.errors import ConfigError


@dataclass
class Explanation:
    """Relevance of the inputs (`input`, like the inputs), of each component
    (`components`: module name -> (batch, n_components), summed over positions / tokens)
    and the model's logits (`output`).

    Transformer layers also give `token_abs` (module name -> (batch, n_components), the sum
    over tokens of |R|, see `pxopt.scores`) and, when asked for, `tokens` (module name ->
    (batch, tokens, n_components)). CNN layers have neither.
    """

    input: Tensor
    components: dict[str, Tensor]
    output: Tensor
    token_abs: dict[str, Tensor] = field(default_factory=dict)
    tokens: dict[str, Tensor] | None = None


def seed_relevance(output: Tensor, targets: Tensor | Sequence[int] | int | None, start: str) -> Tensor:
    """Initial relevance at the logits."""
    if output.ndim != 2:
        raise ConfigError(f"explain: the model must return logits (batch, classes), got {tuple(output.shape)}")
    if start == "predicted":
        idx = output.argmax(1)
    elif start in ("target", "logit"):
        if targets is None:
            raise ConfigError(f"start={start!r} needs targets (class indices)")
        idx = torch.as_tensor(targets, device=output.device).long().reshape(-1)
        if idx.numel() == 1 and output.shape[0] > 1:
            idx = idx.expand(output.shape[0])
        if idx.shape[0] != output.shape[0]:
            raise ConfigError(f"targets: {idx.shape[0]} labels for a batch of {output.shape[0]}")
    else:
        raise ConfigError(f"start: expected 'target', 'predicted' or 'logit', got {start!r}")
    seed = torch.zeros_like(output)
    seed.scatter_(1, idx[:, None], 1.0)
    if start == "logit":
        seed = seed * output.detach()
    return seed


_seed = seed_relevance  # the name the engines used before
