"""One worker: an optimisation loop on a shared study that survives crashes and Ctrl-C.

All coordination goes through Optuna's storage (see `pxopt.search.storage`): a worker is
an ordinary `study.optimize` loop, one trial at a time, so N workers in one process pool
(`pxopt.search.pool`) and N `pxopt search` commands on N machines behave the same. Per
trial the worker:

- checks the shared budget: it stops once finished (COMPLETE or PRUNED) plus running
  trials reach `plan.n_trials`, whoever ran them;
- fails stale trials first, with Optuna's public `optuna.storages.fail_stale_trials`: a
  worker killed outright (SIGKILL, power loss) leaves its trial RUNNING until its
  heartbeat is older than the grace period; it is then marked FAIL with the reason
  (`recording_stale_failures`) and `RetryHeartbeatStaleTrialCallback` queues it again;
- runs the objective under the trial guard (`pxopt.search.guard`): out-of-memory or a
  non-finite value fails only that trial, with the reason in `fail_reason`;
- on Ctrl-C marks the running trial FAIL (`fail_reason` = interrupted) and queues it
  again with the same parameters for the next run.

A live worker whose trial was failed as stale (its heartbeat was late) drops the result
it can no longer report and goes on.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import TrialState

from pxopt.device import configure_threads
from pxopt.errors import StorageError
from pxopt.search.guard import CAUGHT, FAIL_REASON, INTERRUPTED, Objective, guard
from pxopt.search.storage import (
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_MAX_RETRY,
    open_storage,
    orphaned_trial_ids,
    recording_stale_failures,
)

#: States that count against the study's trial budget (failed trials are retried or redone).
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
#: A worker stops after this many failed trials in a row (a broken setup, not bad luck).
MAX_CONSECUTIVE_FAILURES = 5


@dataclass(frozen=True)
class WorkerContext:
    """What one worker process gets to build its objective."""

    index: int  # 0 .. n_workers - 1
    n_workers: int
    device: str  # "auto", "cpu" or "cuda:0" (its own GPU when several are shared out)
    threads: int | None  # CPU threads for this worker (None: leave torch's default)
    n_trials_before: int = 0  # trials in the study when the run started (offset sampler seeds)


@dataclass(frozen=True)
class WorkerPlan:
    """Where the study lives and how much work this run adds (shared by all workers)."""

    storage: str  # path or SQLAlchemy URL
    study_name: str
    n_trials: int | None = None  # finished trials the study should hold; None: until timeout / Ctrl-C
    timeout: float | None = None  # seconds per worker, after which no new trial starts
    device: str = "auto"
    heartbeat_interval: int | None = DEFAULT_HEARTBEAT_INTERVAL
    grace_period: int | None = None
    max_retry: int | None = DEFAULT_MAX_RETRY
    optuna_verbosity: int | None = None  # Optuna's log level in spawned workers (None: Optuna's default)


@dataclass
class WorkerSetup:
    """What a factory returns: the objective, plus the sampler and pruner of this worker.

    Give each worker its own sampler seed (e.g. seed + index + len(trials)): identical
    seeds make every worker propose the same parameters.
    """

    objective: Objective
    sampler: optuna.samplers.BaseSampler | None = None
    pruner: optuna.pruners.BasePruner | None = None
    callbacks: list[Callable[[optuna.Study, optuna.trial.FrozenTrial], None]] = field(default_factory=list)


#: Builds a worker's objective inside its process (load model and task there, not in the
#: parent). Must be picklable for N > 1: a module-level function or a `functools.partial`.
ObjectiveFactory = Callable[[WorkerContext], WorkerSetup]


# --- one worker --------------------------------------------------------------------------


def fail_stale_trials(study: optuna.Study, storage: optuna.storages.RDBStorage) -> list[int]:
    """Fail the trials whose worker stopped sending heartbeats, saying why, and queue retries.

    `storage` is the study's storage. Optuna's public `fail_stale_trials` does the work
    and runs the retry callback; `recording_stale_failures` writes the reason before each
    FAIL and, on SQLite, re-reads the trial under the state lock, so a trial its owner
    completed meanwhile keeps its result. Returns the ids of the trials failed here.
    """
    interval = storage.get_heartbeat_interval()
    if interval is None:
        return []
    grace = storage.grace_period or 2 * interval
    with recording_stale_failures(storage, f"no heartbeat for {grace} s (worker killed or stalled)") as failed:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
    orphans = orphaned_trial_ids(storage, study._study_id, grace)
    if orphans:  # killed between its creation and its first heartbeat: as Optuna does for stale ones
        retry = storage.get_heartbeat_stale_trial_callback()
        with recording_stale_failures(storage, "no heartbeat ever (worker killed as the trial started)") as new:
            for trial_id in orphans:
                if storage.set_trial_state_values(trial_id, TrialState.FAIL) and retry is not None:
                    retry(study, storage.get_trial(trial_id))
        failed += new
    return list(failed)


def _heartbeat_from_creation(sampler: optuna.samplers.BaseSampler, storage: optuna.storages.RDBStorage) -> None:
    """Record a new trial's first heartbeat inside `ask()`, before the sampler works.

    Optuna starts a trial's heartbeat thread only after `ask()` returns, and `ask()` runs the
    relative sampling (TPE's multivariate model: long on a loaded machine). A worker killed in
    between leaves a RUNNING trial with no heartbeat, which `fail_stale_trials` never fails
    (it only judges trials that have one), so it would stay RUNNING forever. `before_trial`
    runs right after the trial is created, before any sampling.
    """
    before_trial = sampler.before_trial

    def with_heartbeat(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        storage.record_heartbeat(trial._trial_id)
        before_trial(study, trial)

    sampler.before_trial = with_heartbeat  # type: ignore[method-assign]


def _finished_elsewhere(exc: Exception, storage: optuna.storages.RDBStorage, trial_ids: list[int]) -> bool:
    """Whether `exc` only says that another worker ended our trial first (e.g. as stale).

    Optuna then raises while reporting the result: UpdateFinishedTrialError from the
    storage, "Cannot tell a FAIL trial" from `tell`, or its own "Should not reach"
    assertion when the trial it meant to report is FAIL without an error of its own.
    """
    told_late = (
        isinstance(exc, optuna.exceptions.UpdateFinishedTrialError)
        or (isinstance(exc, ValueError) and str(exc).startswith("Cannot tell a "))
        or (isinstance(exc, AssertionError) and "Should not reach" in str(exc))
    )
    return told_late and bool(trial_ids) and storage.get_trial(trial_ids[-1]).state.is_finished()


def count_trials(study: optuna.Study, states: tuple[TrialState, ...]) -> int:
    """Trials of the study in these states."""
    return len(study.get_trials(deepcopy=False, states=states))


def _requeue_interrupted(study: optuna.Study, trial_id: int) -> None:
    """Make sure an interrupted trial is FAIL (not left RUNNING) and queue its parameters."""
    storage = study._storage
    frozen = storage.get_trial(trial_id)
    if frozen.state == TrialState.RUNNING:  # interrupted outside the objective (ask / tell)
        storage.set_trial_user_attr(trial_id, FAIL_REASON, INTERRUPTED)
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
        frozen = storage.get_trial(trial_id)
    if frozen.state != TrialState.FAIL or frozen.user_attrs.get(FAIL_REASON) != INTERRUPTED:
        return  # finished before the interrupt (or failed for its own reason): nothing to redo
    if not frozen.params:
        return
    history = [*frozen.system_attrs.get("retry_history", []), frozen.number]
    study.add_trial(
        optuna.trial.create_trial(
            state=TrialState.WAITING,
            params=frozen.params,
            distributions=frozen.distributions,
            system_attrs={
                "failed_trial": frozen.system_attrs.get("failed_trial", frozen.number),
                "retry_history": history,
            },
            # an enqueued baseline stays one (naming re-scores all-epsilon beside the best)
            user_attrs={k: v for k, v in frozen.user_attrs.items() if k == "baseline"},
        )
    )


class _NoInterruptTraceback(logging.Filter):
    """Optuna logs a failed trial with its traceback; for Ctrl-C that is noise, not news."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt):
            record.exc_info = None
            record.exc_text = None
        return True


@contextmanager
def _quiet_interrupts() -> Iterator[None]:
    logger = logging.getLogger("optuna.study._optimize")
    quiet = _NoInterruptTraceback()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


class _Interrupt:
    """Ctrl-C that interrupts only the objective, never Optuna's own storage writes.

    A KeyboardInterrupt raised at an arbitrary bytecode can land inside Optuna's `tell`
    or SQLAlchemy's flush and leave an exception that is not an interrupt. So the first
    SIGINT raises only while the objective runs (its trial is then marked FAIL and
    queued again); anywhere else it is recorded and the worker stops before its next
    trial. Later SIGINTs are ignored (a terminal Ctrl-C reaches every worker, and the
    parent forwards it once more).
    """

    def __init__(self) -> None:
        self.requested = False
        self.in_objective = False

    def handler(self, _signum: int, _frame: Any) -> None:
        if self.requested:
            return
        self.requested = True
        if self.in_objective:
            raise KeyboardInterrupt

    def wrap(self, objective: Objective) -> Objective:
        def run(trial: optuna.Trial) -> float:
            self.in_objective = True
            try:
                if self.requested:  # arrived between ask() and here
                    raise KeyboardInterrupt
                return objective(trial)
            finally:
                self.in_objective = False

        return run

    @contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # handlers can only be set in the main thread; Python's default applies
            return
        previous = signal.signal(signal.SIGINT, self.handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


def run_worker(
    factory: ObjectiveFactory,
    plan: WorkerPlan,
    ctx: WorkerContext,
    *,
    log: Callable[[str], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> bool:
    """One optimisation loop on the shared study; returns False when interrupted.

    Before each trial it fails stale trials (heartbeat) and stops once finished plus running
    trials reach `plan.n_trials`, so N workers share one budget and overshoot rarely.
    """
    log = log or stderr_log
    if ctx.threads is not None:
        configure_threads(ctx.threads)
    storage = open_storage(
        plan.storage,
        heartbeat_interval=plan.heartbeat_interval,
        grace_period=plan.grace_period,
        max_retry=plan.max_retry,
    )
    setup = factory(ctx)
    try:
        study = optuna.load_study(
            study_name=plan.study_name, storage=storage, sampler=setup.sampler, pruner=setup.pruner
        )
    except KeyError as exc:
        raise StorageError(f"study {plan.study_name!r} does not exist in the storage") from exc
    if storage.get_heartbeat_interval() is not None:
        _heartbeat_from_creation(study.sampler, storage)
    current: list[int] = []
    interrupt = _Interrupt()
    # guard outermost: an interrupt raised by `wrap` (one that arrived during ask()) must
    # still find the trial recorded in `current` and get its reason
    objective = guard(interrupt.wrap(setup.objective), on_start=lambda t: current.append(t._trial_id))
    deadline = None if plan.timeout is None else time.monotonic() + plan.timeout
    failures = 0
    with interrupt.installed(), _quiet_interrupts(), warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            while True:
                if interrupt.requested:
                    raise KeyboardInterrupt
                if deadline is not None and time.monotonic() >= deadline:
                    return True
                fail_stale_trials(study, storage)  # no-op without heartbeat
                if plan.n_trials is not None and count_trials(study, (*FINISHED, TrialState.RUNNING)) >= plan.n_trials:
                    return True
                current.clear()
                try:
                    study.optimize(objective, n_trials=1, catch=CAUGHT, callbacks=setup.callbacks, gc_after_trial=False)
                except Exception as exc:
                    if not _finished_elsewhere(exc, storage, current):
                        raise
                    log(f"worker {ctx.index}: trial {storage.get_trial(current[-1]).number} was ended by "
                        "another worker (late heartbeat?); its result is dropped, the retry repeats it")
                if interrupt.requested:
                    raise KeyboardInterrupt
                if progress is not None:
                    progress(count_trials(study, FINISHED))
                if _stop_requested(study):
                    return True
                last = storage.get_trial(current[-1]) if current else None
                failures = failures + 1 if last is not None and last.state == TrialState.FAIL else 0
                if failures >= MAX_CONSECUTIVE_FAILURES:
                    log(
                        f"worker {ctx.index}: stopping after {failures} failed trials in a row; last "
                        f"reason: {last.user_attrs.get(FAIL_REASON, 'unknown') if last else 'unknown'}"
                    )
                    return True
        except KeyboardInterrupt:
            interrupt.requested = True  # ignore further Ctrl-C while cleaning up
            for trial_id in current:
                _requeue_interrupted(study, trial_id)
            return False


def _stop_requested(study: optuna.Study) -> bool:
    """Whether a callback or the objective called `study.stop()` during the last trial.

    The loop runs `study.optimize` one trial at a time, and each call clears Optuna's stop
    flag, so a stop (an early-stopping callback, say) would otherwise be lost and the
    search run to its budget. Optuna has no public accessor for the flag.
    """
    return bool(getattr(study, "_stop_flag", False))


def stderr_log(message: str) -> None:
    """The default log of a worker: one line on stderr."""
    print(message, file=sys.stderr, flush=True)

