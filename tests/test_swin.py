"""Swin transformers (torchvision and timm) end to end: LRP, components, masking, slicing,
physical removal, stage groups, a search trial (pxopt.families.swin)."""

from __future__ import annotations

import pytest
import torch
from timm.models.swin_transformer import SwinTransformer as TimmSwin
from torch import nn
from torchvision.models.swin_transformer import SwinTransformer as TvSwin

from pxopt.errors import UnsupportedLayerError
from pxopt.families import family_of
from pxopt.families.swin import _stage_group, explain_swin, swin_structure
from pxopt.layers import discover_layers
from pxopt.lrp import component_relevance, explain
from pxopt.prune import Masker, global_order
from pxopt.prune.physical import physical_prune
from pxopt.prune.slicing import Slicer

KINDS = ("heads", "mlp")


def tiny_tv(seed: int = 0) -> nn.Module:
    """32x32 input: stage 1 at 8x8 with 4x4 windows (shifted, masked), stage 2 at 4x4."""
    torch.manual_seed(seed)
    return TvSwin(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                  window_size=[4, 4], num_classes=10).eval()


def tiny_timm(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TimmSwin(img_size=32, patch_size=4, num_classes=10, embed_dim=16, depths=(2, 2),
                    num_heads=(2, 2), window_size=4).eval()


MAKERS = [pytest.param(tiny_tv, id="torchvision"), pytest.param(tiny_timm, id="timm")]


def eps_rules(eps: float, softmax: str) -> dict:
    return {"groups": {g: {"rule": "epsilon", "epsilon": eps}
                       for g in ("input", "low", "mid", "high", "fc")}, "softmax": softmax}


def bias_free(model: nn.Module) -> nn.Module:
    """Every bias zero except the relative position bias (a logit constant, see below)."""
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            nn.init.zeros_(p)
    return model


def _inputs(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 3, 32, 32, generator=g, dtype=dtype), torch.tensor([1, 7])


# --------------------------------------------------------------------------- family


@pytest.mark.parametrize("make", MAKERS)
def test_family_and_dispatch(make) -> None:
    model = make()
    assert family_of(model).name == "swin" and family_of(model).kind == "vit"
    st = swin_structure(model)
    assert st.n_stages == 2 and len(st.blocks) == 4 and len(st.merges) == 1
    # stage 1, block 1 is shifted: the shifted-window mask is exercised
    shifted = st.blocks[1].attn.shift_size if st.family == "torchvision" else st.blocks[1].module.shift_size
    assert list(shifted) == [2, 2]


def test_stage_groups_swin_t() -> None:
    """swin_t (depths 2-2-6-2): stage 1 low, stages 2-3 mid, stage 4 high (ResNet's rule)."""
    from torchvision.models import swin_t

    lm = discover_layers(swin_t())
    assert lm.stage_rule == "swin" and lm.grouping == "stage"
    groups = {la.name: la.group for la in lm}
    assert groups["features.0.0"] == "input" and groups["head"] == "fc"
    assert [groups[f"features.1.{i}.attn"] for i in range(2)] == ["low"] * 2
    assert [groups[f"features.3.{i}.attn"] for i in range(2)] == ["mid"] * 2
    assert [groups[f"features.5.{i}.mlp.0"] for i in range(6)] == ["mid"] * 6
    assert [groups[f"features.7.{i}.attn"] for i in range(2)] == ["high"] * 2
    heads = {la.name: la.n_components for la in lm if la.kind == "heads"}
    assert heads["features.1.0.attn"] == 3 and heads["features.7.1.attn"] == 24
    count = discover_layers(swin_t(), grouping="count")  # 12 blocks by quarters: 0-2 / 3-8 / 9-11
    cg = [la.group for la in count if la.kind == "heads"]
    assert cg == ["low"] * 3 + ["mid"] * 6 + ["high"] * 3 and count.stage_rule == ""
    assert [_stage_group(s, 3) for s in range(3)] == ["low", "mid", "high"]
    assert [_stage_group(s, 2) for s in range(2)] == ["low", "high"]


# --------------------------------------------------------------------------- LRP


@pytest.mark.parametrize("make", MAKERS)
@pytest.mark.parametrize("fused", [True, False])
def test_forward_equal_and_model_restored(make, fused: bool) -> None:
    model = make()
    x, t = _inputs()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(x)
    exp = explain_swin(model, x, t, None, fused=fused)
    torch.testing.assert_close(exp.output, ref, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not any("forward" in m.__dict__ or m._forward_pre_hooks or m._forward_hooks
                   for m in model.modules())
    assert {k: tuple(v.shape) for k, v in exp.components.items() if k.endswith("attn")} == \
        {la.name: (2, 2) for la in discover_layers(model) if la.kind == "heads"}


@pytest.mark.parametrize("make", MAKERS)
def test_conservation_cp_float64(make) -> None:
    """Bias-free, CP softmax, eps tiny: input relevance == the logit (shifted windows, masks,
    relative bias, patch merging, LayerNorms and pooling all conserve)."""
    model = bias_free(make()).double()
    x, t = _inputs(torch.float64)
    exp = explain_swin(model, x, t, eps_rules(1e-12, "cp"), start="logit")
    logit = exp.output.gather(1, t[:, None]).flatten()
    torch.testing.assert_close(exp.input.sum(dim=(1, 2, 3)), logit, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("make", MAKERS)
def test_attnlrp_fused_equals_explicit(make) -> None:
    """The fused kernel with the bias (+ mask) as additive mask gives AttnLRP exactly."""
    model = make().double()
    x, t = _inputs(torch.float64)
    a = explain_swin(model, x, t, eps_rules(1e-9, "attnlrp"), fused=True)
    b = explain_swin(model, x, t, eps_rules(1e-9, "attnlrp"), fused=False)
    torch.testing.assert_close(a.input, b.input, rtol=1e-9, atol=1e-12)
    for name in a.components:
        torch.testing.assert_close(a.components[name], b.components[name], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("fused", [True, False])
def test_relative_bias_absorbs_its_share(fused: bool) -> None:
    """The bias (relative position bias + window mask) is a logit constant: the logits'
    relevance is L ⊙ grad_L (AttnLRP's softmax rule), q·kᵀ passes on (L − b) ⊙ grad_L and the
    bias keeps b ⊙ grad_L; v gets half the output's relevance (uniform rule)."""
    import pxopt.lrp.attention as ops

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    bias = torch.randn(3, 2, 5, 5, generator=g, dtype=torch.float64)
    bias[0, :, 0, 1:] = -100.0  # a masked entry, as in shifted windows
    seed = torch.randn(3, 2, 5, 4, generator=g, dtype=torch.float64)
    scale = 0.5
    out = ops.biased_attention(q, k, v, scale, bias, "attnlrp", fused=fused)
    gq, gk, gv = torch.autograd.grad(out, (q, k, v), seed)
    r_out = (out * seed).sum()
    with torch.no_grad():
        logits = (q * scale) @ k.transpose(-2, -1) + bias
        s = torch.softmax(logits, -1)
        g_a = 0.5 * (seed @ v.transpose(-2, -1))
        g_l = s * (g_a - (s * g_a).sum(-1, keepdim=True))
    r_qk = (q * gq).sum() + (k * gk).sum()
    torch.testing.assert_close(r_qk, ((logits - bias) * g_l).sum())
    torch.testing.assert_close((v * gv).sum(), 0.5 * r_out)
    assert abs(float((bias * g_l).sum())) > 1e-3  # the bias's share is not passed on


@pytest.mark.parametrize("make", MAKERS)
def test_explain_dispatch_and_component_relevance(make) -> None:
    model = make()
    x, t = _inputs()
    exp = explain(model, x, t, None)
    direct = explain_swin(model, x, t, None)
    torch.testing.assert_close(exp.input, direct.input)
    scores = component_relevance(model, [(x, t)], None)
    assert scores.default_ranking == "token-abs"
    assert set(scores.abs) == {la.name for la in discover_layers(model).prunable(KINDS)}


@pytest.mark.parametrize("make", MAKERS)
def test_tokens_and_token_abs(make) -> None:
    """Per-token relevance (batch, tokens, n): heads over all windows' queries (64 tokens at
    8x8), MLP neurons per position; sums give the components, |.| sums `token_abs`."""
    model = make().double()
    x, t = _inputs(torch.float64)
    exp = explain_swin(model, x, t, eps_rules(1e-9, "attnlrp"), tokens=True)
    assert exp.tokens is not None and list(exp.tokens) == list(exp.components)
    for name, comp in exp.components.items():
        tok = exp.tokens[name]
        assert tok.dim() == 3 and tok.shape[0] == 2 and tok.shape[2] == comp.shape[1]
        torch.testing.assert_close(tok.sum(1), comp)
        torch.testing.assert_close(tok.abs().sum(1), exp.token_abs[name])
        assert bool((exp.token_abs[name] >= comp.abs() - 1e-12).all())
    first_heads = next(n for n in exp.tokens if n.endswith("attn"))
    assert exp.tokens[first_heads].shape == (2, 64, 2)


@pytest.mark.parametrize("make", MAKERS)
def test_masked_head_gets_no_relevance(make) -> None:
    """Masking zeroes a head's value rows: its output, and so its relevance, is exactly 0."""
    model = make()
    x, t = _inputs()
    lm = discover_layers(model)
    name = next(la.name for la in lm if la.kind == "heads")
    with Masker(model, lm, KINDS) as mk:
        mk.set_pruned({name: torch.tensor([True, False])})
        exp = explain_swin(model, x, t, None)
    assert torch.all(exp.components[name][:, 0] == 0) and torch.all(exp.components[name][:, 1] != 0)


# --------------------------------------------------------------------------- pruning


def _pruned(model: nn.Module, rate: float = 0.4):
    lm = discover_layers(model)
    g = torch.Generator().manual_seed(1)
    scores = {la.name: torch.rand(la.n_components, generator=g) for la in lm.prunable(KINDS)}
    return lm, global_order(scores, lm, KINDS).pruned_at(rate)


@pytest.mark.parametrize("make", MAKERS)
def test_mask_slice_physical_agree(make) -> None:
    model = make()
    x, _ = _inputs()
    lm, pruned = _pruned(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        base = model(x)
        with Masker(model, lm, KINDS) as mk:
            mk.set_pruned(pruned)
            masked = model(x)
            with Slicer(model, lm, KINDS) as sl:
                assert sorted(sl.sliceable) == sorted(la.name for la in lm.prunable(KINDS))
                sl.apply(pruned)
                sliced = model(x)
                first = next(la for la in lm if la.kind == "heads")
                assert first.module.num_heads == 2 - int(pruned[first.name].sum())
            assert not any("forward" in m.__dict__ for m in model.modules())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not torch.allclose(masked, base)
    torch.testing.assert_close(sliced, masked, rtol=1e-5, atol=1e-6)
    res = physical_prune(model, lm, pruned, x[:1], kinds=KINDS, measure_latency=False)
    fc1 = [la for la in lm if la.kind == "mlp"][0]
    slim = res.model.get_submodule(fc1.name)
    assert slim.out_features == fc1.n_components - int(pruned[fc1.name].sum())
    heads = [la.name for la in lm if la.kind == "heads"]
    if isinstance(model, TimmSwin):  # timm: pruned heads removed (pxopt's own record)
        assert all(res.removed[h] == pruned[h].nonzero().flatten().tolist() for h in heads)
        assert res.model.layers[0].blocks[0].attn.num_heads == 2 - len(res.removed[heads[0]])
        assert res.heads_removed and res.pruning_record()["heads_removed"] == res.heads_removed
    else:  # torchvision: the head width follows the input width, heads stay masked
        assert all(res.removed[h] == [] for h in heads)
        assert res.masked[heads[0]] == pruned[heads[0]].nonzero().flatten().tolist()
    assert res.params_after < res.params_before
    with torch.no_grad():
        torch.testing.assert_close(res.model(x), masked, rtol=1e-5, atol=1e-6)


def test_physical_timm_swin_reloads(tmp_path) -> None:
    """Removed heads and neurons come back through `load_pruned` on a fresh model (the
    Torch-Pruning history, then pxopt's head record), and every head pruned keeps one."""
    from pxopt.prune.physical import load_pruned

    model = tiny_timm()
    x, _ = _inputs()
    lm, pruned = _pruned(model)
    pruned["layers.1.blocks.0.attn"] = torch.tensor([True, True])  # all: one stays, masked
    res = physical_prune(model, lm, pruned, x[:1], kinds=KINDS, measure_latency=False)
    assert res.removed["layers.1.blocks.0.attn"] == [1] and res.masked["layers.1.blocks.0.attn"] == [0]
    path = res.save_state(tmp_path / "p.pt")
    back = load_pruned(tiny_timm(seed=5), path, x[:1])
    with torch.no_grad():
        torch.testing.assert_close(back(x), res.model(x))
        with Masker(model, lm, KINDS) as mk:
            mk.set_pruned(pruned)
            torch.testing.assert_close(res.model(x), model(x), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- refusals


@pytest.mark.slow  # torch.export takes ~15 s here
def test_physical_timm_swin_exports(tmp_path) -> None:
    from pxopt.prune.physical import export_program

    model = tiny_timm()
    x, _ = _inputs()
    lm, pruned = _pruned(model)
    res = physical_prune(model, lm, pruned, x[:1], kinds=KINDS, measure_latency=False)
    assert res.heads_removed
    assert export_program(res.model, x, tmp_path / "swin.pt2")["max_abs_diff"] <= 1e-5


def test_swin_v2_and_subclasses_are_refused() -> None:
    from torchvision.models.swin_transformer import (
        PatchMergingV2,
        ShiftedWindowAttentionV2,
        SwinTransformerBlockV2,
    )

    v2 = TvSwin(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=[4, 4],
                num_classes=10, block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2).eval()
    assert any(isinstance(m, ShiftedWindowAttentionV2) for m in v2.modules())
    x, t = _inputs()
    with pytest.raises(UnsupportedLayerError, match="features.1.0.*V2"):
        explain(v2, x, t, None)
    with pytest.raises(UnsupportedLayerError, match="V2"):
        discover_layers(v2)

    class MySwin(TvSwin):
        pass

    sub = MySwin(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                 window_size=[4, 4], num_classes=10)
    with pytest.raises(UnsupportedLayerError, match="not exactly"):
        explain(sub, x, t, None)
    from timm.models.swin_transformer_v2 import SwinTransformerV2

    timm_v2 = SwinTransformerV2(img_size=32, patch_size=4, num_classes=10, embed_dim=16,
                                depths=(2, 2), num_heads=(2, 2), window_size=4).eval()
    with pytest.raises(UnsupportedLayerError, match="Swin V2"):
        explain(timm_v2, x, t, None)
    with pytest.raises(UnsupportedLayerError, match="Swin V2"):
        discover_layers(timm_v2)
    model = tiny_tv()
    model.features[1][0].mlp[1] = nn.Softplus()  # an activation without a rule
    with pytest.raises(UnsupportedLayerError, match="Softplus"):
        explain(model, x, t, None)


# --------------------------------------------------------------------------- search


def test_search_trial_on_tiny_swin(tmp_path) -> None:
    """A Pipeline on a tiny random Swin with a tiny synthetic task completes a search trial."""
    from pxopt.data import Task, TensorSet
    from pxopt.pipeline import Pipeline
    from pxopt.search import StudySpec, run_search

    model = tiny_timm()
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(2)
    ref = TensorSet(torch.randn(6, 3, 32, 32, generator=g), torch.arange(6) % 3)
    val = TensorSet(torch.randn(9, 3, 32, 32, generator=g), torch.arange(9) % 3)
    task = Task(dataset="random", classes=[0, 1, 2], class_names=["a", "b", "c"], reference=ref,
                validation=val, seed=0, n_ref=2, n_val=3)
    pipe = Pipeline(model=model, task=task, layer_map=discover_layers(model), kinds=KINDS,
                    rates=[0.0, 0.25, 0.5], device=torch.device("cpu"), batch_size=8, family="vit")
    pipe.check_explainable()
    spec = StudySpec(name="swin", storage=str(tmp_path / "s.db"), trials=1, seed=0,
                     baselines=False, rates=[0.0, 0.25, 0.5]).validated()
    result = run_search(spec, pipeline=pipe, family="vit")
    trials = result.study.trials
    assert len(trials) == 1 and trials[0].state.name == "COMPLETE"


# --------------------------------------------------------------------------- criteria


@pytest.mark.parametrize("make", MAKERS)
def test_head_site_per_image(make) -> None:
    """The criteria's head site: the forward equals the model's, the head outputs come per
    image over all its windows, a masked head's are zero, and the undo leaves nothing."""
    from pxopt.criteria import sites as site_mod

    model = make()
    x, _ = _inputs()
    lm = discover_layers(model)
    sites = site_mod.make_sites([la for la in lm if la.kind == "heads"])
    seen: dict[str, torch.Tensor] = {}
    handles = [s.register(lambda t, s=s: seen.__setitem__(s.name, t)) for s in sites]
    with torch.no_grad():
        ref = make()(x)
        out = model(x)
    for h in handles:
        h.remove()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert not any("forward" in m.__dict__ or m._forward_pre_hooks for m in model.modules())
    first = sites[0]
    assert seen[first.name].shape == (2, 64, 16)  # 8x8 tokens of one image, 2 heads x 8
    assert first.per_component(seen[first.name]).shape == (2, 2)
    with Masker(model, lm, KINDS) as mk, torch.no_grad():
        mk.set_pruned({first.name: torch.tensor([False, True])})
        h = first.register(lambda t: seen.__setitem__("masked", t))
        model(x)
        h.remove()
    assert torch.all(first.per_component(seen["masked"].abs())[:, 1] == 0)


@pytest.mark.parametrize("make", MAKERS)
def test_gradient_criteria_batch_invariant(make) -> None:
    """Taylor scores of heads and neurons: a batch of two equals the two samples alone."""
    from pxopt.criteria.compute import compute_scores

    model = make()
    x, t = _inputs()
    lm = discover_layers(model)
    both = compute_scores("taylor", model, [(x, t)], lm, kinds=KINDS)
    one = compute_scores("taylor", model, [(x[:1], t[:1]), (x[1:], t[1:])], lm, kinds=KINDS)
    for name in both.abs:
        torch.testing.assert_close(both.abs[name], one.abs[name], rtol=1e-4, atol=1e-7)
    assert set(both.abs) == {la.name for la in lm.prunable(KINDS)}
    weight = compute_scores("weight", model, [(x, t)], lm, kinds=KINDS)  # head_projection
    assert all(v.shape == (2,) for k, v in weight.abs.items() if k.endswith("attn"))


def test_models_lists_swin_and_loaded_family() -> None:
    from torchvision.models import swin_t

    from pxopt.models import describe_supported
    from pxopt.models.loaded import model_family

    assert "swin " in describe_supported()
    assert model_family(swin_t()) == "vit" and model_family(tiny_timm()) == "vit"


def test_padded_windows_forward_and_conservation() -> None:
    """40x40 inputs: 10x10 tokens are padded to 12x12 for the windows, patch merging pads 5x5
    stages; the forward still equals the model's and CP-LRP still conserves (float64)."""
    torch.manual_seed(0)
    models = [tiny_tv(), TimmSwin(img_size=40, patch_size=4, num_classes=10, embed_dim=16,
                                  depths=(2, 2), num_heads=(2, 2), window_size=4).eval()]
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 40, 40, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 7])
    for model in models:
        model = model.double()
        with torch.no_grad():
            ref = model(x)
        torch.testing.assert_close(explain_swin(model, x, t, None).output, ref)
        exp = explain_swin(bias_free(model), x, t, eps_rules(1e-12, "cp"), start="logit")
        torch.testing.assert_close(exp.input.sum(dim=(1, 2, 3)), exp.output.gather(1, t[:, None]).flatten(),
                                   rtol=1e-6, atol=1e-9)
