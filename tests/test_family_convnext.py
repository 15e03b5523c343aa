"""ConvNeXt (torchvision and timm) end to end: LRP conservation and lxt parity of the LayerNorm
rule, the layer map and its stage groups, masking == slicing == physical removal, refusals,
and one search trial. Tiny random-weight configurations, 32x32 inputs."""

from __future__ import annotations

import pytest
import torch
from timm.models.convnext import ConvNeXt as TimmConvNeXt
from torch import nn
from torchvision.models.convnext import CNBlock, CNBlockConfig, LayerNorm2d
from torchvision.models.convnext import ConvNeXt as TvConvNeXt

from pxopt.errors import UnsupportedLayerError
from pxopt.families import convnext as family
from pxopt.layers import discover_layers
from pxopt.lrp import engine, explain
from pxopt.lrp import rules as lrp_rules
from pxopt.prune import Masker, global_order
from pxopt.prune.physical import physical_prune
from pxopt.prune.slicing import Slicer

GROUPS = ("input", "low", "mid", "high", "fc")
LRP0 = {"groups": {g: {"rule": "epsilon", "epsilon": 1e-12} for g in GROUPS}}
TINY_EPS = 1e-30


def tv_tiny(layer_scale: float = 0.5) -> nn.Module:
    torch.manual_seed(0)
    cfg = [CNBlockConfig(8, 16, 2), CNBlockConfig(16, 24, 1), CNBlockConfig(24, 32, 2),
           CNBlockConfig(32, None, 1)]
    return TvConvNeXt(cfg, layer_scale=layer_scale, num_classes=5).eval()


def timm_tiny(**kw) -> nn.Module:
    torch.manual_seed(0)
    return TimmConvNeXt(depths=(1, 2, 1, 1), dims=(8, 16, 24, 32), num_classes=5,
                        **{"ls_init_value": 0.5, **kw}).eval()


MAKERS = {"torchvision": tv_tiny, "timm": timm_tiny,
          "timm-conv_mlp": lambda: timm_tiny(conv_mlp=True)}  # LayerNorm2d + 1x1-conv MLP


def _randomise(model: nn.Module, bias: bool) -> nn.Module:
    """float64, frozen, LayerNorm scales random (incl. negative layer scales); biases zero or random."""
    model = model.double()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.requires_grad_(False)
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype) if bias else 0 * p)
            elif p.ndim == 1 or name.endswith(("layer_scale", "gamma")):
                p.copy_(torch.empty(p.shape, dtype=p.dtype).uniform_(0.5, 1.5, generator=g)
                        * torch.where(torch.rand(p.shape, generator=g) < 0.2, -1.0, 1.0))
    return model


@pytest.fixture
def tiny_stabilisers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sums, pools and LayerNorms with a negligible stabiliser (their default 1e-6 costs ~1e-4
    of the relevance), so conservation can be checked to 1e-9."""
    monkeypatch.setattr(family, "lrp_sum", lambda a, b: lrp_rules.lrp_sum(a, b, TINY_EPS))
    monkeypatch.setattr(engine, "lrp_norm", lambda x, fn: lrp_rules.lrp_norm(x, fn, TINY_EPS))
    monkeypatch.setattr(engine, "lrp_layer_norm",
                        lambda *a: lrp_rules.lrp_layer_norm(*a, eps=TINY_EPS))


# ---- LRP --------------------------------------------------------------------------------
@pytest.mark.parametrize("which", list(MAKERS))
def test_conservation_bias_free(which: str, tiny_stabilisers: None) -> None:
    """Bias-free, float64, LRP-0: the input relevance and every residual-stream layer's
    relevance (stem, downsampling convs, classifier) sum to the target's seed, 1."""
    model = _randomise(MAKERS[which](), bias=False)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        ref = model(x)
    exp = explain(model, x, [1, 3], LRP0)
    assert torch.equal(exp.output, ref)  # logits bit-identical
    ones = torch.ones(2, dtype=torch.float64)
    torch.testing.assert_close(exp.input.sum((1, 2, 3)), ones, rtol=0, atol=1e-9)
    lm = discover_layers(model)
    stream = [la.name for la in lm if la.group == "input" or la.kind == "head"
              or (la.kind == "conv" and la.module.groups == 1 and la.module.kernel_size == (2, 2))]
    assert len(stream) == 5  # stem, three downsampling convs, classifier
    for name in stream:
        torch.testing.assert_close(exp.components[name].sum(1), ones, rtol=0, atol=1e-9)
    # with biases relevance is absorbed: the same check fails (the test can fail)
    biased = _randomise(MAKERS[which](), bias=True)
    got = explain(biased, x, [1, 3], LRP0).input.sum((1, 2, 3))
    assert not torch.allclose(got, ones, atol=1e-3)


