"""torchvision DenseNet end to end (pxopt/families/densenet.py): LRP (conservation on bias-free
variants, zennit parity with zennit's Epsilon hook on the pre-activation BatchNorms), refusals,
components, masking == slicing == physical removal, dense-block stages, a search trial."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torchvision
import zennit.rules as zr
from lrp_zennit_helpers import COMPOSITES, _zennit_rule, randomise_bn, zennit_attribute
from torch import nn
from zennit.canonizers import MergeBatchNorm
from zennit.composites import LayerMapComposite, MixedComposite, NameMapComposite, layer_map_base

from pxopt.errors import UnsupportedLayerError
from pxopt.families.densenet import FAMILY
from pxopt.layers import discover_layers
from pxopt.lrp import check_explainable, explain
from pxopt.lrp.config import RuleConfig
from pxopt.prune import Masker, global_order
from pxopt.prune.physical import physical_prune
from pxopt.prune.slicing import Slicer

EPS_TINY = RuleConfig.uniform({"rule": "epsilon", "epsilon": 1e-12}).to_dict()


def tiny_densenet(seed: int = 0, blocks: tuple[int, ...] = (2, 2), bias_free: bool = False) -> nn.Module:
    """A small torchvision DenseNet in float64, random BatchNorm (bias-free: zero shifts)."""
    torch.manual_seed(seed)
    model = torchvision.models.DenseNet(growth_rate=4, block_config=blocks, num_init_features=8,
                                        bn_size=2, num_classes=5)
    randomise_bn(model, seed)
    if bias_free:
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.zero_()
                    m.bias.zero_()
            model.classifier.bias.zero_()
    return model.double().eval()


@pytest.fixture()
def tiny_stabilisers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fixed stabilisers (zennit's 1e-6) of the pre-activation BatchNorm rule and the
    average pools at 1e-15: with them a bias-free net conserves relevance to float64 rounding
    (at 1e-6 the sums drift by up to ~1e-4 relative, as for ResNets' residual sums)."""
    import functools

    import pxopt.families.densenet as fam
    import pxopt.lrp.engine as engine
    from pxopt.lrp import rules

    monkeypatch.setattr(engine, "lrp_affine", functools.partial(rules.lrp_affine, eps=1e-15))
    monkeypatch.setattr(engine, "lrp_norm", functools.partial(rules.lrp_norm, eps=1e-15))
    monkeypatch.setattr(fam, "lrp_norm", functools.partial(rules.lrp_norm, eps=1e-15))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


# ---- LRP ---------------------------------------------------------------------------------
@pytest.mark.parametrize("blocks", [(2, 2), (1, 2, 1)])
def test_bias_free_densenet_conserves_relevance(blocks: tuple[int, ...], tiny_stabilisers: None) -> None:
    """Epsilon rules with a tiny epsilon: the input relevance sums to the logit (1e-6), so does
    the first conv's (relevance through every concatenation is conserved); logits unchanged."""
    model = tiny_densenet(blocks=blocks, bias_free=True)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    logits = model(x)
    exp = explain(model, x, [1, 3], EPS_TINY, start="logit")
    assert torch.equal(exp.output, logits)
    want = logits[[0, 1], [1, 3]].detach()
    got = exp.input.sum((1, 2, 3))
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-9), (got, want)
    # the classifier's input relevance equals the logit, the first conv's output the same
    assert torch.allclose(exp.components["features.conv0"].sum(1), want, rtol=1e-6, atol=1e-9)
    assert not any("forward" in m.__dict__ for m in model.modules())  # nothing left installed


def test_biases_absorb_relevance_in_the_pre_activation_batchnorm() -> None:
    """With BatchNorm shifts the sum is not the logit (the shifts absorb their share, as a bias
    under the epsilon rule): the pre-activation BatchNorm is not Pass."""
    model = tiny_densenet()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    exp = explain(model, x, [1, 3], EPS_TINY, start="logit")
    want = exp.output[[0, 1], [1, 3]]
    assert not torch.allclose(exp.input.sum((1, 2, 3)), want, rtol=1e-3)


