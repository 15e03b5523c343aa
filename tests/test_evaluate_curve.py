"""Curves: area, Top-PR, on_rate, chance stop, slicing equals masking, exact undo."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pxopt.errors import ConfigError
from pxopt.evaluate import DEFAULT_RATES, accuracy_curve, curve_area, partial_area, top_pruning_rate
from pxopt.prune import Masker, global_order
from pxopt.prune.slicing import Slicer
from tests._prune_helpers import simple_layer_map, tiny_resnet, tiny_vit


class FakeTask:
    """Stand-in for pxopt.data.Task: labels are the model's own predictions on a class subset."""

    def __init__(self, model, classes=(1, 3, 4, 7), n=64, seed=0, shape=(1, 28, 28)):
        g = torch.Generator().manual_seed(seed)
        self.classes = list(classes)
        self.x = torch.randn(n, *shape, generator=g)
        cls = torch.tensor(self.classes)
        with torch.no_grad():
            self.y = cls[model(self.x)[:, cls].argmax(1)]

    def validation_batches(self, batch_size, device):
        for i in range(0, len(self.x), batch_size):
            yield self.x[i:i + batch_size].to(device), self.y[i:i + batch_size].to(device)


def test_area_and_top_pr_on_hand_made_curves():
    rates = [0.0, 0.25, 0.5, 0.75, 1.0]
    accs = [1.0, 1.0, 0.5, 0.5, 0.0]
    assert curve_area(rates, accs) == pytest.approx(0.25 * (1.0 + 0.75 + 0.5 + 0.25))  # span 1
    assert curve_area([0.2, 0.6], [0.8, 0.4]) == pytest.approx(0.6)  # mean accuracy over the span
    assert curve_area([0.0, 0.95], [0.5, 0.5]) == pytest.approx(0.5)  # not the trapezoid 0.475
    assert curve_area([0.3], [0.7]) == 0.7
    assert top_pruning_rate(rates, accs, 1.0) == 0.25
    assert top_pruning_rate([0, 0.1, 0.2, 0.3], [0.8, 0.77, 0.76, 0.75], 0.8) == 0.2  # 0.76 = 95 %
    assert top_pruning_rate([0, 0.1], [0.8, 0.1], 0.8) == 0.0
    assert DEFAULT_RATES[0] == 0.0 and DEFAULT_RATES[-1] == 0.95 and len(DEFAULT_RATES) == 20


def test_partial_area_is_a_lower_bound_on_the_final_scale():
    rates = [0.0, 0.25, 0.5, 0.75, 1.0]
    accs = [1.0, 0.9, 0.6, 0.3, 0.1]
    steps = [partial_area(rates, accs[: i + 1]) for i in range(len(rates))]
    assert steps[0] == 0.0
    assert steps == sorted(steps)  # grows with every rate reached
    assert steps[-1] == curve_area(rates, accs)  # equals the area once complete (bit for bit)
    # at a fixed step it is the plain partial trapezoid divided by the grid's span, so the
    # median pruner's comparisons between trials are those of the plain partial trapezoid
    grid = [0.0, 0.2, 0.4, 0.6, 0.8]
    for a, b in ((0.9, 0.5), (0.8, 0.6)):
        assert partial_area(grid, [a, b]) == pytest.approx((0.2 * (a + b) / 2) / 0.8)
    assert partial_area([0.5], [0.4]) == 0.4


def _setup(kinds=("conv",)):
    model = tiny_resnet()
    lm = simple_layer_map(model, "fc")
    g = torch.Generator().manual_seed(3)
    scores = {la.name: torch.rand(la.n_components, generator=g) for la in lm.prunable(kinds)}
    return model, lm, scores, FakeTask(model)


def test_curve_basics_deterministic_and_model_untouched():
    model, lm, scores, task = _setup()
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    c1 = accuracy_curve(model, task, lm, scores, kinds="conv", device="cpu")
    c2 = accuracy_curve(model, task, lm, scores, kinds="conv", device="cpu")
    assert c1.accuracies == c2.accuracies
    assert c1.accuracies[0] == 1.0  # labels are the unpruned model's predictions
    assert min(c1.accuracies) < 1.0
    span = c1.rates[-1] - c1.rates[0]
    assert c1.area == pytest.approx(float(np.trapezoid(c1.accuracies, c1.rates)) / span)
    assert 0.0 <= c1.area <= 1.0 and not hasattr(c1, "area_normalised")  # one area, one name
    assert c1.to_dict()["area"] == c1.area and "area_normalised" not in c1.to_dict()
    assert c1.pruned_per_layer["stem"][0] == 0
    totals = [sum(v[i] for v in c1.pruned_per_layer.values()) for i in range(20)]
    assert totals == [int(r * 56 + 1e-9) for r in c1.rates]  # 8 + 8 + 8 + 16 + 16 conv channels
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())
    assert c1.meta["sliced_layers"]  # the conv -> BN -> ReLU -> conv pairs were found


