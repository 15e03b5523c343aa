"""The search space: which LRP rule (and which parameters) each layer group may take.

Optuna samples flat parameters (`low.rule`, `low.gamma`, `ranking`, ...); this module is
the one place that maps them to and from a `pxopt.rules/1` dict, so the objective, the
baselines enqueued first and the export all agree on what a trial meant.

The rules, their parameters and default ranges come from the rule registry
(`pxopt.lrp.registry`): a rule registered with `search=True` joins every group's choices,
its parameters with a `search` range are sampled (log-uniformly where `log`), and derived
ones (AlphaBeta's beta = alpha - 1) are computed.

The first layer's rule (group `input`) is not searched: a layer's component relevance is
read at its output, before its own rule applies, so the input rule never reaches a score
(tests/test_input_group.py shows the scores are bit-identical under different input
rules). Sampling it would spend the sampler's budget on a no-op. Every configuration the
space makes gives the first layer the `low` group's rule, as the reference code does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from pxopt.errors import ConfigError
from pxopt.lrp.registry import (
    DEFAULT_SOFTMAX,
    RULES,
    SOFTMAX_RULES,
    get_rule,
    parse_params,
    searched_rules,
)
from pxopt.scores import default_ranking
from pxopt.vocab import (
    DEFAULT_RANKINGS,
    FAMILY_RANKINGS,
    GROUPS,
    INPUT_FOLLOWS,
    INPUT_GROUP,
    RANKINGS,
    SEARCHED_GROUPS,
)

RULES_FORMAT = "pxopt.rules/1"
# The baselines' numbers: LRP-epsilon's usual stabiliser and zennit's default gamma.
BASELINE_EPSILON = 1e-6
BASELINE_GAMMA = 0.25

__all__ = ["GROUPS", "RANKINGS", "SEARCHED_GROUPS", "GroupSpace", "SearchSpace", "TrialLike"]


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


def _complete(rule: str, sampled: Mapping[str, float]) -> dict[str, Any]:
    """A rules-dict entry from the sampled parameters: derived ones added, nothing else."""
    entry: dict[str, Any] = {"rule": rule, **{k: float(v) for k, v in sampled.items()}}
    for p in RULES[rule].params:
        if p.derive is not None:
            entry[p.name] = float(p.derive(entry))
    return entry


def _check_ends(group: str, rule: str, ranges: Mapping[str, tuple[float, float]]) -> None:
    """Raise unless both ends of each sampled range of `rule` make a valid rule (e.g. alpha
    >= 1, so that the derived beta = alpha - 1 is >= 0)."""
    sampled = RULES[rule].sampled
    for p in sampled:
        for value in sorted(set(ranges[p.name])):
            entry = _complete(rule, {q.name: value if q is p else ranges[q.name][0] for q in sampled})
            del entry["rule"]
            try:
                parse_params(RULES[rule], entry, f"space.{group}")
            except ConfigError as exc:
                raise ConfigError(
                    f"space.{group}.{p.name}: {value:g} gives an invalid {rule} rule ({exc})") from None


@dataclass(frozen=True)
class GroupSpace:
    """Allowed rules of one layer group and the ranges of their sampled parameters."""

    rules: tuple[str, ...]
    ranges: Mapping[str, tuple[float, float]] = field(default_factory=dict)

    def range(self, param: str) -> tuple[float, float]:
        return self.ranges[param]


@dataclass(frozen=True)
class SearchSpace:
    """Everything a trial may vary; build it with `SearchSpace.build` from a study spec."""

    groups: dict[str, GroupSpace]
    rankings: tuple[str, ...] = DEFAULT_RANKINGS["cnn"]
    softmax: tuple[str, ...] | None = None  # None: not a transformer
    meta: dict = field(default_factory=dict)

    # -- construction -------------------------------------------------------------------
    @classmethod
    def build(cls, narrowing: Mapping[str, Any] | None = None, *, family: str = "cnn") -> SearchSpace:
        """The full paper space, narrowed or fixed by the study spec's `[space]` table.

        `narrowing` looks like `{"ranking": ["abs"], "softmax": ["cp"], "low": {"rules":
        ["epsilon", "gamma"], "epsilon": [1e-6, 1e-2]}, "fc": {"rules": ["epsilon"],
        "epsilon": 1e-6}}`; a scalar fixes a numeric parameter.
        """
        narrowing = dict(narrowing or {})
        if INPUT_GROUP in narrowing:
            raise ConfigError(
                f"space.{INPUT_GROUP}: the first layer's rule is not searched, because it never "
                "changes a component's score (a layer's relevance is read before its own rule "
                f"applies); pruning studies give it the {INPUT_FOLLOWS} group's rule")
        known = {*SEARCHED_GROUPS, "ranking", "softmax"}
        unknown = sorted(set(narrowing) - known)
        if unknown:
            raise ConfigError(f"space: unknown key {unknown[0]!r} (expected one of {sorted(known)})")
        allowed = searched_rules()
        params = {p.name: p for name in allowed for p in RULES[name].sampled}
        groups: dict[str, GroupSpace] = {}
        for group in SEARCHED_GROUPS:
            g = dict(narrowing.get(group) or {})
            bad = sorted(set(g) - {"rules", *params})
            if bad:
                raise ConfigError(f"space.{group}: unknown key {bad[0]!r} (expected rules, {', '.join(params)})")
            rules = (g["rules"],) if isinstance(g.get("rules"), str) else tuple(g.get("rules", allowed))
            if not rules:
                raise ConfigError(f"space.{group}.rules must not be empty")
            for rule in rules:
                if rule not in allowed:
                    raise ConfigError(
                        f"space.{group}.rules: {rule!r} is not allowed here (choose from {list(allowed)})"
                    )
            ranges = {
                name: _range(g.get(name), p.search, f"space.{group}.{name}", positive=p.log)
                for name, p in params.items()
            }
            for rule in rules:  # each end of every sampled range must give a valid rule
                _check_ends(group, rule, ranges)
            groups[group] = GroupSpace(rules=rules, ranges=ranges)
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
        return cls(groups=groups, rankings=rankings, softmax=softmax)

    # -- sampling -------------------------------------------------------------------------
    def suggest(self, trial: TrialLike) -> tuple[dict, str]:
        """Sample one configuration: returns (`pxopt.rules/1` dict, ranking)."""
        params: dict[str, Any] = {}
        for group, gs in self.groups.items():
            rule = trial.suggest_categorical(f"{group}.rule", list(gs.rules))
            params[f"{group}.rule"] = rule
            for p in get_rule(rule).sampled:
                lo, hi = gs.range(p.name)
                key = f"{group}.{p.name}"
                params[key] = lo if lo == hi else trial.suggest_float(key, lo, hi, log=p.log)
        if self.softmax is not None:
            params["softmax"] = trial.suggest_categorical("softmax", list(self.softmax))
        params["ranking"] = trial.suggest_categorical("ranking", list(self.rankings))
        return self.to_rules(params)

    def to_rules(self, params: Mapping[str, Any]) -> tuple[dict, str]:
        """Flat Optuna parameters -> (`pxopt.rules/1` dict, ranking); pure, used on export too.

        The `input` group gets a copy of the `low` group's rule; parameters of the input
        group in `params` (from trials of studies made before it left the space) are ignored.
        """
        groups: dict[str, dict] = {}
        for group, gs in self.groups.items():
            rule = params.get(f"{group}.rule", gs.rules[0] if len(gs.rules) == 1 else None)
            if rule is None:
                raise ConfigError(f"trial parameters lack {group}.rule")
            sampled: dict[str, float] = {}
            for p in get_rule(rule).sampled:
                lo, hi = gs.range(p.name)
                sampled[p.name] = float(params.get(f"{group}.{p.name}", lo if lo == hi else math.nan))
                if math.isnan(sampled[p.name]):
                    raise ConfigError(f"trial parameters lack {group}.{p.name}")
            groups[group] = _complete(rule, sampled)
        ordered = {g: dict(groups[INPUT_FOLLOWS if g == INPUT_GROUP else g]) for g in GROUPS}
        rules: dict[str, Any] = {"format": RULES_FORMAT, "groups": ordered}
        if self.softmax is not None:
            rules["softmax"] = params.get("softmax", self.softmax[0])
        ranking = params.get("ranking", self.rankings[0])
        return rules, str(ranking)

    def to_params(self, rules: Mapping[str, Any], ranking: str) -> dict[str, Any]:
        """A rules dict -> flat parameters (to enqueue a known configuration as a trial).

        Raises `ConfigError` when the configuration lies outside this space. The `input`
        group is not a parameter: whatever it holds, the trial runs with the low group's.
        """
        params: dict[str, Any] = {}
        groups = rules.get("groups", {})
        for group, gs in self.groups.items():
            entry = groups.get(group, {"rule": "epsilon", "epsilon": BASELINE_EPSILON})
            rule = entry["rule"]
            if rule not in gs.rules:
                raise ConfigError(f"rule {rule!r} for group {group!r} is outside the search space")
            params[f"{group}.rule"] = rule
            for p in get_rule(rule).sampled:
                lo, hi = gs.range(p.name)
                value = float(entry.get(p.name, p.default if p.default is not None else lo))
                params[f"{group}.{p.name}"] = min(max(value, lo), hi)
        if self.softmax is not None:
            sm = rules.get("softmax", DEFAULT_SOFTMAX if DEFAULT_SOFTMAX in self.softmax else self.softmax[0])
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
        `faithful`: the composite known for faithful heatmaps (EpsilonPlusFlat-like: z+
        low/mid, epsilon high/fc; gamma where z+ is not allowed). Its flat input rule is
        left out: the first layer takes the low group's rule, which gives the same scores.
        """
        eps = {"rule": "epsilon", "epsilon": BASELINE_EPSILON}
        candidates: dict[str, dict] = {
            "all-epsilon": {g: dict(eps) for g in SEARCHED_GROUPS},
            "faithful": {
                "low": {"rule": "zplus"},
                "mid": {"rule": "zplus"},
                "high": dict(eps),
                "fc": dict(eps),
            },
        }
        out: dict[str, tuple[dict, str]] = {}
        for name, groups in candidates.items():
            rules: dict[str, Any] = {"format": RULES_FORMAT, "groups": groups}
            for group in ("low", "mid"):
                if groups[group]["rule"] not in self.groups[group].rules:
                    if "gamma" in self.groups[group].rules:
                        groups[group] = {"rule": "gamma", "gamma": BASELINE_GAMMA}
            if self.softmax is not None:
                rules["softmax"] = DEFAULT_SOFTMAX if DEFAULT_SOFTMAX in self.softmax else self.softmax[0]
            preferred = default_ranking("vit" if self.softmax is not None else "cnn")
            ranking = next((r for r in (preferred, "abs") if r in self.rankings), self.rankings[0])
            try:
                params = self.to_params(rules, ranking)
            except ConfigError:
                continue  # narrowed away: the study simply starts without this baseline
            out[name] = self.to_rules(params)
        return out
