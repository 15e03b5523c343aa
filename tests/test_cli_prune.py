"""`pxopt prune` on a tiny real pipeline: the exported curve point is reproduced exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_search_pipeline import _pipeline
from typer.testing import CliRunner

import pxopt.pipeline
from pxopt.cli import app
from pxopt.export import export_trial, write_export
from pxopt.search import StudySpec, run_search


@pytest.fixture()
def exported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    pipe = _pipeline()
    monkeypatch.setattr(pxopt.pipeline.Pipeline, "from_spec", classmethod(lambda cls, spec, **kw: _pipeline()))
    spec = StudySpec(name="tiny", model="builtin:tiny-test", data="random", classes=3, n_ref=4, n_val=10,
                     batch_size=16, rates=pipe.rates, storage=str(tmp_path / "t.db"), trials=4,
                     pruner={"name": "none"}).validated()
    study = run_search(spec, pipe.evaluate, timings=pipe.timings).study
    return write_export(export_trial(study), tmp_path / "best.json")


def test_prune_masked_reproduces_curve_point(exported: Path, tmp_path: Path) -> None:
    data = json.loads(exported.read_text())
    out = tmp_path / "pruned.pt"
    result = CliRunner().invoke(app, ["prune", "--config", str(exported), "--rate", "0.5", "--out", str(out)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "identical" in result.output
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["accuracy"] == data["curve"]["accuracies"][data["curve"]["rates"].index(0.5)]
    assert record["macs_effective"] < record["macs"]
    saved = torch.load(out, weights_only=True)
    pruned = record["pruned"]
    for name, idx in pruned.items():  # the masked channels are zero in the saved weights
        if idx:
            assert torch.all(saved["state_dict"][f"{name}.weight"][idx] == 0)


def test_prune_physical_is_smaller(exported: Path, tmp_path: Path) -> None:
    out = tmp_path / "phys.pt"
    result = CliRunner().invoke(app, ["prune", "--config", str(exported), "--rate", "0.5", "--out", str(out),
                                      "--physical"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["params_after"] < record["params_before"]
    assert record["macs_after"] < record["macs_before"]
    assert record["physical_accuracy"] == pytest.approx(record["accuracy"], abs=0.05)
    assert (tmp_path / "phys" / "pruning.json").is_file()
