"""The LRP rule registry: every rule's name, parameters, ranges, sites and backward, once.

Everything that knows a rule asks this registry: `pxopt.lrp.config` validates a rule
configuration against the parameters declared here, `pxopt.lrp.rules` checks where a rule
may be applied and dispatches its backward through it, and `pxopt.search.space` takes the
rules it searches and their default ranges from it. A new rule is one `register_rule` call
(with its backward kernel) plus its tests::

    from pxopt.lrp.registry import LAYER, Param, RuleDef, register_rule

    def half_epsilon(layer, x, z, r):          # (LayerRule, input, output, R at output)
        ...                                    # -> relevance of the input, shaped like x

    register_rule(RuleDef("half-epsilon", (Param("epsilon", 1e-6, minimum=0.0),),
                          sites=LAYER, backward=half_epsilon))

The module imports no torch: the search space reads it without loading the engine.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pxopt.errors import ConfigError

# Where a rule may be applied.
LAYER = frozenset({"layer"})  # conv / linear layers (LayerRule, the engine's linear kernel)
ACTIVATION = "activation"  # element-wise functions (ReLU, GELU ...)
SUM = "sum"  # residual sums, average pools, means (parameter-free linear maps)

# Stabiliser of every rule other than Epsilon (zennit's default `stabilizer=1e-6`), and of
# the Norm rule on sums and pools.
STABILIZER = 1e-6

# Softmax treatments of transformer attention (AttnLRP, CP-LRP, z+ on the linearised softmax).
SOFTMAX_RULES: tuple[str, ...] = ("attnlrp", "cp", "zplus")
DEFAULT_SOFTMAX = "attnlrp"


@dataclass(frozen=True)
class Param:
    """One numeric parameter of a rule.

    default: the value when a configuration omits it (None: required).
    minimum: the smallest valid value (inclusive; None: any finite number).
    search: the default range of the pruning search space (None: not sampled).
    log: sample log-uniformly (the stabilisers) instead of uniformly.
    derive: computes the value from the sampled ones (AlphaBeta's beta = alpha - 1); the
        search space never samples a derived parameter.
    per_channel: also accepts a list, one value per input channel (ZBox bounds).
    """

    name: str
    default: float | None = None
    minimum: float | None = None
    search: tuple[float, float] | None = None
    log: bool = False
    derive: Callable[[Mapping[str, float]], float] | None = None
    per_channel: bool = False


@dataclass(frozen=True)
class RuleDef:
    """A rule: its parameters, where it may be applied, whether pruning studies search it.

    check(params, where) raises `ConfigError` for constraints across parameters.
    backward(layer, x, z, r) -> relevance of x: the kernel of a rule on conv / linear layers
    (`pxopt.lrp.rules.LayerRule`, its input x, output z, relevance r at z). None means
    pxopt's built-in kernel `pxopt.lrp.rules.relevance_backward`, which implements every
    built-in layer rule in at most two forward and two transposed passes.
    """

    name: str
    params: tuple[Param, ...] = ()
    sites: frozenset[str] = LAYER
    search: bool = False
    check: Callable[[dict[str, Any], str], None] | None = None
    backward: Callable[..., Any] | None = None
    summary: str = ""

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    @property
    def sampled(self) -> tuple[Param, ...]:
        """The parameters the search space samples."""
        return tuple(p for p in self.params if p.search is not None and p.derive is None)


def _check_alphabeta(p: dict[str, Any], where: str) -> None:
    if abs(p["alpha"] - p["beta"] - 1.0) > 1e-9:
        raise ConfigError(
            f"{where}.alpha: alpha - beta must equal 1, got alpha={p['alpha']}, beta={p['beta']}")


def _check_zbox(p: dict[str, Any], where: str) -> None:
    low, high = p["low"], p["high"]
    n = max(len(b) if isinstance(b, tuple) else 1 for b in (low, high))
    lows = low if isinstance(low, tuple) else (low,) * n
    highs = high if isinstance(high, tuple) else (high,) * n
    if len(lows) != len(highs):
        raise ConfigError(f"{where}.high: needs as many entries as low ({len(lows)})")
    if any(lo > hi for lo, hi in zip(lows, highs, strict=True)):
        raise ConfigError(f"{where}.low: must be <= high")


RULES: dict[str, RuleDef] = {}
# The rules whose layer backward is the built-in kernel (`pxopt.lrp.rules.relevance_backward`):
# those registered below, while this module loads (None until then).
_BUILTIN: frozenset[str] | None = None


def register_rule(rule: RuleDef, *, replace: bool = False) -> RuleDef:
    """Add a rule (or, with `replace`, redefine one); returns it."""
    if not rule.name or not isinstance(rule.name, str):
        raise ConfigError(f"a rule needs a non-empty name, got {rule.name!r}")
    if rule.name in RULES and not replace:
        raise ConfigError(f"rule {rule.name!r} is already registered")
    names = [p.name for p in rule.params]
    if "rule" in names or len(set(names)) != len(names):
        raise ConfigError(f"rule {rule.name!r}: parameter names must be unique and not 'rule'")
    builtin = _BUILTIN is None or rule.name in _BUILTIN
    if "layer" in rule.sites and rule.backward is None and not builtin:
        raise ConfigError(f"rule {rule.name!r} applies to layers and needs a backward kernel")
    for p in rule.params:
        if p.search is not None:
            lo, hi = p.search
            if not lo <= hi or (p.log and lo <= 0):
                raise ConfigError(f"rule {rule.name!r}: bad search range {p.search} of {p.name!r}")
    RULES[rule.name] = rule
    return rule


def unregister_rule(name: str) -> None:
    """Remove a rule (tests that register a temporary one)."""
    RULES.pop(name, None)


for _rule in (
    RuleDef("epsilon", (Param("epsilon", 1e-6, minimum=0.0, search=(1e-9, 1.0), log=True),),
            search=True, summary="LRP-epsilon (LRP-0 for a tiny epsilon)"),
    RuleDef("gamma", (Param("gamma", 0.25, minimum=0.0, search=(1e-3, 10.0), log=True),),
            search=True, summary="LRP-gamma, generalised to negative inputs (zennit)"),
    RuleDef("alphabeta",
            (Param("alpha", 2.0, minimum=0.0, search=(1.0, 3.0)),
             Param("beta", 1.0, minimum=0.0, derive=lambda p: p["alpha"] - 1.0)),
            search=True, check=_check_alphabeta, summary="LRP-alpha-beta, alpha - beta = 1"),
    RuleDef("zplus", search=True, summary="LRP-z+ (alpha 1, beta 0)"),
    RuleDef("flat", summary="input-layer rule: all weights 1"),
    RuleDef("wsquare", summary="input-layer rule: squared weights"),
    RuleDef("zbox", (Param("low", per_channel=True), Param("high", per_channel=True)),
            check=_check_zbox, summary="input-layer rule for inputs bounded by [low, high]"),
    RuleDef("pass", sites=frozenset({ACTIVATION}),
            summary="relevance passes unchanged (element-wise activations)"),
    RuleDef("norm", sites=frozenset({"layer", SUM}),
            summary="parameter-free z-rule (residual sums, average pools)"),
):
    register_rule(_rule)
_BUILTIN = frozenset(RULES)


# ---- lookups ------------------------------------------------------------------------------
def get_rule(name: Any, where: str = "rule") -> RuleDef:
    """The registered rule `name`, or a `ConfigError` naming `where` and the choices."""
    if not isinstance(name, str) or name not in RULES:
        raise ConfigError(f"{where}: unknown rule {name!r}; choose one of {', '.join(RULES)}")
    return RULES[name]


def rules_for(site: str) -> tuple[str, ...]:
    """Names of the rules that may be applied at `site` ("layer", "activation", "sum")."""
    return tuple(name for name, rule in RULES.items() if site in rule.sites)


def searched_rules() -> tuple[str, ...]:
    """Names of the rules a pruning study chooses from, in registration order."""
    return tuple(name for name, rule in RULES.items() if rule.search and "layer" in rule.sites)


def number(value: Any, where: str) -> float:
    """A finite number, or a `ConfigError` naming `where`."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(f"{where}: must be finite, got {value!r}")
    return value


def parse_params(rule: RuleDef, given: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Validated parameters of `rule` from a mapping (a configuration entry minus 'rule').

    Unknown keys, missing required values, non-numbers, values below their minimum and the
    rule's own constraints raise `ConfigError` naming the field (`{where}.{param}`).
    """
    allowed = [p.name for p in rule.params]
    for key in given:
        if key not in allowed:
            raise ConfigError(
                f"{where}.{key}: unknown parameter for rule {rule.name!r}"
                + (f" (allowed: {', '.join(allowed)})" if allowed else " (it takes none)"))
    out: dict[str, Any] = {}
    for p in rule.params:
        at = f"{where}.{p.name}"
        if p.name not in given:
            if p.default is None:
                raise ConfigError(f"{at}: required for rule {rule.name!r}")
            out[p.name] = p.default
            continue
        value = given[p.name]
        if p.per_channel and isinstance(value, list | tuple):
            if not value:
                raise ConfigError(f"{at}: empty list")
            out[p.name] = tuple(number(v, f"{at}[{i}]") for i, v in enumerate(value))
        else:
            out[p.name] = number(value, at)
        values = out[p.name] if isinstance(out[p.name], tuple) else (out[p.name],)
        if p.minimum is not None and any(v < p.minimum for v in values):
            shown = out[p.name] if len(values) > 1 else values[0]
            raise ConfigError(f"{at}: must be >= {p.minimum:g}, got {shown}")
    if rule.check is not None:
        rule.check(out, where)
    return out
