"""pxopt's CNN LRP equals zennit 0.5.1 (input relevance and every layer's per-channel relevance).

Random weights, randomised BatchNorm statistics and affine parameters, float64, 32x32
inputs. zennit's side uses the same group assignment (NameMapComposite), its default
stabilisers, and `ExactMergeBatchNorm` (see tests/lrp_zennit_helpers.py for the one
documented difference: zennit keeps BatchNorm eps in the emptied BatchNorm).
"""

from __future__ import annotations

import pytest
import torch
from lrp_zennit_helpers import COMPOSITES, discover_layers, make_model, zennit_relevance

from pxopt.lrp import explain

TOL = 1e-4
MODELS = [
    pytest.param("resnet18"),
    pytest.param("vgg16_bn", marks=pytest.mark.slow),
    pytest.param("resnet50", marks=pytest.mark.slow),
    pytest.param("timm:resnet50", marks=pytest.mark.slow),
]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


@pytest.mark.parametrize("model_name", MODELS)
def test_parity_with_zennit(model_name: str) -> None:
    model = make_model(model_name)
    lm = discover_layers(model)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    targets = [1, 3]
    for name, rules in COMPOSITES.items():
        rel, comps = zennit_relevance(model, x, targets, rules, lm)
        exp = explain(model, x, targets, rules, layer_map=lm)
        assert set(comps) == set(exp.components) == set(lm.names())
        assert _rel(exp.input, rel) < TOL, f"{name}: input relevance"
        for layer, expected in comps.items():
            got = exp.components[layer]
            assert got.shape == expected.shape
            assert _rel(got, expected) < TOL, f"{name}: {layer}"


def test_parity_timm_resnet18_mixed() -> None:
    """timm blocks (own residual canonisation) on a small model, in the fast suite."""
    model = make_model("timm:resnet18")
    lm = discover_layers(model)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    for name in ("mixed", "gamma"):
        rel, comps = zennit_relevance(model, x, [4], COMPOSITES[name], lm)
        exp = explain(model, x, [4], COMPOSITES[name], layer_map=lm)
        assert _rel(exp.input, rel) < TOL
        assert max(_rel(exp.components[k], v) for k, v in comps.items()) < TOL


def test_zennit_bn_eps_difference_is_documented() -> None:
    """With zennit's own merge (eps kept) results drift measurably; with eps fixed they agree.

    This pins down the only deliberate difference to zennit: pxopt's merged model computes
    exactly the model's forward (its logits equal model(x) bit for bit).
    """
    model = make_model("resnet18")
    lm = discover_layers(model)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    rules = COMPOSITES["epsilon"]
    exp = explain(model, x, [1, 3], rules, layer_map=lm)
    assert torch.equal(exp.output, model(x))
    raw, _ = zennit_relevance(model, x, [1, 3], rules, lm, exact_merge=False)
    fixed, _ = zennit_relevance(model, x, [1, 3], rules, lm)
    assert _rel(exp.input, fixed) < 1e-10
    assert 1e-7 < _rel(exp.input, raw) < 1e-2


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.mark.parametrize("model_name", ["resnet18", pytest.param("vgg11_bn", marks=pytest.mark.slow)])
def test_zbox_per_channel_bounds(model_name: str) -> None:
    """ZBox with one bound per input channel (ImageNet normalisation: low = -mean / std,
    high = (1 - mean) / std) equals zennit's ZBox with (1, 3, 1, 1) bound tensors, on
    normalised images with pixels at both bounds; scalar bounds give another result.

    The saturated pixels are scattered: a uniform black or white region makes equal
    activations whose max-pool winner depends on rounding (pxopt runs the model's own
    conv and BatchNorm, zennit the merged conv), which moves relevance between tied
    positions of a channel: a real difference at the input, none in what is pruned.
    """
    model = make_model(model_name)
    lm = discover_layers(model)
    low = [-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)]
    high = [(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)]
    pixels = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    pixels[torch.rand_like(pixels) < 0.1] = 0.0  # inputs exactly at the bounds
    pixels[torch.rand_like(pixels) < 0.1] = 1.0
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    x = (pixels - mean) / std
    rules = {"groups": {"input": {"rule": "zbox", "low": low, "high": high},
                        "low": {"rule": "gamma", "gamma": 0.25}, "mid": {"rule": "zplus"},
                        "high": {"rule": "alphabeta", "alpha": 2.0, "beta": 1.0},
                        "fc": {"rule": "epsilon", "epsilon": 1e-6}}}
    rel, comps = zennit_relevance(model, x, [1, 3], rules, lm)
    exp = explain(model, x, [1, 3], rules, layer_map=lm)
    assert _rel(exp.input, rel) < 1e-10
    assert max(_rel(exp.components[k], v) for k, v in comps.items()) < 1e-10
    scalar = {"groups": dict(rules["groups"], input={"rule": "zbox", "low": min(low),
                                                     "high": max(high)})}
    assert _rel(explain(model, x, [1, 3], scalar, layer_map=lm).input, rel) > 1e-2
