"""Creating, resuming and running a study (Optuna does the bookkeeping).

`run_search(spec, workers=N)` is the one verb, for the library and `pxopt search` alike:
it loads the model and task once (or takes the caller's `evaluate`), creates or resumes
the study (refusing one made for another model, task or weights), queues the baselines
into a new study and runs N workers on it (`pxopt.search.pool`), which share the trial
budget, seed their samplers apart and survive crashes and Ctrl-C.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import TrialState

from pxopt.errors import ConfigError, StorageError
from pxopt.search.meta import library_versions
from pxopt.search.objective import Evaluate, Objective, check_objective
from pxopt.search.space import SearchSpace
from pxopt.search.spec import StudySpec
from pxopt.search.storage import DEFAULT_HEARTBEAT_INTERVAL, pin_study_attrs
from pxopt.search.workers import WorkerContext, WorkerPlan, WorkerSetup
from pxopt.vocab import LEGACY_GROUPING

Callback = Callable[[optuna.Study, optuna.trial.FrozenTrial], None]
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
        with warnings.catch_warnings():  # GPSampler, and TPE's `group` (stable since Optuna 2.8), are "experimental"
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if name == "gp":  # models the rule choices; each rule's own numbers are sampled independently
                cfg.setdefault("warn_independent_sampling", False)
                return optuna.samplers.GPSampler(seed=seed, **cfg)
            cfg.setdefault("multivariate", True)
            cfg.setdefault("group", True)  # conditional parameters (rule -> its numbers)
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
    """Create the spec's study or resume it; refuse a same-named study of another model,
    task or objective."""
    from pxopt.search.storage import open_study as shared_open_study

    if storage is None:
        storage = spec.storage_url()
    if isinstance(storage, str):
        storage = open_storage(storage)
    task = {k: v for k, v in spec.identity().items() if k != "model"}
    try:
        study = shared_open_study(
            storage,
            spec.name,
            model_spec=spec.model,
            task=task,
            pruner=make_pruner(spec.pruner, len(spec.rates)),
        )
    except StorageError as exc:
        _refuse_other_grouping(storage, spec, exc)
        raise
    check_objective(study)  # refuses a study whose values are an older objective's
    if SPEC_ATTR not in study.user_attrs:
        study.set_user_attr(SPEC_ATTR, spec.to_dict())
        study.set_user_attr("pxopt.versions", library_versions())
    study.sampler = make_sampler(spec, len(study.trials))
    return study


def _refuse_other_grouping(storage: optuna.storages.BaseStorage, spec: StudySpec,
                           cause: Exception) -> None:
    """Say so when a study was refused because it was made with another grouping (the
    grouping is part of the task identity, see `StudySpec.identity`)."""
    try:
        attrs = storage.get_study_user_attrs(storage.get_study_id_from_name(spec.name))
    except Exception:  # (no such study, or unreadable: the original error stands)
        return
    stored_spec = attrs.get(SPEC_ATTR)
    if not isinstance(stored_spec, dict):
        return
    stored = stored_spec.get("grouping", LEGACY_GROUPING)
    if stored != spec.grouping:
        raise StorageError(
            f"study {spec.name!r} was made with grouping {stored!r}, not {spec.grouping!r} (other "
            f"rule groups, so its trials do not mix): set grouping = {stored!r} in the spec's "
            "[prune] table to resume it, or use another --study name") from cause


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
    """What a finished (or interrupted) search leaves: the study, where it lives, what ran."""

    study: optuna.Study
    storage_url: str
    n_new_trials: int  # trials added by this run, failed ones included
    trials_before: int = 0  # finished (COMPLETE or PRUNED) trials before the run
    trials_after: int = 0  # ... and after it
    interrupted: bool = False  # Ctrl-C: running trials were failed and queued again
    exit_codes: list[int] = field(default_factory=list)  # one per worker (0 done, 130 interrupted)
    resume_hint: str | None = None  # set when interrupted

    @property
    def best_trial(self) -> optuna.trial.FrozenTrial | None:
        """The search split's best. `pxopt search` names its best after re-scoring the best
        few (`pxopt.search.naming.name_best`); `named_trial(result.study)` reads that."""
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


@dataclass
class SpecFactory:
    """Builds the search's objective for a spec inside each worker (`pxopt.search.pool`).

    A spawned worker loads its own model and task on its own device; the in-process worker
    reuses `pipeline` (or the caller's `evaluate`), which are never pickled. Each worker
    offsets its sampler seed by its index and by the trials already in the study, so
    workers do not propose the same rules and a resumed study does not replay its first.
    """

    spec: StudySpec
    space: SearchSpace
    pipeline: Any = None  # pxopt.pipeline.Pipeline, loaded by run_search
    evaluate: Evaluate | None = None  # a caller's evaluator instead of the pipeline's
    timings: Callable[[], Mapping[str, Any]] | None = None
    callbacks: tuple[Callback, ...] = ()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "pipeline": None, "evaluate": None, "timings": None, "callbacks": ()}

    def __call__(self, ctx: WorkerContext) -> WorkerSetup:
        spec = self.spec
        evaluate, timings = self.evaluate, self.timings
        if evaluate is None:
            pipeline = self.pipeline
            if pipeline is None:
                from pxopt.pipeline import Pipeline

                # (no held-out images: the main process evaluates them; the validation set is the same)
                pipeline = Pipeline.from_spec(dataclasses.replace(spec, n_heldout=0), device=ctx.device)
            evaluate, timings = pipeline.evaluate, pipeline.timings
        offset = ctx.n_trials_before + 1000 * ctx.index
        seeds = {"study": spec.seed, "sampler": spec.seed + offset, "task": spec.task_seed, "worker": ctx.index}
        objective = Objective(self.space, evaluate, spec.rates, timings=timings, seeds=seeds)
        return WorkerSetup(
            objective, make_sampler(spec, offset), make_pruner(spec.pruner, len(spec.rates)), list(self.callbacks)
        )


def heartbeat_from_env() -> int:
    """Heartbeat interval in seconds: `PXOPT_HEARTBEAT` (default 60); a killed worker's
    trial is retried after twice this time."""
    raw = os.environ.get("PXOPT_HEARTBEAT", "").strip()
    if not raw:
        return DEFAULT_HEARTBEAT_INTERVAL
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"PXOPT_HEARTBEAT must be a whole number of seconds >= 1, got {raw!r}")
    return value


def run_search(
    spec: StudySpec,
    evaluate: Evaluate | None = None,
    *,
    workers: int = 1,
    pipeline: Any = None,
    space: SearchSpace | None = None,
    family: str = "cnn",
    storage_url: str | None = None,
    timings: Callable[[], Mapping[str, Any]] | None = None,
    callbacks: Iterable[Callback] = (),
    study_attrs: Mapping[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
    log: Callable[[str], None] | None = None,
    resume_hint: str | None = None,
) -> SearchResult:
    """Run (or resume) the spec's study until it holds `spec.trials` finished trials.

    The model and task load here once (`pipeline`, else `Pipeline.from_spec`; on the CPU
    when `workers` > 1, each worker then loads its own), so bad input fails with one
    error before any worker starts and a built-in model trains once. `evaluate` (with
    `space` or `family`, and `timings`) replaces the pipeline, in this process only.
    `study_attrs` (default: the pipeline's, with its weights fingerprint) are stored with
    the study and checked on resume, and so is the pipeline's held-out split
    (`pxopt.search.heldout`; a resumed study keeps the size it was made with). A trial that fails (bad rule parameters, NaN,
    out of memory) fails alone with its `fail_reason`; the study goes on. `progress(n)`
    gets the finished-trial count, first what the study already holds. After Ctrl-C the
    result is `interrupted` and `resume_hint` has been logged.
    """
    from pxopt.search.pool import run_workers

    if not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    if evaluate is not None and workers > 1:
        raise ConfigError("a custom evaluate runs in this process only: use workers=1")
    url = storage_url or spec.storage_url()
    if evaluate is None:
        if pipeline is None:
            from pxopt.pipeline import Pipeline
            from pxopt.search.heldout import resume_spec

            spec, _ = resume_spec(spec, url)  # a resumed study keeps its held-out split

            pipeline = Pipeline.from_spec(spec, device="cpu" if workers > 1 else None)
            pipeline.check_explainable()  # unsupported model: one error now, not a failed trial each
        spec = spec.with_overrides(components=pipeline.components)  # "auto" -> the model's
        space = space or SearchSpace.build(spec.space, family=pipeline.family)
        if study_attrs is None:
            study_attrs = pipeline.study_attrs()
    space = space or SearchSpace.build(spec.space, family=family)
    study = open_study(spec, url)
    pin_study_attrs(study, study_attrs or {})
    if pipeline is not None:
        from pxopt.search.heldout import record_split

        record_split(study, pipeline.task)  # the images `pxopt.search.heldout` evaluates on
    space.check_resumable(study.get_trials(deepcopy=False))
    if spec.baselines:
        enqueue_baselines(study, space, limit=spec.trials)
    n_before = len(study.trials)
    plan = WorkerPlan(
        storage=url, study_name=spec.name, n_trials=spec.trials, timeout=spec.timeout, device=spec.device,
        heartbeat_interval=heartbeat_from_env(), optuna_verbosity=optuna.logging.get_verbosity(),
    )
    factory = SpecFactory(spec, space, pipeline if workers == 1 else None, evaluate, timings, tuple(callbacks))
    del pipeline  # with several workers each loads its own: free this copy before they start
    summary = run_workers(factory, plan, workers, resume_hint=resume_hint or "the same run_search(spec) call",
                          log=log, progress=progress)
    return SearchResult(
        study=study, storage_url=url, n_new_trials=len(study.trials) - n_before,
        trials_before=summary.trials_before, trials_after=summary.trials_after,
        interrupted=summary.interrupted, exit_codes=summary.exit_codes, resume_hint=summary.resume_hint,
    )
