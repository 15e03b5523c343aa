"""MobileNetV2/V3 and EfficientNet (torchvision and timm) end to end (issue 15.3/15.4).

- LRP: zennit parity in float64 on torchvision MobileNetV2, MobileNetV3 and EfficientNet-B0
  (ReLU6 / Hardswish / SiLU, depthwise convs, inverted residuals: zennit has the rules, with
  a canoniser for the residual sums written here like zennit's own ResNet canonisers; the SE
  gate has no zennit rule, so the canoniser applies the same signal-take-all rule);
  conservation on bias-free variants (torchvision and timm, timm BatchNormAct2d included);
- components: expansion convs and the last conv (see `pxopt.families.mobile`), stage groups;
- masking exact and undone bit-exactly, slicing == masking, Torch-Pruning removal == masking.
"""

from __future__ import annotations

import optuna
import pytest
import timm
import torch
import torchvision
import zennit.rules as zr
from lrp_zennit_helpers import (
    COMPOSITES,
    ExactMergeBatchNorm,
    _zennit_rule,
    randomise_bn,
    zennit_attribute,
)
from torch import nn
from zennit.canonizers import AttributeCanonizer
from zennit.composites import LayerMapComposite, MixedComposite, NameMapComposite, layer_map_base
from zennit.layer import Sum

import pxopt.lrp.rules as lrp_rules
from pxopt.errors import UnsupportedLayerError
from pxopt.families import mobile
from pxopt.layers import discover_layers
from pxopt.lrp import explain
from pxopt.lrp.config import RuleConfig
from pxopt.prune import Masker, global_order
from pxopt.prune.physical import physical_prune
from pxopt.prune.slicing import Slicer

LRP0 = RuleConfig.uniform({"rule": "epsilon", "epsilon": 1e-12}).to_dict()
KINDS = ("conv", "linear")