class _PairsMerge(MergeBatchNorm):
    """zennit's MergeBatchNorm for named (conv, BatchNorm) pairs, emptied BatchNorm eps = 0
    (pxopt merges exactly; see tests/lrp_zennit_helpers.ExactMergeBatchNorm)."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        super().__init__()
        self.pairs = pairs

    def apply(self, root_module: nn.Module) -> list[MergeBatchNorm]:
        out = []
        for lin, bn in self.pairs:
            inst = self.copy()
            inst.register([root_module.get_submodule(lin)], root_module.get_submodule(bn))
            out.append(inst)
        return out

    def merge_batch_norm(self, modules, batch_norm):
        super().merge_batch_norm(modules, batch_norm)
        self._eps = batch_norm.eps
        batch_norm.eps = 0.0

    def remove(self) -> None:
        super().remove()
        self.batch_norm.eps = self._eps

    def copy(self) -> _PairsMerge:
        return _PairsMerge(self.pairs)


def _zennit_densenet(model: nn.Module, x: torch.Tensor, targets: list[int], rules: dict, lm):
    """zennit's relevance for a DenseNet: the model's forward with module ReLU / pool (same
    names), conv -> BatchNorm pairs merged, Epsilon(1e-6) hooks on the pre-activation norms."""
    seq = nn.Sequential(OrderedDict(features=model.features, relu=nn.ReLU(),
                                    pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(),
                                    classifier=model.classifier))
    cfg = RuleConfig.coerce(rules)
    name_map = [((layer.name,), _zennit_rule(cfg.rule_for(layer.name, layer.group))) for layer in lm]
    name_map.append((tuple(FAMILY.input_norms(model)), zr.Epsilon(1e-6)))
    pairs = [("features.conv0", "features.norm0")]
    pairs += [(f"{n}.conv1", f"{n}.norm2") for n, m in model.named_modules()
              if type(m).__name__ == "_DenseLayer"]
    composite = MixedComposite([NameMapComposite(name_map), LayerMapComposite(layer_map_base())],
                               canonizers=[_PairsMerge(pairs)])
    return zennit_attribute(composite, seq, lm.names(), x, targets)


@pytest.mark.parametrize("composite", sorted(COMPOSITES))
def test_parity_with_zennit(composite: str) -> None:
    """Random BatchNorm statistics and shifts, float64: input and every layer's relevance."""
    model = tiny_densenet(seed=1)
    lm = discover_layers(model)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    rules = COMPOSITES[composite]
    rel, comps = _zennit_densenet(model, x, [1, 3], rules, lm)
    exp = explain(model, x, [1, 3], rules, layer_map=lm)
    assert set(comps) == set(exp.components) == set(lm.names())
    assert _rel(exp.input, rel) < 1e-8, composite
    for name, want in comps.items():
        assert _rel(exp.components[name], want) < 1e-8, (composite, name)


def test_parity_with_zennit_on_densenet121() -> None:
    """The real architecture (random weights and BatchNorm statistics), mixed rules."""
    torch.manual_seed(0)
    model = randomise_bn(torchvision.models.densenet121(weights=None, num_classes=10)).double().eval()
    lm = discover_layers(model)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    rel, comps = _zennit_densenet(model, x, [3], COMPOSITES["mixed"], lm)
    exp = explain(model, x, [3], COMPOSITES["mixed"], layer_map=lm)
    assert _rel(exp.input, rel) < 1e-8
    assert max(_rel(exp.components[k], v) for k, v in comps.items()) < 1e-8


