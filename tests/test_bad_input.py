"""Bad input through the real `pxopt` CLI, table-driven.

Every row gives either one `error:` line with exit code 2 (no traceback), or a trial that
fails with its reason while the search goes on. After every row, the shared study that
an earlier good search filled is still readable, with all its trials unchanged.

Rows marked `fake` run the search with the fake pipeline of the search tests (the error
is caught before any model work, or in the search layer itself). The other rows use the
real model, data, LRP and pruning code on tiny models and folders built here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from search_fakes import FakePipeline

import pxopt.pipeline
from pxopt.cli import main
from pxopt.search.storage import open_storage

GOOD_MODEL = "builtin:tiny"


@dataclass(frozen=True)
class Row:
    name: str
    args: list[str]  # {db}, {dir} are filled in
    expect: str  # regex on the one error line, or on the failed trial's fail_reason
    kind: str = "error"  # "error" (exit 2, one line) or "failed-trial" (exit 0, a FAIL trial)
    fake: bool = True  # run with the fake pipeline (no real model or data needed)


def _export(tmp: Path, name: str, **rules_changes) -> str:
    """A valid pxopt.export/1 file with its rules changed (the rules JSON under test)."""
    rules = {"format": "pxopt.rules/1",
             "groups": {g: {"rule": "epsilon", "epsilon": 1e-6} for g in ("input", "low", "mid", "high", "fc")}}
    for key, value in rules_changes.items():
        if key == "format":
            rules["format"] = value
        else:
            rules["groups"][key] = value
    data = {
        "format": "pxopt.export/1", "study": "good", "trial": 0, "rules": rules, "ranking": "abs",
        "components": "conv", "model": GOOD_MODEL,
        "task": {"data": "fashion-mnist", "classes": 3, "n_ref": 2, "n_val": 4, "seed": 0, "batch_size": 8},
        "curve": {"rates": [0.0, 0.5], "accuracies": [0.9, 0.5]}, "area": 0.35, "top_pr": 0.0,
        "versions": {},
    }
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(data))
    return str(path)


def _space_spec(tmp: Path, name: str, space: str, *, model: str = GOOD_MODEL) -> str:
    path = tmp / f"{name}.toml"
    path.write_text(f"""
