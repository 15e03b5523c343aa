"""Open the Optuna storage that several workers, machines and restarts share.

Only Optuna's RDB storage (SQLite file or any SQLAlchemy URL, e.g. PostgreSQL) is used:
it coordinates workers through the database, supports heartbeats (so a killed worker's
trial is failed and retried) and stores every attribute as JSON, so nothing is ever
unpickled from a study. This module adds what Optuna leaves to the caller: SQLite
settings that survive several local writers, atomic trial state changes on SQLite, a
one-line `StorageError` for an unreachable URL, and a guard that refuses to mix two
models or tasks in one study.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from filelock import FileLock
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from sqlalchemy import event
from sqlalchemy.engine import make_url

from pxopt.errors import StorageError

#: Seconds between heartbeats of a running trial; a trial whose heartbeat is older than
#: the grace period is failed (and retried) the next time any worker asks for a trial.
DEFAULT_HEARTBEAT_INTERVAL = 60
#: How often a trial killed by a crash is retried with the same parameters.
DEFAULT_MAX_RETRY = 3
#: Seconds a SQLite writer waits for the lock before "database is locked".
SQLITE_TIMEOUT = 60.0
#: Seconds to wait for a database server before reporting it unreachable.
CONNECT_TIMEOUT = 10

#: The trial user attribute that says why a trial failed (stale, out of memory, NaN, ...).
FAIL_REASON = "fail_reason"

#: Study user attributes that pin a study to one model and one task.
ATTR_MODEL = "pxopt.model"
ATTR_TASK_DIGEST = "pxopt.task_digest"
ATTR_TASK = "pxopt.task"
ATTR_WEIGHTS = "pxopt.weights"


def storage_url(path_or_url: str | Path) -> str:
    """A SQLAlchemy URL: URLs pass through, a plain path becomes an absolute SQLite URL.

    Absolute paths matter because workers may run in another working directory.
    """
    text = str(path_or_url).strip()
    if not text:
        raise StorageError("empty storage: give a file path (SQLite) or a database URL")
    if "://" in text:
        return _with_installed_pg_driver(text)
    path = Path(text).expanduser().resolve()
    if path.is_dir():
        raise StorageError(f"storage {text!r} is a directory: give a file such as {text}/pxopt.db")
    return f"sqlite:///{path}"


def _with_installed_pg_driver(url: str) -> str:
    """`postgresql://` with the driver that is installed.

    SQLAlchemy 2.1 maps a bare `postgresql://` to psycopg 3; pxopt's `postgres` extra
    installs psycopg2, so pick whichever is importable (psycopg 3 first).
    """
    try:
        parsed = make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError):
        return url  # reported by open_storage
    if parsed.drivername not in ("postgresql", "postgres"):
        return url
    for module, driver in (("psycopg", "postgresql+psycopg"), ("psycopg2", "postgresql+psycopg2")):
        if importlib.util.find_spec(module) is not None:
            return parsed.set(drivername=driver).render_as_string(hide_password=False)
    return url


def redact(url: str) -> str:
    """The URL with any password hidden, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a malformed URL is shown as given, minus userinfo
        return url.split("@")[-1] if "@" in url else url


def _engine_kwargs(url: str) -> dict[str, Any]:
    """Engine settings per backend: long lock waits for SQLite, timeouts and pings for servers."""
    backend = make_url(url).get_backend_name()
    if backend == "sqlite":
        return {"connect_args": {"timeout": SQLITE_TIMEOUT}}
    kwargs: dict[str, Any] = {"pool_pre_ping": True}  # searches run for hours: survive idle drops
    if backend == "postgresql" and "connect_timeout" not in make_url(url).query:
        kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT}
    return kwargs


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    """Per-connection SQLite settings: WAL lets readers run beside the one writer."""
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_TIMEOUT * 1000)}")
    finally:
        cursor.close()


def _creation_lock(url: str) -> FileLock | nullcontext:
    """For a SQLite file: the state lock file, held while the file and Optuna's tables are made.

    Two processes creating the same new database at once (a search and a reader, two
    searches) otherwise both insert Optuna's schema version ("UNIQUE constraint failed:
    alembic_version.version_num").
    """
    if not _is_sqlite_file(url):
        return nullcontext()
    database = Path(make_url(url).database)
    database.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(f"{database}.lock")


