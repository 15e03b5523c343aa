"""End to end on the offline default study (slow: trains the built-in model on first use).

`pxopt search` with no arguments -> study in SQLite, best config JSON, HTML report; then
export -> `pxopt prune` reproduces the stored curve point exactly, `pxopt prune --physical`
writes a program that plain Python loads without pxopt, and the `optuna` CLI and
optuna-dashboard's API read the study.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from typer.testing import CliRunner

from pxopt.cli import app
from pxopt.search import baseline_trials


@pytest.mark.slow
def test_default_study_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # outputs go to ./studies; the spec comes from the repository
    runner = CliRunner()
    result = runner.invoke(app, ["search"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "study:" in result.output and "best:" in result.output and "report:" in result.output
    assert "held-out: 300 images the search never saw (30 per class)" in result.output
    assert "all-epsilon (trial 0)" in result.output  # beside the best, search split and held-out
    db = tmp_path / "studies" / "default.db"
    url = f"sqlite:///{db}"
    study = optuna.load_study(study_name="default", storage=url)
    finished = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(finished) >= 10
    base = baseline_trials(study)
    assert {"all-epsilon", "faithful"} <= set(base)
    assert study.best_value >= base["all-epsilon"].value
    assert 0.0 < study.best_value <= 0.95

    # export -> prune reproduces the stored curve point exactly
    best_json = tmp_path / "studies" / "default-best.json"
    exported = json.loads(best_json.read_text())
    rates, accs = exported["curve"]["rates"], exported["curve"]["accuracies"]
    i = rates.index(0.5)
    out = tmp_path / "pruned.pt"
    result = runner.invoke(app, ["prune", "--config", str(best_json), "--rate", "0.5", "--out", str(out)],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["accuracy"] == accs[i] and "identical" in result.output
    assert out.is_file()

    # --physical: the program loads in a plain Python session where pxopt cannot be imported
    result = runner.invoke(app, ["prune", "--config", str(best_json), "--rate", "0.3", "--physical",
                                 "-o", "pruned.pt"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "model = torch.export.load('pruned.pt2').module()" in result.output
    record = json.loads((tmp_path / "pruned.json").read_text())
    assert record["params_after"] < record["params_before"]
    script = ("import sys\nsys.modules['pxopt'] = None  # import pxopt raises ImportError\n"
              "import torch\n"
              "model = torch.export.load('pruned.pt2').module()\n"
              "print(tuple(model(torch.zeros(3, 1, 28, 28)).shape), sys.modules['pxopt'] is not None)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.split() == ["(3,", "10)", "False"], proc.stderr

    # the optuna CLI reads the study
    proc = subprocess.run(["optuna", "best-trial", "--study-name", "default", "--storage", url, "-f", "json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["number"] == study.best_trial.number

    # optuna-dashboard's API reads it, with pxopt's figures attached
    result = runner.invoke(app, ["dashboard", "--attach-only"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    from test_cli_search import dashboard_get

    detail = dashboard_get(url, f"/api/studies/{study._study_id}")
    assert len(detail["trials"]) == len(study.trials)
    assert any(g["id"] == "pxopt-curves" for g in detail["plotly_graph_objects"])
    report = (tmp_path / "studies" / "default-report.html").read_text()
    assert len(report) > 1_000_000 and 'id="fig-heatmaps"' in report  # heatmaps of the real model
    assert detail["objective_names"] == ["area"]
    assert exported["area"] == pytest.approx(study.best_value)  # one area: the mean accuracy
