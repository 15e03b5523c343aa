"""Why pruning studies do not search the first layer's rule (the `input` group).

A component's relevance is read at the output of its layer, before that layer's own rule
turns it into the relevance of the layer's input. The first layer's rule therefore acts
only on the relevance that reaches the image: heatmaps change with it, component scores
(the first layer's channels included) cannot. These tests show it bit for bit, and that
the pruning search space has no input dimension (it would spend the sampler's budget on a
no-op), while the rule configuration keeps the group for `explain` and heatmaps.
"""

from __future__ import annotations

import optuna
import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer as TvViT

from pxopt.errors import ConfigError
from pxopt.lrp import component_relevance, explain
from pxopt.search.space import SearchSpace

from lrp_zennit_helpers import randomise_bn  # isort: skip

HIDDEN = {"low": {"rule": "gamma", "gamma": 0.25}, "mid": {"rule": "alphabeta"},
          "high": {"rule": "epsilon", "epsilon": 1e-6}, "fc": {"rule": "zplus"}}
INPUT_RULES = [{"rule": "epsilon", "epsilon": 1e-6}, {"rule": "zplus"}, {"rule": "flat"},
               {"rule": "wsquare"}, {"rule": "zbox", "low": -3.0, "high": 3.0}]


def _config(input_rule: dict, **extra: object) -> dict:
    return {"groups": {"input": input_rule, **HIDDEN}, **extra}


def test_input_rule_never_changes_a_cnn_score() -> None:
    model = randomise_bn(torchvision.models.resnet18(num_classes=5)).eval()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    scores = [component_relevance(model, [(x, y)], _config(r)) for r in INPUT_RULES]
    heatmaps = [explain(model, x, y, _config(r)).input for r in INPUT_RULES]
    assert "conv1" in scores[0].abs  # the first layer's channels are scored too
    for other in scores[1:]:
        assert other.abs.keys() == scores[0].abs.keys()
        for name in scores[0].abs:
            assert torch.equal(other.abs[name], scores[0].abs[name]), name
            assert torch.equal(other.signed[name], scores[0].signed[name]), name
    # ... while the heatmaps, which the input rule is for, all differ
    for i in range(len(heatmaps)):
        for j in range(i + 1, len(heatmaps)):
            assert not torch.allclose(heatmaps[i], heatmaps[j]), (INPUT_RULES[i], INPUT_RULES[j])


def test_input_rule_never_changes_a_vit_score() -> None:
    model = TvViT(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                  mlp_dim=64, num_classes=5)
    nn.init.normal_(model.heads.head.weight, std=0.1)  # torchvision zero-initialises the head
    model.eval()
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2])
    eps, zbox = INPUT_RULES[0], INPUT_RULES[-1]
    kinds = ("heads", "mlp", "conv")
    a = component_relevance(model, [(x, y)], _config(eps, softmax="attnlrp"), kinds=kinds)
    b = component_relevance(model, [(x, y)], _config(zbox, softmax="attnlrp"), kinds=kinds)
    assert a.abs.keys() == b.abs.keys() and len(a.abs) == 5  # 2 x (heads, mlp) + patch embedding
    for name in a.abs:
        assert torch.equal(a.abs[name], b.abs[name]), name
    ha = explain(model, x, y, _config(eps, softmax="attnlrp")).input
    hb = explain(model, x, y, _config(zbox, softmax="attnlrp")).input
    assert not torch.allclose(ha, hb)


def test_the_pruning_space_has_no_input_dimension() -> None:
    for family in ("cnn", "vit"):
        space = SearchSpace.build(family=family)
        assert "input" not in space.groups
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        for _ in range(20):
            trial = study.ask()
            rules, _ = space.suggest(trial)
            study.tell(trial, 0.0)
            assert not any(k.startswith("input.") for k in trial.params)
            # the first layer takes the low group's rule, as in the reference code
            assert rules["groups"]["input"] == rules["groups"]["low"]
        for name, (rules, _) in space.baselines().items():
            assert rules["groups"]["input"] == rules["groups"]["low"], name
    with pytest.raises(ConfigError, match=r"space\.input: .*never changes a component's score"):
        SearchSpace.build({"input": {"rules": ["flat"]}})


def test_trials_of_old_studies_with_an_input_parameter_still_map_to_rules() -> None:
    """A study made when the input rule was searched still exports (the parameter is ignored)."""
    space = SearchSpace.build()
    params = {"input.rule": "zbox", "low.rule": "zplus", "mid.rule": "zplus", "high.rule": "zplus",
              "fc.rule": "zplus", "ranking": "abs"}
    rules, ranking = space.to_rules(params)
    assert rules["groups"]["input"] == {"rule": "zplus"} and ranking == "abs"
