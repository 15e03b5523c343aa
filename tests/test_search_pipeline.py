"""Pipeline on a tiny CNN with random data: caching by digest, full curves, masks undone."""

from __future__ import annotations

import optuna
import pytest
import torch
from torch import nn

from pxopt.pipeline import Pipeline


def _tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _pipeline() -> Pipeline:
    from pxopt.data import Task, TensorSet
    from pxopt.layers import discover_layers

    model = _tiny_cnn()
    g = torch.Generator().manual_seed(1)
    ref = TensorSet(torch.randn(12, 1, 8, 8, generator=g), torch.arange(12) % 3)
    val = TensorSet(torch.randn(30, 1, 8, 8, generator=g), torch.arange(30) % 3)
    task = Task(dataset="random", classes=[0, 1, 2], class_names=["a", "b", "c"], reference=ref,
                validation=val, seed=0, n_ref=4, n_val=10)
    return Pipeline(model=model, task=task, layer_map=discover_layers(model), kinds=("conv",),
                    rates=[0.0, 0.25, 0.5, 0.75], device=torch.device("cpu"), batch_size=16)


EPS = {"format": "pxopt.rules/1", "groups": {g: {"rule": "epsilon", "epsilon": 1e-6}
                                             for g in ("input", "low", "mid", "high", "fc")}}


def test_evaluate_caches_relevance_by_digest() -> None:
    pipe = _pipeline()
    curve = pipe.evaluate(EPS, "abs")
    assert curve.rates == [0.0, 0.25, 0.5, 0.75] and len(curve.accuracies) == 4
    assert pipe.timings()["cached"] is False and pipe.timings()["curve_s"] > 0
    again = pipe.evaluate(dict(EPS), "signed")  # same rules, other ranking: no attribution
    assert pipe.timings()["cached"] is True and pipe.timings()["attribution_s"] == 0.0
    assert again.accuracies[0] == curve.accuracies[0]
    other = {**EPS, "groups": {**EPS["groups"], "low": {"rule": "zplus"}}}
    pipe.evaluate(other, "abs")
    assert pipe.timings()["cached"] is False


def test_pruned_trial_leaves_model_unchanged() -> None:
    pipe = _pipeline()
    before = {k: v.clone() for k, v in pipe.model.state_dict().items()}

    def stop(i: int, rate: float, acc: float) -> None:
        if i == 1:
            raise optuna.TrialPruned()

    with pytest.raises(optuna.TrialPruned):
        pipe.evaluate(EPS, "abs", stop)
    after = pipe.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_masked_context_and_study_attrs() -> None:
    pipe = _pipeline()
    scores = pipe.scores(EPS)
    x = pipe.task.validation.images[:4]
    ref = pipe.model(x)
    with pipe.pruned(scores, "abs", 0.5) as pruned:
        assert sum(int(v.sum()) for v in pruned.values()) == 16  # half of 4 x 8 channels
        assert not torch.equal(pipe.model(x), ref)
    assert torch.equal(pipe.model(x), ref)
    attrs = pipe.study_attrs()
    assert attrs["pxopt.total_macs"] > sum(attrs["pxopt.layer_macs"].values())
    assert set(attrs["pxopt.layer_sizes"]) == set(attrs["pxopt.layer_macs"])
    # a plain Sequential discovered without an input has no stages: the count split
    assert attrs["pxopt.grouping"] == {"grouping": "count", "stage_rule": ""}
    assert attrs["pxopt.layer_groups"] == pipe.layer_map.groups()
