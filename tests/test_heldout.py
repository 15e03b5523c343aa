"""Held-out split (pxopt.data.heldout via make_task) and its evaluation in a study
(pxopt.search.heldout): disjoint images, determinism, the search's output, export, report,
resume, n_heldout = 0 and studies made before the split existed."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch
from search_fakes import FakePipeline, run_cli, tiny_linear_model

from pxopt.data import make_task
from pxopt.data.heldout import split_per_class
from pxopt.data.sources import Dataset, Split
from pxopt.evaluate import curve_area
from pxopt.search.heldout import (
    ATTR_RESULTS,
    ATTR_SPLIT,
    heldout_summary,
    no_split_note,
    split_record,
)


# -- the split --------------------------------------------------------------------------------
def _indexed(n_per_class: int, classes: int = 3, *, one_split: bool = False) -> Dataset:
    """Images whose pixels encode their own index in the split, so sets can be compared by id."""

    def split(offset: int) -> Split:
        labels = torch.arange(classes).repeat_interleave(n_per_class)
        idx = torch.arange(len(labels)) + offset
        images = torch.stack([idx % 256, idx // 256], dim=1).view(-1, 1, 2).to(torch.uint8)
        return Split(labels=labels, images=images)

    splits = {"all": split(0)} if one_split else {"train": split(10_000), "val": split(0)}
    return Dataset("indexed", classes, {c: f"c{c}" for c in range(classes)}, splits)


def _ids(images: torch.Tensor) -> set[int]:
    raw = torch.round(images * 255).long().view(len(images), -1)
    return set((raw[:, 0] + 256 * raw[:, 1]).tolist())


@pytest.mark.parametrize("one_split", [False, True])
def test_heldout_is_disjoint_balanced_and_leaves_validation_unchanged(one_split: bool) -> None:
    ds = _indexed(40, one_split=one_split)
    plain = make_task(ds, n_ref=3, n_val=5, seed=7)
    task = make_task(ds, n_ref=3, n_val=5, seed=7, n_heldout=30)
    assert plain.heldout is None and "n_heldout" not in plain.describe()  # (a study of older pxopt)
    held, val, ref = _ids(task.heldout.images), _ids(task.validation.images), _ids(task.reference.images)
    assert len(held) == 30 and torch.bincount(task.heldout.labels).tolist() == [10, 10, 10]
    assert not held & val and not held & ref
    # the objective's images are those of the same task without a held-out split
    assert torch.equal(task.validation.images, plain.validation.images)
    assert task.describe()["indices_hash"] == plain.describe()["indices_hash"]
    # deterministic given the data seed; another seed draws others
    again = make_task(ds, n_ref=3, n_val=5, seed=7, n_heldout=30)
    assert torch.equal(again.heldout.images, task.heldout.images)
    assert again.describe()["heldout_hash"] == task.describe()["heldout_hash"]
    other = make_task(ds, n_ref=3, n_val=5, seed=8, n_heldout=30)
    assert other.describe()["heldout_hash"] != task.describe()["heldout_hash"]


def test_heldout_size_on_tiny_tasks_and_off() -> None:
    ds = _indexed(12)
    small = make_task(ds, n_ref=2, n_val=5, seed=0, n_heldout=300)  # 7 left per class
    assert small.describe()["heldout_per_class"] == 7 and len(small.heldout) == 21
    assert make_task(ds, n_ref=2, n_val=12, seed=0, n_heldout=300).heldout is None  # nothing left
    off = make_task(ds, n_ref=2, n_val=5, seed=0, n_heldout=0)
    assert off.heldout is None
    every = make_task(ds, n_ref=2, n_val=None, seed=0, n_heldout=9)  # n_val all: the objective keeps all
    assert every.heldout is None and len(every.validation) == 36
    assert every.describe()["n_heldout_images"] == 0
    assert "n_val = all" in no_split_note(split_record(every))


def test_library_split_is_the_benchmarks_split() -> None:
    """The benchmark drew n_search + n_eval per class and cut the first n_search: the same images."""
    old = make_task("fashion-mnist", classes=3, n_ref=2, n_val=4 + 5, seed=0)
    search, held = split_per_class(old.validation, 4)
    new = make_task("fashion-mnist", classes=3, n_ref=2, n_val=4, seed=0, n_heldout=15)
    assert torch.equal(new.validation.images, search.images) and torch.equal(new.heldout.images, held.images)
    assert torch.equal(new.heldout.labels, held.labels)


def test_results_benchmark_uses_the_library_split() -> None:
    from test_results import R

    loaded = SimpleNamespace(transform=None, num_classes=10, model=tiny_linear_model())
    settings = R.Settings.quick(val_search=12, val_eval=15)
    setting = R.build_setting("resnet", "conv", 3, loaded, settings)
    task = make_task("fashion-mnist", classes=3, n_ref=settings.n_ref, n_val=4, seed=0, n_heldout=15)
    assert torch.equal(setting.held_out.images, task.heldout.images)
    assert torch.equal(setting.search_task.validation.images, task.validation.images)
    assert setting.search_task.heldout is None


# -- in a study, through the CLI (fake pipeline: no model) ------------------------------------
_run = run_cli


SEARCH = ["search", "--model", "builtin:tiny", "--study", "h", "--rates", "0:1:0.25"]


def _study(root: Path) -> optuna.Study:
    return optuna.load_study(study_name="h", storage=f"sqlite:///{root / 'studies' / 'h.db'}")


def test_search_export_report_show_heldout_beside_search_split(fake: Path) -> None:
    out = _run([*SEARCH, "--trials", "6", "--n-heldout", "30"])
    assert "held-out: 30 images the search never saw (10 per class)" in out
    assert "search split" in out and "held-out" in out
    study = _study(fake)
    best = study.best_trial
    lines = {ln.split(")")[0].strip() + ")": ln for ln in out.splitlines() if "(trial " in ln and ln.startswith("  ")}
    assert f"best (trial {best.number})" in lines and any(k.startswith("all-epsilon (trial") for k in lines)
    summary = heldout_summary(study, best)  # stored by the search: nothing to load
    row = summary["rows"]["optimised"]
    assert f"{row['search_area']:.4f}" in lines[f"best (trial {best.number})"]
    assert f"{row['heldout_area']:.4f}" in lines[f"best (trial {best.number})"]
    assert row["heldout_area"] < row["search_area"]  # (the fake's held-out images are harder)
    # export: both held-out curves, from the study (not evaluated again)
    calls = FakePipeline.heldout_calls_total
    _run(["export", "--study", "h", "--out", "b.json"])
    assert FakePipeline.heldout_calls_total == calls
    held = json.loads((fake / "b.json").read_text())["heldout"]
    assert held["n_images"] == 30 and set(held["rows"]) == {"optimised", "all-epsilon"}
    for r in held["rows"].values():
        assert len(r["heldout_curve"]["accuracies"]) == len(r["heldout_curve"]["rates"]) == 4
        assert r["heldout_area"] == pytest.approx(curve_area(r["heldout_curve"]["rates"], r["heldout_curve"]["accuracies"]))
    # another trial: evaluated once, then stored under its number
    other = next(t.number for t in study.trials if t.state.name == "COMPLETE" and t.number != best.number)
    _run(["export", "--study", "h", "--trial", str(other), "--out", "o.json"])
    assert FakePipeline.heldout_calls_total == calls + 1
    assert json.loads((fake / "o.json").read_text())["heldout"]["rows"]["optimised"]["trial"] == other
    _run(["export", "--study", "h", "--trial", str(other), "--out", "o.json"])
    assert FakePipeline.heldout_calls_total == calls + 1
    # report: the held-out figure and the side-by-side rows
    _run(["report", "--study", "h", "--out", "r.html", "--heatmaps", "0"])
    html = (fake / "r.html").read_text()
    assert 'id="fig-heldout"' in html and "search-split area" in html and "held-out area" in html
    assert f"best (trial {best.number}), held-out: area {row['heldout_area']:.4f}" in html  # legend


def test_resume_keeps_the_split_and_a_new_best_is_evaluated(fake: Path) -> None:
    _run([*SEARCH, "--trials", "3", "--n-heldout", "30"])
    first = dict(_study(fake).user_attrs[ATTR_SPLIT])
    out = _run([*SEARCH, "--trials", "6", "--n-heldout", "60"])
    assert "keeps the held-out split it was made with" in out
    study = _study(fake)
    assert study.user_attrs[ATTR_SPLIT] == first and "held-out: 30 images" in out
    keys = set(study.user_attrs[ATTR_RESULTS])
    assert f"{study.best_trial.number}@" in " ".join(keys)  # the (possibly new) best is stored


def test_n_heldout_zero(fake: Path) -> None:
    out = _run([*SEARCH, "--trials", "3", "--n-heldout", "0"])
    assert "held-out: no held-out split (n_heldout = 0)" in out
    _run(["export", "--study", "h", "--out", "b.json"])
    assert json.loads((fake / "b.json").read_text())["heldout"] == {"note": "no held-out split (n_heldout = 0)"}
    out = _run(["report", "--study", "h", "--out", "r.html", "--heatmaps", "0"])
    assert "no held-out split (n_heldout = 0)" in (fake / "r.html").read_text()


def test_study_from_before_the_split_still_exports_and_reports(fake: Path) -> None:
    _run([*SEARCH, "--trials", "3", "--no-report"])
    db = fake / "studies" / "h.db"
    with sqlite3.connect(db) as con:  # what a study of an older pxopt holds: no split, no results
        con.execute("DELETE FROM study_user_attributes WHERE key IN (?, ?)", (ATTR_SPLIT, ATTR_RESULTS))
    out = _run(["export", "--study", "h", "--out", "b.json"])
    assert "no held-out split (the study was made before pxopt kept one)" in out
    data = json.loads((fake / "b.json").read_text())
    assert data["heldout"]["note"].startswith("no held-out split") and data["curve"]["rates"]
    _run(["report", "--study", "h", "--out", "r.html", "--heatmaps", "0"])
    assert "no held-out split" in (fake / "r.html").read_text()


# -- a real model and Fashion-MNIST (random weights: the numbers, not their quality) ----------
def test_real_search_heldout_matches_a_fresh_evaluation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pxopt.data import restricted_correct
    from pxopt.models.builtin.archs import FmnistResNet
    from pxopt.search.heldout import study_pipeline

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    ckpt = tmp_path / "net.pth"
    torch.save(FmnistResNet().state_dict(), ckpt)
    out = _run(["search", "--storage", str(tmp_path / "s.db"), "--study", "h", "--model",
                f"file:{ckpt}@builtin:fmnist-resnet", "--classes", "3", "--n-ref", "2", "--n-val", "4",
                "--n-heldout", "30", "--rates", "0,0.5", "--trials", "2", "--no-report", "--out-dir", "out"])
    assert "held-out: 30 images the search never saw (10 per class)" in out
    study = optuna.load_study(study_name="h", storage=f"sqlite:///{tmp_path / 's.db'}")
    stored = heldout_summary(study, study.best_trial)["rows"]
    # a fresh load of the study's model and task draws the same held-out images ...
    pipe = study_pipeline(study)
    assert pipe.task.describe()["heldout_hash"] == study.user_attrs[ATTR_SPLIT]["hash"]
    with torch.inference_mode():  # ... and the unpruned point is the model's accuracy on them
        x, y = pipe.task.heldout.images, pipe.task.heldout.labels
        acc = int(restricted_correct(pipe.model(x), y, pipe.task.classes)) / len(y)
    assert stored["optimised"]["heldout_curve"]["accuracies"][0] == pytest.approx(acc)
    # recomputed from scratch (results dropped), the same curves
    with sqlite3.connect(tmp_path / "s.db") as con:
        con.execute("DELETE FROM study_user_attributes WHERE key = ?", (ATTR_RESULTS,))
    _run(["export", "--storage", str(tmp_path / "s.db"), "--study", "h", "--out", "b.json"])
    fresh = json.loads((tmp_path / "b.json").read_text())["heldout"]
    assert fresh["note"] is None
    for name, row in stored.items():
        assert fresh["rows"][name]["heldout_curve"] == row["heldout_curve"]
