"""The Optuna objective: rule configuration in, area under the pruning curve out.

It knows nothing of LRP: it gets `evaluate(rules, ranking, on_rate) -> Curve` (from
`pxopt.pipeline.Pipeline`), reports the curve rate by rate so the pruner can stop a
hopeless trial early, and records everything needed to trust and reproduce the trial.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import optuna

from pxopt.errors import NonFiniteRelevanceError, PxoptError
from pxopt.search.meta import library_versions
from pxopt.search.space import SearchSpace
from pxopt.vocab import OnRate


class CurveLike(Protocol):
    """What the objective reads from `pxopt.evaluate.Curve`."""

    rates: list[float]
    accuracies: list[float]
    area: float
    area_normalised: float
    top_pr: float


Evaluate = Callable[[dict, str, OnRate | None], CurveLike]


def partial_area(rates: list[float], accuracies: list[float]) -> float:
    """Trapezoid area of the curve so far (the value reported to the pruner at each step)."""
    return float(
        sum(
            (rates[i + 1] - rates[i]) * (accuracies[i + 1] + accuracies[i]) / 2.0
            for i in range(len(accuracies) - 1)
        )
    )


def curve_record(curve: CurveLike) -> dict[str, Any]:
    """The JSON stored as the trial's `curve` user attribute."""
    return {
        "rates": [float(r) for r in curve.rates],
        "accuracies": [float(a) for a in curve.accuracies],
        "area": float(curve.area),
        "area_normalised": float(getattr(curve, "area_normalised", math.nan)),
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
            trial.report(partial_area(self.rates[: len(seen)], seen), step=i)
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