def test_densenet121_explains_with_block_stages() -> None:
    """The real architecture (random weights): explainable, dense blocks as stages."""
    model = torchvision.models.densenet121(weights=None).eval()
    lm = discover_layers(model)
    assert lm.stage_rule == "densenet"
    groups = lm.by_name()
    assert groups["features.conv0"].group == "input"
    assert {groups[n].group for n in lm.names() if ".denseblock1." in n or ".transition1." in n} == {"low"}
    assert {groups[n].group for n in lm.names() if ".denseblock2." in n or ".transition3." in n} == {"mid"}
    assert {groups[n].group for n in lm.names() if ".denseblock4." in n} == {"high"}
    assert groups["classifier"].group == "fc"
    prunable = [la.name for la in lm.prunable()]
    assert prunable == lm.names()[:-1] and len(prunable) == 1 + 2 * 58 + 3
    assert {groups[n].n_components for n in prunable if n.endswith(".conv1")} == {128}
    assert {groups[n].n_components for n in prunable if n.endswith(".conv2")} == {32}
    x = torch.randn(1, 3, 32, 32)
    check_explainable(model, x)
    exp = explain(model, x, [0], None)
    assert torch.isfinite(exp.input).all() and set(exp.components) == set(lm.names())


def test_count_grouping_still_applies() -> None:
    lm = discover_layers(tiny_densenet(), grouping="count")
    assert lm.grouping == "count" and lm.stage_rule == ""


# ---- refusals ----------------------------------------------------------------------------
def test_other_norm_on_a_dense_layer_input_is_refused() -> None:
    model = tiny_densenet()
    model.features.denseblock1.denselayer2.norm1 = nn.GroupNorm(2, 12).double()
    with pytest.raises(UnsupportedLayerError, match=r"features\.denseblock1\.denselayer2\.norm1"):
        explain(model, torch.randn(1, 3, 32, 32, dtype=torch.float64), [0], None)


def test_pre_activation_norm_without_running_stats_is_refused() -> None:
    model = tiny_densenet()
    model.features.transition1.norm = nn.BatchNorm2d(16, track_running_stats=False).double()
    with pytest.raises(UnsupportedLayerError, match=r"'features\.transition1\.norm'.*no running statistics"):
        explain(model, torch.randn(1, 3, 32, 32, dtype=torch.float64), [0], None)


class _OwnForward(torchvision.models.DenseNet):
    """A subclass with its own forward: not the family's, refused (never a silent gradient)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.nn.functional.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def test_densenet_subclass_with_own_forward_is_refused() -> None:
    model = _OwnForward(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2,
                        num_classes=5).eval()
    assert not FAMILY.matches(model)
    with pytest.raises(UnsupportedLayerError, match=r"denselayer2\.norm1.*registered right after.*denselayer1\.conv2"):
        explain(model, torch.randn(1, 3, 32, 32), [0], None)


# ---- components: masking, slicing, physical removal --------------------------------------
def _pruned(lm, rate: float, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    scores = {la.name: torch.rand(la.n_components, generator=g) for la in lm.prunable(("conv",))}
    return global_order(scores, lm, ("conv",)).pruned_at(rate)


def test_feature_readers_follow_the_concatenations() -> None:
    """Which pre-activation BatchNorms read a producer's channels, and at which offset."""
    model = tiny_densenet(blocks=(2, 3))
    readers = {k: [(n, o) for n, _, o in v] for k, v in FAMILY.feature_readers(model).items()}
    b1, b2 = "features.denseblock1", "features.denseblock2"
    assert readers["features.conv0"] == [(f"{b1}.denselayer1.norm1", 0), (f"{b1}.denselayer2.norm1", 0),
                                         ("features.transition1.norm", 0)]
    assert readers[f"{b1}.denselayer1.conv2"] == [(f"{b1}.denselayer2.norm1", 8),
                                                  ("features.transition1.norm", 8)]
    assert readers[f"{b2}.denselayer2.conv2"] == [(f"{b2}.denselayer3.norm1", 12), ("features.norm5", 12)]
    assert readers[f"{b2}.denselayer3.conv2"] == [("features.norm5", 16)]
    assert not any(n.endswith("conv1") for n in readers)  # bottlenecks are local