def test_conservation_default_stabilisers() -> None:
    """Without patching, the Norm stabiliser 1e-6 (zennit's) costs at most ~1e-3, as for ResNets."""
    model = _randomise(tv_tiny(), bias=False)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    got = explain(model, x, [0, 4], LRP0).input.sum((1, 2, 3))
    torch.testing.assert_close(got, torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-3)


def _lxt_layer_norm_relevance(module: nn.Module, x: torch.Tensor, r: torch.Tensor,
                              channels_first: bool) -> torch.Tensor:
    """lxt's LayerNorm rule (gradient x input, std detached: lxt.efficient.patches
    .layer_norm_forward) for relevance r at the output."""
    from lxt.efficient.patches import layer_norm_forward

    xd = x.detach().requires_grad_(True)
    xl = xd.permute(0, 2, 3, 1) if channels_first else xd
    y = layer_norm_forward(module, xl)
    if channels_first:
        y = y.permute(0, 3, 1, 2)
    (g,) = torch.autograd.grad(y, xd, r / y.detach())
    return x * g


@pytest.mark.parametrize("kind", ["nn.LayerNorm", "torchvision.LayerNorm2d", "timm.LayerNorm2d"])
def test_layer_norm_rule_matches_lxt(kind: str) -> None:
    from timm.layers import LayerNorm2d as TimmLayerNorm2d

    g = torch.Generator().manual_seed(0)
    module = {"nn.LayerNorm": nn.LayerNorm, "torchvision.LayerNorm2d": LayerNorm2d,
              "timm.LayerNorm2d": TimmLayerNorm2d}[kind](6, eps=1e-6).double()
    with torch.no_grad():
        module.weight.copy_(torch.randn(6, generator=g, dtype=torch.float64))
        module.bias.copy_(torch.randn(6, generator=g, dtype=torch.float64))
    first = kind != "nn.LayerNorm"
    x = torch.randn(2, 6, 4, 5, generator=g, dtype=torch.float64)
    x = x if first else x.permute(0, 2, 3, 1).contiguous()
    r = torch.randn(x.shape, generator=g, dtype=torch.float64)
    dim = 1 if first else -1
    xd = x.clone().requires_grad_(True)
    y = lrp_rules.lrp_layer_norm(xd, module.forward, module.weight, dim, module.eps, eps=TINY_EPS)
    assert torch.equal(y, module(x))  # the module's own forward
    (ours,) = torch.autograd.grad(y, xd, r)
    theirs = _lxt_layer_norm_relevance(module, x, r, first)
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)
    # without the bias the rule conserves per position
    module.bias = None
    y = lrp_rules.lrp_layer_norm(xd, module.forward, module.weight, dim, module.eps, eps=TINY_EPS)
    (ours,) = torch.autograd.grad(y, xd, r)
    torch.testing.assert_close(ours.sum(dim), r.sum(dim), rtol=0, atol=1e-9)


@pytest.mark.parametrize("which", list(MAKERS))
def test_model_left_untouched(which: str) -> None:
    model = MAKERS[which]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    exp = explain(model, x, [0, 1], {"groups": {"low": {"rule": "gamma", "gamma": 0.25},
                                                "mid": {"rule": "alphabeta", "alpha": 2.0}}})
    assert torch.equal(exp.output, ref) and torch.isfinite(exp.input).all()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any("forward" in m.__dict__ for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(x), ref)