def _prepare_sqlite(url: str) -> None:
    """Create the file's folder and switch the file to WAL before Optuna's first connection.

    WAL is a property of the file, so setting it once here also covers the connections
    Optuna opens while it creates its tables.
    """
    if not _is_sqlite_file(url):
        return
    database = make_url(url).database
    Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = sqlalchemy.create_engine(url, connect_args={"timeout": SQLITE_TIMEOUT})
    event.listen(engine, "connect", _sqlite_on_connect)
    try:
        with engine.connect():
            pass
    finally:
        engine.dispose()


class SQLiteFileStorage(RDBStorage):
    """An `RDBStorage` on a SQLite file whose trial state changes are atomic across processes.

    Optuna changes a state by reading the trial `FOR UPDATE` and then writing it. SQLite
    ignores `FOR UPDATE` and pysqlite runs the read outside a write transaction, so two
    workers can both see an enqueued trial WAITING and both take it, or one worker can
    fail a trial as stale while its owner reports it COMPLETE ("Cannot tell a COMPLETE
    trial"). A lock file next to the database serialises these read-then-write steps;
    PostgreSQL and MySQL need no such lock (their `FOR UPDATE` is real).
    """

    def __init__(self, url: str, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self._state_lock: FileLock | None = None

    def state_lock(self) -> FileLock:
        """The cross-process lock held while a trial's state is read and changed (reentrant)."""
        if self._state_lock is None:  # made lazily: a FileLock does not survive pickling
            self._state_lock = FileLock(f"{make_url(self.url).database}.lock")
        return self._state_lock

    def set_trial_state_values(
        self, trial_id: int, state: TrialState, values: Sequence[float] | None = None
    ) -> bool:
        with self.state_lock():
            return super().set_trial_state_values(trial_id, state, values)

    def __getstate__(self) -> dict[Any, Any]:
        state = super().__getstate__()
        state["_state_lock"] = None
        return state


@contextmanager
def recording_stale_failures(storage: RDBStorage, reason: str) -> Iterator[list[int]]:
    """While active, a trial failed on `storage` is a stale one: it gets `fail_reason` first.

    For Optuna's public `optuna.storages.fail_stale_trials`, which fails a trial without
    a reason (and a finished trial takes no more attributes). A trial that is no longer
    RUNNING when its turn comes (its owner finished it meanwhile) is left alone; on SQLite
    the read, the reason and the write happen under the state lock. Yields the ids of the
    trials failed. Only for the thread that runs the check (Optuna's heartbeat thread
    never changes a trial's state).
    """
    plain = storage.set_trial_state_values  # the class's method, bound
    lock = storage.state_lock() if isinstance(storage, SQLiteFileStorage) else nullcontext()
    failed: list[int] = []

    def fail_with_reason(trial_id: int, state: TrialState, values: Sequence[float] | None = None) -> bool:
        if state != TrialState.FAIL:
            return plain(trial_id, state, values)
        with lock:
            if storage.get_trial(trial_id).state != TrialState.RUNNING:
                return False
            storage.set_trial_user_attr(trial_id, FAIL_REASON, reason)
            done = plain(trial_id, state, values)
        if done:
            failed.append(trial_id)
        return done

    storage.set_trial_state_values = fail_with_reason  # type: ignore[method-assign]
    try:
        yield failed
    finally:
        del storage.set_trial_state_values  # the class's method again


def orphaned_trial_ids(storage: RDBStorage, study_id: int, grace: float) -> list[int]:
    """RUNNING trials that never recorded a heartbeat and started more than `grace` seconds ago.

    A live worker records a trial's first heartbeat right after creating it (pxopt.search.workers,
    `_heartbeat_from_creation`), so such a trial's worker died in those few milliseconds.
    Optuna's `fail_stale_trials` judges only trials that have a heartbeat and would leave it
    RUNNING forever; here its start counts as its first heartbeat. (Optuna has no public query
    for a trial's heartbeat: this reads its two tables.)
    """
    query = sqlalchemy.text(
        "SELECT t.trial_id, t.datetime_start FROM trials t LEFT JOIN trial_heartbeats h "
        "ON h.trial_id = t.trial_id WHERE t.study_id = :study AND t.state = 'RUNNING' AND h.trial_id IS NULL"
    )
    with storage.engine.connect() as connection:
        rows = connection.execute(query, {"study": study_id}).all()
    now = datetime.now()  # (Optuna stamps datetime_start with the local naive time too)
    return [int(tid) for tid, start in rows
            if start is not None and (now - _as_datetime(start)).total_seconds() > grace]


def _as_datetime(value: Any) -> datetime:
    """A datetime column as SQLite returns it through a text query (a string) or as a datetime."""
    return value if isinstance(value, datetime) else datetime.fromisoformat(str(value))


def _is_sqlite_file(url: str) -> bool:
    """A SQLite database in a plain file (not in memory, not a `file:` URI)."""
    parsed = make_url(url)
    database = parsed.database or ""
    return parsed.get_backend_name() == "sqlite" and database not in ("", ":memory:") and not database.startswith("file:")


def sqlite_path(path_or_url: str | Path) -> Path | None:
    """The file of a SQLite storage (path or URL), or None for a server or in-memory database."""
    url = storage_url(path_or_url)
    try:
        return Path(make_url(url).database) if _is_sqlite_file(url) else None
    except (sqlalchemy.exc.ArgumentError, ValueError):
        return None


def check_reachable(path_or_url: str | Path) -> None:
    """Fail fast (`StorageError`) on a storage that cannot be used, without creating a file.

    A database server is connected to once; a SQLite file is left alone (it is created by
    the first `open_storage`, so a search that fails before that leaves nothing behind).
    """
    path = sqlite_path(path_or_url)
    if path is not None:
        if path.is_dir():
            raise StorageError(f"storage {str(path)!r} is a directory: give a file such as {path}/pxopt.db")
        return
    open_storage(path_or_url, heartbeat_interval=None).engine.dispose()


def require_existing(path_or_url: str | Path) -> None:
    """Refuse (`StorageError`) a SQLite storage whose file does not exist (opening would create it)."""
    path = sqlite_path(path_or_url)
    if path is not None and not path.is_file():
        raise StorageError(f"no study file {str(path)!r}: check the path, or run `pxopt search` first")


def _short_reason(exc: BaseException) -> str:
    """The first meaningful line of a driver error (drivers add SQL and links below it)."""
    orig = getattr(exc, "orig", None) or exc
    lines = [line.strip() for line in str(orig).splitlines() if line.strip()]
    return lines[0] if lines else type(orig).__name__


def open_storage(
    path_or_url: str | Path,
    *,
    heartbeat_interval: int | None = DEFAULT_HEARTBEAT_INTERVAL,
    grace_period: int | None = None,
    max_retry: int | None = DEFAULT_MAX_RETRY,
) -> RDBStorage:
    """Open (creating if needed) an Optuna RDB storage shared by all workers.

    `heartbeat_interval` (seconds) makes every running trial record a heartbeat; a trial
    silent for `grace_period` (default 2 x interval) is marked FAIL and, up to `max_retry`
    times, queued again with the same parameters (`RetryHeartbeatStaleTrialCallback`).
    `heartbeat_interval=None` turns this off. Raises `StorageError` with one line when the
    URL is malformed, its driver is missing or the database cannot be reached.
    """
    url = storage_url(path_or_url)
    shown = redact(url)
    try:
        parsed = make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError) as exc:
        raise StorageError(
            f"invalid storage URL {shown!r}: use a file path or e.g. postgresql://user@host/db"
        ) from exc
    if heartbeat_interval is not None and heartbeat_interval < 1:
        raise StorageError(f"heartbeat interval must be >= 1 second, got {heartbeat_interval}")
    callback = None
    if heartbeat_interval is not None and (max_retry is None or max_retry > 0):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            callback = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
    try:
        with _creation_lock(url), warnings.catch_warnings():
            if parsed.get_backend_name() == "sqlite":
                _prepare_sqlite(url)
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage_class = SQLiteFileStorage if _is_sqlite_file(url) else RDBStorage
            storage = storage_class(
                url,
                engine_kwargs=_engine_kwargs(url),
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                heartbeat_stale_trial_callback=callback,
            )
    except ImportError as exc:
        missing = getattr(exc.__cause__, "name", None) or "its driver"
        raise StorageError(
            f"no database driver for storage {shown!r} ({missing} is not installed; "
            "PostgreSQL: pip install 'pxopt[postgres]')"
        ) from exc
    except (sqlalchemy.exc.SQLAlchemyError, OSError) as exc:
        raise StorageError(f"cannot open storage {shown!r}: {_short_reason(exc)}") from exc
    except RuntimeError as exc:  # Optuna's schema-version check
        raise StorageError(f"storage {shown!r} is not usable: {_short_reason(exc)}") from exc
    if parsed.get_backend_name() == "sqlite":
        event.listen(storage.engine, "connect", _sqlite_on_connect)
        storage.engine.dispose()  # later connections get the listener's settings
    return storage


