"""Crashes: SIGKILL mid-trial (heartbeat + retry), Ctrl-C (clean stop, resume), OOM and NaN.

The kills are real: the worker is a separate `python` process running `run_workers`.
"""

from __future__ import annotations

import os
import re
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
from test_workers_toy import ToyFactory, always_nan

from pxopt.search.guard import CAUGHT, FAIL_REASON, INTERRUPTED, guard
from pxopt.search.pool import run_workers
from pxopt.search.storage import open_storage, open_study
from pxopt.search.workers import (
    WorkerContext,
    WorkerPlan,
    WorkerSetup,
    _requeue_interrupted,
    fail_stale_trials,
    run_worker,
)

TOY = Path(__file__).with_name("test_workers_toy.py")
TASK = {"dataset": "toy"}


def _start(url: str, study: str, trials: int, workers: int, marker: Path, hang_at: int,
           *, new_session: bool = False, sleep: float = 0.05, grace: int = 2) -> subprocess.Popen:
    cmd = [sys.executable, str(TOY), url, study, str(trials), str(workers),
           "--hang-at", str(hang_at), "--marker", str(marker), "--sleep", str(sleep),
           "--grace", str(grace)]
    env = {**os.environ, "PXOPT_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=new_session)


def _wait_for(marker: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"worker exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("worker never reached the hanging trial")
        time.sleep(0.1)


def _snapshot(trials: list[optuna.trial.FrozenTrial]) -> dict[int, tuple]:
    return {
        t.number: (t.state, t.value, t.params, t.datetime_complete, dict(t.user_attrs))
        for t in trials if t.state.is_finished()
    }


def _load(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=open_storage(url, heartbeat_interval=None)).trials


def _check_sigkill_recovery(url: str, tmp_path: Path) -> None:
    open_study(open_storage(url), "crash", model_spec="toy", task=TASK)
    marker = tmp_path / "hanging"
    proc = _start(url, "crash", trials=6, workers=1, marker=marker, hang_at=3)
    _wait_for(marker, proc)
    before = _load(url, "crash")
    assert [t.state for t in before] == [TrialState.COMPLETE] * 3 + [TrialState.RUNNING]
    hung = before[3]
    proc.send_signal(signal.SIGKILL)  # no cleanup possible: only the heartbeat can tell
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert _load(url, "crash")[3].state == TrialState.RUNNING  # nobody marked it yet

    time.sleep(4)  # grace period 2 s (+1 s clock resolution of SQLite's CURRENT_TIMESTAMP)
    plan = WorkerPlan(storage=url, study_name="crash", n_trials=6, device="cpu",
                      heartbeat_interval=1, grace_period=2)
    summary = run_workers(ToyFactory(sleep=0.0), plan, 1)  # a later run on the same study
    assert not summary.interrupted

    after = _load(url, "crash")
    assert after[3].state == TrialState.FAIL
    assert after[3].user_attrs[FAIL_REASON].startswith("no heartbeat for 2 s")
    retries = [t for t in after if t.system_attrs.get("failed_trial") == 3]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params == hung.params  # retried with the same parameters
    assert retries[0].number > 3
    snap_before, snap_after = _snapshot(before), _snapshot(after)
    assert all(snap_after[n] == snap_before[n] for n in snap_before)  # earlier trials untouched
    assert sum(t.state == TrialState.COMPLETE for t in after) == 6
    assert not [t for t in after if t.state in (TrialState.RUNNING, TrialState.WAITING)]


@pytest.mark.slow
def test_sigkill_mid_trial_is_failed_by_heartbeat_and_retried_sqlite(tmp_path):
    _check_sigkill_recovery(f"sqlite:///{tmp_path / 'crash.db'}", tmp_path)


@pytest.mark.slow
def test_sigkill_mid_trial_is_failed_by_heartbeat_and_retried_postgresql(tmp_path, pg_url):  # noqa: F811
    _check_sigkill_recovery(pg_url, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("to", ["parent", "process-group"])
def test_sigint_stops_cleanly_marks_trials_and_resumes(tmp_path, to):
    """Ctrl-C reaches the process group (terminal) or just the parent (`kill -INT`)."""
    url = f"sqlite:///{tmp_path / 'int.db'}"
    open_study(open_storage(url), "int", model_spec="toy", task=TASK)
    marker = tmp_path / "hanging"
    # a long grace period: heartbeats are not under test here, and a loaded machine can
    # delay one past 2 s, failing a live trial as stale
    proc = _start(url, "int", trials=10, workers=2, marker=marker, hang_at=4,
                  new_session=True, sleep=0.6, grace=30)
    _wait_for(marker, proc)
    before = _load(url, "int")
    if to == "parent":
        proc.send_signal(signal.SIGINT)
    else:
        os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Resume with: pxopt search --resume-test" in stderr

    after = _load(url, "int")
    assert not [t for t in after if t.state == TrialState.RUNNING]  # every running trial marked
    failed = [t for t in after if t.state == TrialState.FAIL]
    assert 4 in [t.number for t in failed]
    assert all("interrupted" in t.user_attrs[FAIL_REASON] for t in failed)
    waiting = [t for t in after if t.state == TrialState.WAITING]
    # A trial interrupted before its first suggest has no parameters to repeat: it is not
    # queued again (the resumed run samples afresh). Every other one is, exactly once.
    repeatable = sorted(t.number for t in failed if t.params)
    assert 4 in repeatable  # trial 4 hangs after its suggest
    assert sorted(t.system_attrs["failed_trial"] for t in waiting) == repeatable
    assert all(w.params == after[w.system_attrs["failed_trial"]].params for w in waiting)
    snap_before = _snapshot(before)
    assert all(_snapshot(after)[n] == snap_before[n] for n in snap_before)

    plan = WorkerPlan(storage=url, study_name="int", n_trials=10, device="cpu")
    resumed = run_workers(ToyFactory(sleep=0.0), plan, 1)  # same study, same budget
    assert resumed.trials_before == sum(t.state == TrialState.COMPLETE for t in after)
    final = _load(url, "int")
    assert sum(t.state == TrialState.COMPLETE for t in final) == 10
    redone = {t.system_attrs["failed_trial"]: t for t in final if "failed_trial" in t.system_attrs}
    assert set(redone) == set(repeatable)
    assert all(t.state == TrialState.COMPLETE and t.params == after[n].params for n, t in redone.items())
    assert sorted(t.number for t in final) == list(range(len(final)))


def test_interrupted_trials_are_queued_again_only_with_parameters(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'q.db'}")
    bare = study.ask()  # Ctrl-C before the first suggest: nothing to repeat
    bare.set_user_attr(FAIL_REASON, INTERRUPTED)
    study.tell(bare, state=TrialState.FAIL)
    _requeue_interrupted(study, bare._trial_id)
    assert not study.get_trials(states=(TrialState.WAITING,))
    running = study.ask()  # Ctrl-C outside the objective: still RUNNING, with a parameter
    x = running.suggest_float("x", 0.0, 1.0)
    running.set_user_attr("baseline", "all-epsilon")  # an enqueued baseline stays one
    running.set_user_attr("rules", {"partial": True})  # (what the run left stays behind)
    _requeue_interrupted(study, running._trial_id)
    frozen = study.trials[running.number]
    assert frozen.state == TrialState.FAIL and frozen.user_attrs[FAIL_REASON] == INTERRUPTED
    (retry,) = study.get_trials(states=(TrialState.WAITING,))
    assert retry.params == {"x": x} and retry.system_attrs["failed_trial"] == running.number
    assert retry.user_attrs == {"baseline": "all-epsilon"}


class _CtrlCDuringAsk(optuna.samplers.RandomSampler):
    """Sends SIGINT to this process while Optuna's ask() runs, before the objective starts."""

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.number == 1:
            os.kill(os.getpid(), signal.SIGINT)
        super().before_trial(study, trial)


def test_ctrl_c_during_ask_fails_the_new_trial_with_the_reason(tmp_path):
    """The interrupt is raised only once the objective starts; its trial must say why it failed."""
    url = str(tmp_path / "ask.db")
    open_study(open_storage(url), "a", model_spec="toy", task=TASK)

    def factory(ctx: WorkerContext) -> WorkerSetup:
        return WorkerSetup(objective=ToyFactory(sleep=0.0)(ctx).objective, sampler=_CtrlCDuringAsk(seed=0))

    plan = WorkerPlan(storage=url, study_name="a", n_trials=5, device="cpu", heartbeat_interval=None)
    completed = run_worker(factory, plan, WorkerContext(index=0, n_workers=1, device="cpu", threads=None))
    assert not completed
    trials = _load(url, "a")
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL]
    assert trials[1].user_attrs[FAIL_REASON] == INTERRUPTED
    assert not trials[1].params  # interrupted before its first suggest: nothing to queue again


def test_oom_and_nan_fail_only_their_trial_with_a_reason(tmp_path):
    url = str(tmp_path / "oom.db")
    open_study(open_storage(url), "o", model_spec="toy", task=TASK)
    plan = WorkerPlan(storage=url, study_name="o", n_trials=4, device="cpu")
    run_workers(ToyFactory(sleep=0.0, nan_at=1, oom_at=2), plan, 1)
    trials = _load(url, "o")
    by_number = {t.number: t for t in trials}
    assert by_number[1].state == TrialState.FAIL
    assert by_number[1].user_attrs[FAIL_REASON] == "NonFiniteRelevanceError: objective value is nan"
    assert by_number[2].state == TrialState.FAIL
    assert by_number[2].user_attrs[FAIL_REASON].startswith("out of memory: CUDA out of memory")
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 4  # the study went on
    assert FAIL_REASON not in by_number[0].user_attrs


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), "out of memory: CUDA"),
        (MemoryError("cannot allocate"), "out of memory: cannot allocate"),
        (RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory"), "out of memory"),
    ],
)
def test_guard_turns_every_oom_kind_into_a_caught_failure(error, reason):
    study = optuna.create_study()

    def objective(trial: optuna.Trial) -> float:
        raise error

    study.optimize(guard(objective), n_trials=2, catch=CAUGHT)
    assert [t.state for t in study.trials] == [TrialState.FAIL] * 2
    assert study.trials[0].user_attrs[FAIL_REASON].startswith(reason)


