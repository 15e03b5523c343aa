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
