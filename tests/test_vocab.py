"""One source of truth for the vocabulary: the rule registry and `pxopt.vocab`.

A new rule is one `register_rule` entry (parameters, ranges, sites, backward) plus its
tests: the configuration format, the engine's dispatch and the search space all pick it up.
Every other list (groups, softmax treatments, kinds, rankings, rates, finished states,
the per-rate callback) is defined once, and the other modules use that definition.
"""

from __future__ import annotations

import math
import re
import typing
from pathlib import Path

import optuna
import pytest
import torch

from pxopt import vocab
from pxopt.errors import ConfigError
from pxopt.lrp import registry
from pxopt.lrp.config import RuleConfig, RuleSpec
from pxopt.lrp.registry import LAYER, Param, RuleDef, register_rule, unregister_rule
from pxopt.lrp.rules import lrp_linear
from pxopt.search.space import SearchSpace

PXOPT = Path(__file__).resolve().parents[1] / "pxopt"


def _uniform_kernel(layer, x, z, r):
    """Toy rule: each sample's relevance spread evenly over its inputs, times k."""
    per_sample = r.reshape(r.shape[0], -1).sum(1) / x[0].numel()
    return layer.rule["k"] * per_sample.view(-1, *([1] * (x.ndim - 1))).expand_as(x)


@pytest.fixture
def uniform_rule():
    rule = register_rule(RuleDef("uniform", (Param("k", 1.0, minimum=0.0, search=(0.5, 2.0)),),
                                 sites=LAYER, search=True, backward=_uniform_kernel))
    try:
        yield rule
    finally:
        unregister_rule("uniform")


def test_a_new_rule_is_one_entry(uniform_rule: RuleDef) -> None:
    # the configuration format knows it, with its parameters and their checks
    spec = RuleSpec.from_dict({"rule": "uniform", "k": 2})
    assert spec["k"] == 2.0 and RuleSpec.from_dict("uniform")["k"] == 1.0
    with pytest.raises(ConfigError, match=r"groups\.low\.k: must be >= 0"):
        RuleConfig.from_dict({"groups": {"low": {"rule": "uniform", "k": -1}}})
    with pytest.raises(ConfigError, match=r"groups\.low\.eps: unknown parameter"):
        RuleConfig.from_dict({"groups": {"low": {"rule": "uniform", "eps": 1}}})
    # the engine dispatches its backward through the registry
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w, b = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    r = torch.rand(3, 5, dtype=torch.float64)
    (rel,) = torch.autograd.grad(lrp_linear(x, w, b, spec), x, r)
    torch.testing.assert_close(rel, 2.0 * (r.sum(1, keepdim=True) / 4).expand(3, 4))
    # the search space offers it in every group and samples k in its range
    space = SearchSpace.build({"low": {"rules": ["uniform"], "k": [1.0, 1.5]}})
    assert all("uniform" in space.groups[g].rules for g in ("mid", "high", "fc"))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(5):
        trial = study.ask()
        rules, _ = space.suggest(trial)
        study.tell(trial, 0.0)
        assert rules["groups"]["low"]["rule"] == "uniform"
        assert 1.0 <= rules["groups"]["low"]["k"] <= 1.5
        RuleConfig.from_dict(rules)  # what the space makes, the format accepts
    with pytest.raises(ConfigError, match=r"space\.low\.k"):
        SearchSpace.build({"low": {"k": [-1.0, 1.0]}})


def test_registering_checks_the_entry() -> None:
    with pytest.raises(ConfigError, match="already registered"):
        register_rule(RuleDef("epsilon"))
    with pytest.raises(ConfigError, match="needs a backward kernel"):
        register_rule(RuleDef("no-kernel"))
    with pytest.raises(ConfigError, match="search range"):
        register_rule(RuleDef("bad-range", (Param("e", 1.0, search=(0.0, 1.0), log=True),),
                              backward=_uniform_kernel))
    assert "no-kernel" not in registry.RULES and "bad-range" not in registry.RULES


def test_the_space_derives_its_ranges_from_the_registry() -> None:
    space = SearchSpace.build()
    assert space.groups["low"].rules == registry.searched_rules() == (
        "epsilon", "gamma", "alphabeta", "zplus")
    for name in registry.searched_rules():
        for p in registry.RULES[name].sampled:
            assert space.groups["mid"].range(p.name) == p.search
    assert "beta" not in space.groups["mid"].ranges  # derived: beta = alpha - 1
    assert registry.rules_for("layer") == (
        "epsilon", "gamma", "alphabeta", "zplus", "flat", "wsquare", "zbox", "norm")


