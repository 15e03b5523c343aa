"""Run one study with N worker processes, and survive crashes, Ctrl-C, OOM and NaN.

All coordination goes through Optuna's storage (see `pxopt.search.storage`): every worker
is an ordinary `study.optimize` loop on the same study, so N workers on one machine and
N `pxopt search` commands on N machines behave the same. What this module adds:

- process management: `run_workers` spawns N processes (`spawn` start method, safe with
  CUDA), one GPU each, round-robin over `CUDA_VISIBLE_DEVICES` (or all visible GPUs);
- a shared trial budget: the study ends up with `n_trials` finished (COMPLETE or PRUNED)
  trials in total, whoever ran them (as `pxopt.search.run_search` counts them);
- `guard`: an out-of-memory error or a non-finite value fails only that trial, with the
  reason in its `fail_reason` user attribute, and the study goes on;
- Ctrl-C: the running trial is marked FAIL (`fail_reason` = interrupted), queued again
  with the same parameters for the next run, and a resume command is printed.

A worker killed outright (SIGKILL, power loss) cannot clean up: its trial keeps RUNNING
until the heartbeat check (run by any worker before each new trial) marks it FAIL, with
the reason, and `RetryHeartbeatStaleTrialCallback` queues it again with the same
parameters. A live worker whose trial was failed that way (its heartbeat was late) drops
the result it can no longer report and goes on.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing as mp
import multiprocessing.connection
import os
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
import torch
from optuna.trial import TrialState

from pxopt.device import configure_threads
from pxopt.errors import ConfigError, NonFiniteRelevanceError, PxoptError, StorageError
from pxopt.search.storage import (
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_MAX_RETRY,
    SQLiteFileStorage,
    open_storage,
    pin_study_attrs,
)

Objective = Callable[[optuna.Trial], float]
FAIL_REASON = "fail_reason"
INTERRUPTED = "interrupted by SIGINT (Ctrl-C); queued again for the next run"
#: States that count against the study's trial budget (failed trials are retried or redone).
_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
#: A worker stops after this many failed trials in a row (a broken setup, not bad luck).
MAX_CONSECUTIVE_FAILURES = 5


class TrialOutOfMemory(MemoryError):
    """A trial ran out of (GPU or host) memory; only that trial fails."""


#: Exceptions that fail one trial but let the worker go on with the next one.
CAUGHT: tuple[type[BaseException], ...] = (PxoptError, MemoryError, torch.OutOfMemoryError)


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


#: Builds a worker's objective inside its process (load model and task there, not in the
#: parent). Must be picklable for N > 1: a module-level function or a `functools.partial`.
ObjectiveFactory = Callable[[WorkerContext], WorkerSetup]


@dataclass
class RunSummary:
    """What a run did; `interrupted` runs print `resume_hint`."""

    n_workers: int
    trials_before: int
    trials_after: int
    interrupted: bool = False
    exit_codes: list[int] = field(default_factory=list)
    resume_hint: str | None = None


# --- one trial ---------------------------------------------------------------------------


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError | torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )


def _set_reason(trial: optuna.Trial, reason: str) -> None:
    """Record why a trial failed, keeping a more specific reason set by the objective."""
    if FAIL_REASON not in trial.user_attrs:
        trial.set_user_attr(FAIL_REASON, reason[:1000])


def guard(objective: Objective, on_start: Callable[[optuna.Trial], None] | None = None) -> Objective:
    """Wrap an objective so every failure leaves its reason in the trial's user attributes.

    Out-of-memory becomes `TrialOutOfMemory` and a NaN/inf value `NonFiniteRelevanceError`,
    both in `CAUGHT`, so `study.optimize(..., catch=CAUGHT)` fails only that trial.
    """

    def guarded(trial: optuna.Trial) -> float:
        if on_start is not None:
            on_start(trial)
        try:
            value = objective(trial)
        except optuna.TrialPruned:
            raise
        except KeyboardInterrupt:
            _set_reason(trial, INTERRUPTED)
            raise
        except BaseException as exc:
            if _is_oom(exc):
                _set_reason(trial, f"out of memory: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                if isinstance(exc, CAUGHT):
                    raise
                raise TrialOutOfMemory(str(exc)) from exc
            _set_reason(trial, f"{type(exc).__name__}: {exc}")
            raise
        if value is None or not math.isfinite(float(value)):
            reason = f"objective value is {value}"
            _set_reason(trial, f"NonFiniteRelevanceError: {reason}")
            raise NonFiniteRelevanceError(reason)
        return value

    return guarded


# --- one worker --------------------------------------------------------------------------


def fail_stale_trials(study: optuna.Study, storage: optuna.storages.RDBStorage) -> list[int]:
    """Fail the trials whose worker stopped sending heartbeats, saying why, and queue retries.

    Optuna's `fail_stale_trials` records no reason. Here the reason is written first (a
    finished trial takes no more attributes) and, on SQLite, the trial is re-read under the
    state lock, so a trial its owner completed meanwhile keeps its result.
    """
    interval = storage.get_heartbeat_interval()
    if interval is None:
        return []
    grace = storage.grace_period or 2 * interval
    reason = f"no heartbeat for {grace} s (worker killed or stalled)"
    lock = storage.state_lock() if isinstance(storage, SQLiteFileStorage) else contextlib.nullcontext()
    failed = []
    for trial_id in storage._get_stale_trial_ids(study._study_id):
        with lock:
            if storage.get_trial(trial_id).state != TrialState.RUNNING:
                continue
            try:
                storage.set_trial_user_attr(trial_id, FAIL_REASON, reason)
                if storage.set_trial_state_values(trial_id, TrialState.FAIL):
                    failed.append(trial_id)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another worker finished or failed it between the read and the write
    callback = storage.get_heartbeat_stale_trial_callback()
    if callback is not None:
        for trial_id in failed:
            callback(study, storage.get_trial(trial_id))
    return failed


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


def _count(study: optuna.Study, states: tuple[TrialState, ...]) -> int:
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
    log = log or _stderr
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
                if plan.n_trials is not None and _count(study, (*_FINISHED, TrialState.RUNNING)) >= plan.n_trials:
                    return True
                current.clear()
                try:
                    study.optimize(objective, n_trials=1, catch=CAUGHT, gc_after_trial=False)
                except Exception as exc:
                    if not _finished_elsewhere(exc, storage, current):
                        raise
                    log(f"worker {ctx.index}: trial {storage.get_trial(current[-1]).number} was ended by "
                        "another worker (late heartbeat?); its result is dropped, the retry repeats it")
                if interrupt.requested:
                    raise KeyboardInterrupt
                if progress is not None:
                    progress(_count(study, _FINISHED))
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


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _child_main(factory: ObjectiveFactory, plan: WorkerPlan, ctx: WorkerContext, errors: Any) -> None:
    """Entry point of a spawned worker: exit 0 done, 130 interrupted, 2 user error, 1 bug."""
    if plan.optuna_verbosity is not None:
        optuna.logging.set_verbosity(plan.optuna_verbosity)
    try:
        completed = run_worker(factory, plan, ctx)
    except PxoptError as exc:
        errors.put((ctx.index, type(exc).__name__, str(exc)))
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    except BaseException as exc:
        errors.put((ctx.index, type(exc).__name__, f"{type(exc).__name__}: {exc}"))
        raise
    sys.exit(0 if completed else 130)


# --- many workers ------------------------------------------------------------------------


def visible_gpus() -> list[str]:
    """GPU ids to share out: `CUDA_VISIBLE_DEVICES` if set, else all that torch sees."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        ids = [part.strip() for part in env.split(",") if part.strip()]
        return [] if ids and ids[0].startswith("-") else ids
    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def assign_devices(n_workers: int, device: str = "auto", gpus: list[str] | None = None) -> list[tuple[str, str | None]]:
    """(device for the worker, CUDA_VISIBLE_DEVICES for its process) per worker.

    With `auto` or `cuda` and GPUs present, worker i gets GPU i mod #GPUs and sees it as
    cuda:0. An explicit `cpu` or `cuda:K` is used as given by every worker.
    """
    gpus = visible_gpus() if gpus is None else gpus
    if device in ("auto", "cuda") and gpus:
        return [("cuda:0", gpus[i % len(gpus)]) for i in range(n_workers)]
    return [(device, None) for _ in range(n_workers)]