def test_a_bug_stops_the_worker_but_the_reason_is_recorded(tmp_path):
    study = optuna.create_study()

    def objective(trial: optuna.Trial) -> float:
        return {}["missing"]

    with pytest.raises(KeyError):
        study.optimize(guard(objective), n_trials=3)
    assert study.trials[0].state == TrialState.FAIL
    assert study.trials[0].user_attrs[FAIL_REASON] == "KeyError: 'missing'"


def test_a_trial_ended_by_another_worker_is_dropped_and_the_worker_goes_on(tmp_path, capsys):
    """A late heartbeat lets another worker fail a live trial; its owner must not crash."""
    url = str(tmp_path / "late.db")
    open_study(open_storage(url), "late", model_spec="toy", task=TASK)
    plan = WorkerPlan(storage=url, study_name="late", n_trials=4, device="cpu")
    summary = run_workers(ToyFactory(sleep=0.0, ended_elsewhere_at=1), plan, 1)
    assert not summary.interrupted
    trials = _load(url, "late")
    assert trials[1].state == TrialState.FAIL
    assert trials[1].user_attrs[FAIL_REASON] == "no heartbeat (test)"
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 4  # the study went on
    assert "trial 1 was ended by another worker" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")
def test_stale_trials_are_failed_with_the_reason_and_queued_again(tmp_path):
    url = str(tmp_path / "stale.db")
    storage = open_storage(url, heartbeat_interval=1, grace_period=1)
    study = open_study(storage, "stale", model_spec="toy", task=TASK)
    trial = study.ask({"x": optuna.distributions.FloatDistribution(-1, 1)})
    storage.record_heartbeat(trial._trial_id)
    time.sleep(2.5)  # past the grace period (+1 s resolution of SQLite's CURRENT_TIMESTAMP)
    assert fail_stale_trials(study, storage) == [trial._trial_id]
    trials = study.get_trials()
    assert trials[0].state == TrialState.FAIL
    assert trials[0].user_attrs[FAIL_REASON] == "no heartbeat for 1 s (worker killed or stalled)"
    assert trials[1].state == TrialState.WAITING and trials[1].params == trials[0].params
    assert fail_stale_trials(study, storage) == []  # failed once, queued once


