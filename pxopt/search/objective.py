"""The Optuna objective: rule configuration in, area of the pruning curve out.

It knows nothing of LRP: it gets `evaluate(rules, ranking, on_rate) -> Curve` (from
`pxopt.pipeline.Pipeline`), reports the curve rate by rate so the pruner can stop a
hopeless trial early, and records everything needed to trust and reproduce the trial.

The value is `pxopt.evaluate.AREA_DEFINITION` (the mean accuracy over the rate span). A
study records which objective made its values (`OBJECTIVE_ATTR`) and `check_objective`
refuses to add trials to a study whose values mean something else: the studies of older
pxopt versions stored the plain trapezoid area, which is smaller by the rate span.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import optuna

from pxopt.errors import NonFiniteRelevanceError, PxoptError, StorageError
from pxopt.evaluate import AREA, AREA_DEFINITION, partial_area
from pxopt.search.meta import library_versions
from pxopt.search.space import SearchSpace
from pxopt.vocab import OnRate


class CurveLike(Protocol):
    """What the objective reads from `pxopt.evaluate.Curve`."""

    rates: list[float]
    accuracies: list[float]
    area: float
    top_pr: float


Evaluate = Callable[[dict, str, OnRate | None], CurveLike]

#: Study user attribute naming the objective whose values the study holds.
OBJECTIVE_ATTR = "pxopt.objective"
#: Stable id of the current objective (the definition's wording may change, the id not).
OBJECTIVE_ID = "area/mean-accuracy-over-rate-span"


def objective_record() -> dict[str, str]:
    """The study attribute that names the objective."""
    return {"id": OBJECTIVE_ID, "name": AREA, "definition": AREA_DEFINITION}


def study_objective(study: optuna.Study) -> str | None:
    """The id of the objective a study's values were made with (None: an older study)."""
    stored = study.user_attrs.get(OBJECTIVE_ATTR)
    return stored.get("id") if isinstance(stored, dict) else None


def _has_values(study: optuna.Study) -> bool:
    return any(t.values is not None or t.intermediate_values for t in study.get_trials(deepcopy=False))


def check_objective(study: optuna.Study) -> None:
    """Pin a study to the current objective and name its metric, or refuse it.

    A study whose trials were scored by another objective (an older pxopt's trapezoid
    area) would mix two scales in one sampler, one pruner and one "best": `StorageError`.
    `pxopt report` and `pxopt export` still read such a study (they recompute the area
    from each trial's stored curve).
    """
    wanted = objective_record()
    stored = study.user_attrs.get(OBJECTIVE_ATTR)
    if stored is None:
        if _has_values(study):
            raise StorageError(
                f"study {study.study_name!r} was made by an older pxopt: its values are the plain "
                "trapezoid area, not the mean accuracy over the rate span, and one study cannot mix "
                "the two: use another --study name (pxopt report and pxopt export still read it)"
            )
        study.set_user_attr(OBJECTIVE_ATTR, wanted)
    elif not isinstance(stored, dict) or stored.get("id") != OBJECTIVE_ID:
        what = stored.get("definition", stored) if isinstance(stored, dict) else stored
        raise StorageError(
            f"study {study.study_name!r} was made with another objective ({what}), not the "
            f"{AREA_DEFINITION}: use another --study name"
        )
    if study.metric_names != [AREA]:
        with warnings.catch_warnings():  # set_metric_names is "experimental" (stable since 3.4)
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([AREA])


def curve_record(curve: CurveLike) -> dict[str, Any]:
    """The JSON stored as the trial's `curve` user attribute."""
    return {
        "rates": [float(r) for r in curve.rates],
        "accuracies": [float(a) for a in curve.accuracies],
        "area": float(curve.area),
        "top_pr": float(curve.top_pr),
        "pruned_per_layer": {
            k: [int(n) for n in v] for k, v in (getattr(curve, "pruned_per_layer", None) or {}).items()
        },
        "stopped_early_at": getattr(curve, "stopped_early_at", None),
    }


class Objective:
    """Callable for `study.optimize`; one instance per search run."""

    def __init__(
        self,
        space: SearchSpace,
        evaluate: Evaluate,
        rates: list[float],
        *,
        timings: Callable[[], Mapping[str, Any]] | None = None,
        seeds: Mapping[str, int] | None = None,
    ) -> None:
        self.space = space
        self.evaluate = evaluate
        self.rates = [float(r) for r in rates]
        self.timings = timings
        self.seeds = dict(seeds or {})
        self.versions = library_versions()

    def __call__(self, trial: optuna.Trial) -> float:
        rules, ranking = self.space.suggest(trial)
        trial.set_user_attr("rules", rules)
        trial.set_user_attr("ranking", ranking)
        trial.set_user_attr("seeds", self.seeds)
        trial.set_user_attr("versions", self.versions)
        seen: list[float] = []

        def on_rate(i: int, rate: float, accuracy: float) -> None:
            if not math.isfinite(accuracy):
                raise NonFiniteRelevanceError(f"accuracy at rate {rate} is {accuracy}")
            seen.append(float(accuracy))
            # the area so far on the final scale (rates not reached count as 0): comparable
            # between trials at each step, and equal to the value at the last step
            trial.report(partial_area(self.rates, seen), step=i)
            if trial.should_prune():
                trial.set_user_attr("partial_curve", {"rates": self.rates[: len(seen)], "accuracies": seen})
                raise optuna.TrialPruned(f"pruned at rate {rate} (step {i})")

        start = time.perf_counter()
        try:
            curve = self.evaluate(rules, ranking, on_rate)
        except optuna.TrialPruned:
            self._record_timings(trial, start)
            raise
        except PxoptError as exc:
            trial.set_user_attr("fail_reason", f"{type(exc).__name__}: {exc}")
            self._record_timings(trial, start)
            raise
        self._record_timings(trial, start)
        record = curve_record(curve)
        # The value is the area of the complete curve only: a partial curve is an error.
        if [round(r, 9) for r in record["rates"]] != [round(r, 9) for r in self.rates]:
            reason = f"curve covers rates {record['rates']}, expected {self.rates}"
            trial.set_user_attr("fail_reason", reason)
            raise PxoptError(reason)
        if not all(math.isfinite(v) for v in (*record["accuracies"], record["area"])):
            reason = f"non-finite curve or area ({record['area']})"
            trial.set_user_attr("fail_reason", f"NonFiniteRelevanceError: {reason}")
            raise NonFiniteRelevanceError(reason)
        trial.set_user_attr("curve", record)
        trial.set_user_attr("area", record["area"])
        trial.set_user_attr("top_pr", record["top_pr"])
        return record["area"]

    def _record_timings(self, trial: optuna.Trial, start: float) -> None:
        timings = {"total_s": time.perf_counter() - start}
        if self.timings is not None:
            timings.update({k: v for k, v in self.timings().items()})
        trial.set_user_attr("timings", timings)