def _threads_per_worker(n_workers: int, on_gpu: bool) -> int | None:
    """Split the CPU cores between workers so N processes do not oversubscribe them."""
    if os.environ.get("PXOPT_THREADS"):
        return int(os.environ["PXOPT_THREADS"])
    if n_workers == 1:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return 1 if on_gpu else max(1, cores // n_workers)


def resume_command(argv: list[str] | None = None) -> str:
    """The command that resumes this run (same storage and study continue the study)."""
    import shlex

    args = sys.argv[1:] if argv is None else argv
    return shlex.join(["pxopt", *args])


def run_workers(
    factory: ObjectiveFactory,
    plan: WorkerPlan,
    n_workers: int = 1,
    *,
    resume_hint: str | None = None,
    log: Callable[[str], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> RunSummary:
    """Run `plan` with `n_workers` processes (in this process when 1) on one study.

    The study must exist (create it with `pxopt.search.storage.open_study`). Returns when
    the budget is spent, the timeout passed, or after Ctrl-C (then `interrupted` is True
    and `resume_hint` has been logged). A worker's `PxoptError` is re-raised here.
    `progress(n_finished)` is called after each trial (polled every second for N > 1).
    """
    if not isinstance(n_workers, int) or n_workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {n_workers}")
    if plan.n_trials is not None and plan.n_trials < 1:
        raise ConfigError(f"--trials must be >= 1, got {plan.n_trials}")
    log = log or _stderr
    storage = open_storage(plan.storage, heartbeat_interval=None)
    try:
        study = optuna.load_study(study_name=plan.study_name, storage=storage, sampler=optuna.samplers.RandomSampler())
    except KeyError as exc:
        raise StorageError(f"study {plan.study_name!r} does not exist in the storage") from exc
    before = _count(study, _FINISHED)
    if progress is not None:
        progress(before)  # a resumed study starts where it stands
    summary = RunSummary(n_workers=0, trials_before=before, trials_after=before)
    if plan.n_trials is not None:
        remaining = plan.n_trials - before
        if remaining <= 0:
            log(f"study {plan.study_name!r} already has {before} of {plan.n_trials} finished trials")
            return summary
        n_workers = min(n_workers, remaining)  # idle workers would only load the model
    devices = assign_devices(n_workers, plan.device)
    threads = _threads_per_worker(n_workers, on_gpu=devices[0][1] is not None)
    hint = resume_hint or resume_command()
    summary.n_workers = n_workers

    if n_workers == 1:
        device, _ = devices[0]
        ctx = WorkerContext(0, 1, device, threads, len(study.trials))
        completed = run_worker(factory, plan, ctx, log=log, progress=progress)
        summary.exit_codes = [0 if completed else 130]
        summary.interrupted = not completed
    else:
        summary.exit_codes, summary.interrupted = _run_processes(
            factory, plan, devices, threads, len(study.trials), study if progress else None, progress
        )
    summary.trials_after = _count(study, _FINISHED)
    if summary.interrupted:
        summary.resume_hint = hint
        log(
            f"interrupted: study {plan.study_name!r} has {summary.trials_after} finished trials "
            f"(running ones were marked failed and queued again). Resume with: {hint}"
        )
    return summary


def _run_processes(
    factory: ObjectiveFactory,
    plan: WorkerPlan,
    devices: list[tuple[str, str | None]],
    threads: int | None,
    n_trials_before: int,
    study: optuna.Study | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[int], bool]:
    """Spawn one process per device, forward Ctrl-C to them, collect their errors."""
    context = mp.get_context("spawn")
    errors = context.Queue()
    processes: list[Any] = []
    forwarded = [False]

    def forward(_signum: int, _frame: Any) -> None:
        """Ctrl-C in the parent: tell every worker; they mark, requeue and exit."""
        forwarded[0] = True
        for process in processes:
            if process.pid is not None and process.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGINT)

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, forward) if main_thread else None
    try:
        for index, (device, gpu) in enumerate(devices):
            ctx = WorkerContext(index, len(devices), device, threads, n_trials_before)
            with _env("CUDA_VISIBLE_DEVICES", gpu):
                process = context.Process(
                    target=_child_main, args=(factory, plan, ctx, errors), name=f"pxopt-worker-{index}"
                )
                process.start()
            processes.append(process)
        if forwarded[0]:  # Ctrl-C while starting: reach the late starters too
            forward(signal.SIGINT, None)
        last = -1
        while alive := [process.sentinel for process in processes if process.is_alive()]:
            mp.connection.wait(alive, timeout=1.0)
            if study is not None and progress is not None:
                done = _count(study, _FINISHED)
                if done != last:
                    progress(done)
                    last = done
        for process in processes:
            process.join()
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)
    interrupted = forwarded[0]
    codes = [process.exitcode if process.exitcode is not None else -1 for process in processes]
    interrupted = interrupted or any(code == 130 for code in codes)
    reported = []
    while not errors.empty():
        reported.append(errors.get())
    errors.close()
    for index, name, message in sorted(reported):
        if codes[index] == 2:
            raise _rebuild_error(name, message)
    if reported:
        index, _, message = sorted(reported)[0]
        raise RuntimeError(f"worker {index} crashed: {message}")
    failed = [i for i, code in enumerate(codes) if code not in (0, 130)]
    if failed and not interrupted:
        raise RuntimeError(f"worker(s) {failed} exited with codes {[codes[i] for i in failed]}")
    return codes, interrupted