def test_unknown_operations_are_refused() -> None:
    """ConvNeXt-V2's GlobalResponseNorm has no rule; a CNBlock subclass with its own forward
    is not the registered block, so its layer-scale product and sum are refused by the graph check."""
    v2 = timm_tiny(use_grn=True, ls_init_value=None)
    with pytest.raises(UnsupportedLayerError, match="GlobalResponseNorm"):
        explain(v2, torch.randn(1, 3, 32, 32), [0])

    class MyBlock(CNBlock):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.layer_scale * self.block(x)

    model = tv_tiny()
    blk = model.features[1][0]
    blk.__class__ = MyBlock
    with pytest.raises(UnsupportedLayerError, match="operation"):
        explain(model, torch.randn(1, 3, 32, 32), [0])


# ---- layer map and stage groups ----------------------------------------------------------
def test_convnext_tiny_layer_map_and_stage_groups() -> None:
    """convnext_tiny (random weights): stem + stage 1 low, stages 2-3 mid (downsampling layers
    with the stage they open), stage 4 high; only the MLP neurons (pwconv1) are prunable."""
    import torchvision

    model = torchvision.models.convnext_tiny(weights=None)
    lm = discover_layers(model)
    assert lm.stage_rule == "convnext" and lm.grouping == "stage"
    groups = {la.name: la.group for la in lm}
    assert groups["features.0.0"] == "input" and groups["classifier.2"] == "fc"
    for k, want in ((1, "low"), (2, "mid"), (3, "mid"), (4, "mid"), (5, "mid"), (6, "high"), (7, "high")):
        assert {g for n, g in groups.items() if n.startswith(f"features.{k}.")} == {want}, k
    prunable = lm.prunable()
    assert {la.kind for la in prunable} == {"mlp"} and len(prunable) == 3 + 3 + 9 + 3
    assert all(la.name.endswith("block.3") and la.n_components == 4 * la.module.in_features
               for la in prunable)
    assert lm.by_name()["classifier.2"].kind == "head"
    count = discover_layers(model, grouping="count")
    assert count.grouping == "count" and {la.group for la in count} == set(GROUPS)
    assert count.by_name()["features.1.0.block.0"].group == "low"
    assert count.by_name()["features.7.2.block.5"].group == "high"

    timm_lm = discover_layers(timm_tiny())
    tg = {la.name: la.group for la in timm_lm}
    assert tg["stem.0"] == "input" and tg["stages.0.blocks.0.mlp.fc1"] == "low"
    assert tg["stages.1.downsample.1"] == "mid" and tg["stages.3.blocks.0.mlp.fc1"] == "high"
    assert [la.name for la in timm_lm.prunable()] == [n for n in tg if n.endswith("mlp.fc1")]


# ---- masking, slicing, physical removal -----------------------------------------------------
@pytest.mark.parametrize("which", list(MAKERS))
def test_masking_slicing_and_physical_removal_agree(which: str) -> None:
    model = MAKERS[which]()
    model.requires_grad_(False)
    lm = discover_layers(model)
    kinds = ("conv",) if which == "timm-conv_mlp" else ("mlp",)
    assert [la.name for la in lm.prunable()] == [la.name for la in lm.prunable(kinds)]
    x = torch.randn(3, 3, 32, 32)
    g = torch.Generator().manual_seed(0)
    scores = {la.name: torch.rand(la.n_components, generator=g) for la in lm.prunable(kinds)}
    pruned = global_order(scores, lm, kinds).pruned_at(0.5)
    with torch.no_grad():
        full = model(x)
    with Masker(model, lm, kinds) as masker, torch.no_grad():
        masker.set_pruned(pruned)
        masked = model(x)
        slicer = Slicer(model, lm, kinds)
        assert sorted(slicer.sliceable) == sorted(scores)
        assert len(slicer.pairs) == len(scores)  # pwconv1 -> GELU -> pwconv2 sliced as a pair
        slicer.apply(pruned)
        sliced = model(x)
        slicer.undo()
    assert not torch.allclose(masked, full, atol=1e-4)
    torch.testing.assert_close(sliced, masked, rtol=1e-5, atol=1e-6)
    res = physical_prune(model, lm, pruned, x[:1], kinds=kinds, measure_latency=False)
    assert all(len(res.removed[n]) == int(pruned[n].sum()) and not res.masked[n] for n in pruned)
    assert res.params_after < res.params_before
    with torch.no_grad():
        torch.testing.assert_close(res.model(x), masked, rtol=1e-5, atol=1e-6)
        assert torch.equal(model(x), full)  # the original is untouched


