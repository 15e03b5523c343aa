"""Ranking, nesting, caps and exact in-place masks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pxopt.errors import ConfigError
from pxopt.prune import Cap, Masker, global_order
from tests._prune_helpers import simple_layer_map, tiny_resnet, tiny_vit


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _bit_identical(model: nn.Module, snap: dict[str, torch.Tensor]) -> bool:
    return all(
        torch.equal(v.view(torch.uint8) if v.is_floating_point() else v,
                    snap[k].view(torch.uint8) if v.is_floating_point() else snap[k])
        for k, v in model.state_dict().items()
    )


def _rand_scores(lm, kinds=("conv",)):
    g = torch.Generator().manual_seed(1)
    return {layer.name: torch.rand(layer.n_components, generator=g) for layer in lm.prunable(kinds)}


def test_order_is_global_ascending_and_nested():
    model = tiny_resnet()
    lm = simple_layer_map(model, "fc")
    scores = _rand_scores(lm)
    order = global_order(scores, lm, "conv")
    flat = torch.cat([scores[n] for n in order.names])
    offsets = torch.tensor([0] + [order.n_components[n] for n in order.names]).cumsum(0)
    ranked = flat[offsets[order.layer_index] + order.component_index]
    assert bool((ranked[1:] >= ranked[:-1]).all())
    assert order.n_total == flat.numel() == len(order)
    prev = None
    for rate in [0.0, 0.1, 0.2, 0.3, 0.5, 0.95]:
        cur = order.pruned_at(rate)
        assert sum(int(m.sum()) for m in cur.values()) == int(rate * order.n_total + 1e-9)
        if prev is not None:
            assert all(bool((prev[n] <= cur[n]).all()) for n in cur)  # nested
        prev = cur
    rev = global_order(scores, lm, "conv", most_relevant_first=True)
    first = rev.pruned_first(1)
    top = max(((n, int(s.argmax()), float(s.max())) for n, s in scores.items()), key=lambda t: t[2])
    assert bool(first[top[0]][top[1]])


def test_classifier_never_ranked_and_bad_input_raises():
    model = tiny_resnet()
    lm = simple_layer_map(model, "fc")
    scores = _rand_scores(lm, ("conv", "linear"))
    order = global_order(scores, lm, ("conv", "linear"))
    assert "fc" not in order.names and "hidden" in order.names
    with pytest.raises(ConfigError):
        global_order(scores, lm, "head")
    bad = dict(scores)
    bad["stem"] = torch.full_like(bad["stem"], float("nan"))
    with pytest.raises(ConfigError, match="NaN"):
        global_order(bad, lm, ("conv", "linear"))
    short = dict(scores)
    short["stem"] = short["stem"][:-1]
    with pytest.raises(ConfigError, match="components"):
        global_order(short, lm, ("conv", "linear"))


def test_cap_keeps_at_least_k_and_at_most_fraction():
    model = tiny_resnet()
    lm = simple_layer_map(model, "fc")
    scores = _rand_scores(lm)
    scores["stem"] = scores["stem"] * 0  # the stem is the least relevant: would be wiped out
    order = global_order(scores, lm, "conv", cap=Cap(min_keep=2, max_fraction=0.5))
    full = order.pruned_at(1.0)
    for name, mask in full.items():
        n = order.n_components[name]
        assert int((~mask).sum()) >= 2
        assert int(mask.sum()) <= int(0.5 * n)
    assert order.capped["stem"] == 8 - 4
    uncapped = global_order(scores, lm, "conv")
    assert int(uncapped.pruned_at(0.2)["stem"].sum()) == 8  # the guard matters here


def test_conv_mask_outputs_exact_zero_with_bn_shift_and_undo_is_bit_exact():
    model = tiny_resnet()
    lm = simple_layer_map(model, "fc")
    x = torch.randn(4, 1, 28, 28)
    snap = _snapshot(model)
    ref = model(x)
    seen: dict[str, torch.Tensor] = {}
    hooks = [model.bn.register_forward_hook(lambda m, i, o: seen.__setitem__("bn", o)),
             model.features[1].register_forward_hook(lambda m, i, o: seen.__setitem__("f1", o))]
    pruned = {"stem": torch.zeros(8, dtype=torch.bool), "features.0": torch.zeros(16, dtype=torch.bool)}
    pruned["stem"][[1, 5]] = True
    pruned["features.0"][[0, 3, 7]] = True
    with Masker(model, lm, "conv") as masker:
        masker.set_pruned(pruned)
        out = model(x)
        assert not torch.equal(out, ref)
        assert bool((seen["bn"][:, [1, 5]] == 0).all())  # BN output, shift included
        assert bool((seen["f1"][:, [0, 3, 7]] == 0).all())
        assert bool((seen["bn"][:, [0, 2]] != 0).any())
    for h in hooks:
        h.remove()
    assert _bit_identical(model, snap)
    assert torch.equal(model(x), ref)


def test_masker_grows_shrinks_and_restores_on_exception():
    model = tiny_resnet()
    lm = simple_layer_map(model, "fc")
    order = global_order(_rand_scores(lm), lm, "conv")
    snap = _snapshot(model)
    x = torch.randn(2, 1, 28, 28)
    with Masker(model, lm, "conv") as masker:
        masker.set_pruned(order.pruned_at(0.5))
        direct = model(x)
        masker.set_pruned(order.pruned_at(0.1))
        masker.set_pruned(order.pruned_at(0.3))  # nested growth after a shrink
        masker.set_pruned(order.pruned_at(0.5))
        assert torch.equal(model(x), direct)
    assert _bit_identical(model, snap)
    with pytest.raises(RuntimeError, match="boom"):
        with Masker(model, lm, "conv") as masker:
            masker.set_pruned(order.pruned_at(0.7))
            raise RuntimeError("boom")
    assert _bit_identical(model, snap)


def test_linear_mask_silences_neuron():
    model = tiny_resnet()
    lm = simple_layer_map(model, "fc")
    x = torch.randn(3, 1, 28, 28)
    seen = {}
    h = model.hidden.register_forward_hook(lambda m, i, o: seen.__setitem__("h", o))
    mask = torch.zeros(16, dtype=torch.bool)
    mask[[2, 9]] = True
    with Masker(model, lm, "linear") as masker:
        masker.set_pruned({"hidden": mask})
        model(x)
    h.remove()
    assert bool((seen["h"][:, [2, 9]] == 0).all()) and bool((seen["h"][:, ~mask] != 0).any())


def test_timm_head_mask_removes_head_contribution():
    model = tiny_vit()
    lm = simple_layer_map(model, "head")
    assert [la.kind for la in lm].count("heads") == 2
    attn = model.blocks[0].attn
    x = torch.randn(2, 1, 28, 28)
    seen = {}
    h = attn.proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("in", a[0]))
    snap = _snapshot(model)
    mask = torch.tensor([False, True, False, False])
    with Masker(model, lm, "heads") as masker:
        masker.set_pruned({"blocks.0.attn": mask})
        out = model(x)
    h.remove()
    hd = 32 // 4
    heads = seen["in"].reshape(2, -1, 4, hd)
    assert bool((heads[:, :, 1] == 0).all()) and bool((heads[:, :, 0] != 0).any())
    assert _bit_identical(model, snap)
    # Same result as removing the head's columns from the output projection by hand.
    with torch.no_grad():
        w = attn.proj.weight.clone()
        attn.proj.weight[:, hd:2 * hd] = 0
        ref = model(x)
        attn.proj.weight.copy_(w)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_torchvision_mha_head_mask():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    nn.init.normal_(mha.in_proj_bias)
    nn.init.normal_(mha.out_proj.bias)

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = mha

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    model = Wrap().eval()
    lm = simple_layer_map(model, "none")
    x = torch.randn(2, 5, 16)
    mask = torch.tensor([True, False, False, True])
    snap = _snapshot(model)
    with Masker(model, lm, "heads") as masker:
        masker.set_pruned({"attn": mask})
        out = model(x)
    assert _bit_identical(model, snap)
    with torch.no_grad():  # reference: the heads' columns of out_proj removed
        w = mha.out_proj.weight.clone()
        for h in (0, 3):
            mha.out_proj.weight[:, 4 * h:4 * h + 4] = 0
        ref = model(x)
        mha.out_proj.weight.copy_(w)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
