"""LRP on EfficientNet-Lite pieces equals zennit 0.5.1 (float64, random weights, random BatchNorm).

Two tiny networks: a plain depthwise-separable net of torch layers (grouped / depthwise
convs, BatchNorm, ReLU6), and a timm EfficientNet-Lite built small (TensorFlow "SAME"
convs, BatchNormAct2d, DepthwiseSeparableConv and InvertedResidual blocks with skips).
zennit sees the timm one through a twin whose BatchNormAct2d are split into BatchNorm +
activation (zennit merges only leaf BatchNorms) and a canonizer that makes the block's
residual addition an explicit `Sum`, the treatment pxopt's canonisation mirrors.
"""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from lrp_zennit_helpers import (
    COMPOSITES,
    ExactMergeBatchNorm,
    randomise_bn,
    zennit_attribute,
    zennit_relevance,
)
from torch import nn
from zennit.canonizers import AttributeCanonizer
from zennit.layer import Sum

from pxopt.errors import UnsupportedLayerError
from pxopt.layers import discover_layers
from pxopt.lrp import explain

TOL = 1e-4


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def plain_depthwise_net() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
        nn.Conv2d(8, 12, 1), nn.BatchNorm2d(12), nn.ReLU6(inplace=True),
        nn.Conv2d(12, 12, 5, stride=2, padding=2, groups=4), nn.BatchNorm2d(12), nn.ReLU6(),
        nn.Conv2d(12, 6, 1, bias=False), nn.BatchNorm2d(6),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 10),
    )
    return randomise_bn(model).double().eval()


def tiny_timm_lite() -> nn.Module:
    """timm's EfficientNet-Lite structure (tf_efficientnet_lite0's settings), a few channels."""
    from timm.models._efficientnet_builder import decode_arch_def
    from timm.models.efficientnet import EfficientNet

    torch.manual_seed(0)
    arch = [["ds_r1_k3_s1_e1_c8"], ["ir_r2_k3_s2_e3_c8"], ["ir_r2_k5_s2_e2_c16"]]
    model = EfficientNet(block_args=decode_arch_def(arch), num_features=32, stem_size=8,
                         fix_stem=True, act_layer=nn.ReLU6, pad_type="same", num_classes=10,
                         norm_layer=partial(nn.BatchNorm2d, eps=1e-3))
    return randomise_bn(model).double().eval()


class _LiteBlockCanonizer(AttributeCanonizer):
    """zennit canonizer for timm DepthwiseSeparableConv / InvertedResidual: explicit Sum."""

    def __init__(self) -> None:
        super().__init__(self._attribute_map)

    @classmethod
    def _attribute_map(cls, name, module):
        from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual

        if isinstance(module, DepthwiseSeparableConv | InvertedResidual) and module.has_skip:
            return {"forward": cls.forward.__get__(module), "canonizer_sum": Sum()}
        return None

    @staticmethod
    def forward(self, x):
        shortcut = x
        if hasattr(self, "conv_pwl"):
            x = self.bn3(self.conv_pwl(self.bn2(self.conv_dw(self.bn1(self.conv_pw(x))))))
        else:
            x = self.bn2(self.conv_pw(self.bn1(self.conv_dw(x))))
        return self.canonizer_sum(torch.stack([shortcut, x], dim=-1))

    def copy(self):
        return _LiteBlockCanonizer()


def zennit_twin(model: nn.Module) -> nn.Module:
    """`model` with each BatchNormAct2d split into nn.BatchNorm2d + its activation."""
    from timm.layers import BatchNormAct2d

    twin = copy.deepcopy(model)
    for name, module in list(twin.named_modules()):
        if isinstance(module, BatchNormAct2d):
            bn = nn.BatchNorm2d(module.num_features, eps=module.eps).double()
            bn.load_state_dict(module.state_dict())
            parent, _, attr = name.rpartition(".")
            setattr(twin.get_submodule(parent) if parent else twin, attr,
                    nn.Sequential(bn, module.act))
    return twin.eval()


def test_plain_depthwise_parity_with_zennit() -> None:
    model = plain_depthwise_net()
    lm = discover_layers(model)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for name, rules in COMPOSITES.items():
        rel, comps = zennit_relevance(model, x, [1, 3], rules, lm)
        exp = explain(model, x, [1, 3], rules, layer_map=lm)
        assert torch.equal(exp.output, model(x))
        assert _rel(exp.input, rel) < TOL, f"{name}: input relevance"
        for layer, expected in comps.items():
            assert _rel(exp.components[layer], expected) < TOL, f"{name}: {layer}"


