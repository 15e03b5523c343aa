"""CLI: search, export, report, dashboard (attach) with a fake pipeline and temporary storage."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import optuna_dashboard
import pytest
from search_fakes import run_cli

from pxopt.cli import main

_run = run_cli


def _error(args: list[str], capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and err.endswith(lines[0]), err
    return lines[0]


def test_search_export_report_dashboard(fake: Path) -> None:
    out = _run(["search", "--model", "builtin:tiny", "--study", "s1", "--trials", "6", "--rates", "0:1:0.1"])
    assert "study:" in out and "best:" in out and "report:" in out
    db = fake / "studies" / "s1.db"
    assert db.is_file()
    best_json = json.loads((fake / "studies" / "s1-best.json").read_text())
    assert best_json["format"] == "pxopt.export/1" and best_json["model"] == "builtin:tiny"
    assert len(best_json["curve"]["rates"]) == 10
    html = (fake / "studies" / "s1-report.html").read_text()
    assert "plotly" in html.lower() and html.count("fig-") >= 5
    assert 'id="fig-heatmaps"' in html  # drawn with the search's own pipeline
    # resume with a larger budget adds trials to the same study
    _run(["search", "--model", "builtin:tiny", "--study", "s1", "--trials", "8", "--rates", "0:1:0.1"])
    study = optuna.load_study(study_name="s1", storage=f"sqlite:///{db}")
    assert len(study.trials) == 8
    # export a chosen trial (trial 0 is the all-epsilon baseline)
    out = _run(["export", "--study", "s1", "--trial", "0", "--out", "t0.json"])
    t0 = json.loads((fake / "t0.json").read_text())
    assert t0["trial"] == 0 and t0["baseline"] == "all-epsilon"
    _run(["report", "--study", "s1", "--out", "r.html"])
    assert (fake / "r.html").stat().st_size > 1_000_000  # plotly.js inlined
    assert 'id="fig-heatmaps"' in (fake / "r.html").read_text()  # model and task loaded from the study's spec
    _run(["report", "--study", "s1", "--out", "r0.html", "--heatmaps", "0"])
    assert 'id="fig-heatmaps"' not in (fake / "r0.html").read_text()
    out = _run(["dashboard", "--study", "s1", "--attach-only"])
    assert "attached 5 figures" in out
    note = optuna_dashboard.get_note(study)
    assert "pxopt study" in note and "Best: trial" in note
    rules = note.split("```json\n", 1)[1].split("\n```", 1)[0]
    assert json.loads(rules) == study.best_trial.user_attrs["rules"]  # rules as JSON
    assert "lower bound" in note  # what a pruned trial's value is
    detail = dashboard_get(f"sqlite:///{db}", f"/api/studies/{study._study_id}")
    ids = {g["id"] for g in detail["plotly_graph_objects"]}
    assert {"pxopt-curves", "pxopt-history", "pxopt-per_layer"} <= ids
    assert len(detail["trials"]) == 8
    assert detail["objective_names"] == ["area"]  # the dashboard names the objective


def dashboard_get(storage: str, path: str) -> dict:
    """GET from optuna-dashboard's own WSGI app (its REST API), no server needed."""
    from wsgiref.util import setup_testing_defaults

    app_ = optuna_dashboard.wsgi(storage)
    environ: dict = {"PATH_INFO": path, "REQUEST_METHOD": "GET"}
    setup_testing_defaults(environ)
    status: list[str] = []
    body = b"".join(app_(environ, lambda s, h, *a: status.append(s)))
    assert status[0].startswith("200"), (status, body[:200])
    return json.loads(body)


@pytest.mark.parametrize(
    "args, message",
    [
        (["search", "--model", "x", "--rates", "0.5,0.2"], "increasing"),
        (["search", "--model", "x", "--rates", "0,1.5"], "[0, 1)"),
        (["search", "--model", "x", "--rates", "a,b"], "--rates"),
        (["search", "--model", "x", "--components", "rows"], "components"),
        (["search", "--model", "x", "--trials", "0"], "trials"),
        (["search", "--model", "x", "--classes", "3", "--class-names", "a,b"], "either"),
        (["search", "--spec", "missing.toml"], "does not exist"),
        (["search", "--model", "x", "--storage", "postgresql://u@127.0.0.1:1/db"], "storage"),
        (["export", "--study", "nope"], "no study file"),
        (["report", "--study", "nope"], "no study file"),
        (["prune", "--config", "missing.json", "--rate", "0.5", "--out", "p.pt"], "does not exist"),
        (["baselines", "--model", "x", "--criteria", "magic"], "--criteria"),
        (["search", "--model", "x", "--workers", "0"], "--workers"),
    ],
)
def test_user_errors_exit_2_with_one_line(fake: Path, capsys: pytest.CaptureFixture, args: list[str], message: str) -> None:
    err = _error(args, capsys)
    assert message in err