def _rebuild_error(name: str, message: str) -> PxoptError:
    """The worker's PxoptError subclass, by name, so the CLI reports it the same way."""
    import pxopt.errors as errors_module

    cls = getattr(errors_module, name, None)
    if isinstance(cls, type) and issubclass(cls, PxoptError):
        return cls(message)
    return PxoptError(message)


@contextmanager
def _env(name: str, value: str | None) -> Iterator[None]:
    """Set an environment variable while a child is spawned (it inherits os.environ)."""
    if value is None:
        yield
        return
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


# --- the real pxopt search ---------------------------------------------------------------


@dataclass
class SpecFactory:
    """Builds pxopt's real objective for a `StudySpec` inside each worker process.

    Each worker loads its own model and task on its own device and offsets its sampler
    seed by its index (and by the trials already in the study), so workers do not propose
    the same rules. `pipeline` (a `Pipeline` already loaded here) is reused by an
    in-process worker and never pickled.
    """

    spec: Any  # pxopt.search.spec.StudySpec
    pipeline: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "pipeline": None}

    def __call__(self, ctx: WorkerContext) -> WorkerSetup:
        from pxopt.pipeline import Pipeline
        from pxopt.search.objective import Objective
        from pxopt.search.space import SearchSpace
        from pxopt.search.study import make_pruner, make_sampler

        spec = self.spec
        pipeline = self.pipeline if self.pipeline is not None else Pipeline.from_spec(spec, device=ctx.device)
        space = SearchSpace.build(spec.space, family=pipeline.family, zbox_bounds=pipeline.input_bounds())
        offset = ctx.n_trials_before + 1000 * ctx.index
        seeds = {"study": spec.seed, "sampler": spec.seed + offset, "task": spec.task_seed, "worker": ctx.index}
        objective = Objective(space, pipeline.evaluate, spec.rates, timings=pipeline.timings, seeds=seeds)
        return WorkerSetup(objective, make_sampler(spec, offset), make_pruner(spec.pruner, len(spec.rates)))


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


