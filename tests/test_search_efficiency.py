"""benchmarks/search_efficiency.py: best-so-far bookkeeping, trials to 99 %, and a tiny real run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from bench_modules import load_benchmark

SE = load_benchmark("search_efficiency")


def test_best_so_far_skips_pruned_trials() -> None:
    out = SE.best_so_far([None, 0.3, None, 0.2, 0.5, float("nan"), 0.4])
    assert math.isnan(out[0])
    assert out[1:] == [0.3, 0.3, 0.3, 0.5, 0.5, 0.5]


def test_trials_to_reach() -> None:
    curve = [math.nan, 0.5, 0.7, 0.79, 0.8]
    assert SE.trials_to_reach(curve, 0.99 * 0.8) == 5  # 0.79 < 0.792: reached only at trial 5
    assert SE.trials_to_reach(curve, 0.785) == 4
    assert SE.trials_to_reach(curve, 0.8) == 5
    assert SE.trials_to_reach(curve, 0.81) is None
    assert SE.trials_to_reach(curve, 0.6) == 3
    # not monotone: touches 0.6 at trial 2, falls back, holds from trial 4
    wobbly = [0.5, 0.65, 0.55, 0.7, 0.62]
    assert SE.trials_to_reach(wobbly, 0.6) == 4
    assert SE.trials_to_reach(wobbly, 0.6, stay=False) == 2
    assert SE.trials_to_reach([0.7, 0.5], 0.6) is None


def test_picked_held_out_follows_the_search_best_not_the_held_out_best() -> None:
    search = [0.5, None, 0.7, 0.6, 0.7, 0.9]
    held = {0: 0.40, 2: 0.45, 3: 0.99, 4: 0.99, 5: 0.30}  # trial 3 is better held out but never picked
    calls: list[int] = []

    def evaluate(i: int) -> float:
        calls.append(i)
        return held[i]

    assert SE.picked_held_out(search, evaluate) == [0.40, 0.40, 0.45, 0.45, 0.45, 0.30]
    assert calls == [0, 2, 5]  # evaluated once per change of the best; the tie at trial 4 keeps trial 2


def test_summary_trials_to_99_percent_of_best_any_run() -> None:
    runs = [
        {"sampler": "tpe", "pruner": "none", "seed": 0, "picked_held_out": [0.5, 0.9, 1.0], "final_held_out": 1.0,
         "final_search": 1.0, "states": ["COMPLETE"] * 3, "search_seconds": 1.0},
        {"sampler": "random", "pruner": "none", "seed": 0, "picked_held_out": [0.5, 0.5, 0.6], "final_held_out": 0.6,
         "final_search": 0.7, "states": ["COMPLETE", "PRUNED", "COMPLETE"], "search_seconds": 1.0},
    ]
    sm = SE.summarise(runs)
    assert sm["best_held_out_any"] == 1.0 and sm["target"] == pytest.approx(0.99)
    assert sm["groups"]["tpe/none"]["trials_to_reach"] == [3]
    assert sm["groups"]["random/none"]["trials_to_reach"] == [None]
    assert sm["groups"]["random/none"]["n_reached"] == 0
    assert sm["groups"]["random/none"]["pruned_fraction"] == pytest.approx(1 / 3)


def test_summary_reports_what_a_smaller_budget_hands_over() -> None:
    curves = ([0.5] * 4 + [0.8] * 6, [0.6] * 9 + [0.9])
    runs = [{"sampler": "gp", "pruner": "none", "seed": i, "picked_held_out": list(c), "final_held_out": c[-1],
             "final_search": c[-1], "states": ["COMPLETE"] * 10, "search_seconds": 10.0,
             "trial_seconds": [1.0 + i] * 10, "search_values": list(c)} for i, c in enumerate(curves)]
    budgets = SE.summarise(runs)["groups"]["gp/none"]["budgets"]
    assert list(budgets) == [10]  # budgets beyond the run's trials are left out
    assert budgets[10]["held_out_mean"] == pytest.approx(0.85)
    assert budgets[10]["seconds_mean"] == pytest.approx(15.0)
    assert "n = 10" in SE.markdown({"settings": {"model": "m", "components": "conv", "n_classes": 10, "trials": 10,
                                                 "seeds": 2, "n_ref": 5, "rates": [0.0, 0.5]},
                                    "summary": SE.summarise(runs), "scale": "s", "command": "c", "runs": runs,
                                    "search_images": 1, "held_out_images": 1, "wall_seconds": 1.0,
                                    "machine": "m"})


def test_same_as_random_detects_a_fallback_sampler() -> None:
    runs = [{"sampler": "random", "pruner": "none", "seed": 0, "search_values": [0.1, None, 0.3]},
            {"sampler": "cmaes", "pruner": "none", "seed": 0, "search_values": [0.1, None, 0.3]},
            {"sampler": "tpe", "pruner": "none", "seed": 0, "search_values": [0.1, None, 0.4]}]
    assert SE.same_as_random(runs) == ["cmaes"]


def test_unknown_sampler_is_a_config_error() -> None:
    from pxopt.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown sampler"):
        SE.make_sampler("anneal", 0, 2)


def test_finished_runs_are_kept_only_for_the_same_settings(tmp_path: Path) -> None:
    settings = {"model": "resnet", "components": "conv", "n_classes": 10, "trials": 100, "n_startup": 8,
                "n_ref": 5, "val_search": 100, "val_eval": 300, "rates": [0.0, 0.5], "samplers": ["tpe"],
                "pruners": ["none"], "seeds": 3}
    runs = [{"sampler": "tpe", "pruner": "none", "seed": 0}]
    path = tmp_path / "se.json"
    assert SE.finished_runs(path, settings) == ([], 0.0)  # nothing stored yet
    path.write_text(json.dumps({"format": SE.FORMAT, "settings": {**settings, "seeds": 2}, "runs": runs,
                                "wall_seconds": 12.5}))
    # more seeds or samplers than before: the stored studies still count
    assert SE.finished_runs(path, settings) == (runs, 12.5)
    for key, other in (("trials", 20), ("rates", [0.0, 0.25, 0.5]), ("val_search", 50)):
        assert SE.finished_runs(path, {**settings, key: other}) == ([], 0.0), key
    path.write_text("{not json")
    assert SE.finished_runs(path, settings) == ([], 0.0)


@pytest.mark.slow
def test_quick_run_on_builtin_resnet(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    result = CliRunner().invoke(SE.app, ["--quick", "--out-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    res = json.loads((tmp_path / "search_efficiency_resnet_conv_10cls.json").read_text())
    assert len(res["runs"]) == 4
    for run in res["runs"]:
        assert len(run["picked_held_out"]) == 4 and 0.0 < run["final_held_out"] <= 1.0
    assert "QUICK" in (tmp_path / "search_efficiency_resnet_conv_10cls.md").read_text()
    # run again (as after an interrupted session): the finished studies are kept, none rerun
    again = CliRunner().invoke(SE.app, ["--quick", "--out-dir", str(tmp_path)])
    assert again.exit_code == 0 and "resuming: 4 finished studies" in again.output, again.output
    res2 = json.loads((tmp_path / "search_efficiency_resnet_conv_10cls.json").read_text())
    assert res2["runs"] == res["runs"] and res2["wall_seconds"] >= res["wall_seconds"]
