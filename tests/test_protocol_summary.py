"""benchmarks/protocol_summary.py: rows, verdicts and files from protocol runs on disk."""

from __future__ import annotations

import json
import math
from pathlib import Path

from bench_modules import load_benchmark

S = load_benchmark("protocol_summary")


def _criterion(area: float, se: float, top_pr: float, n: int) -> dict:
    return {"area_mean": area, "area_se": se, "top_pr_mean": top_pr, "top_pr_se": 0.0, "n_seeds": n}


def _run(folder: Path, key: str, *, model: str, kind: str, n_classes: int, opt: float, eps: float,
         ci: list[float], seeds: int, planned: int, n_trials: int, budget: int, stopped: bool) -> None:
    summary = {"optimised": _criterion(opt, 0.001, 0.7, seeds), "lrp-epsilon": _criterion(eps, 0.002, 0.65, seeds),
               "taylor": _criterion(opt - 0.01, 0.001, 0.6, seeds), "random": _criterion(0.3, 0.05, 0.1, seeds)}
    run = {
        "scale": "test", "settings_used": {"trials": budget, "seeds": planned, "rates": [0.0, 0.5, 0.9], "n_ref": 10,
                                           "val_search": 200, "val_eval": 300, "patience": 50},
        "settings": {key: {
            "model": model, "components": kind, "n_classes": n_classes, "complete": seeds == planned,
            "summary": summary,
            "search": {"n_trials": n_trials, "n_complete": 5, "n_pruned": n_trials - 5, "stopped_early": stopped,
                       "trial": 1, "baseline": "faithful" if kind == "heads" else None, "search_area": opt + 0.01,
                       **({"complete_areas": {"min": 0.7, "median": 0.75, "max": opt + 0.01},
                           "baseline_areas": {"all-epsilon": 0.76, "faithful": 0.74}} if kind == "conv" else {})},
            "paired": {"area": {"mean_diff": opt - eps, "ci95": ci, "t_p": 0.01, "n_positive": seeds},
                       "top_pr": {"mean_diff": 0.05, "ci95": [0.0, 0.1]}},
        }},
    }
    folder.mkdir(parents=True)
    (folder / "paper_comparison.json").write_text(json.dumps(run))


def test_rows_verdicts_and_files(tmp_path: Path) -> None:
    res = tmp_path / "results"
    _run(res / "protocol_big", "fmnist-resnet50-conv-10cls", model="fmnist-resnet50", kind="conv", n_classes=10,
         opt=0.80, eps=0.78, ci=[0.01, 0.03], seeds=5, planned=5, n_trials=100, budget=100, stopped=True)
    _run(res / "protocol_vit", "fmnist-vit12-heads-10cls", model="fmnist-vit12", kind="heads", n_classes=10,
         opt=0.84, eps=0.845, ci=[-0.02, 0.01], seeds=5, planned=5, n_trials=60, budget=100, stopped=True)
    _run(res / "protocol_small", "resnet-conv-10cls", model="resnet", kind="conv", n_classes=10,
         opt=0.5, eps=0.55, ci=[-0.08, -0.02], seeds=5, planned=5, n_trials=30, budget=30, stopped=False)
    _run(res / "protocol_partial", "fmnist-vit12-mlp-10cls", model="fmnist-vit12", kind="mlp", n_classes=10,
         opt=0.87, eps=0.87, ci=[math.nan, math.nan], seeds=1, planned=5, n_trials=100, budget=100, stopped=False)
    rows = S.collect(res)
    assert [r["setting"] for r in rows] == ["fmnist-resnet50-conv-10cls", "fmnist-vit12-heads-10cls",
                                            "fmnist-vit12-mlp-10cls", "resnet-conv-10cls"]  # paper-scale first
    assert [S.verdict(r) for r in rows] == ["**wins**", "tie", "-", "**loses**"]
    assert rows[0]["strongest_other"] == "taylor"  # random is not a contender
    assert [r["setting"] for r in S.collect(res, min_trials=100)] == [r["setting"] for r in rows
                                                                      if r["trial_budget"] >= 100]

    out = tmp_path / "out"
    S.write(rows, out, "cmd")
    md = (out / "protocol_summary.md").read_text()
    assert "patience not honoured*" in md  # ran its whole budget although it recorded a stop
    assert "60 (5 / 55, stopped early)" in md
    assert "(incomplete: 1 of 5 seeds)" in md and "nan" not in md
    assert "baseline `faithful` (0.850)" in md
    assert "trial 1 (0.810; complete trials 0.700-0.810, all-ε 0.760)" in md  # how flat the space is
    html = (out / "protocol_summary.html").read_text()
    assert "fmnist-resnet50 channels, 10 cl." in html and "fmnist-vit12 MLP" not in html  # no interval, no point


