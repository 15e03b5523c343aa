"""Held-out evaluation of a study: does the search's best generalise?

The best trial (or a chosen one) and the all-epsilon baseline are evaluated on the task's
held-out images (`pxopt.data.heldout`, which no objective sees) and set beside their
search-split areas. The split is recorded in the study when its first search runs
(`ATTR_SPLIT`: size, indices hash, dataset, seed), so a resumed search, `pxopt export` and
`pxopt report` use the same images; the held-out curves are stored in the study
(`ATTR_RESULTS`, keyed by trial number and the split's identity), so export and report
reuse them and only a trial not yet evaluated (a new best) costs a model load.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import optuna

from pxopt.errors import PxoptError
from pxopt.evaluate import curve_area
from pxopt.search.storage import ATTR_WEIGHTS, digest, sqlite_path

ATTR_SPLIT = "pxopt.heldout"
ATTR_RESULTS = "pxopt.heldout_results"
BASELINE = "all-epsilon"  # the configuration every search is compared with
OPTIMISED = "optimised"
NO_SPLIT = "no held-out split"


# -- the split ------------------------------------------------------------------------------
def split_record(task: Any) -> dict[str, Any]:
    """What identifies a task's held-out images (`n_images` 0: it has none)."""
    info = getattr(task, "info", {}) or {}
    if getattr(task, "heldout", None) is None:
        return {"n_heldout": int(info.get("n_heldout", 0)), "n_images": 0, "n_val": getattr(task, "n_val", 0)}
    return {
        "n_heldout": int(info["n_heldout"]),
        "per_class": int(info["heldout_per_class"]),
        "n_images": int(info["n_heldout_images"]),
        "hash": info["heldout_hash"],
        "dataset": task.dataset,
        "content_hash": info.get("content_hash"),
        "classes": list(task.classes),
        "seed": task.seed,
        "n_val": task.n_val,
    }


def recorded_split(study: optuna.Study) -> dict[str, Any] | None:
    """The split the study's searches used (None: a study made before pxopt kept one)."""
    rec = study.user_attrs.get(ATTR_SPLIT)
    return rec if isinstance(rec, dict) else None


def record_split(study: optuna.Study, task: Any) -> None:
    """Pin the task's split to the study on its first search (a resume keeps the first)."""
    if recorded_split(study) is None:
        study.set_user_attr(ATTR_SPLIT, split_record(task))


def no_split_note(record: dict[str, Any] | None) -> str:
    """Why a study has no held-out numbers."""
    if record is None:
        return f"{NO_SPLIT} (the study was made before pxopt kept one)"
    if int(record.get("n_heldout", 0)) == 0:
        return f"{NO_SPLIT} (n_heldout = 0)"
    if record.get("n_val", 0) is None:
        return f"{NO_SPLIT} (n_val = all: the search uses every validation image; set n_val to keep some out)"
    return f"{NO_SPLIT} (the dataset had no validation images left for one)"


def recorded_size(storage_url: str, study_name: str) -> int | None:
    """The held-out size recorded in an existing study (None: no such study, or no record).

    Read before the model loads, so a resumed search draws the split its study was made with;
    a SQLite file that does not exist is not created.
    """
    path = sqlite_path(storage_url)
    if path is not None and not path.is_file():
        return None
    from pxopt.search.storage import open_storage

    storage = open_storage(storage_url)
    try:
        attrs = storage.get_study_user_attrs(storage.get_study_id_from_name(study_name))
    except KeyError:
        return None
    rec = attrs.get(ATTR_SPLIT)
    return int(rec["n_heldout"]) if isinstance(rec, dict) and "n_heldout" in rec else None


