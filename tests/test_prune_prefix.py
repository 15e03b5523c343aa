"""Curve shortcuts: prefix reuse (block-level split, exact resumed outputs, budget, fall-backs)
and severed networks (input-independent logits evaluated on one batch)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pxopt.data.accuracy import restricted_correct
from pxopt.evaluate import _plan_prefix, _severed_accuracy, accuracy_curve
from pxopt.prune import Masker, global_order
from pxopt.prune.prefix import PrefixCache, default_budget
from pxopt.prune.severed import SeveredDetector
from pxopt.prune.slicing import Slicer
from tests._prune_helpers import simple_layer_map, tiny_resnet, tiny_vit
from tests.test_evaluate_curve import FakeTask


def _late_first_scores(lm, kinds, seed=0):
    """Random scores, with the first prunable layer made the most relevant (pruned last)."""
    g = torch.Generator().manual_seed(seed)
    layers = list(lm.prunable(kinds))
    scores = {la.name: torch.rand(la.n_components, generator=g) for la in layers}
    scores[layers[0].name] = scores[layers[0].name] + 10.0
    return scores


def _cut_names(cache: PrefixCache) -> list[str]:
    return [cache._nodes[i].name for i in cache._cuts]


def test_block_level_split_reproduces_the_models_exactly():
    resnet = tiny_resnet()
    cache = PrefixCache(resnet, 1 << 20)
    assert cache.enabled, cache.reason
    assert {"block", "features_0", "features_3", "pool"} <= set(_cut_names(cache))
    with torch.inference_mode():
        assert cache.verify(torch.randn(4, 1, 28, 28)) is not None
    broken = PrefixCache(resnet, 1 << 20)
    last = broken._segments[-1]
    broken._segments[-1] = lambda h: last(h) + 1e-6  # a split that is not exact is refused
    with torch.inference_mode():
        assert broken.verify(torch.randn(4, 1, 28, 28)) is None
    assert not broken.enabled and "exactly" in broken.reason
    vit = tiny_vit()
    cache = PrefixCache(vit, 1 << 20)  # timm's forward has defaulted extra arguments
    assert cache.enabled, cache.reason
    assert {"blocks_0", "blocks_1"} <= set(_cut_names(cache))
    with torch.inference_mode():
        assert cache.verify(torch.randn(4, 1, 28, 28)) is not None


@pytest.mark.parametrize("mode", ["mask", "slice"])
def test_resumed_outputs_equal_the_pruned_model_bit_for_bit(mode):
    model = tiny_resnet()
    lm = simple_layer_map(model, "fc")
    scores = _late_first_scores(lm, "conv")
    order = global_order(scores, lm, "conv")
    task = FakeTask(model)
    data = list(task.validation_batches(16, "cpu"))
    rates = [0.0, 0.2, 0.4, 0.6, 0.8, 0.95]
    masker = Masker(model, lm, "conv")
    slicer = Slicer(model, lm, "conv") if mode == "slice" else None
    cache, resume, state = _plan_prefix(model, masker, order, rates, data, 1 << 30)
    assert state == "on" and cache is not None
    assert resume[order.count(0.2)] is not None  # the stem is unpruned at 0.2: resumable
    resumed = 0
    with torch.inference_mode():
        for i, (x, _) in enumerate(data):
            cache.record(i, x)
        for rate in rates[1:]:
            k = order.count(rate)
            masker.set_pruned(order.pruned_first(k))
            if slicer is not None:
                slicer.apply(order.pruned_first(k))
            for i, (x, _) in enumerate(data):
                assert torch.equal(cache.run(i, x, resume[k]), model(x))
            resumed += resume[k] is not None
            if slicer is not None:
                slicer.undo()
    masker.restore()
    assert 0 < resumed < len(rates) - 1  # once the stem is pruned, nothing before it is reusable


@pytest.mark.parametrize("kinds", ["conv", "mlp", "heads"])
def test_curves_with_and_without_the_prefix_cache_are_identical(kinds):
    model = tiny_resnet() if kinds == "conv" else tiny_vit()
    lm = simple_layer_map(model, "fc" if kinds == "conv" else "head")
    scores = _late_first_scores(lm, kinds)
    task = FakeTask(model)
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    off = accuracy_curve(model, task, lm, scores, kinds=kinds, prefix_cache_bytes=0)
    on = accuracy_curve(model, task, lm, scores, kinds=kinds)
    assert on.accuracies == off.accuracies
    assert min(on.accuracies) < 1.0
    assert off.meta["prefix_cache"] == "off" and off.meta["resumed_passes"] == 0
    assert on.meta["prefix_cache"] == "on" and on.meta["resumed_passes"] > 0
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


def test_budget_too_small_stores_nothing_and_the_curve_is_unchanged():
    model = tiny_resnet()
    lm = simple_layer_map(model, "fc")
    scores = _late_first_scores(lm, "conv")
    task = FakeTask(model)
    tiny = accuracy_curve(model, task, lm, scores, kinds="conv", prefix_cache_bytes=1)
    full = accuracy_curve(model, task, lm, scores, kinds="conv")
    assert tiny.meta["resumed_passes"] == 0 and full.meta["resumed_passes"] > 0
    assert tiny.accuracies == full.accuracies


class _DataDependent(nn.Module):
    """Control flow on tensor values: not traceable, so no prefix reuse."""

    def __init__(self):
        super().__init__()
        self.net = tiny_resnet()

    def forward(self, x):
        if x.sum() > 1e9:
            x = x * 0
        return self.net(x)


def test_untraceable_models_and_root_hooks_fall_back_to_full_passes():
    wrapped = _DataDependent()
    cache = PrefixCache(wrapped, 1 << 20)
    assert not cache.enabled and "not traceable" in cache.reason

    model = tiny_resnet()
    lm = simple_layer_map(model, "fc")
    scores = _late_first_scores(lm, "conv")
    task = FakeTask(model)
    plain = accuracy_curve(model, task, lm, scores, kinds="conv")
    calls = []
    handle = model.register_forward_hook(lambda m, a, out: calls.append(1))
    try:
        hooked = accuracy_curve(model, task, lm, scores, kinds="conv")
    finally:
        handle.remove()
    assert "hooks" in hooked.meta["prefix_cache"] and hooked.meta["resumed_passes"] == 0
    assert hooked.accuracies == plain.accuracies
    assert len(calls) >= hooked.meta["passes"]  # the hook saw every pass


# -- severed networks ---------------------------------------------------------------------


def test_severed_detection_follows_every_path_to_the_output():
    model = tiny_resnet()
    det = SeveredDetector(model)
    assert det.enabled
    assert det.severed(["features.3"])  # the only path to the classifier
    assert det.severed(["stem"])  # everything after it is computed from constants
    assert not det.severed(["block.conv2"])  # the identity shortcut still carries the input
    assert det.severed(["block.conv1", "features.0"])  # features.0 is on every path
    assert not det.severed([])
    assert not SeveredDetector(_DataDependent()).severed(["net.features.3"])  # untraceable: never


def test_severed_accuracy_needs_identical_logits():
    model = tiny_resnet()
    task = FakeTask(model)
    data = list(task.validation_batches(16, "cpu"))
    classes = torch.tensor(task.classes)
    always = _AlwaysSevered(model)  # claims a severed net whatever it is asked
    assert _severed_accuracy(model, data, classes, always, ["stem"]) is None  # input-dependent
    lm = simple_layer_map(model, "fc")
    with Masker(model, lm, "conv") as masker:
        masker.set_pruned({"features.3": torch.ones(16, dtype=torch.bool)})
        assert masker.fully_pruned() == ["features.3"]
        acc = _severed_accuracy(model, data, classes, SeveredDetector(model), masker.fully_pruned())
        with torch.inference_mode():
            out = torch.cat([model(x) for x, _ in data])
        labels = torch.cat([y for _, y in data])
        assert acc == int(restricted_correct(out, labels, classes)) / len(labels)


class _AlwaysSevered(SeveredDetector):
    def severed(self, fully_pruned):
        return True


@pytest.mark.parametrize("mode", ["mask", "slice"])
def test_severed_rates_cost_one_batch_and_change_nothing(mode):
    model = tiny_resnet()
    lm = simple_layer_map(model, "fc")
    g = torch.Generator().manual_seed(1)
    scores = {la.name: torch.rand(la.n_components, generator=g) + 1.0 for la in lm.prunable("conv")}
    scores["features.3"] = scores["features.3"] - 1.0  # pruned first: the net is severed by 16/56
    task = FakeTask(model)
    full = accuracy_curve(model, task, lm, scores, kinds="conv", mode=mode, batch_size=16,
                          prefix_cache_bytes=0, detect_severed=False)
    fast = accuracy_curve(model, task, lm, scores, kinds="conv", mode=mode, batch_size=16)
    assert fast.accuracies == full.accuracies
    assert full.meta["severed_passes"] == 0
    assert fast.meta["severed_passes"] == sum(r >= 16 / 56 for r in fast.rates)


def test_default_budget_is_a_quarter_of_free_memory():
    import os

    budget = default_budget(torch.device("cpu"))
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert 0 < budget <= available // 4 + (64 << 20)  # free memory moves a little between calls