def test_no_runs_is_a_one_line_error(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    result = CliRunner().invoke(S.app, ["--results-dir", str(tmp_path), "--out-dir", str(tmp_path)])
    assert result.exit_code == 1 and "error: no protocol run" in result.output


def test_each_row_names_the_training_it_measured():
    """Two trainings of one recipe can give different verdicts: the table says which one."""
    recorded = {"test_accuracy": 0.8821, "epochs": 10, "step_dtype": "float32"}
    assert S.trained_label(recorded, "anything") == "10 ep, float32 steps, 88.21%"
    label = "PAPER PROTOCOL (issue #14), fmnist-vgg16 (4-epoch recipe), 10 classes: 100 trials"
    assert S.trained_label(None, label) == "4-epoch recipe"
    assert S.trained_label({}, "REDUCED SCALE on the small ResNet (30 trials)") == ""
    assert S.trained_label(None, None) == ""


def test_results_records_the_training_of_a_builtin():
    R = load_benchmark("results")
    meta = {"test_accuracy": 0.9229, "recipe": {"epochs": 12, "autocast": "bf16"}, "trained_at": "t", "cpu": "x"}
    assert R.trained_model_record(meta) == {"test_accuracy": 0.9229, "epochs": 12, "step_dtype": "bfloat16",
                                            "trained_at": "t", "cpu": "x"}
    assert R.trained_model_record({**meta, "step_dtype": "float32"})["step_dtype"] == "float32"
    assert R.trained_model_record({"device": "cpu"}) == {}  # torchvision / timm / file models


def test_the_re_scored_pick_is_shown_only_for_the_run_it_was_made_from(tmp_path: Path) -> None:
    res = tmp_path / "results"
    _run(res / "protocol_big", "k", model="fmnist-resnet50", kind="conv", n_classes=10,
         opt=0.80, eps=0.78, ci=[0.01, 0.03], seeds=2, planned=2, n_trials=100, budget=100, stopped=False)
    run_file = res / "protocol_big" / "paper_comparison.json"
    run = json.loads(run_file.read_text())
    run["settings"]["k"]["per_seed"] = {"1": {"optimised": {"area": 0.79}}, "2": {"optimised": {"area": 0.81}}}
    run_file.write_text(json.dumps(run))
    reeval = {"settings": {"k": {
        "search_best_trial": 1, "named_trial": 0, "held_out": {"optimised": [0.79, 0.81]},
        "candidates": [{"trial": 1, "baseline": None}, {"trial": 0, "baseline": "all-epsilon"}],
        "re-evaluated − lrp-epsilon": {"mean_diff": 0.004, "ci95": [-0.001, 0.009], "t_p": 0.1}}}}
    (res / "protocol_big" / "reeval_best.json").write_text(json.dumps(reeval))
    (row,) = S.collect(res)
    assert S._rescored_cell(row) == "+0.004 [-0.001, +0.009] (`all-epsilon`, ref. only)"
    # the re-scoring on new validation images too (what pxopt search does now) comes first
    fresh = json.loads(json.dumps(reeval))
    fresh["settings"]["k"].update(named_trial=1, **{"re-evaluated − lrp-epsilon": {
        "mean_diff": 0.002, "ci95": [0.001, 0.003], "t_p": 0.01}})
    (res / "protocol_big" / "reeval_best_fresh.json").write_text(json.dumps(fresh))
    (row,) = S.collect(res)
    assert S._rescored_cell(row) == "+0.002 [+0.001, +0.003] (trial 1)"
    for name in ("reeval_best.json", "reeval_best_fresh.json"):
        reeval["settings"]["k"]["held_out"]["optimised"] = [0.70, 0.81]  # made from an earlier run in the folder
        (res / "protocol_big" / name).write_text(json.dumps(reeval))
    (row,) = S.collect(res)
    assert S._rescored_cell(row) == "-"
    S.write([row], tmp_path / "out", "cmd")
    assert "named after re-scoring − LRP-ε" in (tmp_path / "out" / "protocol_summary.md").read_text()
