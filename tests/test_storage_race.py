"""Several processes taking enqueued trials from one SQLite study never take the same one.

Regression test for a CI failure with `--workers 4` ("Cannot tell a COMPLETE trial"):
Optuna marks an enqueued trial RUNNING by reading it and then writing it, which SQLite
does not make atomic; `SQLiteFileStorage` serialises the two steps with a lock file.
"""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from pxopt.search.storage import SQLiteFileStorage, open_storage

N_WORKERS = 4
N_ENQUEUED = 48


def _take_trials(url: str, start: mp.Barrier, results: mp.Queue) -> None:
    """Ask for trials until the queue is empty; report (trial number, x, error)."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.load_study(study_name="race", storage=open_storage(url, heartbeat_interval=None))
    start.wait()
    taken = []
    while True:
        trial = study.ask()
        fixed = study._storage.get_trial(trial._trial_id).system_attrs.get("fixed_params")
        if fixed is None:  # the queue is empty: Optuna made a fresh trial
            study.tell(trial, state=TrialState.FAIL)
            break
        x = trial.suggest_int("x", 0, N_ENQUEUED)
        try:
            study.tell(trial, float(x))
            taken.append((trial.number, x, None))
        except Exception as exc:  # noqa: BLE001 - the race shows up here; report, don't crash
            taken.append((trial.number, x, f"{type(exc).__name__}: {exc}"))
    results.put(taken)


def test_enqueued_trials_are_taken_once_each_by_concurrent_workers(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'race.db'}"
    storage = open_storage(url, heartbeat_interval=None)
    assert isinstance(storage, SQLiteFileStorage)
    study = optuna.create_study(study_name="race", storage=storage, direction="maximize")
    for x in range(N_ENQUEUED):
        study.enqueue_trial({"x": x})

    ctx = mp.get_context("spawn")
    start, results = ctx.Barrier(N_WORKERS), ctx.Queue()
    procs = [ctx.Process(target=_take_trials, args=(url, start, results)) for _ in range(N_WORKERS)]
    for proc in procs:
        proc.start()
    taken = [row for _ in procs for row in results.get(timeout=240)]
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0

    assert [row for row in taken if row[2] is not None] == []  # no "Cannot tell a COMPLETE trial"
    numbers = [number for number, _, _ in taken]
    assert len(numbers) == len(set(numbers)) == N_ENQUEUED  # each enqueued trial taken once
    assert sorted(x for _, x, _ in taken) == list(range(N_ENQUEUED))
    trials = optuna.load_study(study_name="race", storage=open_storage(url, heartbeat_interval=None)).trials
    assert sum(t.state == TrialState.COMPLETE for t in trials) == N_ENQUEUED
    assert not [t for t in trials if t.state in (TrialState.WAITING, TrialState.RUNNING)]


def test_sqlite_file_storage_survives_pickling(tmp_path: Path) -> None:
    """Workers are spawned with the storage pickled: the lock must be rebuilt, not copied."""
    import pickle

    storage = open_storage(tmp_path / "p.db", heartbeat_interval=None)
    with storage.state_lock():
        clone = pickle.loads(pickle.dumps(storage))
    assert clone.state_lock().lock_file == storage.state_lock().lock_file
    assert clone.state_lock() is not storage.state_lock()


def test_memory_and_server_urls_get_the_plain_storage() -> None:
    assert type(open_storage("sqlite:///:memory:", heartbeat_interval=None)) is optuna.storages.RDBStorage


def test_stale_failures_get_their_reason_and_spare_finished_trials(tmp_path: Path) -> None:
    """The hook behind `fail_stale_trials`: reason first, finished trials untouched, then undone."""
    from pxopt.search.storage import recording_stale_failures

    storage = open_storage(tmp_path / "r.db", heartbeat_interval=None)
    study = optuna.create_study(storage=storage)
    running, done = study.ask(), study.ask()
    study.tell(done, 1.0)
    with recording_stale_failures(storage, "gone quiet") as failed:
        assert storage.set_trial_state_values(done._trial_id, TrialState.FAIL) is False
        assert storage.set_trial_state_values(running._trial_id, TrialState.FAIL) is True
    assert failed == [running._trial_id]
    first, second = study.trials
    assert first.state == TrialState.FAIL and first.user_attrs["fail_reason"] == "gone quiet"
    assert second.state == TrialState.COMPLETE and second.value == 1.0
    assert "set_trial_state_values" not in vars(storage)  # the class's method again
    later = study.ask()
    study.tell(later, state=TrialState.FAIL)
    assert "fail_reason" not in study.trials[2].user_attrs


def _open_new(url: str, start: mp.Barrier, results: mp.Queue) -> None:
    """Open a storage whose file does not exist yet, at the same moment as the others."""
    start.wait()
    try:
        open_storage(url, heartbeat_interval=None)
        results.put(None)
    except Exception as exc:  # noqa: BLE001 - report the race, don't crash
        results.put(f"{type(exc).__name__}: {exc}")


@pytest.mark.slow
def test_processes_creating_one_new_sqlite_file_do_not_collide(tmp_path: Path) -> None:
    """A search and a reader (or two searches) creating the same database at once.

    Without the creation lock one of them fails with "UNIQUE constraint failed:
    alembic_version.version_num" (both insert Optuna's schema version).
    """
    ctx = mp.get_context("spawn")
    for attempt in range(3):
        url = f"sqlite:///{tmp_path / f'new{attempt}.db'}"
        start, results = ctx.Barrier(N_WORKERS), ctx.Queue()
        procs = [ctx.Process(target=_open_new, args=(url, start, results)) for _ in range(N_WORKERS)]
        for proc in procs:
            proc.start()
        errors = [results.get(timeout=240) for _ in procs]
        for proc in procs:
            proc.join(timeout=60)
        assert [e for e in errors if e is not None] == []
