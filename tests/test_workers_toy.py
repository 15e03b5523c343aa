"""A tiny objective and a command line around `run_workers`, for the worker/crash tests.

Run as a script it is a real worker process that tests can kill:
`python tests/test_workers_toy.py STORAGE STUDY N_TRIALS N_WORKERS [--hang-at K] ...`.
(No tests here; pytest imports it harmlessly.)
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import optuna

from pxopt.search.pool import run_workers
from pxopt.search.workers import WorkerContext, WorkerPlan, WorkerSetup


@dataclass(frozen=True)
class ToyFactory:
    """Objective: maximise -(x - 0.3)^2, reported in 3 steps so a pruner can act.

    `hang_at`: the trial with this number writes `marker` and sleeps (to be killed);
    `nan_at` / `oom_at`: that trial returns NaN / raises an out-of-memory error;
    `ended_elsewhere_at`: that trial is failed behind its worker's back before it reports,
    as another worker's heartbeat check does when this worker's heartbeat is late.
    """

    sleep: float = 0.05
    hang_at: int | None = None
    marker: str | None = None
    nan_at: int | None = None
    oom_at: int | None = None
    seed: int = 0
    prune: bool = False
    ended_elsewhere_at: int | None = None

    def __call__(self, ctx: WorkerContext) -> WorkerSetup:
        def objective(trial: optuna.Trial) -> float:
            x = trial.suggest_float("x", -1.0, 1.0)
            trial.set_user_attr("worker", ctx.index)
            if trial.number == self.hang_at:
                if self.marker:
                    Path(self.marker).write_text(str(trial.number))
                time.sleep(3600)
            if trial.number == self.nan_at:
                return float("nan")
            if trial.number == self.oom_at:
                raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")
            if trial.number == self.ended_elsewhere_at:
                storage = trial.study._storage
                storage.set_trial_user_attr(trial._trial_id, "fail_reason", "no heartbeat (test)")
                storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
            value = -((x - 0.3) ** 2)
            for step in range(3):
                time.sleep(self.sleep / 3)
                trial.report(value * (3 - step), step)
                if self.prune and trial.should_prune():
                    raise optuna.TrialPruned()
            return value

        sampler = optuna.samplers.RandomSampler(seed=self.seed + 1000 * ctx.index)
        pruner = optuna.pruners.MedianPruner(n_startup_trials=2) if self.prune else None
        return WorkerSetup(objective=objective, sampler=sampler, pruner=pruner)


def always_nan(ctx: WorkerContext) -> WorkerSetup:
    """A broken setup: every trial fails (the worker must stop, not loop forever)."""
    return WorkerSetup(objective=lambda trial: float("nan"))


def broken_data(ctx: WorkerContext) -> WorkerSetup:
    """A worker whose task cannot be built: a user error inside a spawned process."""
    from pxopt.errors import DataError

    raise DataError(f"dataset folder '/nowhere' does not exist (worker {ctx.index})")


def _fake_cli(argv: list[str]) -> int:
    """`pxopt ...` with the search tests' fake pipeline; the Nth evaluation hangs.

    Env: PXOPT_TEST_HANG_AT (0-based evaluation index to hang at), PXOPT_TEST_MARKER.
    """
    import os

    from search_fakes import FakePipeline

    import pxopt.pipeline
    from pxopt.cli import main as cli_main

    hang_at = int(os.environ.get("PXOPT_TEST_HANG_AT", "-1"))
    marker = os.environ.get("PXOPT_TEST_MARKER")
    calls = [0]

    class HangingFake(FakePipeline):
        def evaluate(self, rules, ranking, on_rate=None):
            calls[0] += 1
            if calls[0] - 1 == hang_at:
                if marker:
                    Path(marker).write_text("hanging")
                time.sleep(3600)
            return super().evaluate(rules, ranking, on_rate)

    pxopt.pipeline.Pipeline.from_spec = HangingFake.from_spec
    sys.argv = [sys.argv[0], *argv]  # what the resume hint is made of
    try:
        cli_main(argv)
    except SystemExit as exc:
        return 0 if exc.code is None else int(exc.code)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "cli":
        return _fake_cli(argv[1:])
    parser = argparse.ArgumentParser()
    parser.add_argument("storage")
    parser.add_argument("study")
    parser.add_argument("trials", type=int)
    parser.add_argument("workers", type=int)
    parser.add_argument("--hang-at", type=int)
    parser.add_argument("--marker")
    parser.add_argument("--sleep", type=float, default=0.05)
    parser.add_argument("--heartbeat", type=int, default=1)
    parser.add_argument("--grace", type=int, default=2)
    args = parser.parse_args(argv)
    from test_workers_toy import ToyFactory as Factory  # picklable by module name, not __main__

    plan = WorkerPlan(
        storage=args.storage, study_name=args.study, n_trials=args.trials,
        heartbeat_interval=args.heartbeat, grace_period=args.grace, device="cpu",
    )
    factory = Factory(sleep=args.sleep, hang_at=args.hang_at, marker=args.marker)
    summary = run_workers(factory, plan, args.workers, resume_hint="pxopt search --resume-test")
    return 130 if summary.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