@pytest.mark.parametrize("size", [32, 33])  # even: asymmetric "SAME" padding; odd: symmetric
def test_timm_lite_parity_with_zennit(size: int) -> None:
    model = tiny_timm_lite()
    assert {type(m).__name__ for m in model.modules()} >= {
        "Conv2dSame", "BatchNormAct2d", "DepthwiseSeparableConv", "InvertedResidual"}
    assert sum(getattr(m, "has_skip", False) for m in model.modules()) == 3
    twin = zennit_twin(model)
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    assert torch.allclose(twin(x), model(x), rtol=0, atol=1e-12)
    lm = discover_layers(model)
    for name in ("epsilon", "gamma", "alphabeta", "mixed", "mixed_flat", "mixed_wsquare"):
        rules = COMPOSITES[name]
        rel, comps = _zennit(twin, x, [1, 3], rules, lm)
        exp = explain(model, x, [1, 3], rules, layer_map=lm)
        assert torch.equal(exp.output, model(x))
        assert set(comps) == set(exp.components) == set(lm.names())
        assert _rel(exp.input, rel) < TOL, f"{name}: input relevance"
        for layer, expected in comps.items():
            assert _rel(exp.components[layer], expected) < TOL, f"{name}: {layer}"


def _zennit(twin, x, targets, rules, lm):
    """Input and per-layer relevance from zennit with this file's canonizers; layers that get
    a rule without being components (a family's `LayerMap.rule_only`) get their rule too."""
    from lrp_zennit_helpers import _zennit_rule
    from zennit.composites import (
        LayerMapComposite,
        MixedComposite,
        NameMapComposite,
        layer_map_base,
    )

    from pxopt.lrp.config import RuleConfig

    cfg = RuleConfig.coerce(rules)
    entries = [(la.name, la.group) for la in lm] + list(getattr(lm, "rule_only", {}).items())
    name_map = [((n,), _zennit_rule(cfg.rule_for(n, g))) for n, g in entries]
    composite = MixedComposite([NameMapComposite(name_map), LayerMapComposite(layer_map_base())],
                               canonizers=[ExactMergeBatchNorm(), _LiteBlockCanonizer()])
    return zennit_attribute(composite, twin, [la.name for la in lm], x, targets)


def test_lite_conservation_bias_free() -> None:
    """Epsilon rules with a tiny epsilon on a bias-free variant: input relevance == logit, up
    to the Norm rule's stabiliser 1e-6 in the average pool and residual sums (measured
    relative error ~4e-6); with the biases kept the same check fails."""
    model = tiny_timm_lite()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    rules = {"groups": {g: {"rule": "epsilon", "epsilon": 1e-12}
                        for g in ("input", "low", "mid", "high", "fc")}}
    biased = explain(model, x, [1, 3], rules, start="logit").input.sum((1, 2, 3))
    assert not torch.allclose(biased, model(x)[[0, 1], [1, 3]], rtol=1e-2, atol=0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.bias.zero_()
                m.running_mean.zero_()
            if isinstance(m, nn.Linear):
                m.bias.zero_()
    exp = explain(model, x, [1, 3], rules, start="logit")
    logits = model(x)[[0, 1], [1, 3]]
    assert torch.allclose(exp.input.sum((1, 2, 3)), logits, rtol=1e-4, atol=0)


def test_lite_with_squeeze_excitation_is_not_silent() -> None:
    """A gated block (squeeze-excitation) either has a rule or is refused, never the gradient."""
    from timm.models._efficientnet_builder import decode_arch_def
    from timm.models.efficientnet import EfficientNet

    model = EfficientNet(block_args=decode_arch_def([["ds_r1_k3_s1_e1_c8"], ["ir_r1_k3_s2_e3_c8_se0.25"]]),
                         num_features=16, stem_size=8, num_classes=4).double().eval()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    try:
        exp = explain(model, x, [0], {"groups": {g: {"rule": "epsilon", "epsilon": 1e-12} for g in
                                                 ("input", "low", "mid", "high", "fc")}}, start="logit")
    except UnsupportedLayerError:
        return
    assert torch.isfinite(exp.input).all()  # supported elsewhere (h2-mobile): parity tests there