def test_repeated_failures_stop_the_run_instead_of_looping(tmp_path, capsys):
    url = str(tmp_path / "nan.db")
    open_study(open_storage(url), "n", model_spec="toy", task=TASK)
    plan = WorkerPlan(storage=url, study_name="n", n_trials=3, device="cpu")
    run_workers(always_nan, plan, 1)
    trials = _load(url, "n")
    assert [t.state for t in trials] == [TrialState.FAIL] * 5
    assert "stopping after 5 failed trials in a row" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (a real CUDA OOM)")
def test_real_cuda_oom_fails_only_that_trial(tmp_path):
    study = optuna.create_study()

    def objective(trial: optuna.Trial) -> float:
        if trial.number == 0:
            total = torch.cuda.get_device_properties(0).total_memory
            torch.empty(2 * total, dtype=torch.uint8, device="cuda")  # raises OutOfMemoryError
        return float(torch.ones(4, device="cuda").sum())

    study.optimize(guard(objective), n_trials=2, catch=CAUGHT)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert study.trials[0].user_attrs[FAIL_REASON].startswith("out of memory: CUDA out of memory")


@pytest.mark.slow
def test_ctrl_c_in_pxopt_search_prints_resume_and_the_same_command_continues(tmp_path):
    """The real `pxopt search` command (fake pipeline, one in-process worker)."""
    db = tmp_path / "cli.db"
    args = ["cli", "search", "--model", "builtin:tiny", "--study", "c", "--storage", str(db),
            "--trials", "6", "--rates", "0,0.25,0.5,0.75", "--no-report", "--out-dir", str(tmp_path)]
    marker = tmp_path / "hanging"
    env = {**os.environ, "PXOPT_TEST_HANG_AT": "3", "PXOPT_TEST_MARKER": str(marker)}
    proc = subprocess.Popen([sys.executable, str(TOY), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    _wait_for(marker, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    resume = re.search(r"Resume with: (pxopt search .*)$", err, re.MULTILINE)
    assert resume and "--study c" in resume.group(1) and str(db) in resume.group(1)
    url = f"sqlite:///{db}"
    after = _load(url, "c")
    assert [t.state for t in after[:3]] == [TrialState.COMPLETE] * 3
    assert after[3].state == TrialState.FAIL and "interrupted" in after[3].user_attrs[FAIL_REASON]
    assert [t.state for t in after[4:]] == [TrialState.WAITING]

    env["PXOPT_TEST_HANG_AT"] = "-1"  # the same command again
    done = subprocess.run([sys.executable, str(TOY), *args], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    final = _load(url, "c")
    assert sum(t.state == TrialState.COMPLETE for t in final) == 6
    assert final[4].state == TrialState.COMPLETE and final[4].params == after[3].params
    assert [t.user_attrs.get("area") for t in final[:3]] == [t.user_attrs.get("area") for t in after[:3]]


def test_a_trial_has_a_heartbeat_as_soon_as_ask_returns(tmp_path):
    """A worker killed between `ask()` and its heartbeat thread's first write (seconds on a
    loaded machine with several SQLite writers) must leave a trial that stale detection can
    see: Optuna judges only trials with a heartbeat (CI saw such a trial stay RUNNING after a
    SIGKILL). pxopt records the first heartbeat inside `ask()`, in the sampler's hook."""
    from pxopt.search.workers import _heartbeat_from_creation

    storage = open_storage(str(tmp_path / "hb.db"), heartbeat_interval=1, grace_period=1)
    sampler = optuna.samplers.RandomSampler(seed=0)
    _heartbeat_from_creation(sampler, storage)
    study = optuna.create_study(storage=storage, sampler=sampler)
    trial = study.ask()  # no heartbeat thread runs: as if the worker died right here
    time.sleep(2.5)  # past the grace period (SQLite's now() has whole seconds)
    assert storage._get_stale_trial_ids(study._study_id) == [trial._trial_id]
    fail_stale_trials(study, storage)
    assert study.trials[0].state == TrialState.FAIL


def _check_orphan_recovery(url: str) -> None:
    """The few milliseconds between a trial's creation and its first heartbeat: a worker
    killed there (CI, under load) left a RUNNING trial with no heartbeat, which Optuna's stale
    detection never judges. Its start now counts as its first heartbeat; a young one is left
    alone (its worker may be about to record it)."""
    from pxopt.search.storage import orphaned_trial_ids

    storage = open_storage(url, heartbeat_interval=1, grace_period=1)
    study = optuna.create_study(storage=storage)
    dist = optuna.distributions.FloatDistribution(0.0, 1.0)
    study.enqueue_trial({"x": 0.25})
    orphan = study.ask({"x": dist})  # as `ask` leaves it: RUNNING, params stored, no heartbeat
    assert orphaned_trial_ids(storage, study._study_id, 1.0) == []  # young: its worker may be alive
    assert fail_stale_trials(study, storage) == []
    time.sleep(1.5)
    assert orphaned_trial_ids(storage, study._study_id, 1.0) == [orphan._trial_id]
    live = study.ask({"x": dist})
    storage.record_heartbeat(live._trial_id)  # a trial with a fresh heartbeat is not an orphan
    assert fail_stale_trials(study, storage) == [orphan._trial_id]
    dead = storage.get_trial(orphan._trial_id)
    assert dead.state == TrialState.FAIL and "no heartbeat ever" in dead.user_attrs[FAIL_REASON]
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == dead.number]
    assert len(retries) == 1 and retries[0].state == TrialState.WAITING and retries[0].params == {"x": 0.25}
    assert storage.get_trial(live._trial_id).state == TrialState.RUNNING


def test_a_trial_killed_before_its_first_heartbeat_is_failed_and_retried_sqlite(tmp_path):
    _check_orphan_recovery(str(tmp_path / "orphan.db"))


def test_a_trial_killed_before_its_first_heartbeat_is_failed_and_retried_postgresql(pg_url):  # noqa: F811
    _check_orphan_recovery(pg_url)
