"""Every supported architecture explains without error and keeps its forward output."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision

from pxopt.layers import discover_layers
from pxopt.lrp import explain

from lrp_zennit_helpers import COMPOSITES, randomise_bn  # isort: skip

ARCHS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2",
         "vgg11", "vgg13", "vgg16", "vgg19", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn",
         "timm:resnet18", "timm:resnet50"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_supported_architecture(arch: str) -> None:
    if arch.startswith("timm:"):
        model = timm.create_model(arch[5:], pretrained=False, num_classes=10)
    else:
        model = getattr(torchvision.models, arch)(num_classes=10)
    model = randomise_bn(model).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    lm = discover_layers(model)
    exp = explain(model, x, [3], COMPOSITES["mixed"], layer_map=lm)
    assert torch.equal(exp.output, ref)
    assert set(exp.components) == set(lm.names())
    assert all(exp.components[layer.name].shape == (1, layer.n_components) for layer in lm)
    assert torch.isfinite(exp.input).all() and exp.input.abs().sum() > 0
