"""Naming the best trial: the search's best few, re-scored on other images.

A trial's area depends on the reference images its relevances came from and on the
validation images its curve is measured on: another draw of either moves it by about as much
as the best rule sets differ (benchmarks/results/objective_noise_*, rules_vs_ranking.md), and
the search's best is the maximum over many such areas, so it is the trial most likely to have
been lucky on the search's images. Before one is named best, the `top` best complete trials
(one of each rule set: TPE often proposes the same one again) and the all-epsilon baseline
trial are therefore re-scored on `sets` other draws of the same task
(`Pipeline.with_other_images`: same classes, a reference set and, where the dataset has
enough images left, a validation set of the same sizes, none of them the task's images; the
held-out images stay unseen), and the highest mean of those areas is named. The search-split
area does not enter the mean: it is the biased one.

The record (`ATTR_NAMING`) and each candidate's areas (`ATTR_RESCORED`, by trial, reference
set and weights) live in the study, so `pxopt search`, `export` and `report` name the same
trial and a resumed search re-scores only trials not scored yet. A record is current while
the study's `top` best trials are those it re-scored; otherwise the study's best stands until
the next naming (`named_trial`), which `export` and `report` make with the record's settings.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import optuna
from optuna.trial import TrialState

from pxopt.errors import NonFiniteRelevanceError, PxoptError
from pxopt.search.storage import ATTR_WEIGHTS, digest

ATTR_NAMING = "pxopt.naming"
ATTR_RESCORED = "pxopt.rescored"
ATTR_REDRAWN = "pxopt.rescored_validation"  # per other draw: were its validation images new?
DRAW = "reference+validation"  # what an other draw redraws (part of a stored area's identity)
BASELINE = "all-epsilon"  # re-scored beside the best: the question is whether they beat the default
REFERENCE_SEED0 = 101  # reference set i is drawn with task_seed + REFERENCE_SEED0 + i


def reference_seeds(task_seed: int, sets: int) -> list[int]:
    """Seeds of the other draws of reference and validation images (never the search's own, `task_seed`)."""
    return [int(task_seed) + REFERENCE_SEED0 + i for i in range(sets)]


def _ranked(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Complete trials, highest area first (ties: the earlier trial)."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.value is not None and math.isfinite(t.value)]
    return sorted(done, key=lambda t: (-t.value, t.number))


def search_best(study: optuna.Study) -> optuna.trial.FrozenTrial:
    """The search split's best (ties: the earlier trial, unlike Optuna's storage-dependent
    `best_trial`), so every table marks the same one. ValueError: no complete trial."""
    ranked = _ranked(study)
    if not ranked:
        raise ValueError("no complete trial")
    return ranked[0]


def _config_key(trial: optuna.trial.FrozenTrial) -> str:
    return json.dumps([trial.user_attrs.get("rules"), trial.user_attrs.get("ranking")], sort_keys=True)


def candidates(study: optuna.Study, top: int) -> list[optuna.trial.FrozenTrial]:
    """The `top` best complete trials, one per rule configuration (ties: the earlier), then
    the all-epsilon baseline trial if its configuration is not among them."""
    picked: list[optuna.trial.FrozenTrial] = []
    seen: set[str] = set()
    ranked = _ranked(study)
    for t in ranked:
        if len(picked) < top and _config_key(t) not in seen:
            picked.append(t)
            seen.add(_config_key(t))
    picked += [t for t in ranked if t.user_attrs.get("baseline") == BASELINE and _config_key(t) not in seen][:1]
    return picked


def _identity(study: optuna.Study) -> str:
    """What a re-scored area depends on besides the trial and the reference seed."""
    return digest({"weights": study.user_attrs.get(ATTR_WEIGHTS),
                   "task": study.user_attrs.get("pxopt.task_description"), "draw": DRAW})


def naming_settings(study: optuna.Study) -> tuple[int, int]:
    """(top, sets) of the study's last naming, else of its spec; a study made before naming
    existed: (0, 0), the search's best, so its exports do not change."""
    from pxopt.search.study import SPEC_ATTR

    rec = study.user_attrs.get(ATTR_NAMING)
    if isinstance(rec, dict):
        return int(rec["top"]), int(rec["sets"])
    spec = study.user_attrs.get(SPEC_ATTR) or {}
    return int(spec.get("rescore_top", 0) or 0), int(spec.get("rescore_sets", 0) or 0)


def _picked(study: optuna.Study, top: int, seeds: list[int]) -> list[optuna.trial.FrozenTrial]:
    """The candidates of a naming; without re-scoring, the search's best alone."""
    return candidates(study, top) if top > 0 and seeds else [search_best(study)]


def stored_naming(study: optuna.Study) -> dict[str, Any] | None:
    """The study's naming record while it is current (its candidates are still the best)."""
    rec = study.user_attrs.get(ATTR_NAMING)
    if not isinstance(rec, dict) or rec.get("identity") != _identity(study):
        return None
    try:
        now = [t.number for t in _picked(study, int(rec["top"]), rec["seeds"])]
    except ValueError:  # no complete trial
        return None
    return rec if now == [c["trial"] for c in rec["candidates"]] else None


def _trial(study: optuna.Study, number: int) -> optuna.trial.FrozenTrial:
    return next(t for t in study.get_trials(deepcopy=False) if t.number == number)


def named_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    """The trial named best: the current naming's, else the study's best (ValueError: none)."""
    rec = stored_naming(study)
    return _trial(study, int(rec["named"])) if rec is not None else study.best_trial


def name_best(
    study: optuna.Study,
    *,
    top: int,
    sets: int,
    pipeline: Any = None,
    load: Callable[[], Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Re-score the best `top` trials and all-epsilon on `sets` other draws of the task's images; name the
    highest mean, store and return the record.

    Areas already stored are reused; missing ones are computed with `pipeline` (else `load()`).
    `top` or `sets` 0, or a single candidate: the search's best is named without re-scoring. A
    candidate whose rules give NaN relevances on another draw is recorded with the
    reason and never named. Any other error (out of memory, too few images for another
    reference set) propagates and names nothing; the areas computed before it stay stored,
    so the next call goes on from there.
    `progress(done, total)` counts re-scored curves.
    """
    from pxopt.search.study import SPEC_ATTR

    best = search_best(study)  # (ValueError: no complete trial)
    task_seed = int((study.user_attrs.get(SPEC_ATTR) or {}).get("task_seed", 0))
    seeds = reference_seeds(task_seed, sets) if top > 0 else []
    picked = _picked(study, top, seeds)
    ident = _identity(study)
    stored = dict(study.user_attrs.get(ATTR_RESCORED) or {})
    redrawn = dict(study.user_attrs.get(ATTR_REDRAWN) or {})
    missing = [(s, t) for s in seeds for t in picked if f"{t.number}/{s}@{ident}" not in stored]
    if len(picked) > 1 and missing:
        if pipeline is None and load is not None:
            pipeline = load()
        if pipeline is None:
            raise PxoptError("naming the best trial needs the study's model and task")
        pipe, pipe_seed = None, None
        try:
            for done, (seed, trial) in enumerate(missing):  # seed by seed: one other draw at a time
                if seed != pipe_seed:
                    pipe, pipe_seed = pipeline.with_other_images(seed), seed
                    redrawn[f"{seed}@{ident}"] = bool(pipe.task.info.get("validation_redrawn"))
                try:
                    scores = pipe.scores(trial.user_attrs["rules"])
                    area: float | str = float(pipe.curve(scores, trial.user_attrs["ranking"]).area)
                except NonFiniteRelevanceError as exc:
                    area = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                stored[f"{trial.number}/{seed}@{ident}"] = area
                if progress is not None:
                    progress(done + 1, len(missing))
        finally:  # (an error or Ctrl-C midway keeps the areas computed so far)
            study.set_user_attr(ATTR_RESCORED, stored)
            study.set_user_attr(ATTR_REDRAWN, redrawn)
    rows = []
    for t in picked:
        areas = [stored.get(f"{t.number}/{s}@{ident}") for s in seeds] if len(picked) > 1 else []
        failed = next((a for a in areas if isinstance(a, str)), None)
        mean = (sum(areas) / len(areas)) if areas and failed is None else None
        rows.append({"trial": t.number, "baseline": t.user_attrs.get("baseline"), "search_area": float(t.value),
                     "areas": areas, "mean": mean, "failed": failed})
    scored = [r for r in rows if r["mean"] is not None]
    named = max(scored, key=lambda r: (r["mean"], r["search_area"], -r["trial"]))["trial"] if scored else best.number
    record = {"top": top, "sets": sets, "seeds": seeds, "identity": ident, "candidates": rows,
              "named": named, "search_best": best.number, "rescored": bool(scored),
              "other_validation": [redrawn.get(f"{s}@{ident}") for s in seeds] if len(picked) > 1 else []}
    study.set_user_attr(ATTR_NAMING, record)
    return record


def naming_error(exc: BaseException) -> str | None:
    """The one-line reason a naming failed for want of resources or data, or None: a bug."""
    from pxopt.search.guard import CAUGHT, is_oom

    if isinstance(exc, CAUGHT) or is_oom(exc):
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return None


def name_study_best(study: optuna.Study, *, load: Callable[[], Any] | None = None, pipeline: Any = None,
                    log: Callable[[str], None] | None = None) -> optuna.trial.FrozenTrial:
    """The named best trial of a study: the stored naming if current, else a new one with the
    settings of its last naming (or its spec's `rescore_top`, `rescore_sets`), loading the
    model only for trials not re-scored yet. If that fails (memory, data), the study's best,
    and `log` says why. ValueError: no complete trial."""
    rec = stored_naming(study)
    top, sets = naming_settings(study)
    if rec is None and top > 0 and sets > 0:
        if log is not None:
            log(f"naming the best trial: re-scoring the {top} best trials and {BASELINE} on {sets} other "
                "reference sets (trials the study has not re-scored yet)")
        try:
            rec = name_best(study, top=top, sets=sets, pipeline=pipeline, load=load)
        except Exception as exc:
            reason = naming_error(exc)
            if reason is None:
                raise
            if log is not None:
                log(f"re-scoring failed ({reason}): the search's best stands")
    return named_trial(study) if rec is None else _trial(study, int(rec["named"]))


def naming_lines(record: dict[str, Any]) -> list[str]:
    """What `pxopt search` prints about the naming (nothing when nothing was to re-score)."""
    rows = record["candidates"]
    if len(rows) < 2:
        return []
    if not record.get("rescored"):
        return [f"named:  trial {record['named']}, the search's best: re-scoring failed for every candidate "
                f"({rows[0]['failed']})"]
    joined = len(rows) > int(record["top"])  # all-epsilon, re-scored beside the best few
    n_best = len(rows) - int(joined)
    others = ", ".join(str(s) for s in record["seeds"])
    with_eps = f" and {BASELINE}" if joined else ""
    redrawn = record.get("other_validation") or []
    images = ("reference and validation sets" if redrawn and all(redrawn) else
              "reference sets (the search's validation images: too few others)" if redrawn and not any(redrawn)
              else "reference sets")
    lines = [f"named:  trial {record['named']} after re-scoring the {n_best} best trials{with_eps} on "
             f"{len(record['seeds'])} other {images} (seeds {others})",
             f"  {'trial':>7s} {'search split':>12s} {'re-scored':>9s}"]
    for r in rows:
        mark = ("  <- named" if r["trial"] == record["named"] else "") + (
            "  (search's best)" if r["trial"] == record["search_best"] else "")
        again = f"{r['mean']:9.4f}" if r["mean"] is not None else f"{'failed':>9s}"
        base = f" {r['baseline']}" if r["baseline"] else ""
        failed = f"  ({r['failed']})" if r["failed"] else ""
        lines.append(f"  {r['trial']:7d} {r['search_area']:12.4f} {again}{base}{mark}{failed}")
    return lines