def test_other_model_same_study_refused(fake: Path, capsys: pytest.CaptureFixture) -> None:
    _run(["search", "--model", "builtin:a", "--study", "s", "--trials", "2", "--no-report"])
    err = _error(["search", "--model", "builtin:b", "--study", "s", "--trials", "2"], capsys)
    assert "model" in err


def test_export_errors(fake: Path, capsys: pytest.CaptureFixture) -> None:
    _run(["search", "--model", "builtin:a", "--study", "s", "--trials", "3", "--no-report"])
    assert "no trial 99" in _error(["export", "--study", "s", "--trial", "99"], capsys)
    bad = fake / "bad.json"
    bad.write_text(json.dumps({"format": "pxopt.export/2"}))
    assert "format" in _error(["prune", "--config", str(bad), "--rate", "0.5", "--out", "p.pt"], capsys)
    bad.write_text("{not json")
    assert "not valid JSON" in _error(["prune", "--config", str(bad), "--rate", "0.5", "--out", "p.pt"], capsys)
    _run(["export", "--study", "s", "--out", "b.json"])
    data = json.loads((fake / "b.json").read_text())
    data["rules"]["groups"]["low"] = {"rule": "epsilon", "epsilon": -1.0}
    bad.write_text(json.dumps(data))
    assert "epsilon" in _error(["prune", "--config", str(bad), "--rate", "0.5", "--out", "p.pt"], capsys)
    assert "--rate" in _error(["prune", "--config", str(fake / "b.json"), "--rate", "1.5", "--out", "p.pt"], capsys)


def test_export_area_is_the_mean_accuracy(fake: Path, capsys: pytest.CaptureFixture) -> None:
    from pxopt.evaluate import AREA_DEFINITION, curve_area
    from pxopt.export import read_export

    _run(["search", "--model", "builtin:a", "--study", "s", "--trials", "3", "--no-report", "--rates", "0:0.8:0.2"])
    out = _run(["export", "--study", "s", "--out", "b.json"])
    data = json.loads((fake / "b.json").read_text())
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{fake / 'studies' / 's.db'}")
    mean = curve_area(data["curve"]["rates"], data["curve"]["accuracies"])
    assert data["area"] == pytest.approx(mean) == pytest.approx(study.best_value)
    assert data["area_definition"] == AREA_DEFINITION and "area_normalised" not in data
    assert f"area {mean:.4f}" in out
    # an export of an older pxopt: trapezoid area, no definition -> read as the mean accuracy
    old = dict(data, area=mean * 0.6, area_normalised=mean)
    del old["area_definition"]
    (fake / "old.json").write_text(json.dumps(old))
    back = read_export(fake / "old.json")
    assert back["area"] == pytest.approx(mean) and "area_normalised" not in back
    # a current export whose area does not match its curve is refused
    (fake / "bad.json").write_text(json.dumps(dict(data, area=mean * 0.6)))
    assert "area" in _error(["prune", "--config", str(fake / "bad.json"), "--rate", "0.5", "--out", "p.pt"], capsys)


def test_baselines_table_and_figure(fake: Path) -> None:
    out = _run(["baselines", "--model", "builtin:tiny", "--criteria", "random,weight,lrp-epsilon",
                "--out-dir", "b", "--rates", "0:1:0.25"])
    assert "random" in out and "lrp-epsilon" in out
    table = json.loads((fake / "b" / "builtin-tiny-baselines.json").read_text())
    assert table["format"] == "pxopt.baselines/1" and table["area_definition"].startswith("area = mean accuracy")
    assert set(table["criteria"]) == {"random", "weight", "lrp-epsilon"}
    areas = {k: v["area"] for k, v in table["criteria"].items()}
    assert areas["lrp-epsilon"] > areas["random"]
    assert (fake / "b" / "builtin-tiny-baselines.html").stat().st_size > 1_000_000
    # the report can overlay them
    _run(["search", "--model", "builtin:tiny", "--study", "s", "--trials", "3", "--no-report", "--rates", "0:1:0.25"])
    _run(["report", "--study", "s", "--out", "r.html", "--baselines", "b/builtin-tiny-baselines.json"])
    assert "criterion random" in (fake / "r.html").read_text()
