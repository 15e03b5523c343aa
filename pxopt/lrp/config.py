"""Rule configuration: which LRP rule each layer group (or named layer) gets.

One JSON-serialisable, versioned format (`pxopt.rules/1`) used everywhere: search trials,
export, import, CLI. Example::

    {"format": "pxopt.rules/1",
     "groups": {"input": {"rule": "zbox", "low": -3.0, "high": 3.0},
                "low":   {"rule": "gamma", "gamma": 0.25},
                "mid":   {"rule": "alphabeta", "alpha": 2.0, "beta": 1.0},
                "high":  {"rule": "epsilon", "epsilon": 1e-6},
                "fc":    {"rule": "epsilon", "epsilon": 1e-6}},
     "softmax": "attnlrp",
     "overrides": {"layer4.2.conv3": {"rule": "zplus"}}}

The rules, their parameters and defaults come from `pxopt.lrp.registry`, the groups from
`pxopt.vocab`. Missing groups take the default (epsilon 1e-6); missing numeric parameters
take the defaults of zennit 0.5.1 (gamma 0.25, alpha 2 / beta 1), except ZBox bounds, which
depend on the input normalisation and are therefore required. Every invalid entry raises
`ConfigError` naming the field (`groups.mid.alpha`, `overrides.fc.rule`, ...).

The `input` group is the first layer's rule. It changes the relevance that reaches the
input (heatmaps), never a component's score: a layer's component relevance is read at its
output, before its own rule applies. Pruning studies therefore do not search it and give
the first layer the `low` group's rule (`pxopt.search.space`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pxopt.errors import ConfigError
from pxopt.lrp.registry import DEFAULT_SOFTMAX, SOFTMAX_RULES, STABILIZER, get_rule, parse_params
from pxopt.vocab import GROUPS

__all__ = ["DEFAULT_RULE", "FORMAT", "GROUPS", "SOFTMAX_RULES", "STABILIZER", "RuleConfig", "RuleSpec"]

FORMAT = "pxopt.rules/1"


@dataclass(frozen=True)
class RuleSpec:
    """One rule with its parameters (hashable, so rules can key caches)."""

    name: str
    params: tuple[tuple[str, Any], ...] = ()

    def __getitem__(self, key: str) -> Any:
        return dict(self.params)[key]

    def get(self, key: str, default: Any = None) -> Any:
        return dict(self.params).get(key, default)

    @classmethod
    def from_dict(cls, d: Any, where: str = "rule") -> RuleSpec:
        if isinstance(d, RuleSpec):
            return d
        if isinstance(d, str):  # shorthand: "zplus"
            d = {"rule": d}
        if not isinstance(d, Mapping):
            raise ConfigError(f"{where}: expected an object like {{'rule': 'epsilon'}}, got {d!r}")
        rule = get_rule(d.get("rule"), f"{where}.rule")
        params = parse_params(rule, {k: v for k, v in d.items() if k != "rule"}, where)
        return cls(rule.name, tuple(sorted(params.items())))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rule": self.name}
        for key, value in self.params:
            out[key] = list(value) if isinstance(value, tuple) else value
        return out


DEFAULT_RULE = RuleSpec.from_dict({"rule": "epsilon", "epsilon": 1e-6})


@dataclass(frozen=True)
class RuleConfig:
    """Rules per layer group, optional per-layer overrides and the ViT softmax treatment."""

    groups: Mapping[str, RuleSpec] = field(default_factory=lambda: {g: DEFAULT_RULE for g in GROUPS})
    softmax: str = DEFAULT_SOFTMAX
    overrides: Mapping[str, RuleSpec] = field(default_factory=dict)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Any) -> RuleConfig:
        if isinstance(d, RuleConfig):
            return d
        if not isinstance(d, Mapping):
            raise ConfigError(f"rule config: expected a JSON object, got {type(d).__name__}")
        unknown = set(d) - {"format", "groups", "softmax", "overrides"}
        if unknown:
            raise ConfigError(f"{sorted(unknown)[0]}: unknown field in rule config")
        fmt = d.get("format", FORMAT)
        if fmt != FORMAT:
            raise ConfigError(f"format: expected {FORMAT!r}, got {fmt!r}")
        groups_in = d.get("groups", {})
        if not isinstance(groups_in, Mapping):
            raise ConfigError("groups: expected an object mapping group name -> rule")
        groups: dict[str, RuleSpec] = {}
        for g in groups_in:
            if g not in GROUPS:
                raise ConfigError(f"groups.{g}: unknown group; choose from {', '.join(GROUPS)}")
        for g in GROUPS:
            groups[g] = (
                RuleSpec.from_dict(groups_in[g], f"groups.{g}") if g in groups_in else DEFAULT_RULE
            )
        softmax = d.get("softmax", DEFAULT_SOFTMAX)
        if softmax not in SOFTMAX_RULES:
            raise ConfigError(f"softmax: unknown {softmax!r}; choose one of {', '.join(SOFTMAX_RULES)}")
        over_in = d.get("overrides", {}) or {}
        if not isinstance(over_in, Mapping):
            raise ConfigError("overrides: expected an object mapping module name -> rule")
        overrides = {}
        for name, spec in over_in.items():
            if not isinstance(name, str) or not name:
                raise ConfigError(f"overrides: module names must be non-empty strings, got {name!r}")
            overrides[name] = RuleSpec.from_dict(spec, f"overrides.{name}")
        return cls(groups=groups, softmax=softmax, overrides=overrides)

    @classmethod
    def from_json(cls, s: str) -> RuleConfig:
        try:
            data = json.loads(s)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"rule config: invalid JSON ({exc.msg} at line {exc.lineno})") from exc
        return cls.from_dict(data)

    @classmethod
    def uniform(cls, rule: Mapping[str, Any] | str | RuleSpec, **kw: Any) -> RuleConfig:
        """The same rule in every group (e.g. all-Epsilon, all-ZPlus)."""
        spec = RuleSpec.from_dict(rule, "rule")
        return cls.from_dict({"groups": {g: spec.to_dict() for g in GROUPS}, **kw})

    @classmethod
    def coerce(cls, value: Any) -> RuleConfig:
        """Accept a RuleConfig, a dict, a JSON string or None (the default config)."""
        if value is None:
            return cls()
        if isinstance(value, str):
            return cls.from_json(value)
        return cls.from_dict(value)

    # ---- serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "groups": {g: self.groups[g].to_dict() for g in GROUPS},
            "softmax": self.softmax,
            "overrides": {k: v.to_dict() for k, v in sorted(self.overrides.items())},
        }

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=indent is None)

    def digest(self) -> str:
        """Stable short hash of the content (caches relevances across trials)."""
        canon = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()[:16]

    # ---- lookup -------------------------------------------------------------------------
    def rule_for(self, name: str, group: str) -> RuleSpec:
        """The rule of module `name` in layer group `group` (an override wins)."""
        if name in self.overrides:
            return self.overrides[name]
        try:
            return self.groups[group]
        except KeyError:
            raise ConfigError(f"groups.{group}: unknown group for layer {name!r}") from None

    def check_overrides(self, known: set[str]) -> None:
        """Overrides must name real layers (catches typos that would silently do nothing)."""
        for name in self.overrides:
            if name not in known:
                raise ConfigError(f"overrides.{name}: no such layer in the model")

    def __hash__(self) -> int:
        return hash(self.digest())
