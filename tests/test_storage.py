"""Storage: paths and URLs, SQLite settings, clear errors, the model/task guard, PostgreSQL."""

from __future__ import annotations

import sqlite3
import time

import optuna
import pytest
from fixtures_pg import pg_server, pg_url  # noqa: F401

from pxopt.errors import StorageError
from pxopt.search.storage import (
    ATTR_MODEL,
    ATTR_TASK_DIGEST,
    digest,
    open_storage,
    open_study,
    redact,
    storage_url,
)

TASK = {"dataset": "fashion-mnist", "classes": [0, 1, 2], "n_ref": 2, "seed": 0}


def test_path_becomes_absolute_sqlite_url(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage_url("runs/a.db") == f"sqlite:///{tmp_path}/runs/a.db"
    assert storage_url("sqlite:///x.db") == "sqlite:///x.db"
    with pytest.raises(StorageError, match="directory"):
        storage_url(tmp_path)
    with pytest.raises(StorageError, match="empty"):
        storage_url("  ")


def test_bare_postgresql_url_gets_an_installed_driver():
    url = storage_url("postgresql://u:pw@db.example:5432/pxopt")
    assert url.startswith(("postgresql+psycopg://", "postgresql+psycopg2://"))
    assert url.endswith("u:pw@db.example:5432/pxopt")
    assert redact(url).endswith("u:***@db.example:5432/pxopt")


def test_sqlite_file_is_created_in_wal_mode_with_parent_folders(tmp_path):
    path = tmp_path / "deep" / "dir" / "s.db"
    storage = open_storage(path, heartbeat_interval=None)
    optuna.create_study(storage=storage, study_name="s")
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with storage.engine.connect() as conn:  # settings apply to Optuna's own connections too
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 30_000


def test_heartbeat_and_retry_callback_are_configured(tmp_path):
    storage = open_storage(tmp_path / "h.db", heartbeat_interval=5, grace_period=11, max_retry=2)
    assert storage.heartbeat_interval == 5 and storage.grace_period == 11
    assert isinstance(storage.heartbeat_stale_trial_callback, optuna.storages.RetryHeartbeatStaleTrialCallback)
    off = open_storage(tmp_path / "h.db", heartbeat_interval=None)
    assert off.heartbeat_interval is None and off.heartbeat_stale_trial_callback is None
    with pytest.raises(StorageError, match="heartbeat"):
        open_storage(tmp_path / "h.db", heartbeat_interval=0)


@pytest.mark.parametrize(
    ("url", "pattern"),
    [
        ("postgresql://pxopt:secret@127.0.0.1:1/nodb", r"cannot open storage .*127\.0\.0\.1:1.*refused"),
        ("mysql://pxopt:secret@127.0.0.1:1/nodb", r"no database driver .*MySQLdb"),
        ("nosuchdb://pxopt:secret@host/x", r"cannot open storage .*nosuchdb"),
        ("postgresql://pxopt:secret@[::1/x", r"invalid storage URL|cannot open storage"),
    ],
)
def test_unreachable_or_unusable_url_is_one_line_without_password(url, pattern):
    start = time.monotonic()
    with pytest.raises(StorageError, match=pattern) as info:
        open_storage(url)
    message = str(info.value)
    assert "\n" not in message and "secret" not in message
    assert time.monotonic() - start < 15


def test_study_pins_model_and_task(tmp_path):
    storage = open_storage(tmp_path / "g.db", heartbeat_interval=None)
    study = open_study(storage, "s", model_spec="builtin:fmnist-resnet", task=TASK)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    assert study.user_attrs[ATTR_MODEL] == "builtin:fmnist-resnet"
    assert study.user_attrs[ATTR_TASK_DIGEST] == digest(TASK)

    resumed = open_study(storage, "s", model_spec="builtin:fmnist-resnet", task=dict(TASK))
    assert len(resumed.trials) == 2
    with pytest.raises(StorageError, match="created for model 'builtin:fmnist-resnet', not 'builtin:fmnist-vgg'"):
        open_study(storage, "s", model_spec="builtin:fmnist-vgg", task=TASK)
    with pytest.raises(StorageError, match=r"another task \(n_ref: stored 2, now 3\)"):
        open_study(storage, "s", model_spec="builtin:fmnist-resnet", task={**TASK, "n_ref": 3})
    with pytest.raises(StorageError, match="direction"):
        open_study(storage, "s", model_spec="builtin:fmnist-resnet", task=TASK, direction="minimize")
    # refusing left the study and its trials untouched
    again = optuna.load_study(study_name="s", storage=storage)
    assert [t.value for t in again.trials] == [t.value for t in study.trials]
    assert again.user_attrs[ATTR_MODEL] == "builtin:fmnist-resnet"


def test_foreign_study_with_trials_is_refused(tmp_path):
    storage = open_storage(tmp_path / "f.db", heartbeat_interval=None)
    foreign = optuna.create_study(storage=storage, study_name="other", direction="maximize")
    foreign.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    with pytest.raises(StorageError, match="not made by pxopt"):
        open_study(storage, "other", model_spec="m", task=TASK)


def test_user_attrs_are_stored_as_json_not_pickles(tmp_path):
    path = tmp_path / "j.db"
    study = open_study(open_storage(path, heartbeat_interval=None), "s", model_spec="m", task=TASK)
    study.optimize(lambda t: (t.set_user_attr("curve", {"rates": [0.0, 0.5]}), 1.0)[1], n_trials=1)
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT value_json FROM trial_user_attributes").fetchall()
        rows += conn.execute("SELECT value_json FROM study_user_attributes").fetchall()
    assert rows and all(isinstance(v, str) for (v,) in rows)
    assert '{"rates": [0.0, 0.5]}' in [v for (v,) in rows]


def test_postgresql_storage_roundtrip(pg_url):  # noqa: F811
    storage = open_storage(pg_url, heartbeat_interval=1)
    study = open_study(storage, "pg", model_spec="m", task=TASK)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    again = open_study(open_storage(pg_url), "pg", model_spec="m", task=TASK)
    assert [t.params for t in again.trials] == [t.params for t in study.trials]
    with pytest.raises(StorageError, match="created for model"):
        open_study(open_storage(pg_url), "pg", model_spec="other", task=TASK)


def test_postgresql_wrong_database_is_one_line(pg_server):  # noqa: F811
    with pytest.raises(StorageError, match='database "nope" does not exist'):
        open_storage(pg_server.url("nope"))
