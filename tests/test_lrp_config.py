"""Rule configuration: round trips, defaults, digest, and errors that name the field."""

from __future__ import annotations

import pytest

from pxopt.errors import ConfigError
from pxopt.lrp.config import GROUPS, RuleConfig, RuleSpec

EXAMPLE = {
    "format": "pxopt.rules/1",
    "groups": {
        "input": {"rule": "zbox", "low": -3.0, "high": 3.0},
        "low": {"rule": "gamma", "gamma": 0.25},
        "mid": {"rule": "alphabeta", "alpha": 2.0, "beta": 1.0},
        "high": {"rule": "epsilon", "epsilon": 1e-6},
        "fc": {"rule": "epsilon", "epsilon": 1e-6},
    },
    "softmax": "cp",
    "overrides": {"layer4.2.conv3": {"rule": "zplus"}},
}


def test_round_trip_and_digest() -> None:
    cfg = RuleConfig.from_dict(EXAMPLE)
    assert cfg.to_dict() == EXAMPLE
    again = RuleConfig.from_json(cfg.to_json())
    assert again == cfg and again.digest() == cfg.digest()
    other = RuleConfig.from_dict({**EXAMPLE, "softmax": "attnlrp"})
    assert other.digest() != cfg.digest()
    assert cfg.rule_for("layer4.2.conv3", "high") == RuleSpec("zplus")
    assert cfg.rule_for("layer4.2.conv2", "mid").name == "alphabeta"


def test_defaults_and_uniform() -> None:
    cfg = RuleConfig.from_dict({"groups": {"mid": {"rule": "gamma"}}})
    assert cfg.groups["mid"]["gamma"] == 0.25
    assert all(cfg.groups[g].name == "epsilon" for g in GROUPS if g != "mid")
    assert cfg.softmax == "attnlrp"
    uni = RuleConfig.uniform({"rule": "alphabeta", "alpha": 1, "beta": 0})
    assert {uni.groups[g]["alpha"] for g in GROUPS} == {1.0}
    assert RuleConfig.coerce(None) == RuleConfig()
    assert RuleConfig.from_dict({"groups": {"input": {"rule": "zbox", "low": [-1, -2, -3],
                                                      "high": [1, 2, 3]}}}).groups["input"]["low"] == (-1.0, -2.0, -3.0)


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ({"format": "pxopt.rules/2"}, "format"),
        ({"groups": {"middle": {"rule": "epsilon"}}}, "groups.middle"),
        ({"groups": {"mid": {"rule": "nope"}}}, "groups.mid.rule"),
        ({"groups": {"mid": {"rule": "alphabeta", "alpha": 3.0, "beta": 1.0}}}, "groups.mid.alpha"),
        ({"groups": {"mid": {"rule": "alphabeta", "alpha": 1.0, "beta": -0.5}}}, "groups.mid"),
        ({"groups": {"low": {"rule": "gamma", "gamma": -1}}}, "groups.low.gamma"),
        ({"groups": {"low": {"rule": "gamma", "gamma": "big"}}}, "groups.low.gamma"),
        ({"groups": {"high": {"rule": "epsilon", "eps": 1e-3}}}, "groups.high.eps"),
        ({"groups": {"input": {"rule": "zbox", "low": 0.0}}}, "groups.input.high"),
        ({"groups": {"input": {"rule": "zbox", "low": 1.0, "high": 0.0}}}, "groups.input.low"),
        ({"softmax": "sparsemax"}, "softmax"),
        ({"overrides": {"fc": {"rule": "gamma", "gamma": float("nan")}}}, "overrides.fc.gamma"),
        ({"extra": 1}, "extra"),
    ],
)
def test_invalid_config_names_the_field(bad: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")) as info:
        RuleConfig.from_dict(bad)
    assert isinstance(info.value, ValueError)


def test_invalid_json() -> None:
    with pytest.raises(ConfigError, match="invalid JSON"):
        RuleConfig.from_json("{not json")


def test_override_of_unknown_layer() -> None:
    cfg = RuleConfig.from_dict({"overrides": {"layer9.conv": "zplus"}})
    with pytest.raises(ConfigError, match="overrides.layer9.conv"):
        cfg.check_overrides({"conv1", "fc"})