@pytest.mark.parametrize("which", ["torchvision", "timm"])
def test_every_criterion_scores_the_mlp_neurons(which: str) -> None:
    """Every baseline criterion (and LRP) gives one finite score per MLP neuron of every
    prunable layer, and none for the non-prunable ones."""
    from pxopt.criteria import CRITERIA, compute_scores

    model = MAKERS[which]()
    model.requires_grad_(False)
    lm = discover_layers(model)
    want = {la.name: la.n_components for la in lm.prunable(("mlp",))}
    batches = [(torch.randn(2, 3, 32, 32), torch.tensor([0, 3]))]
    for name in CRITERIA:
        scores = compute_scores(name, model, batches, lm, kinds=("mlp",))
        got = scores.select("abs")
        assert {k: v.numel() for k, v in got.items()} == want, name
        assert all(bool(torch.isfinite(v).all()) for v in got.values()), name


# ---- a search trial ---------------------------------------------------------------------------
def test_search_trial_completes(tmp_path) -> None:
    import optuna

    from pxopt.data import Task, TensorSet
    from pxopt.pipeline import Pipeline
    from pxopt.search import StudySpec, run_search
    from pxopt.search.components import resolve_components

    model = tv_tiny()
    model.requires_grad_(False)
    lm = discover_layers(model)
    assert resolve_components("auto", lm) == "mlp"
    g = torch.Generator().manual_seed(1)
    ref = TensorSet(torch.randn(6, 3, 32, 32, generator=g), torch.arange(6) % 5)
    val = TensorSet(torch.randn(10, 3, 32, 32, generator=g), torch.arange(10) % 5)
    task = Task(dataset="random", classes=list(range(5)), class_names=list("abcde"), reference=ref,
                validation=val, seed=0, n_ref=2, n_val=2)
    pipe = Pipeline(model=model, task=task, layer_map=lm, kinds=("mlp",), rates=[0.0, 0.5],
                    device=torch.device("cpu"), batch_size=8, components="mlp")
    pipe.check_explainable()
    spec = StudySpec(name="cn", storage=str(tmp_path / "cn.db"), trials=1, seed=0, baselines=False,
                     rates=[0.0, 0.5], components="mlp").validated()
    result = run_search(spec, pipeline=pipe, log=lambda _m: None)
    trials = result.study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE]
    assert 0.0 <= trials[0].value <= 1.0


def test_family_registered() -> None:
    """The family protocol: `family_of` finds ConvNeXt for both libraries, not for a ResNet."""
    import torchvision

    from pxopt.families import families, family_of

    assert "convnext" in [f.name for f in families()]
    for make in MAKERS.values():
        fam = family_of(make())
        assert fam.name == "convnext" and fam.kind == "cnn"
        assert set(fam.block_forwards()) == {CNBlock, family._timm_classes()[1]}
    assert not family.FAMILY.matches(torchvision.models.resnet18())
    lm = family.FAMILY.layer_map(tv_tiny(), (0.25, 0.75), grouping="count", example_input=None)
    assert lm.grouping == "count" and lm.by_name()["features.7.0.block.3"].group == "high"


@pytest.mark.slow
def test_cli_explain_timm_convnext_checkpoint(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`pxopt explain` end to end on a checkpoint of timm's convnext_atto (random weights,
    its own 224x224 preprocessing), mixed rules beside all-epsilon: one PNG."""
    import json

    import numpy as np
    import timm
    from PIL import Image
    from typer.testing import CliRunner

    from pxopt.cli import app

    torch.manual_seed(0)
    torch.save(timm.create_model("convnext_atto", pretrained=False).state_dict(), tmp_path / "atto.pth")
    (tmp_path / "imgs").mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (60, 50, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"x{i}.jpg")
    (tmp_path / "rules.json").write_text(json.dumps({"format": "pxopt.rules/1", "groups": {
        "low": {"rule": "gamma", "gamma": 0.25}, "mid": {"rule": "alphabeta", "alpha": 2.0, "beta": 1.0}}}))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, [
        "explain", "--config", "rules.json", "--model", f"file:{tmp_path}/atto.pth@timm:convnext_atto",
        "--images", "imgs", "--out", "h.png", "--device", "cpu"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "heatmaps of 2 images" in result.output and (tmp_path / "h.png").stat().st_size > 0
