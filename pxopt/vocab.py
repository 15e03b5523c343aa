"""The shared vocabulary, defined once: layer groups, groupings, component kinds, rankings,
pruning rates and the per-rate callback type.

Every package imports these names from here instead of keeping its own copy (the LRP rules
and softmax treatments have their own registry, `pxopt.lrp.registry`). The module imports
nothing heavy, so any package may use it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from pxopt.errors import ConfigError

# ---- layer groups -----------------------------------------------------------------------
# A rule configuration picks one rule per group. `input` is the first layer (its rule shapes
# heatmaps only), `low` / `mid` / `high` the hidden layers by stage, `fc` the classifier.
GROUPS: tuple[str, ...] = ("input", "low", "mid", "high", "fc")
INPUT_GROUP = "input"
HIDDEN_GROUPS: tuple[str, ...] = ("low", "mid", "high")
# In pruning studies the first layer takes this group's rule (as in the reference code):
# its own rule never reaches a component score, so it is not searched.
INPUT_FOLLOWS = "low"
# The groups a pruning study searches a rule for.
SEARCHED_GROUPS: tuple[str, ...] = tuple(g for g in GROUPS if g != INPUT_GROUP)

# ---- groupings: how hidden layers are split into low / mid / high ------------------------
# "stage": by the network's stages, as the reference code groups them (ResNet conv1+layer1 /
# layer2+layer3 / layer4; VGG-16 convs 1-4 / 5-9 / 10-13; ViT blocks by quarters);
# "count": by position among the hidden layers (first quarter / middle half / last quarter),
# the grouping of pxopt before stages (and of every study made before the option existed).
GROUPINGS: tuple[str, ...] = ("stage", "count")
DEFAULT_GROUPING = "stage"
LEGACY_GROUPING = "count"

# ---- component kinds --------------------------------------------------------------------
# Layer kinds of a layer map; "head" is the classifier, never pruned.
LAYER_KINDS: tuple[str, ...] = ("conv", "linear", "mlp", "heads", "head")
PRUNABLE_KINDS: tuple[str, ...] = tuple(k for k in LAYER_KINDS if k != "head")
# Kinds whose components are the output channels / neurons of a conv or linear layer (read
# at the layer's output, sliced as weight rows); "heads" are read inside the attention.
CHANNEL_KINDS: tuple[str, ...] = ("conv", "linear", "mlp")
# What a transformer explanation records when no kinds are asked for.
TRANSFORMER_KINDS: tuple[str, ...] = ("heads", "mlp")
# A study's `components` -> the layer kinds whose components it prunes.
COMPONENTS: dict[str, tuple[str, ...]] = {
    "conv": ("conv",),
    "mlp": ("mlp",),
    "heads": ("heads",),
}
# `components = "auto"`: decided by the model's layer map (`pxopt.search.components`).
AUTO_COMPONENTS = "auto"

# ---- ranking: how component scores are aggregated and sorted (`pxopt.scores`) -----------
# "abs": |sum over positions| (the reference's score for conv channels), "signed": the sum,
# "token-abs": sum over tokens of |R| (the reference's score for transformer components).
RANKINGS: tuple[str, ...] = ("abs", "signed", "token-abs")
# The rankings a model family may use, and those its studies search by default: the sort
# order is a hyperparameter of the paper, so a family searches its reference's absolute
# aggregation and the signed one. "token-abs" needs tokens: transformers only.
FAMILY_RANKINGS: dict[str, tuple[str, ...]] = {"cnn": ("abs", "signed"), "vit": RANKINGS}
DEFAULT_RANKINGS: dict[str, tuple[str, ...]] = {"cnn": ("abs", "signed"), "vit": ("token-abs", "signed")}

# ---- pruning rates ----------------------------------------------------------------------
DEFAULT_RATES: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(20))

# ---- held-out split ----------------------------------------------------------------------
#: Held-out images per task when a study does not say (fewer where the dataset has fewer;
#: 0: none): `pxopt.data.heldout`, evaluated by `pxopt.search.heldout`.
DEFAULT_N_HELDOUT = 300

# on_rate(index, rate, accuracy): called after each rate of a curve; may raise (e.g.
# optuna.TrialPruned) to stop the curve.
OnRate = Callable[[int, float, float], None]


def check_rates(rates: Any) -> list[float]:
    """Pruning rates: a non-empty, strictly increasing list in [0, 1).

    Rate 1 is excluded: it prunes every component of the kind, so all criteria give the same
    (dead) model and the point says nothing about the ranking; the paper's grid ends at 0.95.
    """
    if isinstance(rates, str | bytes):
        raise ConfigError(f"rates must be a list of numbers, got {rates!r}")
    try:
        values = [float(r) for r in rates]
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"rates must be a list of numbers, got {rates!r}") from exc
    if not values:
        raise ConfigError("rates must contain at least one pruning rate")
    if not all(map(_in_rate_range, values)):
        raise ConfigError(f"rates must lie in [0, 1), got {values}")
    if any(b <= a for a, b in zip(values, values[1:], strict=False)):
        raise ConfigError(f"rates must be strictly increasing, got {values}")
    return values


def _in_rate_range(rate: float) -> bool:
    return not math.isnan(rate) and 0.0 <= rate < 1.0


def check_rate(rate: Any, where: str = "rate") -> float:
    """One pruning rate of a curve or an export, in [0, 1) like `check_rates`.

    (`pxopt.prune.count_at` takes [0, 1]: the library may mask every component, e.g. to
    measure how much a kind matters; a curve point or an exported model may not.)
    """
    try:
        value = float(rate)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where} must be a number, got {rate!r}") from exc
    if not _in_rate_range(value):
        raise ConfigError(f"{where} must be in [0, 1), got {rate}")
    return value


def check_choice(value: Any, choices: Sequence[str], where: str) -> str:
    """`value` if it is one of `choices`, else a `ConfigError` naming `where`."""
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{where} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value
