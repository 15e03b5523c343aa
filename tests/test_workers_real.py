"""`pxopt search --workers 4` end to end: real CLI, real model/data/LRP/pruning, real kills.

The model is the built-in Fashion-MNIST ResNet architecture loaded from a checkpoint
written here (no training), so each trial is the real objective at tiny size.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from fixtures_pg import pg_server, pg_url  # noqa: F401
from optuna.trial import TrialState

from pxopt.search.storage import open_storage

PXOPT = [sys.executable, "-c", "from pxopt.cli import main; main()"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    from pxopt.models.builtin.archs import FmnistResNet

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("real") / "resnet.pth"
    torch.save(FmnistResNet().state_dict(), path)
    return f"file:{path}@builtin:fmnist-resnet"


def _args(model: str, storage: str, study: str, trials: int, workers: int, out: Path) -> list[str]:
    return ["search", "--model", model, "--storage", storage, "--study", study, "--classes", "2",
            "--n-ref", "2", "--n-val", "4", "--rates", "0,0.25,0.5", "--trials", str(trials),
            "--workers", str(workers), "--device", "cpu", "--no-report", "--out-dir", str(out)]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PXOPT_THREADS": "1", **extra}


def _trials(storage: str, study: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=study, storage=open_storage(storage, heartbeat_interval=None)).trials


def _check_four_workers(model: str, storage: str, tmp_path: Path) -> None:
    done = subprocess.run([*PXOPT, *_args(model, storage, "w4", 8, 4, tmp_path)], capture_output=True,
                          text=True, env=_env(), timeout=580)
    assert done.returncode == 0, done.stderr[-3000:]
    trials = _trials(storage, "w4")
    assert {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
    assert 8 <= len(trials) <= 8 + 3
    assert sorted(t.number for t in trials) == list(range(len(trials)))  # none lost or doubled
    assert len({t.user_attrs["seeds"]["worker"] for t in trials}) >= 2  # several processes worked
    best = max((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    again = optuna.load_study(study_name="w4", storage=open_storage(storage))
    assert (again.best_trial.number, again.best_trial.value) == (best.number, best.value)
    assert again.best_trial.user_attrs["curve"] == best.user_attrs["curve"]
    assert f"trial {best.number}, area {best.value:.4f}" in done.stdout  # what the CLI reported


@pytest.mark.slow
def test_pxopt_search_four_workers_sqlite(checkpoint, tmp_path):
    _check_four_workers(checkpoint, str(tmp_path / "w4.db"), tmp_path)


@pytest.mark.slow
def test_pxopt_search_four_workers_postgresql(checkpoint, pg_url, tmp_path):  # noqa: F811
    _check_four_workers(checkpoint, pg_url, tmp_path)


def _kill_while_a_trial_runs(args: list[str], env: dict[str, str],
                             storage: str) -> dict[int, optuna.trial.FrozenTrial] | None:
    """Start the run, SIGKILL its whole process group once a trial with stored params runs.

    Returns None when the run finished before such a moment was seen (a fast machine can
    finish a small study between two polls); the caller then tries again on a fresh study.
    """
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    deadline = time.monotonic() + 400
    running: list[optuna.trial.FrozenTrial] = []
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
        if not Path(storage).exists():
            continue
        try:
            trials = _trials(storage, "k")
        except (KeyError, Exception):  # noqa: B014 - study not created yet
            continue
        finished = [t for t in trials if t.state.is_finished()]
        # a running trial whose params are stored: its retry must repeat them
        running = [t for t in trials if t.state == TrialState.RUNNING and t.params]
        if len(finished) >= 2 and running:
            break
    if proc.poll() is not None:
        assert proc.returncode == 0, proc.stderr.read()[-3000:] if proc.stderr else proc.returncode
        return None
    assert running, "no trial ran within 400 s"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    return {t.number: t for t in _trials(storage, "k")}


@pytest.mark.slow
def test_pxopt_search_killed_with_sigkill_is_retried_by_the_same_command(checkpoint, tmp_path):
    """Kill the whole run (parent and workers, as a machine crash would) mid-trial."""
    env = _env(PXOPT_HEARTBEAT="1")
    killed: list[optuna.trial.FrozenTrial] = []
    # A run may finish before it is caught mid-trial, or a trial may finish between our last
    # read and the kill: try again, each time on a fresh study.
    for attempt in range(4):
        storage = str(tmp_path / f"kill{attempt}.db")
        args = [*PXOPT, *_args(checkpoint, storage, "k", 8, 2, tmp_path)]
        before = _kill_while_a_trial_runs(args, env, storage)
        killed = [t for t in before.values() if t.state == TrialState.RUNNING] if before else []
        if killed:
            break
    assert killed, "four runs in a row could not be killed mid-trial"

    time.sleep(3)  # > grace period (2 x 1 s heartbeat)
    again = subprocess.run(args, capture_output=True, text=True, env=env, timeout=580)
    assert again.returncode == 0, again.stderr[-3000:]
    after = {t.number: t for t in _trials(storage, "k")}
    for dead in killed:
        assert after[dead.number].state == TrialState.FAIL
        if not dead.params:  # killed before its first suggestion: nothing to repeat
            continue
        retries = [t for t in after.values() if t.system_attrs.get("failed_trial") == dead.number]
        # the retry repeats every choice the killed trial had stored (it may have been killed
        # between two suggestions; the retry then samples the rest)
        assert len(retries) == 1 and dead.params.items() <= retries[0].params.items()
        assert retries[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    for number, old in before.items():
        if old.state.is_finished():
            new = after[number]
            assert (new.state, new.value, new.params, new.datetime_complete) == (
                old.state, old.value, old.params, old.datetime_complete)
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in after.values()) >= 8
    assert not [t for t in after.values() if t.state == TrialState.RUNNING]
