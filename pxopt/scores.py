"""The one structure every pruning criterion returns.

LRP, random, weight magnitude, Taylor ... all produce `ComponentScores`, so the
ranking and curve code never know which criterion made them.

How a component's relevance is aggregated before ranking (the `ranking` choice of a
study, `RANKINGS`); R is the relevance of one reference image at the component, the mean
is over the reference images:

- "abs": mean |R_total|, where R_total sums the component's relevance over its positions
  (conv channel: spatial positions; MLP neuron: tokens; head: queries and keys).
  The reference's score for conv channels (spatial sum, then |.|).
- "signed": mean R_total (most negative first).
- "token-abs": mean over images of sum_t |R_t|: |R| per token, then summed over the
  tokens (MLP neuron: per token; head: per query token, R_t being the relevance of the
  head's attention weights of query t summed over the keys). The reference code's score
  for transformer components (pxp/attribute.py) and the default for ViTs. Components
  without tokens (conv channels, the patch embedding, the logits) and criteria that do not
  record tokens give the same values as "abs".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from pxopt.vocab import RANKINGS  # the one list, re-exported

# For type checkers, which cannot read a tuple: tests/test_vocab.py keeps it equal to RANKINGS.
Ranking = Literal["abs", "signed", "token-abs"]


def default_ranking(family: str) -> str:
    """The reference's aggregation: "abs" for CNN channels, "token-abs" for ViT components."""
    return "token-abs" if family == "vit" else "abs"


@dataclass
class ComponentScores:
    """Mean score per component, keyed by module name (as in `model.named_modules()`).

    `abs` holds the mean over reference samples of |score|, `signed` the mean of the
    signed score; criteria without a sign store the same tensors in both. `token_abs` the
    mean of sum_t |score_t| where the criterion records tokens (None: same as `abs`). Each
    tensor is 1-D with one entry per component (conv channel, MLP neuron, attention head)
    and may live on any device. `default_ranking` is what `select()` uses when no ranking
    is named (the reference's aggregation for these components).
    """

    abs: dict[str, torch.Tensor]
    signed: dict[str, torch.Tensor]
    criterion: str
    n_samples: int = 0
    meta: dict = field(default_factory=dict)
    token_abs: dict[str, torch.Tensor] | None = None
    default_ranking: str = "abs"

    def select(self, ranking: str | None = None) -> dict[str, torch.Tensor]:
        """Scores used for ranking (see the module docstring); None: `default_ranking`."""
        ranking = self.default_ranking if ranking is None else ranking
        if ranking == "abs":
            return self.abs
        if ranking == "signed":
            return self.signed
        if ranking == "token-abs":
            return self.abs if self.token_abs is None else self.token_abs
        raise ValueError(f"ranking must be one of {', '.join(map(repr, RANKINGS))}, got {ranking!r}")

    def to(self, device: torch.device | str) -> ComponentScores:
        return ComponentScores(
            abs={k: v.to(device) for k, v in self.abs.items()},
            signed={k: v.to(device) for k, v in self.signed.items()},
            criterion=self.criterion,
            n_samples=self.n_samples,
            meta=dict(self.meta),
            token_abs=None if self.token_abs is None else {k: v.to(device) for k, v in self.token_abs.items()},
            default_ranking=self.default_ranking,
        )

    def is_finite(self) -> bool:
        tensors = (*self.abs.values(), *self.signed.values(), *(self.token_abs or {}).values())
        return all(bool(torch.isfinite(v).all()) for v in tensors)


class ScoreAccumulator:
    """Running sums of |score|, score and sum_t |score_t| per component, kept on the device.

    Criteria that score each sample (LRP on CNNs and ViTs) add one batch of per-sample
    component scores at a time; `result` divides by the number of samples. No host
    synchronisation happens until the caller reads the tensors.
    """

    def __init__(self) -> None:
        self._abs: dict[str, torch.Tensor] = {}
        self._signed: dict[str, torch.Tensor] = {}
        self._token_abs: dict[str, torch.Tensor] = {}
        self.n_samples = 0

    def add(self, components: dict[str, torch.Tensor], batch_size: int,
            token_abs: dict[str, torch.Tensor] | None = None) -> None:
        """components: module name -> (batch, n_components) scores of one batch (summed over
        tokens); token_abs: the same layers' sum over tokens of |score| where they have tokens
        (a layer missing there has none: its |score| is used)."""
        token_abs = token_abs or {}
        for name, r in components.items():
            a, s = r.abs().sum(0), r.sum(0)
            t = token_abs[name].sum(0) if name in token_abs else a
            if name in self._abs:
                self._abs[name] += a
                self._signed[name] += s
                self._token_abs[name] += t
            else:
                self._abs[name], self._signed[name] = a, s
                self._token_abs[name] = t.clone() if t is a else t
        self.n_samples += int(batch_size)

    def result(self, criterion: str, meta: dict | None = None, *,
               default_ranking: str = "abs") -> ComponentScores:
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
            token_abs={k: v / n for k, v in self._token_abs.items()},
            default_ranking=default_ranking,
        )
