"""Baseline criteria: shapes, hand-checkable values, IG completeness, heads, differ from random."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pxopt.criteria import CRITERIA, compute_scores
from pxopt.criteria.sites import make_sites
from pxopt.errors import ConfigError
from pxopt.prune import Masker, global_order
from tests._prune_helpers import simple_layer_map, tiny_resnet, tiny_vit, trained_tiny_resnet


@pytest.fixture(scope="module")
def trained():
    from pxopt.data import make_task
    from pxopt.layers import discover_layers

    model = trained_tiny_resnet()
    task = make_task("mnist-5k", classes=None, n_ref=5, n_val=30, seed=0)
    return model, discover_layers(model), task


def test_every_criterion_runs_and_differs_from_random(trained):
    model, lm, task = trained
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    kinds = ("conv", "linear")
    names = [la.name for la in lm.prunable(kinds)]
    rnd = compute_scores("random", model, task.reference_batches(32, "cpu"), lm, kinds=kinds, seed=0)
    rnd_order = global_order(rnd.abs, lm, kinds)
    for name in CRITERIA:
        sc = compute_scores(name, model, task.reference_batches(32, "cpu"), lm, kinds=kinds)
        assert sc.criterion == name and sorted(sc.abs) == sorted(names)
        assert sc.is_finite()
        for la in lm.prunable(kinds):
            assert sc.abs[la.name].shape == (la.n_components,)
        if name != "random":
            assert sc.n_samples == 50 or name.startswith("weight")
            order = global_order(sc.abs, lm, kinds)
            same = (order.layer_index == rnd_order.layer_index) & (order.component_index == rnd_order.component_index)
            assert float(same.float().mean()) < 0.5
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


def test_taylor_and_lrp_epsilon_beat_random_on_trained_model(trained):
    from pxopt.evaluate import accuracy_curve

    model, lm, task = trained
    areas = {}
    for name in ("random", "taylor", "lrp-epsilon"):
        sc = compute_scores(name, model, task.reference_batches(32, "cpu"), lm, kinds="conv")
        areas[name] = accuracy_curve(model, task, lm, sc, kinds="conv").area
    assert areas["taylor"] > areas["random"]
    assert areas["lrp-epsilon"] > areas["random"]


def test_random_is_seeded_and_weight_is_l1():
    model = tiny_resnet()
    lm = simple_layer_map(model, "fc")
    a = compute_scores("random", model, [], lm, kinds="conv", seed=3)
    b = compute_scores("random", model, [], lm, kinds="conv", seed=3)
    c = compute_scores("random", model, [], lm, kinds="conv", seed=4)
    assert all(torch.equal(a.abs[k], b.abs[k]) for k in a.abs)
    assert not torch.equal(a.abs["stem"], c.abs["stem"])
    w = compute_scores("weight", model, [], lm, kinds="conv")
    torch.testing.assert_close(w.abs["block.conv1"], model.block.conv1.weight.abs().sum((1, 2, 3)))


def test_gradient_and_activation_of_hidden_linear_match_hand_computation():
    model = tiny_resnet()
    lm = simple_layer_map(model, "fc")
    x = torch.randn(6, 1, 28, 28)
    y = torch.randint(0, 10, (6,))
    g = compute_scores("gradient", model, [(x, y)], lm, kinds="linear")
    act = compute_scores("activation", model, [(x, y)], lm, kinds="linear")
    seen = {}
    h = model.hidden.register_forward_hook(lambda m, i, o: seen.__setitem__("h", o.detach()))
    with torch.no_grad():
        model(x)
    h.remove()
    grad = model.fc.weight[y] * (seen["h"] > 0)  # d logit_y / d hidden
    torch.testing.assert_close(g.signed["hidden"], grad.mean(0))
    torch.testing.assert_close(g.abs["hidden"], grad.abs().mean(0))
    torch.testing.assert_close(act.abs["hidden"], seen["h"].abs().mean(0))


def test_ig_is_complete_for_a_layer():
    """Sum over components of IG = target logit minus the logit with the layer zeroed."""
    model = tiny_resnet()
    lm = simple_layer_map(model, "fc")
    x = torch.randn(1, 1, 28, 28)
    y = torch.tensor([int(model(x).argmax())])
    ig = compute_scores("ig", model, [(x, y)], lm, kinds="conv", steps=256)
    with torch.no_grad():
        full = model(x)[0, y]
        with Masker(model, lm, "conv") as m:
            m.set_pruned({"features.3": torch.ones(16, dtype=torch.bool)})
            zeroed = model(x)[0, y]
    torch.testing.assert_close(ig.signed["features.3"].sum(), (full - zeroed)[0], rtol=2e-2, atol=2e-2)


def test_yeom_zplus_is_l1_normalised_per_layer(trained):
    model, lm, task = trained
    sc = compute_scores("yeom-zplus", model, task.reference_batches(32, "cpu"), lm, kinds="conv")
    for v in sc.abs.values():
        assert float(v.sum()) == pytest.approx(1.0, rel=1e-5)


def test_head_criteria_on_timm_vit_and_torchvision_mha():
    model = tiny_vit()
    lm = simple_layer_map(model, "head")
    x = torch.randn(4, 1, 28, 28)
    y = torch.randint(0, 10, (4,))
    for name in ("weight", "activation", "gradient", "taylor", "ig"):
        sc = compute_scores(name, model, [(x, y)], lm, kinds=("heads", "mlp"), steps=4)
        assert sc.abs["blocks.1.attn"].shape == (4,) and sc.abs["blocks.0.mlp.fc1"].shape == (128,)
        assert bool((sc.abs["blocks.0.attn"] > 0).all())
    # Taylor of a head = first-order estimate of zeroing it; the head's output is read
    # before the projection, so its per-head sums are hand-checkable:
    qkv = model.blocks[0].attn.qkv.weight
    w = compute_scores("weight", model, [], lm, kinds="heads").abs["blocks.0.attn"]
    torch.testing.assert_close(w[2], sum(qkv[s * 32 + 16: s * 32 + 24].abs().sum() for s in range(3)))

    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = mha
            self.head = nn.Linear(16, 3)

        def forward(self, t):
            return self.head(self.attn(t, t, t, need_weights=False)[0].mean(1))

    net = Wrap().eval()
    tl = simple_layer_map(net, "head")
    t = torch.randn(2, 5, 16)
    ref = net(t)
    site = make_sites(tl.prunable("heads"))[0]
    handle = site.register(lambda a: None)
    torch.testing.assert_close(net(t), ref, rtol=1e-5, atol=1e-6)  # explicit forward == fused one
    handle.remove()
    assert "forward" not in mha.__dict__
    sc = compute_scores("taylor", net, [(t, torch.tensor([0, 2]))], tl, kinds="heads")
    assert sc.abs["attn"].shape == (4,) and bool((sc.abs["attn"] > 0).all())


def test_bad_names_raise():
    model = tiny_resnet()
    lm = simple_layer_map(model, "fc")
    with pytest.raises(ConfigError, match="unknown criterion"):
        compute_scores("magic", model, [], lm)
    with pytest.raises(ConfigError, match="option"):
        compute_scores("random", model, [], lm, bogus=1)


def test_lrp_criteria_cover_vit_heads_and_mlp():
    from pxopt.layers import discover_layers

    model = tiny_vit()
    lm = discover_layers(model)
    x = torch.randn(4, 1, 28, 28)
    y = torch.randint(0, 10, (4,))
    for name in ("lrp-epsilon", "yeom-zplus"):
        sc = compute_scores(name, model, [(x, y)], lm, kinds=("heads", "mlp"))
        assert sorted(sc.abs) == ["blocks.0.attn", "blocks.0.mlp.fc1", "blocks.1.attn", "blocks.1.mlp.fc1"]
        assert sc.abs["blocks.0.attn"].shape == (4,) and sc.is_finite()
        assert bool((sc.abs["blocks.1.mlp.fc1"] > 0).any())