def test_masking_slicing_and_physical_removal_agree() -> None:
    """Every conv's channels are components; masking a global channel (conv0, growth conv2,
    transition conv) also silences it in every BatchNorm that reads it, so the masked model
    equals the physically pruned one (Torch-Pruning follows the concatenations)."""
    model = tiny_densenet(blocks=(2, 3)).float()
    lm = discover_layers(model)
    names = [la.name for la in lm.prunable(("conv",))]
    assert names == [n for n in lm.names() if n != "classifier"]
    pruned = _pruned(lm, 0.5)
    assert all(int(pruned[n].sum()) > 0 for n in ("features.conv0", "features.transition1.conv",
                                                    "features.denseblock1.denselayer1.conv2"))
    x = torch.randn(4, 3, 32, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        full = model(x)
        with Masker(model, lm, ("conv",)) as masker:
            masker.set_pruned(pruned)
            masked = model(x)
            slicer = Slicer(model, lm, ("conv",))
            assert set(slicer.sliceable) == set(names)
            assert {p.name for p in slicer.pairs} == {n for n in names if n.endswith(".conv1")}
            assert all(p.consumer_name.endswith(".conv2") for p in slicer.pairs)  # conv1 -> norm2 -> conv2
            assert [sorted(p.names) for p in slicer.plans] == [sorted(set(names) - {p.name for p in slicer.pairs})]
            with slicer:
                slicer.apply(pruned)
                sliced = model(x)
                # the global channels left the producers, every reader and its reading layer
                kept = {n: int((~pruned[n]).sum()) for n in names}
                f = model.features
                assert f.denseblock1.denselayer1.conv2.weight.shape[:2] == (
                    kept["features.denseblock1.denselayer1.conv2"], kept["features.denseblock1.denselayer1.conv1"])
                assert f.norm0.weight.numel() == kept["features.conv0"]
                width5 = kept["features.transition1.conv"] + sum(
                    kept[f"features.denseblock2.denselayer{i}.conv2"] for i in (1, 2, 3))
                assert f.norm5.running_var.numel() == width5 and model.classifier.weight.shape[1] == width5
                assert f.transition1.conv.weight.shape[1] == kept["features.conv0"] + sum(
                    kept[f"features.denseblock1.denselayer{i}.conv2"] for i in (1, 2))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(v is not None and v.shape == before[k].shape for k, v in model.state_dict().items())
    assert not torch.allclose(masked, full)
    torch.testing.assert_close(sliced, masked, rtol=1e-5, atol=1e-6)
    res = physical_prune(model, lm, pruned, x[:1], kinds=("conv",), measure_latency=False)
    assert res.params_after < res.params_before and res.macs_after < res.macs_before
    for name, mask in pruned.items():
        assert len(res.removed[name]) == int(mask.sum()) and not res.masked.get(name)
        assert res.model.get_submodule(name).out_channels == mask.numel() - int(mask.sum())
    kept1 = res.model.features.denseblock1.denselayer1.conv1.out_channels
    assert res.model.features.denseblock1.denselayer1.norm2.num_features == kept1
    assert res.model.features.denseblock1.denselayer1.conv2.in_channels == kept1
    growth = [res.model.get_submodule(f"features.denseblock2.denselayer{i}.conv2").out_channels for i in (1, 2, 3)]
    assert res.model.features.norm5.num_features == res.model.features.transition1.conv.out_channels + sum(growth)
    with torch.no_grad():
        torch.testing.assert_close(res.model(x), masked, rtol=1e-5, atol=1e-5)


def test_slicing_a_fully_pruned_growth_conv_keeps_one_zero_channel() -> None:
    model = tiny_densenet().float()
    lm = discover_layers(model)
    pruned = {la.name: torch.zeros(la.n_components, dtype=torch.bool) for la in lm.prunable(("conv",))}
    pruned["features.denseblock1.denselayer2.conv2"][:] = True
    pruned["features.conv0"][::2] = True
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), Masker(model, lm, ("conv",)) as masker:
        masker.set_pruned(pruned)
        masked = model(x)
        with Slicer(model, lm, ("conv",)) as slicer:
            slicer.apply(pruned)
            assert model.features.denseblock1.denselayer2.conv2.out_channels == 4  # attribute, not weight
            assert model.features.denseblock1.denselayer2.conv2.weight.shape[0] == 1
            sliced = model(x)
    torch.testing.assert_close(sliced, masked, rtol=1e-5, atol=1e-6)