def _build(name: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    if name.startswith("timm:"):
        model = timm.create_model(name[5:], pretrained=False, num_classes=10)
    else:
        kw = {"width_mult": 0.25} if name == "mobilenet_v2" else {}
        model = getattr(torchvision.models, name)(weights=None, num_classes=10, **kw)
    return randomise_bn(model).to(dtype).eval()


# ---- zennit parity (torchvision MobileNetV2: everything zennit has a rule for) -------------
class _SignalTakeAll(torch.autograd.Function):
    """x * s whose backward hands x the whole incoming relevance (zennit-side gate rule)."""

    @staticmethod
    def forward(ctx, x, s):
        ctx.shape = s.shape
        return x * s

    @staticmethod
    def backward(ctx, r):
        return r, r.new_zeros(ctx.shape)  # zeros, not None: zennit's hooks need a tensor


class _MbV2Canonizer(AttributeCanonizer):
    """zennit canoniser: residual sums and the functional pool as modules (zennit's Norm
    rule), the SE gate product with the signal-take-all rule (zennit has no gate rule)."""

    def __init__(self) -> None:
        super().__init__(self._attribute_map)

    @classmethod
    def _attribute_map(cls, name, module):
        if isinstance(module, torchvision.models.mobilenetv2.InvertedResidual):
            return {"forward": cls.block.__get__(module), "canonizer_sum": Sum()}
        if isinstance(module, torchvision.models.MobileNetV2):
            return {"forward": cls.model.__get__(module), "canonizer_pool": nn.AdaptiveAvgPool2d(1)}
        if isinstance(module, torchvision.models.mobilenetv3.InvertedResidual | torchvision.models.efficientnet.MBConv):
            return {"forward": cls.block_v3.__get__(module), "canonizer_sum": Sum()}
        if isinstance(module, torchvision.ops.SqueezeExcitation):
            return {"forward": cls.se.__get__(module)}
        return None

    @staticmethod
    def block_v3(self, x):
        if not self.use_res_connect:
            return self.block(x)
        return self.canonizer_sum(torch.stack([x, self.block(x)], dim=-1))

    @staticmethod
    def se(self, x):
        return _SignalTakeAll.apply(x, self._scale(x))

    @staticmethod
    def block(self, x):
        if not self.use_res_connect:
            return self.conv(x)
        return self.canonizer_sum(torch.stack([x, self.conv(x)], dim=-1))

    @staticmethod
    def model(self, x):
        return self.classifier(torch.flatten(self.canonizer_pool(self.features(x)), 1))

    def copy(self):
        return _MbV2Canonizer()


def _zennit(model, x, targets, rules, lm):
    cfg = RuleConfig.coerce(rules)
    entries = [(la.name, la.group) for la in lm] + list(lm.rule_only.items())
    name_map = [((n,), _zennit_rule(cfg.rule_for(n, g))) for n, g in entries]
    composite = MixedComposite([NameMapComposite(name_map), LayerMapComposite(layer_map_base())],
                               canonizers=[ExactMergeBatchNorm(), _MbV2Canonizer()])
    return zennit_attribute(composite, model, [la.name for la in lm], x, targets)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


@pytest.mark.parametrize(("name", "composite"), [
    ("mobilenet_v2", "epsilon"), ("mobilenet_v2", "mixed"), ("mobilenet_v2", "zplus"),
    ("mobilenet_v3_small", "epsilon"), ("mobilenet_v3_small", "mixed"),
    ("efficientnet_b0", "mixed"),
])
def test_parity_with_zennit(name: str, composite: str) -> None:
    """Everything but the gate from zennit (Hardswish / SiLU / Hardsigmoid: zennit's Pass);
    the gate with the same signal-take-all rule on both sides."""
    model = _build(name, torch.float64)
    lm = discover_layers(model)
    assert lm.rule_only  # depthwise / projection / stem convs get rules, not components
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    rel, comps = _zennit(model, x, [1, 3], COMPOSITES[composite], lm)
    exp = explain(model, x, [1, 3], COMPOSITES[composite], layer_map=lm)
    assert set(comps) == set(exp.components) == set(lm.names())
    assert _rel(exp.input, rel) < 1e-4
    for name, expected in comps.items():
        assert _rel(exp.components[name], expected) < 1e-4, name
    assert zr  # zennit's rules module is what `_zennit_rule` builds from


# ---- conservation where zennit has no rule (SE gates, SiLU, Hardswish, timm blocks) --------
def bias_free(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """No biases; BatchNorm with zero mean and shift, its variance from one batch (train mode,
    momentum 1) so activations stay O(1) through the deep stack (default init vanishes)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            m.bias = None
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 1.0
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.zero_()
    model.train()
    with torch.no_grad():
        model(x)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.zero_()
    return model.eval()


CONSERVED = [
    "mobilenet_v3_small",
    "timm:mobilenetv3_small_050",
    "timm:mobilenetv2_050",
    pytest.param("efficientnet_b0", marks=pytest.mark.slow),
    pytest.param("timm:efficientnet_b0", marks=pytest.mark.slow),
    "timm:tf_efficientnet_lite0",  # the Lite0 of `package:efficientnet_lite0` (TF "same" padding)
]


@pytest.mark.parametrize("name", CONSERVED)
def test_conservation_bias_free(name: str) -> None:
    """Input relevance == target logit (LRP-0, signal-take-all gates), up to the Norm rule's
    stabiliser 1e-6 on pools and residual sums (measured 1e-6 .. 2e-5 relative)."""
    model = _build(name, torch.float64)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    model = bias_free(model, x)
    exp = explain(model, x, [1, 2], LRP0, start="logit")
    logit = exp.output[[0, 1], [1, 2]]
    assert logit.abs().min() > 1e-3
    assert ((exp.input.sum((1, 2, 3)) / logit - 1).abs().max()) < 1e-4
    # with biases relevance is absorbed: the same check fails (the test can fail)
    biased = _build(name, torch.float64)
    e2 = explain(biased, x, [1, 2], LRP0, start="logit")
    assert ((e2.input.sum((1, 2, 3)) / e2.output[[0, 1], [1, 2]] - 1).abs().max()) > 1e-3


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_gate_rule_conserves(share: float) -> None:
    """R_x + R_s == R for signal-take-all (0), AttnLRP's uniform rule (0.5), gate-take-all."""
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    s = torch.rand(2, 4, 1, 1, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    out = lrp_rules.lrp_gate(x, s, share)
    assert torch.equal(out, x * s)
    gx, gs = torch.autograd.grad(out, (x, s), r, allow_unused=True)
    assert (gs is None) == (share == 0.0)  # signal-take-all: the gate branch is not run
    gs = torch.zeros_like(s) if gs is None else gs
    torch.testing.assert_close(gx.sum() + gs.sum(), r.sum())
    torch.testing.assert_close(gx, r * (1 - share))
    torch.testing.assert_close(gs, (r * share).sum((2, 3), keepdim=True))


def test_uniform_gate_reaches_se_convs(monkeypatch: pytest.MonkeyPatch) -> None:
    """With AttnLRP's uniform rule the SE branch carries relevance; with signal-take-all none."""
    model = _build("mobilenet_v3_small", torch.float64)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    seen: list[float] = []
    se = next(m for m in model.modules() if isinstance(m, torchvision.ops.SqueezeExcitation))

    def grab(m: nn.Module, i: object, o: torch.Tensor) -> None:  # a tensor hook: no graph node
        if o.requires_grad:
            o.register_hook(lambda g: seen.append(float(g.abs().sum())))

    se.fc1.register_forward_hook(grab)
    explain(model, x, [1], LRP0)
    assert not seen
    monkeypatch.setattr(lrp_rules, "GATE_SHARE", 0.5)
    explain(model, x, [1], LRP0)
    assert seen and seen[0] > 0


# ---- structure ---------------------------------------------------------------------------
def test_layer_map_components_and_stages() -> None:
    model = _build("mobilenet_v2")
    lm = discover_layers(model)
    names = lm.names()
    # expansion convs (blocks 2..17; block 1 has none), the last conv, the classifier
    assert names[0] == "features.2.conv.0.0" and "features.1.conv.0.0" in lm.rule_only
    assert names[-2:] == ["features.18.0", "classifier.1"] and lm[-1].kind == "head"
    assert lm.rule_only["features.0.0"] == "input"
    assert "features.2.conv.1.0" in lm.rule_only and "features.2.conv.1.0" in lm.tied  # depthwise
    assert lm.stage_rule == "resolution" and lm.grouping == "stage"
    # 5 resolution stages: low, low, mid, mid, high; block 2's expansion runs at stage 1
    assert lm.by_name()["features.2.conv.0.0"].group == "low"
    assert lm.by_name()["features.7.conv.0.0"].group == "mid"  # stage 3 (28x28 at 224)
    assert lm.by_name()["features.18.0"].group == "high"
    count = discover_layers(model, grouping="count")
    assert count.grouping == "count" and count.stage_rule == ""
    hidden = [la.group for la in count if la.group != "fc"]
    assert hidden == sorted(hidden, key=["low", "mid", "high"].index) and len(set(hidden)) == 3
    timm_lm = discover_layers(_build("timm:mobilenetv3_small_050"))
    assert "blocks.1.0.conv_pw" in timm_lm.names() and "blocks.0.0.se.conv_expand" in timm_lm.rule_only
    assert timm_lm.names()[-2:] == ["conv_head", "classifier"]


def test_unknown_blocks_are_refused() -> None:
    """timm EfficientNet-EdgeTPU blocks (EdgeResidual) are not the family's: refused."""
    model = timm.create_model("efficientnet_es", pretrained=False, num_classes=10).eval()
    assert not mobile.matches(model)
    with pytest.raises(UnsupportedLayerError):
        explain(model, torch.randn(1, 3, 32, 32), [0], LRP0)


# ---- masking, slicing, physical removal ----------------------------------------------------
PRUNED = ["mobilenet_v2", *CONSERVED]


@pytest.mark.parametrize("name", PRUNED)
def test_mask_slice_physical(name: str) -> None:
    model = _build(name)
    lm = discover_layers(model)
    x = torch.randn(2, 3, 32, 32)
    g = torch.Generator().manual_seed(0)
    scores = {la.name: torch.rand(la.n_components, generator=g) for la in lm.prunable(KINDS)}
    pruned = global_order(scores, lm, KINDS).pruned_at(0.5)
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(x)
        with Masker(model, lm, KINDS) as masker:
            masker.set_pruned(pruned)
            masked = model(x)
            # a pruned expansion channel is exactly zero after the depthwise conv's BatchNorm
            exp_name = next(n for n in lm.names() if n in mobile.structure(model).followers)
            dw = model.get_submodule(mobile.structure(model).followers[exp_name][1])
            got = {}
            h = dw.register_forward_hook(lambda m, i, o: got.setdefault("o", o))
            model(x)
            h.remove()
            idx = pruned[exp_name].nonzero().flatten()
            assert idx.numel() and got["o"][:, idx].abs().max() == 0
            slicer = Slicer(model, lm, KINDS)
            slicer.apply(pruned)
            sliced = model(x)
            slicer.undo()
        assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())
    assert not torch.allclose(masked, ref)
    torch.testing.assert_close(sliced, masked, rtol=1e-5, atol=1e-5)
    res = physical_prune(model, lm, pruned, x[:1], kinds=KINDS, measure_latency=False)
    assert res.params_after < 0.7 * res.params_before
    assert not any(res.masked.values())  # every pruned channel physically removed
    with torch.no_grad():
        torch.testing.assert_close(res.model(x), masked, rtol=1e-5, atol=1e-5)


# ---- a search trial ------------------------------------------------------------------------
def test_search_completes_a_trial(tmp_path) -> None:
    """run_search with the real pipeline (LRP scores, masked accuracy curve) on a small
    torchvision MobileNetV3 and a tiny random task: one trial completes."""
    from pxopt.data import Task, TensorSet
    from pxopt.pipeline import Pipeline
    from pxopt.search import StudySpec, run_search

    model = _build("mobilenet_v3_small")
    model.classifier[-1] = nn.Linear(1024, 3)
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    ref = TensorSet(torch.randn(6, 3, 32, 32, generator=g), torch.arange(6) % 3)
    val = TensorSet(torch.randn(9, 3, 32, 32, generator=g), torch.arange(9) % 3)
    task = Task(dataset="random", classes=[0, 1, 2], class_names=["a", "b", "c"], reference=ref,
                validation=val, seed=0, n_ref=2, n_val=3)
    lm = discover_layers(model)
    pipe = Pipeline(model=model, task=task, layer_map=lm, kinds=("conv",), rates=[0.0, 0.3, 0.6],
                    device=torch.device("cpu"), batch_size=16)
    spec = StudySpec(name="mobile", storage=str(tmp_path / "s.db"), trials=1, seed=1,
                     rates=[0.0, 0.3, 0.6], sampler={"name": "random"},
                     pruner={"name": "none"}).validated()
    result = run_search(spec, pipeline=pipe)
    assert result.trials_after == 1 and result.exit_codes == [0]
    trials = optuna.load_study(study_name="mobile", storage=result.storage_url).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"], trials[0].user_attrs
    assert 0.0 <= trials[0].values[0] <= 1.0


def test_family_registry_and_models_listing() -> None:
    from pxopt.families import family_of
    from pxopt.models import describe_supported

    for name in ("mobilenet_v2", "mobilenet_v3_small", "timm:mobilenetv3_small_050", "timm:mobilenetv2_050"):
        assert family_of(_build(name)).name == "mobilenet-efficientnet"
    fam = family_of(_build("mobilenet_v2"))
    assert set(fam.block_forwards()) >= {torchvision.models.mobilenetv2.InvertedResidual}
    assert "MobileNetV2/V3" in describe_supported()
