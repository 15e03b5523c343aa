"""Fakes for search tests: a synthetic curve whose area depends on the rules, deterministically."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

_RULE_QUALITY = {"epsilon": 1.0, "gamma": 0.9, "alphabeta": 0.6, "zplus": 0.7, "flat": 0.8,
                 "wsquare": 0.75, "zbox": 0.85}


@dataclass
class FakeCurve:
    rates: list[float]
    accuracies: list[float]
    area: float  # mean accuracy over the rate span
    top_pr: float
    pruned_per_layer: dict[str, list[int]] = field(default_factory=dict)
    stopped_early_at: float | None = None


def trapezoid(rates: list[float], acc: list[float]) -> float:
    return sum((rates[i + 1] - rates[i]) * (acc[i] + acc[i + 1]) / 2 for i in range(len(acc) - 1))


class FakeEvaluator:
    """Accuracy decays with rate; the better the rules, the slower. Counts calls."""

    def __init__(self, rates: list[float], *, nan_if_epsilon_below: float | None = None) -> None:
        self.rates = rates
        self.calls = 0
        self.nan_if_epsilon_below = nan_if_epsilon_below
        self.last_timings = {"attribution_s": 0.0, "curve_s": 0.0, "cached": False}

    def quality(self, rules: dict, ranking: str) -> float:
        q = 1.0
        for g in rules["groups"].values():
            q *= _RULE_QUALITY[g["rule"]]
            if g["rule"] == "epsilon":
                q *= 1.0 - 0.05 * abs(math.log10(g["epsilon"]) + 6) / 3
        return q * (1.0 if ranking in (None, "abs", "token-abs") else 0.8)

    def __call__(self, rules: dict, ranking: str, on_rate=None) -> FakeCurve:
        self.calls += 1
        q = self.quality(rules, ranking)
        acc: list[float] = []
        for i, r in enumerate(self.rates):
            a = 0.9 * math.exp(-((r / max(q, 1e-3)) ** 3))
            if self.nan_if_epsilon_below is not None and any(
                g.get("epsilon", 1.0) < self.nan_if_epsilon_below for g in rules["groups"].values()
            ):
                a = math.nan
            acc.append(a)
            if on_rate is not None:
                on_rate(i, r, a)
        top = max((r for r, a in zip(self.rates, acc, strict=True) if a >= 0.95 * acc[0]), default=0.0)
        area = trapezoid(self.rates, acc) / (self.rates[-1] - self.rates[0])
        return FakeCurve(self.rates, acc, area, top, {"layer1": [int(100 * r) for r in self.rates]})


class _FakeTask:
    """Three classes, six 8x8 reference images (heatmaps of the report), and a held-out
    split of `n_heldout` (per task, as `make_task` records it) when asked for one."""

    classes = [0, 1, 2]
    class_names = ["zero", "one", "two"]
    dataset = "fake"

    def __init__(self, n_heldout: int = 0, seed: int = 0, n_val: int | None = 4) -> None:
        import torch

        from pxopt.data.tensorset import TensorSet

        g = torch.Generator().manual_seed(0)
        self.reference = TensorSet(torch.rand(6, 1, 8, 8, generator=g), torch.tensor([0, 1, 2, 0, 1, 2]))
        self.seed, self.n_val = seed, n_val
        self.info: dict = {}
        self.heldout = None
        if n_heldout:
            per = max(1, n_heldout // 3)
            self.heldout = TensorSet(torch.zeros(3 * per, 1, 8, 8), torch.tensor([0, 1, 2] * per))
            self.info = {"n_heldout": n_heldout, "heldout_per_class": per, "n_heldout_images": 3 * per,
                         "heldout_hash": f"fake-{seed}-{per}"}

    def describe(self) -> dict:
        return {"dataset": "fake", "classes": [0, 1, 2], **self.info}


def tiny_linear_model():
    """(1, 8, 8) -> 3 logits: one Linear layer (LRP: its 'input' group rule)."""
    import torch
    from torch import nn

    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model[1].weight.copy_(0.3 * torch.randn(3, 64, generator=g))
        model[1].bias.zero_()
    return model.eval().requires_grad_(False)


class _Scores:
    def __init__(self, rules: dict) -> None:
        self.rules = rules


class FakePipeline:
    """Stands in for `pxopt.pipeline.Pipeline` in CLI tests (no model, no data)."""

    family = "cnn"
    heldout_calls_total = 0  # over all instances (the CLI loads its own)
    rescore_calls_total = 0  # curves on other reference sets (`pxopt.search.naming`)
    reference_seed: int | None = None

    def __init__(self, spec) -> None:
        self.spec = spec
        self.rates = list(spec.rates)
        self.evaluator = FakeEvaluator(self.rates)
        self.task = _FakeTask(getattr(spec, "n_heldout", 0), spec.task_seed, spec.n_val)
        self.heldout_calls = 0  # held-out curves computed (the study stores them)
        self.model = tiny_linear_model()
        self.components = "conv" if spec.components == "auto" else spec.components  # a CNN

    @classmethod
    def from_spec(cls, spec, **_kw) -> FakePipeline:
        return cls(spec)

    def evaluate(self, rules, ranking, on_rate=None):
        return self.evaluator(rules, ranking, on_rate)

    def timings(self) -> dict:
        return dict(self.evaluator.last_timings)

    def check_explainable(self) -> None:
        pass

    def study_attrs(self) -> dict:
        return {"pxopt.task_description": self.task.describe(), "pxopt.total_macs": 1000.0,
                "pxopt.layer_macs": {"layer1": 5.0}, "pxopt.layer_sizes": {"layer1": 100}}

    def scores(self, rules):
        return _Scores(rules)

    def with_other_images(self, seed: int) -> FakePipeline:
        other = FakePipeline(self.spec)
        other.reference_seed = seed
        other.task.info["validation_redrawn"] = True
        return other

    def curve(self, scores, ranking=None, on_rate=None, *, heldout: bool = False):
        curve = self.evaluator(scores.rules, ranking, on_rate)
        if self.reference_seed is not None:  # another reference set: the search's best was a little lucky
            FakePipeline.rescore_calls_total += 1
            drop = 0.95 if any(g["rule"] != "epsilon" for g in scores.rules["groups"].values()) else 0.99
            return FakeCurve(curve.rates, [a * drop for a in curve.accuracies], curve.area * drop, curve.top_pr)
        if not heldout:
            return curve
        self.heldout_calls += 1
        FakePipeline.heldout_calls_total += 1
        # other images: a little lower, and less so for all-epsilon (the rules "over-fit")
        drop = 0.9 if any(g["rule"] != "epsilon" for g in scores.rules["groups"].values()) else 0.97
        acc = [a * drop for a in curve.accuracies]
        return FakeCurve(curve.rates, acc, curve.area * drop, curve.top_pr)

    def criterion_scores(self, name: str):
        quality = {"random": "alphabeta", "weight": "zplus"}.get(name, "epsilon")
        return _Scores({"groups": {"low": {"rule": quality, "epsilon": 1e-6}}})



def run_cli(args: list[str]) -> str:
    """Invoke `pxopt args`, assert it exited 0, return its output."""
    from typer.testing import CliRunner

    from pxopt.cli import app

    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output
