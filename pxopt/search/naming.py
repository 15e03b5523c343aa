"""Naming the best trial: the search's best few, re-scored on other reference sets.

A trial's area depends on the reference images its relevances came from: another draw
moves it by about as much as the best rule sets differ (benchmarks/results/objective_noise_*),
and the search's best is the maximum over many such areas, so it is the trial most likely to
have been lucky on the search's reference set. Before one is named best, the `top` best
complete trials and the all-epsilon baseline trial are therefore re-scored on `sets` other
reference sets of the same task (`Pipeline.with_reference_seed`: same classes and
validation images; the held-out images stay unseen), and the highest mean of those areas is
named. The search-split area does not enter the mean: it is the biased one.

The record (`ATTR_NAMING`) and each candidate's areas (`ATTR_RESCORED`, by trial, reference
set and weights) live in the study, so `pxopt search`, `export` and `report` name the same
trial and a resumed search re-scores only trials not scored yet. A record is current while
the study's `top` best trials are those it re-scored; otherwise the study's best stands until
the next naming (`named_trial`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import optuna
from optuna.trial import TrialState

from pxopt.errors import PxoptError
from pxopt.search.storage import ATTR_WEIGHTS, digest

ATTR_NAMING = "pxopt.naming"
ATTR_RESCORED = "pxopt.rescored"
BASELINE = "all-epsilon"  # re-scored beside the best: TPE's best few are often one rule set
REFERENCE_SEED0 = 101  # reference set i is drawn with task_seed + REFERENCE_SEED0 + i


def reference_seeds(task_seed: int, sets: int) -> list[int]:
    """Seeds of the other reference sets (never the search's own, `task_seed`)."""
    return [int(task_seed) + REFERENCE_SEED0 + i for i in range(sets)]


def candidates(study: optuna.Study, top: int) -> list[optuna.trial.FrozenTrial]:
    """The `top` complete trials with the highest area (ties: the earlier), then the
    all-epsilon baseline trial if it is not among them."""
    done = sorted((t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                   if t.value is not None and math.isfinite(t.value)),
                  key=lambda t: (-t.value, t.number))  # fmt: skip
    picked = done[:top]
    picked += [t for t in done[top:] if t.user_attrs.get("baseline") == BASELINE]
    return picked


def _identity(study: optuna.Study, seeds: list[int]) -> str:
    """What a re-scored area depends on besides the trial: weights, task, reference seeds."""
    return digest({"weights": study.user_attrs.get(ATTR_WEIGHTS),
                   "task": study.user_attrs.get("pxopt.task_description"), "seeds": seeds})


def naming_settings(study: optuna.Study) -> tuple[int, int]:
    """(top, sets) of the study's spec; studies made before naming existed: (0, 0), the
    search's best, so their exports do not change."""
    from pxopt.search.study import SPEC_ATTR

    spec = study.user_attrs.get(SPEC_ATTR) or {}
    return int(spec.get("rescore_top", 0) or 0), int(spec.get("rescore_sets", 0) or 0)


def stored_naming(study: optuna.Study) -> dict[str, Any] | None:
    """The study's naming record while it is current (its candidates are still the best)."""
    rec = study.user_attrs.get(ATTR_NAMING)
    if not isinstance(rec, dict):
        return None
    now = [t.number for t in _picked(study, int(rec["top"]), rec["seeds"])]
    if now != [c["trial"] for c in rec["candidates"]] or rec.get("identity") != _identity(study, rec["seeds"]):
        return None
    return rec


def _picked(study: optuna.Study, top: int, seeds: list[int]) -> list[optuna.trial.FrozenTrial]:
    """The candidates of a naming; without re-scoring, the study's best alone."""
    return candidates(study, top) if top > 0 and seeds else [study.best_trial]


def named_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    """The trial named best: the current naming's, else the study's best (ValueError: none)."""
    rec = stored_naming(study)
    return _trial(study, int(rec["named"])) if rec is not None else study.best_trial


def _trial(study: optuna.Study, number: int) -> optuna.trial.FrozenTrial:
    return next(t for t in study.get_trials(deepcopy=False) if t.number == number)


def name_best(
    study: optuna.Study,
    *,
    top: int,
    sets: int,
    pipeline: Any = None,
    load: Callable[[], Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Re-score the best `top` trials and all-epsilon on `sets` other reference sets; name the
    highest mean, store and return the record.

    Areas already stored are reused; missing ones are computed with `pipeline` (else `load()`).
    `top` 0 or a single candidate: the study's best is named without re-scoring. A candidate
    whose rules fail on another reference set (NaN relevances) is recorded with the reason and
    never named. `progress(done, total)` counts re-scored curves.
    """
    best = study.best_trial  # (ValueError: no complete trial)
    from pxopt.search.study import SPEC_ATTR

    task_seed = int((study.user_attrs.get(SPEC_ATTR) or {}).get("task_seed", 0))
    seeds = reference_seeds(task_seed, sets) if top > 0 else []
    picked = _picked(study, top, seeds)
    ident = _identity(study, seeds)
    stored = dict(study.user_attrs.get(ATTR_RESCORED) or {})
    missing = [(t, s) for t in picked for s in seeds if f"{t.number}/{s}@{ident}" not in stored]
    if len(picked) > 1 and missing:
        if pipeline is None and load is not None:
            pipeline = load()
        if pipeline is None:
            raise PxoptError("naming the best trial needs the study's model and task")
        pipes: dict[int, Any] = {}
        for done, (trial, seed) in enumerate(missing):
            if seed not in pipes:
                pipes[seed] = pipeline.with_reference_seed(seed)
            pipe = pipes[seed]
            try:
                scores = pipe.scores(trial.user_attrs["rules"])
                area: float | str = float(pipe.curve(scores, trial.user_attrs["ranking"]).area)
            except (PxoptError, MemoryError) as exc:
                area = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            stored[f"{trial.number}/{seed}@{ident}"] = area
            if progress is not None:
                progress(done + 1, len(missing))
        study.set_user_attr(ATTR_RESCORED, stored)
    rows = []
    for t in picked:
        areas = [stored.get(f"{t.number}/{s}@{ident}") for s in seeds] if len(picked) > 1 else []
        failed = next((a for a in areas if isinstance(a, str)), None)
        mean = (sum(areas) / len(areas)) if areas and failed is None else None
        rows.append({"trial": t.number, "baseline": t.user_attrs.get("baseline"), "search_area": float(t.value),
                     "areas": areas, "mean": mean, "failed": failed})
    scored = [r for r in rows if r["mean"] is not None]
    named = max(scored, key=lambda r: (r["mean"], r["search_area"], -r["trial"])) if scored else rows[0]
    record = {"top": top, "sets": sets, "seeds": seeds, "identity": ident, "candidates": rows,
              "named": named["trial"], "search_best": best.number, "rescored": bool(scored)}
    study.set_user_attr(ATTR_NAMING, record)
    return record


def name_study_best(study: optuna.Study, *, load: Callable[[], Any] | None = None,
                    pipeline: Any = None) -> optuna.trial.FrozenTrial:
    """The named best trial of a study as its spec asks (`rescore_top`, `rescore_sets`):
    the stored naming if current, else a new one (loading the model only for trials not
    re-scored yet); errors of the model or data leave the study's best, as `named_trial` does."""
    rec = stored_naming(study)
    top, sets = naming_settings(study)
    if rec is None and top > 0 and sets > 0:
        try:
            rec = name_best(study, top=top, sets=sets, pipeline=pipeline, load=load)
        except (PxoptError, MemoryError):
            rec = None
    return _trial(study, int(rec["named"])) if rec is not None else study.best_trial


def naming_lines(record: dict[str, Any]) -> list[str]:
    """What `pxopt search` prints about the naming (nothing when nothing was re-scored)."""
    if not record.get("rescored"):
        return []
    others = ", ".join(str(s) for s in record["seeds"])
    lines = [f"named:  trial {record['named']} after re-scoring the {record['top']} best trials and "
             f"{BASELINE} on {len(record['seeds'])} other reference sets (seeds {others})",
             f"  {'trial':>7s} {'search split':>12s} {'re-scored':>9s}"]
    for r in record["candidates"]:
        mark = ("  <- named" if r["trial"] == record["named"] else "") + (
            "  (search's best)" if r["trial"] == record["search_best"] else "")
        again = f"{r['mean']:9.4f}" if r["mean"] is not None else f"{'failed':>9s}"
        base = f" {r['baseline']}" if r["baseline"] else ""
        lines.append(f"  {r['trial']:7d} {r['search_area']:12.4f} {again}{base}{mark}")
    return lines
