"""Pruning criteria besides optimised LRP, all returning `ComponentScores`.

    scores = compute_scores("taylor", model, task.reference_batches(64, device), layer_map)

`CRITERIA` is the one list of names; the CLI (`pxopt baselines --criteria`), the results
benchmark and the library all check names against it (`check_criteria`). This module
imports no torch, so the CLI can read the names without loading it; `compute_scores`
lives in `pxopt.criteria.compute` and is imported on first use.

Names (score per component: conv channel, MLP neuron or attention head):
- random: seeded uniform random scores;
- weight: L1 norm of the component's own weights (a filter, a neuron's incoming row, a
  head's q/k/v rows), raw;
- weight-norm: `weight` divided by its layer's mean;
- weight-l2-norm: sum of squared weights (Torch-Pruning's p=2 magnitude, no square root)
  divided by its layer's mean;
- activation: mean |output| of the component, raw; activation-norm: over the layer's mean;
- gradient: d(target)/d(output), summed over positions;
- taylor: output x gradient summed over positions, |.| per sample (Molchanov et al. 2017),
  raw; taylor-norm: over the layer's mean;
- ig: integrated gradients of the layer output (baseline 0);
- yeom-zplus: LRP z+ relevance divided by its layer's L1 norm (Yeom et al. 2021);
- lrp-epsilon: LRP epsilon relevance, raw (conserved relevance needs no normalisation).

`-norm` forms: every score of a layer (abs and signed) is divided by the mean of the
layer's |scores|, so each layer's mean is 1 before the global ranking. Raw weight norms
and activations are not comparable across layers (BatchNorm rescales freely), and the
global ranking of the raw forms can empty a whole layer at the first pruning rates;
dividing by the layer mean is Torch-Pruning's default normaliser (`normalizer="mean"` of
`MagnitudeImportance` / `TaylorImportance`, torch_pruning/pruner/importance.py).
`kinds` limits the layers (default: every prunable kind of the layer map); the classifier
is never scored. The model is left as it was (eval mode during scoring, flags restored).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from pxopt.errors import ConfigError

if TYPE_CHECKING:
    from pxopt.criteria.compute import compute_scores

# Order: raw before its normalised form, cheap before expensive, LRP last.
CRITERIA: tuple[str, ...] = (
    "random", "weight", "weight-norm", "weight-l2-norm", "activation", "activation-norm", "gradient",
    "taylor", "taylor-norm", "ig", "yeom-zplus", "lrp-epsilon",
)

# The layer-mean-normalised forms and what they normalise: (criterion, its options).
LAYER_MEAN_NORMALISED: dict[str, tuple[str, dict[str, Any]]] = {
    "weight-norm": ("weight", {"p": 1}),
    "weight-l2-norm": ("weight", {"p": 2}),
    "activation-norm": ("activation", {}),
    "taylor-norm": ("taylor", {}),
}


def check_criteria(names: Iterable[str], *, what: str = "criterion") -> tuple[str, ...]:
    """The names, stripped, each checked against `CRITERIA` (ConfigError naming the first bad one)."""
    out = tuple(n.strip() for n in names if n.strip())
    if not out:
        raise ConfigError(f"{what}: empty list (choose from {', '.join(CRITERIA)})")
    for n in out:
        if n not in CRITERIA:
            raise ConfigError(f"{what}: unknown criterion {n!r}; choose from {', '.join(CRITERIA)}")
    return out


def __getattr__(name: str) -> Any:
    if name == "compute_scores":
        from pxopt.criteria import compute

        return compute.compute_scores
    raise AttributeError(f"module 'pxopt.criteria' has no attribute {name!r}")


__all__ = ["CRITERIA", "LAYER_MEAN_NORMALISED", "check_criteria", "compute_scores"]
