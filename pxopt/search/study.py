"""Creating, resuming and running a study (Optuna does the bookkeeping).

`run_search(spec, evaluator)` is the one verb: it opens the storage, creates or resumes
the study (refusing one made for another model or task), seeds TPE so a resumed study
does not replay its first trials, enqueues the baselines into a new study and optimises.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import TrialState

from pxopt.errors import ConfigError, PxoptError
from pxopt.search.meta import library_versions
from pxopt.search.objective import Evaluate, Objective
from pxopt.search.space import SearchSpace
from pxopt.search.spec import StudySpec
from pxopt.search.storage import pin_study_attrs

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
SPEC_ATTR = "pxopt.spec"


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """Storage for a path or URL (the shared layer: SQLite settings, heartbeats, retries)."""
    from pxopt.search.storage import open_storage as shared_open_storage

    return shared_open_storage(url)


def make_sampler(spec: StudySpec, n_existing: int) -> optuna.samplers.BaseSampler:
    """Seeded sampler; the seed is offset by the trials already there (no replay on resume)."""
    cfg = dict(spec.sampler)
    name = cfg.pop("name", "tpe")
    seed = spec.seed + n_existing
    try:
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        cfg.setdefault("n_startup_trials", 8)
        cfg.setdefault("multivariate", True)
        cfg.setdefault("group", True)  # conditional parameters (rule -> its numbers)
        with warnings.catch_warnings():  # `group` is "experimental" but stable since Optuna 2.8
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, **cfg)
    except TypeError as exc:
        raise ConfigError(f"sampler: {exc}") from exc


def make_pruner(cfg: Mapping[str, Any], n_rates: int) -> optuna.pruners.BasePruner:
    """Optuna pruner from the spec's `[pruner]` table (default: median)."""
    cfg = dict(cfg)
    name = cfg.pop("name", "median")
    try:
        if name == "median":
            return optuna.pruners.MedianPruner(**cfg)
        if name == "percentile":
            cfg.setdefault("percentile", 25.0)
            return optuna.pruners.PercentilePruner(**cfg)
        if name == "halving":
            return optuna.pruners.SuccessiveHalvingPruner(**cfg)
        if name == "hyperband":
            cfg.setdefault("min_resource", 1)
            cfg.setdefault("max_resource", n_rates)
            return optuna.pruners.HyperbandPruner(**cfg)
        if name == "none":
            return optuna.pruners.NopPruner()
    except TypeError as exc:
        raise ConfigError(f"pruner: {exc}") from exc
    raise ConfigError(f"unknown pruner {name!r}")


def open_study(spec: StudySpec, storage: str | optuna.storages.BaseStorage | None = None) -> optuna.Study:
    """Create the spec's study or resume it; refuse a same-named study of another model/task."""
    from pxopt.search.storage import open_study as shared_open_study

    if storage is None:
        storage = spec.storage_url()
    if isinstance(storage, str):
        storage = open_storage(storage)
    task = {k: v for k, v in spec.identity().items() if k != "model"}
    study = shared_open_study(
        storage,
        spec.name,
        model_spec=spec.model,
        task=task,
        pruner=make_pruner(spec.pruner, len(spec.rates)),
    )
    if SPEC_ATTR not in study.user_attrs:
        study.set_user_attr(SPEC_ATTR, spec.to_dict())
        study.set_user_attr("pxopt.versions", library_versions())
    study.sampler = make_sampler(spec, len(study.trials))
    return study


def enqueue_baselines(study: optuna.Study, space: SearchSpace, limit: int | None = None) -> list[str]:
    """Enqueue the baseline configurations into a fresh study (first trials).

    At most `limit` (the trial budget): a baseline beyond it would stay WAITING forever.
    """
    if study.trials:
        return []
    names = []
    for name, (rules, ranking) in list(space.baselines().items())[:limit]:
        study.enqueue_trial(space.to_params(rules, ranking), user_attrs={"baseline": name})
        names.append(name)
    return names


@dataclass
class SearchResult:
    """What a finished (or interrupted) search leaves: the study and where it lives."""

    study: optuna.Study
    storage_url: str
    n_new_trials: int

    @property
    def best_trial(self) -> optuna.trial.FrozenTrial | None:
        try:
            return self.study.best_trial
        except ValueError:
            return None


def baseline_trials(study: optuna.Study) -> dict[str, optuna.trial.FrozenTrial]:
    """Completed baseline trials by baseline name."""
    return {
        t.user_attrs["baseline"]: t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if "baseline" in t.user_attrs
    }


def run_search(
    spec: StudySpec,
    evaluate: Evaluate,
    *,
    space: SearchSpace | None = None,
    family: str = "cnn",
    storage_url: str | None = None,
    timings: Callable[[], Mapping[str, Any]] | None = None,
    callbacks: Iterable[Callable[[optuna.Study, optuna.trial.FrozenTrial], None]] = (),
    study_attrs: Mapping[str, Any] | None = None,
) -> SearchResult:
    """Run (or resume) the study until it holds `spec.trials` finished trials or time is up.

    A trial that raises a `PxoptError` (bad rule parameters, NaN relevances) fails with
    its reason in the user attributes; the study goes on.
    """
    url = storage_url or spec.storage_url()
    study = open_study(spec, url)
    pin_study_attrs(study, study_attrs or {})
    space = space or SearchSpace.build(spec.space, family=family)
    if spec.baselines:
        enqueue_baselines(study, space, limit=spec.trials)
    n_before = len(study.trials)
    finished = len(study.get_trials(deepcopy=False, states=FINISHED))
    remaining = None if spec.trials is None else max(spec.trials - finished, 0)
    sampler_seed = spec.seed + n_before
    objective = Objective(
        space,
        evaluate,
        spec.rates,
        timings=timings,
        seeds={"study": spec.seed, "sampler": sampler_seed, "task": spec.task_seed},
    )
    all_callbacks = list(callbacks)
    if spec.trials is not None:
        all_callbacks.append(optuna.study.MaxTrialsCallback(spec.trials, states=FINISHED))
    if remaining != 0:
        study.optimize(
            objective,
            n_trials=remaining,
            timeout=spec.timeout,
            catch=(PxoptError,),
            callbacks=all_callbacks,
        )
    return SearchResult(study=study, storage_url=url, n_new_trials=len(study.trials) - n_before)
