"""discover_layers: forward order, groups, classifier layers, the family registry."""

from __future__ import annotations

from collections import Counter

import pytest
import timm
import torch
import torchvision
from torch import nn

from pxopt.errors import ConfigError, UnsupportedLayerError
from pxopt.families import Family, register_family, unregister_family
from pxopt.layers import Layer, LayerMap, discover_layers


def test_resnet18_groups() -> None:
    lm = discover_layers(torchvision.models.resnet18())
    assert lm[0].name == "conv1" and lm[0].group == "input" and lm[0].kind == "conv"
    assert lm[-1].name == "fc" and lm[-1].kind == "head" and lm[-1].group == "fc"
    hidden = [layer for layer in lm if layer.group in ("low", "mid", "high")]
    assert [layer.depth for layer in hidden] == list(range(19))
    # stages: layer1 / layer2+layer3 / layer4 (tests/test_groups_reference.py: name by name)
    assert Counter(layer.group for layer in hidden) == {"low": 4, "mid": 10, "high": 5}
    # groups are monotone in depth
    order = {"low": 0, "mid": 1, "high": 2}
    assert all(order[a.group] <= order[b.group] for a, b in zip(hidden, hidden[1:], strict=False))
    assert lm.by_name()["layer2.0.downsample.0"].n_components == 128
    assert "fc" not in [layer.name for layer in lm.prunable()]
    assert len(lm.prunable(["conv"])) == 20


def test_vgg_classifier_layers_are_fc() -> None:
    lm = discover_layers(torchvision.models.vgg11())
    fc = [(layer.name, layer.kind) for layer in lm if layer.group == "fc"]
    assert fc == [("classifier.0", "linear"), ("classifier.3", "linear"), ("classifier.6", "head")]
    assert [layer.name for layer in lm.prunable(["linear"])] == ["classifier.0", "classifier.3"]
    assert lm.by_name()["classifier.0"].n_components == 4096


def test_boundaries_and_timm() -> None:
    model = timm.create_model("resnet18", pretrained=False)
    default = discover_layers(model)
    assert default.stage_rule == "resnet" and default.by_name()["layer4.0.conv1"].group == "high"
    count = discover_layers(model, grouping="count")
    wide = discover_layers(model, boundaries=(0.5, 0.5), grouping="count")
    assert Counter(layer.group for layer in wide)["mid"] == 0
    assert Counter(layer.group for layer in count)["mid"] > 0
    with pytest.raises(ConfigError, match="boundaries"):
        discover_layers(model, boundaries=(0.8, 0.2), grouping="count")


def test_forward_order_from_an_example_input() -> None:
    class Swapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.b = nn.Conv2d(4, 4, 1)
            self.a = nn.Conv2d(3, 4, 1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.b(self.a(x)).mean((2, 3)))

    lm = discover_layers(Swapped(), example_input=torch.randn(1, 3, 4, 4))
    assert [layer.name for layer in lm] == ["a", "b", "fc"]
    assert lm[0].group == "input" and lm[2].kind == "head"


def test_no_layers_raises() -> None:
    with pytest.raises(UnsupportedLayerError):
        discover_layers(nn.Sequential(nn.ReLU()))


def test_registered_family_wins() -> None:
    marker = nn.Linear(2, 2)

    class Markers(Family):
        name = "test-markers"
        priority = 1000

        def matches(self, model: nn.Module) -> bool:
            return model is marker

        def layer_map(self, model: nn.Module, boundaries: tuple[float, float], *,
                      grouping: str, example_input: torch.Tensor | None) -> LayerMap:
            return LayerMap([Layer("", model, "head", "fc", 2, 0)])

    register_family(Markers())
    try:
        assert discover_layers(marker)[0].kind == "head"
        assert discover_layers(torchvision.models.resnet18())[0].name == "conv1"
    finally:
        unregister_family("test-markers")
    assert discover_layers(marker)[0].kind == "linear"