def resume_spec(spec: Any, storage_url: str) -> tuple[Any, str | None]:
    """The spec with the held-out size of the study it resumes, and a note when that differs."""
    size = recorded_size(storage_url, spec.name)
    if size is None or size == spec.n_heldout:
        return spec, None
    note = (f"study {spec.name!r} keeps the held-out split it was made with ({size} images requested; "
            f"n_heldout {spec.n_heldout} applies to a new study)")
    return spec.with_overrides(n_heldout=size), note


def identity(record: dict[str, Any], weights: Any) -> str:
    """Key of the split's results: its images and the model's weights."""
    return digest({"split": record, "weights": weights})


# -- evaluation -----------------------------------------------------------------------------
def _curve(rec: Any) -> dict[str, Any]:
    """Rates, accuracies, area (recomputed: `pxopt.evaluate.AREA_DEFINITION`), Top-PR."""
    rates = [float(r) for r in rec["rates"]]
    accuracies = [float(a) for a in rec["accuracies"]]
    return {"rates": rates, "accuracies": accuracies, "area": curve_area(rates, accuracies),
            "top_pr": float(rec["top_pr"])}


def study_pipeline(study: optuna.Study, device: str | None = None, *, allow_download: bool = False) -> Any:
    """The study's model and task, with its recorded held-out split, from its stored spec."""
    from pxopt.errors import ConfigError
    from pxopt.pipeline import Pipeline
    from pxopt.search.spec import StudySpec
    from pxopt.search.study import SPEC_ATTR

    stored = study.user_attrs.get(SPEC_ATTR)
    if not isinstance(stored, dict):
        raise ConfigError("the study stores no pxopt spec (it was not made by pxopt search)")
    names = {f.name for f in dataclasses.fields(StudySpec)}
    values = {k: v for k, v in stored.items() if k in names}
    values["n_heldout"] = int((recorded_split(study) or {}).get("n_heldout", 0))
    return Pipeline.from_spec(StudySpec(**values).validated(), device=device, allow_download=allow_download)


def _baseline_config(study: optuna.Study, pipeline: Any) -> tuple[dict, str]:
    """The all-epsilon rules and ranking of the study's search space (no trial ran them)."""
    from pxopt.search.space import SearchSpace
    from pxopt.search.study import SPEC_ATTR

    space = SearchSpace.build(study.user_attrs.get(SPEC_ATTR, {}).get("space") or {}, family=pipeline.family)
    return space.baselines()[BASELINE]


