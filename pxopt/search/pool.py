"""The process pool: N worker processes on one study, one GPU each, Ctrl-C forwarded.

`run_workers(factory, plan, n)` runs `pxopt.search.workers.run_worker` in this process
(N = 1) or in N spawned processes (`spawn` start method, safe with CUDA), worker i on
GPU i mod #GPUs (round-robin over `CUDA_VISIBLE_DEVICES`, or all visible GPUs), with the
CPU cores split between them. A worker's `PxoptError` comes back as the same error class
with one line; Ctrl-C in the parent reaches every worker, and the resume command is
logged.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import optuna
import torch

from pxopt.errors import ConfigError, PxoptError, StorageError
from pxopt.search.storage import open_storage
from pxopt.search.workers import (
    FINISHED,
    ObjectiveFactory,
    WorkerContext,
    WorkerPlan,
    count_trials,
    run_worker,
    stderr_log,
)


@dataclass
class RunSummary:
    """What a run did; `interrupted` runs print `resume_hint`."""

    n_workers: int
    trials_before: int
    trials_after: int
    interrupted: bool = False
    exit_codes: list[int] = field(default_factory=list)
    resume_hint: str | None = None


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
    log = log or stderr_log
    storage = open_storage(plan.storage, heartbeat_interval=None)
    try:
        study = optuna.load_study(study_name=plan.study_name, storage=storage, sampler=optuna.samplers.RandomSampler())
    except KeyError as exc:
        raise StorageError(f"study {plan.study_name!r} does not exist in the storage") from exc
    before = count_trials(study, FINISHED)
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
    summary.trials_after = count_trials(study, FINISHED)
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
                done = count_trials(study, FINISHED)
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
