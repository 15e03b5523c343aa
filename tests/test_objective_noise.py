"""benchmarks/objective_noise.py: noise statistics, naming the best trial, averaged curves, a tiny run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from bench_modules import load_benchmark

ON = load_benchmark("objective_noise")


def test_noise_summary_on_known_areas() -> None:
    # 4 rule sets x 3 draws; draw 2 swaps the two best rule sets
    areas = np.array([[0.50, 0.52, 0.50],
                      [0.60, 0.60, 0.60],
                      [0.70, 0.71, 0.80],
                      [0.80, 0.81, 0.75]])
    sm = ON.noise_summary(areas)
    assert sm["n_rule_sets"] == 4 and sm["n_draws"] == 3
    assert sm["sd_per_rule_set"][1] == 0.0
    assert sm["sd_per_rule_set"][0] == pytest.approx(np.std([0.5, 0.52, 0.5], ddof=1))
    assert sm["spearman_between_draws"][0] == pytest.approx(1.0)  # draws 0 and 1 rank the same
    assert sm["spearman_between_draws"][1] == pytest.approx(0.8)  # one swap among 4: 1 - 6*2/(4*15)
    assert sm["spearman_min"] == pytest.approx(0.8)
    changes = [0.02, 0, 0.02, 0, 0, 0, 0.01, 0.1, 0.09, 0.01, 0.05, 0.06]
    assert sm["abs_change_median"] == pytest.approx(float(np.median(changes)))


def test_spearman_undefined_cases_are_nan() -> None:
    assert math.isnan(ON.spearman([1.0, 2.0], [1.0, 2.0]))
    assert math.isnan(ON.spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
    assert ON.spearman([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) == pytest.approx(-1.0)


def test_name_best_with_and_without_reevaluation() -> None:
    values = [0.5, None, 0.9, 0.8, 0.85, 0.9]
    assert ON.name_best(values, None, 0) == (2, 0.9)  # ties: the earlier trial
    more = {2: 0.70, 5: 0.72, 4: 0.75, 3: 0.99}  # trial 3 is 4th by search value: not re-evaluated
    assert ON.name_best(values, more.__getitem__, 3) == (4, 0.75)
    with pytest.raises(Exception, match="no complete trial"):
        ON.name_best([None, None], None, 0)


def test_averaged_evaluate_means_the_curves_and_reports_each_rate() -> None:
    def pipe(accs):
        curve = SimpleNamespace(rates=[0.0, 0.5], accuracies=accs, area=float(np.mean(accs)), top_pr=0.5)
        return SimpleNamespace(evaluate=lambda rules, ranking=None, on_rate=None: curve)

    seen = []
    curve = ON.AveragedEvaluate([pipe([0.9, 0.5]), pipe([0.7, 0.3])])({}, "abs", lambda i, r, a: seen.append((i, r, a)))
    assert curve.accuracies == pytest.approx([0.8, 0.4])
    assert curve.area == pytest.approx(0.6)
    assert seen == [(0, 0.0, pytest.approx(0.8)), (1, 0.5, pytest.approx(0.4))]


def test_variants_change_one_thing_each() -> None:
    base = ON.Variant(name="base")
    variants = ON.default_variants(base)
    assert variants[0] is base and len({v.name for v in variants}) == len(variants)
    fields = ("n_ref", "n_val", "rate_step", "ref_sets", "reeval_top", "pruner")
    for v in variants[1:]:
        assert sum(getattr(v, f) != getattr(base, f) for f in fields) == 1, v
    assert base.rates() == pytest.approx([0.1 * i for i in range(10)])


@pytest.mark.slow
def test_quick_run_on_builtin_resnet(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    result = CliRunner().invoke(ON.app, ["--quick", "--out-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    res = json.loads((tmp_path / "objective_noise_resnet_conv_10cls.json").read_text())
    assert res["noise"]["n_draws"] == 2 and len(res["noise"]["areas"]) == 3
    assert len(res["variants"]) == 2 and "spearman_objective_held_out" in res["variants"][0]
    for r in res["variants"]:
        assert 0.0 < r["held_out_area"] <= 1.0
