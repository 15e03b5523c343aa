"""A throw-away PostgreSQL server for tests (Debian's `postgresql` package).

`pg_server` starts one server per test session on a free localhost port, as an
unprivileged user (`initdb` refuses root: as root it runs as `postgres` through
`runuser`), with its data and unix socket in a temporary folder; `pg_url` creates a
fresh database per test and drops it afterwards. Without the binaries the tests fail
when `CI` is set (CI must exercise PostgreSQL) and skip with a reason otherwise.

Use: `from fixtures_pg import pg_server, pg_url  # noqa: F401` in a test module.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

_BIN_GLOB = "/usr/lib/postgresql/*/bin"


@dataclass(frozen=True)
class PgServer:
    host: str
    port: int
    user: str
    datadir: Path

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"


def _bin_dir() -> Path | None:
    """The newest installed PostgreSQL server binaries (Debian layout), or PATH."""
    for candidate in sorted(glob.glob(_BIN_GLOB), key=lambda p: int(Path(p).parent.name), reverse=True):
        if (Path(candidate) / "initdb").exists() and (Path(candidate) / "pg_ctl").exists():
            return Path(candidate)
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb and shutil.which("pg_ctl") else None


def _missing(reason: str) -> None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} (CI must test PostgreSQL: install Debian's postgresql package)")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _as_user(cmd: list[str]) -> list[str]:
    """Run server commands unprivileged: PostgreSQL refuses to run as root."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


class PgUnavailable(RuntimeError):
    """PostgreSQL binaries or driver missing."""


@contextmanager
def throwaway_server() -> Iterator[PgServer]:
    """Start a private PostgreSQL server (trust auth, localhost, free port); stop and delete it."""
    bindir = _bin_dir()
    if bindir is None:
        raise PgUnavailable("PostgreSQL server binaries (initdb, pg_ctl) not found")
    try:
        import psycopg2  # noqa: F401
    except ImportError as exc:
        raise PgUnavailable("psycopg2 is not installed (pip install 'pxopt[postgres]')") from exc
    root = Path(tempfile.mkdtemp(prefix="pxopt-pg-"))
    datadir = root / "data"
    if os.geteuid() == 0:
        shutil.chown(root, user="postgres", group="postgres")
    port = _free_port()
    log = root / "server.log"
    run = dict(check=True, capture_output=True, text=True, timeout=120)
    try:
        subprocess.run(
            _as_user([str(bindir / "initdb"), "-D", str(datadir), "-U", "postgres",
                      "--auth=trust", "--no-sync", "-E", "UTF8"]),
            **run,
        )
        options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100"
        subprocess.run(
            _as_user([str(bindir / "pg_ctl"), "-D", str(datadir), "-l", str(log), "-o", options,
                      "-w", "-t", "60", "start"]),
            **run,
        )
    except subprocess.CalledProcessError as exc:
        text = log.read_text() if log.exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"could not start PostgreSQL: {exc.stderr.strip()} {text[-2000:]}") from exc
    try:
        yield PgServer("127.0.0.1", port, "postgres", datadir)
    finally:
        subprocess.run(
            _as_user([str(bindir / "pg_ctl"), "-D", str(datadir), "-m", "immediate", "-w", "stop"]),
            capture_output=True, timeout=120,
        )
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    try:
        with throwaway_server() as server:
            yield server
    except PgUnavailable as exc:
        _missing(str(exc))
    except RuntimeError as exc:
        pytest.fail(str(exc))


def create_database(server: PgServer, name: str) -> str:
    """Create a database on the server; returns its URL."""
    _admin(server, f'CREATE DATABASE "{name}"')
    return server.url(name)


def _admin(server: PgServer, sql: str) -> None:
    import psycopg2

    conn = psycopg2.connect(host=server.host, port=server.port, user=server.user, dbname="postgres")
    try:
        conn.autocommit = True  # CREATE/DROP DATABASE cannot run in a transaction
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


@pytest.fixture
def pg_url(pg_server: PgServer) -> Iterator[str]:
    """URL of a fresh, empty database on the session's server, dropped after the test."""
    name = f"pxopt_{uuid.uuid4().hex[:12]}"
    _admin(pg_server, f'CREATE DATABASE "{name}"')
    try:
        yield pg_server.url(name)
    finally:
        for _ in range(5):  # workers may still be closing their connections
            try:
                _admin(pg_server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                break
            except Exception:  # noqa: BLE001
                time.sleep(1)