def heldout_summary(
    study: optuna.Study,
    trial: optuna.trial.FrozenTrial,
    *,
    pipeline: Any = None,
    load: Callable[[], Any] | None = None,
) -> dict[str, Any]:
    """Search-split and held-out curves of `trial` and of the all-epsilon baseline.

    Stored results are reused; missing ones are computed with `pipeline` (else `load()`, else
    they stay missing and the summary says so) and stored in the study. Returns
    `{"n_images", "per_class", "identity", "note", "rows": {name: row}}`, or `{"note": why}`
    when the study has no held-out split.
    """
    from pxopt.search.study import baseline_trials

    rec = recorded_split(study)
    if rec is None and pipeline is not None and getattr(pipeline.task, "heldout", None) is not None:
        rec = split_record(pipeline.task)  # (a study of an older pxopt, given a task with a split)
    if rec is None or not rec.get("n_images"):
        return {"note": no_split_note(rec)}
    weights = study.user_attrs.get(ATTR_WEIGHTS)
    ident = identity(rec, weights)
    base = baseline_trials(study).get(BASELINE)
    wanted = {OPTIMISED: trial, BASELINE: base}
    keys = {name: f"{t.number if t is not None else BASELINE}@{ident}" for name, t in wanted.items()}
    stored = dict(study.user_attrs.get(ATTR_RESULTS) or {})
    note = None
    if any(k not in stored for k in keys.values()):
        if pipeline is None and load is not None:
            pipeline = load()
        if pipeline is None:
            return {"note": "not evaluated yet (pxopt export or pxopt report evaluates it)",
                    "n_images": rec["n_images"]}
        now = split_record(pipeline.task)
        if identity(now, weights) != ident:
            note = ("the held-out images drawn now differ from those the study recorded (the dataset "
                    "changed?): evaluated on the images drawn now")
            rec, ident = now, identity(now, weights)
            keys = {name: f"{t.number if t is not None else BASELINE}@{ident}" for name, t in wanted.items()}
        for name, t in wanted.items():
            if keys[name] in stored:
                continue
            rules, ranking = ((t.user_attrs["rules"], t.user_attrs["ranking"]) if t is not None
                              else _baseline_config(study, pipeline))
            scores = pipeline.scores(rules)
            entry = {"heldout": _curve(_as_dict(pipeline.curve(scores, ranking, heldout=True)))}
            if t is None:  # no baseline trial: its search-split curve too
                entry["search"] = _curve(_as_dict(pipeline.curve(scores, ranking)))
            stored[keys[name]] = entry
        study.set_user_attr(ATTR_RESULTS, stored)
    rows = {}
    from pxopt.search.naming import named_trial

    best_number = named_trial(study).number
    for name, t in wanted.items():
        entry = stored[keys[name]]
        search = _curve(t.user_attrs["curve"]) if t is not None else entry["search"]
        where = f"trial {t.number}" if t is not None else "not a trial"
        label = name if name != OPTIMISED else ("best" if t.number == best_number else "chosen")
        rows[name] = {
            "label": f"{label} ({where})",
            "trial": None if t is None else t.number,
            "baseline": None if t is None else t.user_attrs.get("baseline"),
            "search_area": search["area"],
            "search_curve": {"rates": search["rates"], "accuracies": search["accuracies"]},
            "heldout_area": entry["heldout"]["area"],
            "heldout_top_pr": entry["heldout"]["top_pr"],
            "heldout_curve": {"rates": entry["heldout"]["rates"], "accuracies": entry["heldout"]["accuracies"]},
        }
    return {"n_images": rec["n_images"], "per_class": rec.get("per_class"), "identity": ident, "note": note,
            "rows": rows}


def _as_dict(curve: Any) -> dict[str, Any]:
    return curve if isinstance(curve, dict) else {"rates": curve.rates, "accuracies": curve.accuracies,
                                                  "top_pr": curve.top_pr}


def try_heldout_summary(
    study: optuna.Study,
    trial: optuna.trial.FrozenTrial,
    *,
    pipeline: Any = None,
    load: Callable[[], Any] | None = None,
) -> dict[str, Any]:
    """`heldout_summary`, or `{"note": why not}` when the model, the data or the rules fail."""
    try:
        return heldout_summary(study, trial, pipeline=pipeline, load=load)
    except (PxoptError, MemoryError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return {"note": f"not evaluated: {reason}"}


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The side-by-side table `pxopt search` prints (or the one line saying why there is none)."""
    if "rows" not in summary:
        return [f"held-out: {summary['note']}"]
    lines = [f"held-out: {summary['n_images']} images the search never saw "
             f"({summary['per_class']} per class); area = mean accuracy over the rate span",
             f"  {'':28s} {'search split':>12s} {'held-out':>9s}"]
    for row in summary["rows"].values():
        lines.append(f"  {row['label']:28s} {row['search_area']:12.4f} {row['heldout_area']:9.4f}")
    opt, base = summary["rows"][OPTIMISED], summary["rows"][BASELINE]
    diff = opt["heldout_area"] - base["heldout_area"]
    verdict = ("generalises: better than all-epsilon on the held-out images" if diff > 0 else
               "the same configuration as all-epsilon" if opt["trial"] == base["trial"] else
               "does not generalise: not better than all-epsilon on the held-out images")
    lines.append(f"  {opt['label'].split(' ')[0]} - all-epsilon on held-out: {diff:+.4f} ({verdict})")
    if summary.get("note"):
        lines.append(f"  note: {summary['note']}")
    return lines