[study]
name = "{name}"
trials = 2
baselines = false
[model]
spec = "{model}"
[task]
data = "fashion-mnist"
classes = 3
n_ref = 2
n_val = 4
[prune]
rates = [0.0, 0.5]
[space]
{space}
""")
    return str(path)


ROWS: list[Row] = [
    Row("rates-above-one", ["search", "--storage", "{db}", "--study", "r1", "--model", GOOD_MODEL,
                            "--rates", "0,0.5,1.2"], r"rates must lie in \[0, 1\)"),
    Row("rates-negative", ["search", "--storage", "{db}", "--study", "r2", "--model", GOOD_MODEL,
                           "--rates", "-0.1,0.5"], r"rates must lie in \[0, 1\)"),
    Row("rates-not-increasing", ["search", "--storage", "{db}", "--study", "r3", "--model", GOOD_MODEL,
                                 "--rates", "0,0.5,0.3"], r"rates must be strictly increasing"),
    Row("workers-zero", ["search", "--storage", "{db}", "--study", "good", "--model", GOOD_MODEL,
                         "--workers", "0"], r"--workers must be >= 1, got 0"),
    Row("storage-unreachable", ["search", "--storage", "postgresql://pxopt:secret@127.0.0.1:1/pxopt",
                                "--study", "good", "--model", GOOD_MODEL],
        r"cannot open storage 'postgresql\+psycopg2?://pxopt:\*\*\*@127\.0\.0\.1:1/pxopt': .*refused"),
    Row("storage-bad-url", ["search", "--storage", "nosuchdb://x@y/z", "--study", "good",
                            "--model", GOOD_MODEL], r"cannot open storage 'nosuchdb://x@y/z'"),
    Row("storage-not-a-database", ["search", "--storage", "{dir}/garbage.json", "--study", "good",
                                   "--model", GOOD_MODEL], r"cannot open storage '.*garbage\.json': file is not a database"),
    Row("study-of-another-model", ["search", "--storage", "{db}", "--study", "good",
                                   "--model", "builtin:other", "--trials", "6"],
        r"study 'good' was created for model 'builtin:tiny', not 'builtin:other': use another --study name"),
    Row("study-of-another-task", ["search", "--storage", "{db}", "--study", "good", "--model", GOOD_MODEL,
                                  "--n-ref", "7", "--trials", "6", "--rates", "0,0.25,0.5,0.75"],
        r"study 'good' was created for another task \(n_ref: stored \d+, now 7\): use another --study"),
    Row("rules-unknown-format", ["prune", "--config", "{dir}/fmt.json", "--rate", "0.5", "--out", "{dir}/o.pt"],
        r"rules.format: expected 'pxopt.rules/1', got 'pxopt.rules/9'"),
    Row("rules-unknown-rule", ["prune", "--config", "{dir}/rule.json", "--rate", "0.5", "--out", "{dir}/o.pt"],
        r"rules: .*(unknown|not a known|invalid).*rule.*teleport|rules: .*teleport"),
    Row("rules-negative-epsilon", ["prune", "--config", "{dir}/neg.json", "--rate", "0.5", "--out", "{dir}/o.pt"],
        r"rules: .*groups\.mid\.epsilon"),
    Row("rules-not-json", ["prune", "--config", "{dir}/garbage.json", "--rate", "0.5", "--out", "{dir}/o.pt"],
        r"is not valid JSON"),
    Row("space-negative-epsilon", ["search", "--storage", "{db}", "--spec", "{dir}/negspace.toml"],
        r"space\.low\.epsilon must be > 0"),
    Row("prune-rate-one", ["prune", "--config", "{dir}/ok.json", "--rate", "1.0", "--out", "{dir}/o.pt"],
        r"--rate must be in \[0, 1\), got 1\.0"),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A storage with a good study (6 finished trials) and the bad files of the table."""
    tmp = tmp_path_factory.mktemp("bad")
    db = str(tmp / "shared.db")
    _export(tmp, "ok")
    _export(tmp, "fmt", format="pxopt.rules/9")
    _export(tmp, "rule", low={"rule": "teleport"})
    _export(tmp, "neg", mid={"rule": "epsilon", "epsilon": -1e-3})
    (tmp / "garbage.json").write_text("{not json")
    _space_spec(tmp, "negspace", 'low = { rules = ["epsilon"], epsilon = -1e-3 }')
    mp = pytest.MonkeyPatch()
    mp.setattr(pxopt.pipeline.Pipeline, "from_spec", FakePipeline.from_spec)
    try:
        code = _exit_code(["search", "--storage", db, "--study", "good", "--model", GOOD_MODEL,
                           "--trials", "6", "--rates", "0,0.25,0.5,0.75", "--no-report",
                           "--out-dir", str(tmp / "out")])
        assert code == 0
    finally:
        mp.undo()
    return {"db": db, "dir": str(tmp)}


def _exit_code(args: list[str]) -> int:
    """Run the real entry point; its exit status (0 when it returns normally)."""
    try:
        main(args)
    except SystemExit as exc:
        return 0 if exc.code is None else int(exc.code)
    return 0


def _good_trials(db: str) -> list[tuple]:
    study = optuna.load_study(study_name="good", storage=open_storage(db, heartbeat_interval=None))
    return [(t.number, t.state, t.value, t.params) for t in study.trials]


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_bad_input(row: Row, world: dict[str, str], monkeypatch: pytest.MonkeyPatch,
                   capsys: pytest.CaptureFixture) -> None:
    before = _good_trials(world["db"])
    assert len(before) == 6 and all(s == TrialState.COMPLETE for _, s, _, _ in before)
    if row.fake:
        monkeypatch.setattr(pxopt.pipeline.Pipeline, "from_spec", FakePipeline.from_spec)
    monkeypatch.chdir(world["dir"])
    args = [a.format(**world) for a in row.args]
    capsys.readouterr()
    code = _exit_code(args)
    err = capsys.readouterr().err
    if row.kind == "error":
        assert code == 2, err
        assert "Traceback" not in err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err
        assert re.search(row.expect, lines[0]), lines[0]
        assert "secret" not in err
    assert _good_trials(world["db"]) == before  # the earlier study is untouched and readable


def test_the_table_covers_the_issue() -> None:
    names = {r.name for r in ROWS}
    assert len(names) == len(ROWS) >= 12
