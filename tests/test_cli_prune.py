"""`pxopt prune` on a tiny real pipeline: the exported curve point is reproduced exactly, and the
physically pruned model leaves as a torch.export program that loads without pxopt."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_search_pipeline import _pipeline
from typer.testing import CliRunner

import pxopt.pipeline
from pxopt.cli import app
from pxopt.export import export_trial, write_export
from pxopt.prune.physical import load_pruned
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


def _masked_logits(exported: Path, rate: float, x: torch.Tensor) -> torch.Tensor:
    """The masked model's logits at `rate` under the exported configuration."""
    data = json.loads(exported.read_text())
    pipe = _pipeline()
    scores = pipe.scores(data["rules"])
    with pipe.pruned(scores, data["ranking"], rate), torch.no_grad():
        return pipe.model(x)


def test_prune_physical_writes_a_program_that_loads_without_pxopt(exported: Path, tmp_path: Path) -> None:
    out = tmp_path / "phys.pt"
    result = CliRunner().invoke(app, ["prune", "--config", str(exported), "--rate", "0.5", "-o", str(out),
                                      "--physical"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["params_after"] < record["params_before"]
    assert record["macs_after"] < record["macs_before"]
    assert record["physical_accuracy"] == pytest.approx(record["accuracy"], abs=0.05)
    program = tmp_path / "phys.pt2"
    assert record["files"] == {"program": str(program), "state_dict": str(out),
                               "summary": str(out.with_suffix(".json"))}
    assert record["program"]["dynamic_batch"] and record["input_shape"] == ["N", 1, 8, 8]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("phys")) == [
        "phys.json", "phys.pt", "phys.pt2"]  # no replay folder any more
    assert f"torch.export.load({str(program)!r}).module()" in result.output
    stats = record["latency"]["cpu"]
    assert stats["before"]["threads"] == 1 and stats["before"]["runs"] >= 5
    assert stats["before"]["q1_ms"] <= stats["before"]["median_ms"] <= stats["before"]["q3_ms"]
    assert "interleaved runs, 1 thread" in result.output

    # a plain Python session (isolated mode, another folder) where pxopt cannot be imported at
    # all (the editable install would otherwise still find it) loads the program
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    torch.save(x, tmp_path / "x.pt")
    script = (
        "import sys\n"
        "sys.modules['pxopt'] = None  # any import of pxopt raises ImportError\n"
        "import torch\n"
        f"model = torch.export.load({str(program)!r}).module()\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r})\n"
        "with torch.no_grad():\n"
        f"    torch.save(model(x), {str(tmp_path / 'y.pt')!r})\n"
        f"saved = torch.load({str(out)!r}, weights_only=True)  # the state dict beside it, too\n"
        "assert saved['state_dict'] and saved['pruning']\n"
        "assert sys.modules['pxopt'] is None, 'pxopt was imported'\n"
        "print('ok', [p for p in sys.path if 'wt' in p or 'work' in p])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok [")
    y = torch.load(tmp_path / "y.pt")
    torch.testing.assert_close(y, _masked_logits(exported, 0.5, x), rtol=1e-5, atol=1e-5)

    # the state dict beside it rebuilds the same model in pxopt (for fine-tuning)
    rebuilt = load_pruned(_pipeline().model, out, x[:1])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), y, rtol=1e-6, atol=1e-6)
    saved = torch.load(out, weights_only=True)
    assert saved["pxopt"]["physical_accuracy"] == record["physical_accuracy"]


def test_readme_loading_lines_run_as_written(exported: Path, tmp_path: Path) -> None:
    # the README's two lines, verbatim, in a session that cannot import pxopt, next to the
    # files the README's own command writes (`pxopt prune ... --physical -o pruned.pt`)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("### The pruned model", 1)[1]
    assert "--physical -o pruned.pt" in section
    snippet = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert len(snippet.strip().splitlines()) == 2, snippet
    folder = tmp_path / "user"
    folder.mkdir()
    result = CliRunner().invoke(app, ["prune", "--config", str(exported), "--rate", "0.5", "--physical",
                                      "-o", str(folder / "pruned.pt")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    script = ("import sys\nsys.modules['pxopt'] = None\n" + snippet
              + "print(tuple(model(torch.zeros(2, 1, 8, 8)).shape))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-I", "-c", script], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "(2, 3)"


def test_prune_physical_out_pt2_and_threads(exported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pxopt.prune.physical as physical

    seen = []
    original = physical.compare_models

    def spy(before, after, x, *, threads=None, repeats=15):
        seen.append(threads)  # time with one thread anyway: two collapse on a busy test machine
        return original(before, after, x, threads=1, repeats=3)

    monkeypatch.setattr(physical, "compare_models", spy)
    out = tmp_path / "m.pt2"
    result = CliRunner().invoke(app, ["prune", "--config", str(exported), "--rate", "0.25", "--out", str(out),
                                      "--physical", "--threads", "2"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert out.is_file() and (tmp_path / "m.pt").is_file() and (tmp_path / "m.json").is_file()
    assert seen == [2]


def test_prune_physical_falls_back_when_export_fails(exported: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import pxopt.prune.physical as physical

    def refuse(model, example, path):
        raise physical.ExportFailed("torch.export cannot capture this model: data-dependent branch")

    monkeypatch.setattr(physical, "export_program", refuse)
    out = tmp_path / "p.pt"
    result = CliRunner().invoke(app, ["prune", "--config", str(exported), "--rate", "0.5", "-o", str(out),
                                      "--physical"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "warning: no " in result.output and "data-dependent branch" in result.output
    assert not (tmp_path / "p.pt2").exists() and out.is_file()
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["program"] is None and record["files"]["program"] is None


def test_export_program_refuses_what_it_cannot_capture(tmp_path: Path) -> None:
    from pxopt.prune.physical import ExportFailed, export_program

    class Branchy(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent Python control flow
                return x * 2
            return x

    with pytest.raises(ExportFailed, match="^torch.export cannot capture this model: ") as info:
        export_program(Branchy(), torch.ones(2, 3), tmp_path / "b.pt2")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "b.pt2").exists()