def digest(obj: Any) -> str:
    """A stable short hash of a JSON-serialisable value (task descriptions, configs)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def open_study(
    storage: RDBStorage,
    study_name: str,
    *,
    model_spec: str,
    task: dict[str, Any],
    direction: str = "maximize",
    sampler: optuna.samplers.BaseSampler | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
) -> optuna.Study:
    """Create or resume `study_name`, refusing a study made for another model or task.

    The model spec and a digest of the task description are stored in the study's user
    attributes on creation and compared on every resume, so two searches can never mix
    their trials by reusing a name.
    """
    if not study_name or not study_name.strip():
        raise StorageError("empty study name")
    try:
        study = optuna.create_study(
            storage=storage,
            study_name=study_name,
            direction=direction,
            sampler=sampler,
            pruner=pruner,
            load_if_exists=True,
        )
    except sqlalchemy.exc.SQLAlchemyError as exc:
        raise StorageError(f"cannot open study {study_name!r}: {_short_reason(exc)}") from exc
    wanted_direction = optuna.study.StudyDirection[direction.upper()]
    if study.directions != [wanted_direction]:
        raise StorageError(
            f"study {study_name!r} exists with direction(s) "
            f"{[d.name.lower() for d in study.directions]}, not {direction!r}: use another --study name"
        )
    check_study_identity(study, model_spec=model_spec, task=task)
    return study


def pin_study_attrs(study: optuna.Study, attrs: Mapping[str, Any]) -> None:
    """Store facts about the model and task with the study, refusing other weights on resume.

    The model spec alone does not pin the network (a retrained built-in or an edited
    checkpoint keeps its spec), so the weights' fingerprint must match the stored one.
    """
    stored = study.user_attrs.get(ATTR_WEIGHTS)
    wanted = attrs.get(ATTR_WEIGHTS)
    if stored is not None and wanted is not None and stored != wanted:
        raise StorageError(
            f"study {study.study_name!r} was made with other weights of model "
            f"{study.user_attrs.get(ATTR_MODEL)!r} (fingerprint {stored}, now {wanted}; the model was "
            "retrained or its checkpoint changed): use another --study name"
        )
    for key, value in attrs.items():
        study.set_user_attr(key, value)


def check_study_identity(study: optuna.Study, *, model_spec: str, task: dict[str, Any]) -> None:
    """Pin a new study to (model, task), or raise `StorageError` if it was made for others."""
    task_digest = digest(task)
    attrs = study.user_attrs
    if ATTR_MODEL not in attrs:
        if study.trials and ATTR_TASK_DIGEST not in attrs:
            raise StorageError(
                f"study {study.study_name!r} already has {len(study.trials)} trials not made by "
                "pxopt: use another --study name"
            )
        study.set_user_attr(ATTR_MODEL, model_spec)
        study.set_user_attr(ATTR_TASK_DIGEST, task_digest)
        study.set_user_attr(ATTR_TASK, task)
        attrs = study.user_attrs  # re-read: a concurrent creator may have won the race
    if attrs.get(ATTR_MODEL) != model_spec:
        raise StorageError(
            f"study {study.study_name!r} was created for model {attrs.get(ATTR_MODEL)!r}, not "
            f"{model_spec!r}: use another --study name (trials of different models never mix)"
        )
    if attrs.get(ATTR_TASK_DIGEST) != task_digest:
        stored = attrs.get(ATTR_TASK)
        if isinstance(stored, dict):
            keys = sorted(k for k in {*stored, *task} if stored.get(k) != task.get(k))
            what = "; ".join(f"{k}: stored {stored.get(k)!r}, now {task.get(k)!r}" for k in keys[:3])
        else:
            what = f"digest {attrs.get(ATTR_TASK_DIGEST)}, now {task_digest}"
        raise StorageError(
            f"study {study.study_name!r} was created for another task ({what}): use another "
            "--study name or the same task settings"
        )