def test_masking_only_silences_a_global_channel_with_its_readers() -> None:
    """Without the readers' BatchNorm channels, a zeroed growth channel still reaches the next
    layers as relu(shift): the masked model would not be the pruned one (the test can fail)."""
    from pxopt.prune import masking
    from pxopt.prune.targets import channel_targets

    model = tiny_densenet().float()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.bias.abs_()  # positive shifts: relu(shift) > 0 where a channel is zero
    lm = discover_layers(model)
    name = "features.denseblock1.denselayer1.conv2"
    mask = torch.zeros(4, dtype=torch.bool)
    mask[1] = True
    x = torch.randn(2, 3, 32, 32)
    res = physical_prune(model, lm, {name: mask}, x[:1], kinds=("conv",), measure_latency=False)
    layer = lm.by_name()[name]
    own = channel_targets(model, layer)
    assert len(masking.component_targets(model, layer)) == len(own) + 4  # norm1 of layer 2, transition norm
    with torch.no_grad():
        saved = [t.tensor[1].clone() for t in own]
        for t in own:
            t.tensor[1] = 0
        only_own = model(x)
        for t, v in zip(own, saved, strict=True):
            t.tensor[1] = v
        assert not torch.allclose(only_own, res.model(x), atol=1e-4)


def test_accuracy_curve_modes_agree() -> None:
    """The curve's fast paths (slicing, prefix cache) give the masked model's accuracies."""
    from pxopt.data import Task, TensorSet
    from pxopt.evaluate import accuracy_curve

    model = tiny_densenet(blocks=(1, 2, 1)).float()
    model.requires_grad_(False)
    lm = discover_layers(model)
    g = torch.Generator().manual_seed(3)
    val = TensorSet(torch.randn(24, 3, 32, 32, generator=g), torch.arange(24) % 5)
    task = Task(dataset="random", classes=list(range(5)), class_names=list("abcde"), reference=val,
                validation=val, seed=0, n_ref=2, n_val=4)
    scores = {la.name: torch.rand(la.n_components, generator=g) for la in lm.prunable(("conv",))}
    rates = [0.0, 0.2, 0.4, 0.6]
    masked = accuracy_curve(model, task, lm, scores, kinds=("conv",), rates=rates, mode="mask",
                            prefix_cache_bytes=0, detect_severed=False)
    fast = accuracy_curve(model, task, lm, scores, kinds=("conv",), rates=rates, mode="auto")
    assert masked.accuracies == fast.accuracies


def test_default_stabilisers_conserve_to_their_size() -> None:
    """With the default stabilisers (1e-6) the bias-free sums hold to 1e-3 (as for ResNets)."""
    model = tiny_densenet(bias_free=True)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    exp = explain(model, x, [1, 3], EPS_TINY, start="logit")
    want = exp.output[[0, 1], [1, 3]]
    assert torch.allclose(exp.input.sum((1, 2, 3)), want, rtol=1e-3, atol=1e-6)


def test_lrp_still_conserves_on_the_masked_model(tiny_stabilisers: None) -> None:
    """Masked bottleneck channels: zero relevance there, the bias-free net still conserves."""
    model = tiny_densenet(bias_free=True)
    lm = discover_layers(model)
    pruned = _pruned(lm, 0.5)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with Masker(model, lm, ("conv",)) as masker:
        masker.set_pruned(pruned)
        exp = explain(model, x, [0, 2], EPS_TINY, start="logit", layer_map=lm)
    want = exp.output[[0, 1], [0, 2]]
    assert torch.allclose(exp.input.sum((1, 2, 3)), want, rtol=1e-6, atol=1e-9)
    for name, mask in pruned.items():
        assert torch.all(exp.components[name][:, mask] == 0), name


