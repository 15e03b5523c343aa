"""The one structure every pruning criterion returns.

LRP, random, weight magnitude, Taylor ... all produce `ComponentScores`, so the
ranking and curve code never know which criterion made them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

Ranking = Literal["abs", "signed"]


@dataclass
class ComponentScores:
    """Mean score per component, keyed by module name (as in `model.named_modules()`).

    `abs` holds the mean over reference samples of |score|, `signed` the mean of the
    signed score; criteria without a sign store the same tensors in both. Each tensor is
    1-D with one entry per component (conv channel, MLP neuron, attention head) and may
    live on any device.
    """

    abs: dict[str, torch.Tensor]
    signed: dict[str, torch.Tensor]
    criterion: str
    n_samples: int = 0
    meta: dict = field(default_factory=dict)

    def select(self, ranking: Ranking = "abs") -> dict[str, torch.Tensor]:
        """Scores used for ranking: absolute (near-zero first) or signed (most negative first)."""
        if ranking == "abs":
            return self.abs
        if ranking == "signed":
            return self.signed
        raise ValueError(f"ranking must be 'abs' or 'signed', got {ranking!r}")

    def to(self, device: torch.device | str) -> ComponentScores:
        return ComponentScores(
            abs={k: v.to(device) for k, v in self.abs.items()},
            signed={k: v.to(device) for k, v in self.signed.items()},
            criterion=self.criterion,
            n_samples=self.n_samples,
            meta=dict(self.meta),
        )

    def is_finite(self) -> bool:
        return all(bool(torch.isfinite(v).all()) for v in (*self.abs.values(), *self.signed.values()))


class ScoreAccumulator:
    """Running sums of |score| and score per component over batches, kept on the device.

    Criteria that score each sample (LRP on CNNs and ViTs) add one batch of per-sample
    component scores at a time; `result` divides by the number of samples. No host
    synchronisation happens until the caller reads the tensors.
    """

    def __init__(self) -> None:
        self._abs: dict[str, torch.Tensor] = {}
        self._signed: dict[str, torch.Tensor] = {}
        self.n_samples = 0

    def add(self, components: dict[str, torch.Tensor], batch_size: int) -> None:
        """components: module name -> (batch, n_components) scores of one batch."""
        for name, r in components.items():
            a, s = r.abs().sum(0), r.sum(0)
            if name in self._abs:
                self._abs[name] += a
                self._signed[name] += s
            else:
                self._abs[name], self._signed[name] = a, s
        self.n_samples += int(batch_size)

    def result(self, criterion: str, meta: dict | None = None) -> ComponentScores:
        if self.n_samples == 0:
            from pxopt.errors import ConfigError

            raise ConfigError(f"{criterion}: no reference samples (empty batches)")
        n = self.n_samples
        return ComponentScores(
            abs={k: v / n for k, v in self._abs.items()},
            signed={k: v / n for k, v in self._signed.items()},
            criterion=criterion,
            n_samples=n,
            meta=dict(meta or {}),
        )
