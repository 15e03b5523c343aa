"""The search space: which LRP rule (and which parameters) each layer group may take.

Optuna samples flat parameters (`low.rule`, `low.gamma`, `ranking`, ...); this module is
the one place that maps them to and from a `pxopt.rules/1` dict, so the objective, the
baselines enqueued first and the export all agree on what a trial meant.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from pxopt.errors import ConfigError
from pxopt.scores import RANKINGS, default_ranking

GROUPS: tuple[str, ...] = ("input", "low", "mid", "high", "fc")
HIDDEN_RULES: tuple[str, ...] = ("epsilon", "gamma", "alphabeta", "zplus")
INPUT_RULES: tuple[str, ...] = (*HIDDEN_RULES, "flat", "wsquare", "zbox")
SOFTMAX_RULES: tuple[str, ...] = ("attnlrp", "cp", "zplus")
# `ranking` (how a component's relevance is aggregated, `pxopt.scores`): the sort order is
# a hyperparameter of the paper; by default a family searches its reference's absolute
# aggregation and the signed one. "token-abs" needs tokens: transformers only.
DEFAULT_RANKINGS: dict[str, tuple[str, ...]] = {"cnn": ("abs", "signed"), "vit": ("token-abs", "signed")}
FAMILY_RANKINGS: dict[str, tuple[str, ...]] = {"cnn": ("abs", "signed"), "vit": RANKINGS}
RULES_FORMAT = "pxopt.rules/1"

# Default numeric ranges: log-uniform for the stabilisers, uniform for alpha (beta = alpha - 1).
DEFAULT_EPSILON = (1e-9, 1.0)
DEFAULT_GAMMA = (1e-3, 10.0)
DEFAULT_ALPHA = (1.0, 3.0)
BASELINE_EPSILON = 1e-6
BASELINE_GAMMA = 0.25


class TrialLike(Protocol):
    """The part of `optuna.Trial` the space needs (so tests can use a stub)."""

    def suggest_categorical(self, name: str, choices: Any) -> Any: ...

    def suggest_float(self, name: str, low: float, high: float, *, log: bool = False) -> float: ...


def _range(value: Any, default: tuple[float, float], where: str, *, positive: bool) -> tuple[float, float]:
    """A spec value -> (low, high); a scalar fixes the parameter (low == high)."""
    if value is None:
        return default
    if isinstance(value, int | float) and not isinstance(value, bool):
        lo = hi = float(value)
    elif isinstance(value, list | tuple) and len(value) == 2:
        lo, hi = (float(v) for v in value)
    else:
        raise ConfigError(f"{where} must be a number or [low, high], got {value!r}")
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise ConfigError(f"{where} must satisfy low <= high (finite), got {value!r}")
    if positive and lo <= 0:
        raise ConfigError(f"{where} must be > 0, got {value!r}")
    return lo, hi


@dataclass(frozen=True)
class GroupSpace:
    """Allowed rules of one layer group and the ranges of their parameters."""

    rules: tuple[str, ...]
    epsilon: tuple[float, float] = DEFAULT_EPSILON
    gamma: tuple[float, float] = DEFAULT_GAMMA
    alpha: tuple[float, float] = DEFAULT_ALPHA


@dataclass(frozen=True)
class SearchSpace:
    """Everything a trial may vary; build it with `SearchSpace.build` from a study spec."""

    groups: dict[str, GroupSpace]
    rankings: tuple[str, ...] = DEFAULT_RANKINGS["cnn"]
    softmax: tuple[str, ...] | None = None  # None: not a transformer
    zbox_bounds: tuple[float, float] = (-3.0, 3.0)
    meta: dict = field(default_factory=dict)

    # -- construction -------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        narrowing: Mapping[str, Any] | None = None,
        *,
        family: str = "cnn",
        zbox_bounds: tuple[float, float] | None = None,
    ) -> SearchSpace:
        """The full paper space, narrowed or fixed by the study spec's `[space]` table.

        `narrowing` looks like `{"ranking": ["abs"], "softmax": ["cp"], "low": {"rules":
        ["epsilon", "gamma"], "epsilon": [1e-6, 1e-2]}, "fc": {"rules": ["epsilon"],
        "epsilon": 1e-6}}`; a scalar fixes a numeric parameter.
        """
        narrowing = dict(narrowing or {})
        known = {*GROUPS, "ranking", "softmax", "zbox"}
        unknown = sorted(set(narrowing) - known)
        if unknown:
            raise ConfigError(f"space: unknown key {unknown[0]!r} (expected one of {sorted(known)})")
        groups: dict[str, GroupSpace] = {}
        for group in GROUPS:
            allowed = INPUT_RULES if group == "input" else HIDDEN_RULES
            g = dict(narrowing.get(group) or {})
            bad = sorted(set(g) - {"rules", "epsilon", "gamma", "alpha"})
            if bad:
                raise ConfigError(f"space.{group}: unknown key {bad[0]!r}")
            rules = tuple(g.get("rules", allowed))
            if isinstance(g.get("rules"), str):
                rules = (g["rules"],)
            if not rules:
                raise ConfigError(f"space.{group}.rules must not be empty")
            for rule in rules:
                if rule not in allowed:
                    raise ConfigError(
                        f"space.{group}.rules: {rule!r} is not allowed here (choose from {list(allowed)})"
                    )
            alpha = _range(g.get("alpha"), DEFAULT_ALPHA, f"space.{group}.alpha", positive=True)
            if alpha[0] < 1.0:
                raise ConfigError(f"space.{group}.alpha must be >= 1 (beta = alpha - 1 >= 0)")
            groups[group] = GroupSpace(
                rules=rules,
                epsilon=_range(g.get("epsilon"), DEFAULT_EPSILON, f"space.{group}.epsilon", positive=True),
                gamma=_range(g.get("gamma"), DEFAULT_GAMMA, f"space.{group}.gamma", positive=True),
                alpha=alpha,
            )
        if family not in DEFAULT_RANKINGS:
            raise ConfigError(f"unknown model family {family!r} (expected 'cnn' or 'vit')")
        rankings = narrowing.get("ranking", DEFAULT_RANKINGS[family])
        rankings = (rankings,) if isinstance(rankings, str) else tuple(rankings)
        allowed_rankings = FAMILY_RANKINGS[family]
        if not rankings or any(r not in allowed_rankings for r in rankings):
            extra = " ('token-abs' needs tokens: transformers only)" if "token-abs" in rankings else ""
            raise ConfigError(f"space.ranking must be a non-empty subset of {list(allowed_rankings)} "
                              f"for a {family} model{extra}")
        softmax: tuple[str, ...] | None = None
        if family == "vit":
            sm = narrowing.get("softmax", SOFTMAX_RULES)
            softmax = (sm,) if isinstance(sm, str) else tuple(sm)
            if not softmax or any(s not in SOFTMAX_RULES for s in softmax):
                raise ConfigError(f"space.softmax must be a non-empty subset of {list(SOFTMAX_RULES)}")
        elif family != "cnn":
            raise ConfigError(f"unknown model family {family!r} (expected 'cnn' or 'vit')")
        zb = narrowing.get("zbox", zbox_bounds or (-3.0, 3.0))
        zb = _range(list(zb), (-3.0, 3.0), "space.zbox", positive=False)
        if zb[0] >= zb[1]:
            raise ConfigError("space.zbox must be [low, high] with low < high")
        return cls(groups=groups, rankings=rankings, softmax=softmax, zbox_bounds=zb)

    # -- sampling -------------------------------------------------------------------------
    def suggest(self, trial: TrialLike) -> tuple[dict, str]:
        """Sample one configuration: returns (`pxopt.rules/1` dict, ranking)."""
        params: dict[str, Any] = {}
        for group, gs in self.groups.items():
            rule = trial.suggest_categorical(f"{group}.rule", list(gs.rules))
            params[f"{group}.rule"] = rule
            for name in _NUMERIC.get(rule, ()):
                lo, hi = getattr(gs, name)
                key = f"{group}.{name}"
                params[key] = lo if lo == hi else trial.suggest_float(key, lo, hi, log=name != "alpha")
        if self.softmax is not None:
            params["softmax"] = trial.suggest_categorical("softmax", list(self.softmax))
        params["ranking"] = trial.suggest_categorical("ranking", list(self.rankings))
        return self.to_rules(params)

    def to_rules(self, params: Mapping[str, Any]) -> tuple[dict, str]:
        """Flat Optuna parameters -> (`pxopt.rules/1` dict, ranking); pure, used on export too."""
        groups: dict[str, dict] = {}
        for group, gs in self.groups.items():
            rule = params.get(f"{group}.rule", gs.rules[0] if len(gs.rules) == 1 else None)
            if rule is None:
                raise ConfigError(f"trial parameters lack {group}.rule")
            entry: dict[str, Any] = {"rule": rule}
            for name in _NUMERIC.get(rule, ()):
                lo, hi = getattr(gs, name)
                entry[name] = float(params.get(f"{group}.{name}", lo if lo == hi else math.nan))
                if math.isnan(entry[name]):
                    raise ConfigError(f"trial parameters lack {group}.{name}")
            if rule == "alphabeta":
                entry["beta"] = entry["alpha"] - 1.0
            if rule == "zbox":
                entry["low"], entry["high"] = self.zbox_bounds
            groups[group] = entry
        rules: dict[str, Any] = {"format": RULES_FORMAT, "groups": groups}
        if self.softmax is not None:
            rules["softmax"] = params.get("softmax", self.softmax[0])
        ranking = params.get("ranking", self.rankings[0])
        return rules, str(ranking)

    def to_params(self, rules: Mapping[str, Any], ranking: str) -> dict[str, Any]:
        """A rules dict -> flat parameters (to enqueue a known configuration as a trial).

        Raises `ConfigError` when the configuration lies outside this space.
        """
        params: dict[str, Any] = {}
        groups = rules.get("groups", {})
        for group, gs in self.groups.items():
            entry = groups.get(group, {"rule": "epsilon", "epsilon": BASELINE_EPSILON})
            rule = entry["rule"]
            if rule not in gs.rules:
                raise ConfigError(f"rule {rule!r} for group {group!r} is outside the search space")
            params[f"{group}.rule"] = rule
            for name in _NUMERIC.get(rule, ()):
                lo, hi = getattr(gs, name)
                value = float(entry.get(name, lo))
                params[f"{group}.{name}"] = min(max(value, lo), hi)
        if self.softmax is not None:
            sm = rules.get("softmax", self.softmax[0])
            if sm not in self.softmax:
                raise ConfigError(f"softmax {sm!r} is outside the search space")
            params["softmax"] = sm
        if ranking not in self.rankings:
            raise ConfigError(f"ranking {ranking!r} is outside the search space")
        params["ranking"] = ranking
        return params

    def check_resumable(self, trials: Any) -> None:
        """Raise `ConfigError` if earlier trials of a study drew a categorical parameter
        (`<group>.rule`, `softmax`, `ranking`) from other choices: Optuna cannot change them
        within a study (e.g. a ViT study from before "token-abs" was the default ranking)."""
        now: dict[str, tuple[str, ...]] = {f"{g}.rule": gs.rules for g, gs in self.groups.items()}
        if self.softmax is not None:
            now["softmax"] = self.softmax
        now["ranking"] = self.rankings
        for trial in trials:
            for name, dist in trial.distributions.items():
                before = tuple(getattr(dist, "choices", ()))
                if name in now and before and before != tuple(now[name]):
                    key, _, _ = name.partition(".")
                    hint = f"{key} = {{ rules = {list(before)} }}" if "." in name else f"{name} = {list(before)}"
                    raise ConfigError(
                        f"the study drew {name} from {list(before)}, this search space offers "
                        f"{list(now[name])} (Optuna cannot change a parameter's choices within a "
                        f"study): set [space] {hint} to resume it, or use another --study name")

    # -- baselines ------------------------------------------------------------------------
    def baselines(self) -> dict[str, tuple[dict, str]]:
        """The configurations every study starts with (those that fit this space).

        `all-epsilon`: LRP-epsilon everywhere (the paper's strong default);
        `faithful`: the composite known for faithful heatmaps (EpsilonPlusFlat-like:
        flat input, z+ low/mid, epsilon high/fc; gamma where z+ is not allowed).
        """
        eps = {"rule": "epsilon", "epsilon": BASELINE_EPSILON}
        candidates: dict[str, dict] = {
            "all-epsilon": {g: dict(eps) for g in GROUPS},
            "faithful": {
                "input": {"rule": "flat"},
                "low": {"rule": "zplus"},
                "mid": {"rule": "zplus"},
                "high": dict(eps),
                "fc": dict(eps),
            },
        }
        out: dict[str, tuple[dict, str]] = {}
        for name, groups in candidates.items():
            rules: dict[str, Any] = {"format": RULES_FORMAT, "groups": groups}
            for group in ("input", "low", "mid"):
                if groups[group]["rule"] not in self.groups[group].rules:
                    if "gamma" in self.groups[group].rules:
                        groups[group] = {"rule": "gamma", "gamma": BASELINE_GAMMA}
            if self.softmax is not None:
                rules["softmax"] = "attnlrp" if "attnlrp" in self.softmax else self.softmax[0]
            preferred = default_ranking("vit" if self.softmax is not None else "cnn")
            ranking = next((r for r in (preferred, "abs") if r in self.rankings), self.rankings[0])
            try:
                params = self.to_params(rules, ranking)
            except ConfigError:
                continue  # narrowed away: the study simply starts without this baseline
            out[name] = self.to_rules(params)
        return out


_NUMERIC: dict[str, tuple[str, ...]] = {
    "epsilon": ("epsilon",),
    "gamma": ("gamma",),
    "alphabeta": ("alpha",),
}