def test_slice_equals_mask():
    model, lm, scores, task = _setup()
    order = global_order(scores, lm, "conv")
    x = task.x[:16]
    slicer = Slicer(model, lm, "conv")
    assert {p.name for p in slicer.pairs} == {"block.conv1", "features.0"}
    assert {o.name for o in slicer.outs} == {"stem", "block.conv2", "features.3"}  # scattered back
    with Masker(model, lm, "conv") as masker:
        for rate in (0.2, 0.5, 0.9):
            masker.set_pruned(order.pruned_at(rate))
            masked = model(x)
            slicer.apply(order.pruned_at(rate))
            counts = order.per_layer_counts(rate)
            assert model.block.conv1.weight.shape[0] == 8 - counts["block.conv1"]
            assert model.block.conv2.weight.shape[:2] == (8 - counts["block.conv2"], 8 - counts["block.conv1"])
            sliced = model(x)
            slicer.undo()
            torch.testing.assert_close(sliced, masked, rtol=1e-5, atol=1e-5)
    a = accuracy_curve(model, task, lm, scores, kinds="conv", mode="mask")
    b = accuracy_curve(model, task, lm, scores, kinds="conv", mode="slice")
    assert a.accuracies == b.accuracies


def test_on_rate_may_raise_and_masks_are_undone():
    model, lm, scores, task = _setup()
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []

    def stop(i, rate, acc):
        seen.append((i, rate, acc))
        if i == 5:
            raise KeyboardInterrupt  # anything, e.g. optuna.TrialPruned

    with pytest.raises(KeyboardInterrupt):
        accuracy_curve(model, task, lm, scores, kinds="conv", on_rate=stop)
    assert [s[0] for s in seen] == list(range(6))
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())
    assert all(p is model.get_parameter(n) for n, p in model.named_parameters())


def test_stop_at_chance_records_chance_and_says_so():
    model, lm, scores, task = _setup()
    full = accuracy_curve(model, task, lm, scores, kinds="conv", stop_at_chance=False)
    early = accuracy_curve(model, task, lm, scores, kinds="conv", stop_at_chance=True, chance_margin=0.3)
    assert early.chance == 0.25
    i = next(i for i in range(1, 20) if all(a <= 0.55 for a in full.accuracies[i - 1:i + 1]))
    assert i + 1 < 20
    assert early.stopped_early_at == full.rates[i + 1]
    assert early.accuracies[: i + 1] == full.accuracies[: i + 1]
    assert early.accuracies[i + 1:] == [0.25] * (19 - i)
    assert early.meta["passes"] < full.meta["passes"]
    assert full.stopped_early_at is None


def test_rates_not_from_zero_and_bad_rates():
    model, lm, scores, task = _setup()
    c = accuracy_curve(model, task, lm, scores, kinds="conv", rates=[0.5, 0.9])
    assert c.meta["unpruned_accuracy"] == 1.0 and len(c.accuracies) == 2
    with pytest.raises(ConfigError):
        accuracy_curve(model, task, lm, scores, kinds="conv", rates=[0.5, 0.2])
    with pytest.raises(ConfigError):
        accuracy_curve(model, task, lm, scores, kinds="conv", rates=[0.0, 1.5])


def test_vit_mlp_and_heads_curves():
    model = tiny_vit()
    lm = simple_layer_map(model, "head")
    task = FakeTask(model)
    g = torch.Generator().manual_seed(0)
    for kinds in ("mlp", "heads"):
        scores = {la.name: torch.rand(la.n_components, generator=g) for la in lm.prunable(kinds)}
        c = accuracy_curve(model, task, lm, scores, kinds=kinds)
        assert c.accuracies[0] == 1.0 and c.accuracies[-1] < 1.0
        masked = accuracy_curve(model, task, lm, scores, kinds=kinds, mode="mask")
        assert masked.accuracies == c.accuracies
    assert set(c.meta["sliced_layers"]) == {"blocks.0.attn", "blocks.1.attn"}
    order = global_order(scores, lm, "heads")
    x = task.x[:8]
    with Masker(model, lm, "heads") as masker, Slicer(model, lm, "heads") as slicer:
        masker.set_pruned(order.pruned_at(0.5))
        ref = model(x)
        slicer.apply(order.pruned_at(0.5))
        assert model.blocks[0].attn.qkv.weight.shape[0] < 96
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
    assert model.blocks[0].attn.num_heads == 4
    assert model.blocks[0].attn.qkv.weight.shape[0] == 96 and model.blocks[0].attn.attn_dim == 32