def run_spec_search(
    spec: Any,
    *,
    n_workers: int = 1,
    storage_url: str | None = None,
    pipeline: Any = None,
    study_attrs: dict[str, Any] | None = None,
    resume_hint: str | None = None,
    log: Callable[[str], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> RunSummary:
    """`pxopt search --workers N`: create or resume the spec's study and run N workers on it.

    The model and task are loaded here first (given as `pipeline`, or loaded on the CPU
    when N > 1): bad input fails once with one clear error before any worker starts, and
    a built-in model is trained once, not by every worker. Baselines are queued into a
    new study exactly as `run_search` does; the workers then share `spec.trials`.
    """
    from pxopt.pipeline import Pipeline
    from pxopt.search.space import SearchSpace
    from pxopt.search.study import enqueue_baselines, open_study

    if not isinstance(n_workers, int) or n_workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {n_workers}")
    url = storage_url or spec.storage_url()
    if pipeline is None:
        pipeline = Pipeline.from_spec(spec, device="cpu" if n_workers > 1 else None)
    spec = spec.with_overrides(components=pipeline.components)  # "auto" -> the model's
    study = open_study(spec, url)
    pin_study_attrs(study, study_attrs or {})
    if spec.baselines:
        space = SearchSpace.build(spec.space, family=pipeline.family, zbox_bounds=pipeline.input_bounds())
        enqueue_baselines(study, space, limit=spec.trials)
    plan = WorkerPlan(
        storage=url, study_name=spec.name, n_trials=spec.trials, timeout=spec.timeout, device=spec.device,
        heartbeat_interval=heartbeat_from_env(), optuna_verbosity=optuna.logging.get_verbosity(),
    )
    factory = SpecFactory(spec, pipeline if n_workers == 1 else None)
    if n_workers > 1:
        del pipeline  # the workers load their own; free this copy before they start
    return run_workers(factory, plan, n_workers, resume_hint=resume_hint, log=log, progress=progress)
