"""Search space: sampling, mapping to pxopt.rules/1, narrowing, baselines."""

from __future__ import annotations

import optuna
import pytest

from pxopt.errors import ConfigError
from pxopt.search.space import GROUPS, SearchSpace


def _sample(space: SearchSpace, n: int = 30) -> list[tuple[dict, str]]:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append(space.suggest(trial))
        study.tell(trial, 0.0)
    return out


def test_samples_are_valid_rules_dicts() -> None:
    space = SearchSpace.build()
    for rules, ranking in _sample(space):
        assert rules["format"] == "pxopt.rules/1"
        assert set(rules["groups"]) == set(GROUPS)
        assert ranking in ("abs", "signed")
        assert "softmax" not in rules
        assert rules["groups"]["input"] == rules["groups"]["low"]  # tests/test_input_group.py
        for g in rules["groups"].values():
            assert g["rule"] in ("epsilon", "gamma", "alphabeta", "zplus")
            if g["rule"] == "alphabeta":
                assert g["beta"] == pytest.approx(g["alpha"] - 1.0)
                assert 1.0 <= g["alpha"] <= 3.0
            if g["rule"] == "epsilon":
                assert 1e-9 <= g["epsilon"] <= 1.0


def test_vit_space_has_softmax() -> None:
    space = SearchSpace.build({"softmax": ["cp", "attnlrp"]}, family="vit")
    seen = {r["softmax"] for r, _ in _sample(space, 20)}
    assert seen <= {"cp", "attnlrp"} and seen


def test_narrowing_and_fixing() -> None:
    space = SearchSpace.build(
        {"ranking": "signed", "fc": {"rules": ["epsilon"], "epsilon": 0.01},
         "low": {"rules": ["gamma"], "gamma": [0.1, 0.2]}}
    )
    for rules, ranking in _sample(space, 15):
        assert ranking == "signed"
        assert rules["groups"]["fc"] == {"rule": "epsilon", "epsilon": 0.01}
        assert 0.1 <= rules["groups"]["low"]["gamma"] <= 0.2


def test_params_round_trip() -> None:
    space = SearchSpace.build()
    for rules, ranking in _sample(space, 10):
        assert space.to_rules(space.to_params(rules, ranking)) == (rules, ranking)


@pytest.mark.parametrize(
    "narrowing, field",
    [
        ({"low": {"rules": ["flat"]}}, "space.low.rules"),
        ({"mid": {"epsilon": [-1, 1]}}, "space.mid.epsilon"),
        ({"high": {"alpha": [0.5, 2]}}, "space.high.alpha"),
        ({"ranking": ["up"]}, "space.ranking"),
        ({"bogus": 1}, "bogus"),
        ({"fc": {"rules": []}}, "space.fc.rules"),
    ],
)
def test_bad_narrowing_names_field(narrowing: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        SearchSpace.build(narrowing)


def test_baselines_fit_space() -> None:
    base = SearchSpace.build().baselines()
    assert set(base) == {"all-epsilon", "faithful"}
    eps_rules, ranking = base["all-epsilon"]
    assert ranking == "abs"
    assert all(g == {"rule": "epsilon", "epsilon": 1e-6} for g in eps_rules["groups"].values())
    faithful = base["faithful"][0]["groups"]
    assert faithful["input"] == faithful["low"] == {"rule": "zplus"}  # input takes low's rule
    assert faithful["high"]["rule"] == "epsilon"
    # narrowed so z+ is not allowed in low: gamma takes its place
    alt = SearchSpace.build({"low": {"rules": ["gamma", "epsilon"]}}).baselines()["faithful"][0]
    assert alt["groups"]["low"]["rule"] == "gamma"
    # narrowed so epsilon is not allowed anywhere in fc: the all-epsilon baseline is dropped
    assert "all-epsilon" not in SearchSpace.build({"fc": {"rules": ["zplus"]}}).baselines()