def test_each_list_is_defined_once() -> None:
    import pxopt.criteria.sites
    import pxopt.evaluate
    import pxopt.families.swin
    import pxopt.layermap
    import pxopt.layers
    import pxopt.lrp.config
    import pxopt.lrp.vit
    import pxopt.pipeline
    import pxopt.prune._layers
    import pxopt.prune.slicing
    import pxopt.scores
    import pxopt.search.objective
    import pxopt.search.pool
    import pxopt.search.space
    import pxopt.search.spec
    import pxopt.search.study
    import pxopt.search.workers

    assert pxopt.lrp.config.GROUPS is vocab.GROUPS is pxopt.search.space.GROUPS
    assert pxopt.lrp.config.SOFTMAX_RULES is registry.SOFTMAX_RULES
    assert pxopt.layers.KINDS is vocab.LAYER_KINDS
    assert pxopt.prune._layers.PRUNABLE_KINDS is vocab.PRUNABLE_KINDS
    assert pxopt.search.spec.COMPONENTS is vocab.COMPONENTS
    assert pxopt.search.spec.check_rates is vocab.check_rates is pxopt.evaluate.check_rates
    assert pxopt.evaluate.DEFAULT_RATES is vocab.DEFAULT_RATES is pxopt.search.spec.DEFAULT_RATES
    assert pxopt.search.objective.OnRate is vocab.OnRate is pxopt.evaluate.OnRate is pxopt.pipeline.OnRate
    assert pxopt.search.pool.FINISHED is pxopt.search.workers.FINISHED
    assert typing.get_args(pxopt.scores.Ranking) == vocab.RANKINGS  # the type checkers' copy
    assert pxopt.criteria.sites.CHANNEL_KINDS is vocab.CHANNEL_KINDS is pxopt.prune.slicing.CHANNEL_KINDS
    assert pxopt.lrp.vit.TRANSFORMER_KINDS is vocab.TRANSFORMER_KINDS is pxopt.families.swin.TRANSFORMER_KINDS
    assert pxopt.layermap.HIDDEN_GROUPS is vocab.HIDDEN_GROUPS is pxopt.families.swin.HIDDEN_GROUPS
    # and no module of the package or of the benchmarks spells one of them out again:
    # pattern -> the one file allowed to hold it
    copies = {
        "groups": (r"\"input\",\s*\"low\",\s*\"mid\",\s*\"high\",\s*\"fc\"", "vocab.py"),
        "hidden groups": (r"[(\[{]\s*\"low\",\s*\"mid\",\s*\"high\"\s*[)\]}]", "vocab.py"),
        "softmax rules": (r"\"attnlrp\",\s*\"cp\",\s*\"zplus\"", "registry.py"),
        # the softmax rules the fused attention kernel serves: one decision, in one function
        "fused softmax rules": (r"\"attnlrp\",\s*\"cp\"\)", "attention.py"),
        "searched rules": (r"\"epsilon\",\s*\"gamma\",\s*\"alphabeta\",\s*\"zplus\"", "registry.py"),
        "criteria": (r"\"random\",\s*\"weight\"", "__init__.py"),
        "finished states": (r"TrialState\.COMPLETE,\s*TrialState\.PRUNED\)", "workers.py"),
        "on_rate type": (r"Callable\[\[int,\s*float,\s*float\],\s*None\]", "vocab.py"),
        "prunable kinds": (r"\"conv\",\s*\"linear\",\s*\"mlp\",\s*\"heads\"", "vocab.py"),
        "channel kinds": (r"\(\"conv\",\s*\"linear\",\s*\"mlp\"\)", "vocab.py"),
        "transformer kinds": (r"[({]\"heads\",\s*\"mlp\"[)}]", "vocab.py"),
        "rankings": (r"\(\"abs\",\s*\"signed\"\)", "vocab.py"),
    }
    files = [*sorted(PXOPT.rglob("*.py")), *sorted((PXOPT.parent / "benchmarks").glob("*.py"))]
    assert len(files) > 50
    for path in files:
        text = path.read_text(encoding="utf-8")
        for what, (pattern, owner) in copies.items():
            if path.name != owner or (what == "criteria" and path.parent.name != "criteria"):
                assert not re.search(pattern, text), f"{path.relative_to(PXOPT.parent)} defines the {what} again"


@pytest.mark.parametrize("rates", [[0.0, 0.5, 0.95], [0.3], (0.0, 0.999)])
def test_rates_in_zero_one_are_accepted(rates: list[float]) -> None:
    assert vocab.check_rates(rates) == [float(r) for r in rates]


@pytest.mark.parametrize(("rates", "message"), [
    ([0.0, 1.0], r"\[0, 1\)"), ([-0.1], r"\[0, 1\)"), ([0.0, math.nan], r"\[0, 1\)"),
    ([0.5, 0.2], "strictly increasing"), ([0.2, 0.2], "strictly increasing"),
    ([], "at least one"), ("0.1", "list of numbers"), ([0.1, "a"], "list of numbers"),
])
def test_one_rate_check_everywhere(rates: object, message: str) -> None:
    """The spec, the curve and the export validate rates with the same function."""
    from pxopt.export import validate_export
    from pxopt.search.spec import StudySpec

    with pytest.raises(ConfigError, match=message):
        vocab.check_rates(rates)
    with pytest.raises(ConfigError, match=message):
        StudySpec(rates=rates).validated()  # type: ignore[arg-type]
    export = {"format": "pxopt.export/1", "rules": {"format": "pxopt.rules/1", "groups": {}},
              "ranking": "abs", "components": "conv", "model": "m", "trial": 0, "area": 0.5,
              "top_pr": 0.1, "versions": {}, "curve": {"rates": rates, "accuracies": [0.5] * 9},
              "task": {k: None for k in ("data", "classes", "n_ref", "n_val", "seed", "batch_size")}}
    with pytest.raises(ConfigError, match=message):
        validate_export(export)


def test_one_rate_of_a_curve_or_export_has_the_same_range() -> None:
    assert vocab.check_rate(0.0) == 0.0 and vocab.check_rate("0.5", "--rate") == 0.5
    for bad in (1.0, -0.1, math.nan):
        with pytest.raises(ConfigError, match=r"--rate must be in \[0, 1\)"):
            vocab.check_rate(bad, "--rate")
        with pytest.raises(ConfigError, match=r"\[0, 1\)"):
            vocab.check_rates([bad])
    with pytest.raises(ConfigError, match="must be a number"):
        vocab.check_rate("x")
    import pxopt.cli.export_cmd

    assert pxopt.cli.export_cmd.check_rate is vocab.check_rate