# ---- search -----------------------------------------------------------------------------
def test_a_search_trial_completes(tmp_path: Path) -> None:
    from pxopt.data import Task, TensorSet
    from pxopt.pipeline import Pipeline
    from pxopt.search import StudySpec, run_search

    model = tiny_densenet(blocks=(1, 2, 1)).float()
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    ref = TensorSet(torch.randn(6, 3, 32, 32, generator=g), torch.arange(6) % 3)
    val = TensorSet(torch.randn(12, 3, 32, 32, generator=g), torch.arange(12) % 3)
    task = Task(dataset="random", classes=[0, 1, 2], class_names=["a", "b", "c"], reference=ref,
                validation=val, seed=0, n_ref=2, n_val=4)
    pipe = Pipeline(model=model, task=task, layer_map=discover_layers(model), kinds=("conv",),
                    rates=[0.0, 0.25, 0.5], device=torch.device("cpu"), batch_size=8)
    pipe.check_explainable()
    assert set(pipe.layer_map.groups()) == {"input", "low", "mid", "high", "fc"}
    spec = StudySpec(name="dn", model="builtin:tiny-test", data="random", classes=3, n_ref=2, n_val=4,
                     batch_size=8, rates=pipe.rates, storage=str(tmp_path / "d.db"), trials=2,
                     pruner={"name": "none"}).validated()
    study = run_search(spec, pipe.evaluate, timings=pipe.timings).study
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert done and all(0.0 <= t.value for t in done)


def test_family_registry_and_models_listing() -> None:
    """The family is found by `family_of` (exact DenseNet forward only) and listed."""
    from pxopt.families import family_of
    from pxopt.models import describe_supported
    from pxopt.prune.masking import component_targets

    model = tiny_densenet()
    assert family_of(model) is FAMILY and FAMILY.kind == "cnn"
    assert not FAMILY.matches(_OwnForward(growth_rate=4, block_config=(2, 2), num_init_features=8))
    layer = discover_layers(model).by_name()["features.transition1.conv"]
    mine = [(t.tensor.data_ptr(), t.index_map(torch.tensor([2])).item()) for t in FAMILY.mask_targets(model, layer)]
    generic = [(t.tensor.data_ptr(), t.index_map(torch.tensor([2])).item()) for t in component_targets(model, layer)]
    assert mine == generic and len(mine) == 1 + 2 * 3  # conv rows; 2 dense layers' norm1 and norm5
    assert "DenseNet" in describe_supported()


def test_every_criterion_scores_every_conv() -> None:
    """The baselines (weights, activations, gradients, IG, LRP variants) read DenseNet's convs."""
    from pxopt.criteria import CRITERIA
    from pxopt.criteria.compute import compute_scores

    model = tiny_densenet().float()
    model.requires_grad_(False)
    lm = discover_layers(model)
    batches = [(torch.randn(2, 3, 32, 32), torch.tensor([0, 3]))]
    for name in CRITERIA:
        sc = compute_scores(name, model, batches, lm, kinds=("conv",), steps=2)
        assert set(sc.abs) == {la.name for la in lm.prunable(("conv",))}, name
        assert all(torch.isfinite(v).all() and v.numel() == lm.by_name()[k].n_components
                   for k, v in sc.abs.items()), name


def test_timm_densenet_is_refused() -> None:
    """timm's DenseNet (BatchNormAct2d: BatchNorm and activation in one module) is not this
    family's: refused naming where, never explained with a plain gradient."""
    from timm.models.densenet import DenseNet as TimmDenseNet

    model = TimmDenseNet(growth_rate=4, block_config=(2, 2), num_classes=5, bn_size=2).eval()
    assert not FAMILY.matches(model)
    with pytest.raises(UnsupportedLayerError, match=r"(?i)features\.denseblock.*batchnorm"):
        explain(model, torch.randn(1, 3, 32, 32), [0], None)


def test_memory_efficient_densenet_explains_like_the_plain_one() -> None:
    """memory_efficient=True (gradient checkpointing in the dense layers) gets the same
    relevances: the family's dense-layer forward does not checkpoint."""
    plain = tiny_densenet()
    torch.manual_seed(0)
    ckpt = torchvision.models.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2,
                                       num_classes=5, memory_efficient=True).double().eval()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    a = explain(plain, x, [1, 2], COMPOSITES["mixed"])
    b = explain(ckpt, x, [1, 2], COMPOSITES["mixed"])
    assert torch.equal(a.input, b.input) and torch.equal(a.output, b.output)
