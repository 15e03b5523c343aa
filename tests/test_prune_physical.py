"""Physical removal: smaller, same outputs as the masked model, saved and reloaded."""

from __future__ import annotations

import pytest
import torch

from pxopt.errors import CheckpointError, ConfigError
from pxopt.prune import Masker, global_order
from pxopt.prune.physical import export_program, load_pruned, physical_prune
from tests._prune_helpers import TinyResNet, simple_layer_map, tiny_vit, trained_tiny_resnet

KINDS = ("conv", "linear")


def _setup():
    from pxopt.layers import discover_layers

    model = trained_tiny_resnet()
    lm = discover_layers(model)
    g = torch.Generator().manual_seed(0)
    scores = {la.name: torch.rand(la.n_components, generator=g) for la in lm.prunable(KINDS)}
    return model, lm, scores


def _masked_output(model, lm, pruned, x, kinds):
    with Masker(model, lm, kinds) as masker, torch.no_grad():
        masker.set_pruned(pruned)
        return model(x)


def test_removed_equals_masked_and_is_smaller(tmp_path):
    model, lm, scores = _setup()
    x = torch.rand(8, 1, 28, 28)
    pruned = global_order(scores, lm, KINDS).pruned_at(0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = physical_prune(model, lm, pruned, x[:1], kinds=KINDS, measure_latency=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # original untouched
    assert res.params_after < res.params_before and res.macs_after < res.macs_before
    assert res.model.block.conv1.out_channels == 8 - len(res.removed["block.conv1"])
    # The residual stage couples the stem and block.conv2: only their common channels go.
    assert ["stem", "block.conv2"] in res.groups
    common = set(res.removed["stem"])
    assert common == set(pruned["stem"].nonzero().flatten().tolist()) & set(
        pruned["block.conv2"].nonzero().flatten().tolist())
    assert res.masked["stem"] or res.masked["block.conv2"]  # the rest stays masked
    with torch.no_grad():
        out = res.model(x)
    torch.testing.assert_close(out, _masked_output(model, lm, pruned, x, KINDS), rtol=1e-5, atol=1e-5)

    path = res.save(tmp_path / "pruned")
    fresh = TinyResNet(width=8)  # same architecture, other weights
    reloaded = load_pruned(fresh, path, x[:1])
    with torch.no_grad():
        assert torch.equal(reloaded(x), out)
    assert reloaded.features[0].out_channels == res.model.features[0].out_channels
    with pytest.raises(CheckpointError):
        load_pruned(TinyResNet(width=8), tmp_path / "missing", x[:1])

    # one file (state dict + history), as `pxopt prune --physical` writes it
    single = res.save_state(tmp_path / "pruned.pt", {"note": "record"})
    assert torch.load(single, weights_only=True)["pxopt"] == {"note": "record"}
    with torch.no_grad():
        assert torch.equal(load_pruned(TinyResNet(width=8), single, x[:1])(x), out)
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not a file written by `pxopt prune --physical`"):
        load_pruned(TinyResNet(width=8), tmp_path / "plain.pt", x[:1])

    # the torch.export program: same outputs, any batch size
    many = torch.cat([x] * 64)  # 512 images: the program keeps its example, which must not drag them along
    info = export_program(res.model, many[:2], tmp_path / "pruned.pt2")
    assert (tmp_path / "pruned.pt2").stat().st_size < many.numel() * 4 / 4
    program = torch.export.load(str(tmp_path / "pruned.pt2")).module()
    assert info["dynamic_batch"] and info["max_abs_diff"] <= 1e-6
    with torch.no_grad():
        torch.testing.assert_close(program(x), out, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(program(x[:3]), out[:3], rtol=1e-6, atol=1e-6)


def test_group_sum_removes_whole_groups_and_reports_latency():
    model, lm, scores = _setup()
    x = torch.rand(1, 1, 28, 28)
    pruned = global_order(scores, lm, KINDS).pruned_at(0.5)
    res = physical_prune(model, lm, pruned, x, kinds=KINDS, coupled="group-sum", scores=scores,
                         repeats=3, threads=1)
    mask_res = physical_prune(model, lm, pruned, x, kinds=KINDS, measure_latency=False)
    k = round((int(pruned["stem"].sum()) + int(pruned["block.conv2"].sum())) / 2)
    assert len(res.removed["stem"]) == k and res.removed["stem"] == res.removed["block.conv2"]
    assert res.macs_after <= mask_res.macs_after
    assert {"cpu_before_ms", "cpu_after_ms"} <= set(res.latency) and res.latency["cpu_after_ms"] > 0
    stats = res.latency["cpu"]["after"]  # timed interleaved with the original, spread included
    assert stats["median_ms"] == res.latency["cpu_after_ms"] and stats["runs"] == 3 and stats["threads"] == 1
    assert stats["min_ms"] <= stats["q1_ms"] <= stats["median_ms"] <= stats["q3_ms"] <= stats["max_ms"]
    with pytest.raises(ConfigError):
        physical_prune(model, lm, pruned, x, kinds=KINDS, coupled="group-sum")


def test_vit_mlp_removed_and_heads_left_masked(tmp_path):
    model = tiny_vit()
    lm = simple_layer_map(model, "head")
    x = torch.randn(3, 1, 28, 28)
    g = torch.Generator().manual_seed(1)
    kinds = ("mlp", "heads")
    scores = {la.name: torch.rand(la.n_components, generator=g) for la in lm.prunable(kinds)}
    pruned = global_order(scores, lm, kinds).pruned_at(0.4)
    res = physical_prune(model, lm, pruned, x[:1], kinds=kinds, measure_latency=False)
    assert res.model.blocks[0].mlp.fc1.out_features == 128 - int(pruned["blocks.0.mlp.fc1"].sum())
    assert res.model.blocks[0].mlp.fc2.in_features == res.model.blocks[0].mlp.fc1.out_features
    assert res.removed["blocks.0.attn"] == [] and res.masked["blocks.0.attn"] == \
        pruned["blocks.0.attn"].nonzero().flatten().tolist()
    with torch.no_grad():
        out = res.model(x)
    torch.testing.assert_close(out, _masked_output(model, lm, pruned, x, kinds), rtol=1e-5, atol=1e-5)
    export_program(res.model, x, tmp_path / "vit.pt2")  # timm ViT with MLP neurons removed
    with torch.no_grad():
        torch.testing.assert_close(torch.export.load(str(tmp_path / "vit.pt2")).module()(x), out,
                                   rtol=1e-6, atol=1e-6)
