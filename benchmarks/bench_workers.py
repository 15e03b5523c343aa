"""Storage overhead of N workers on one study: SQLite (pxopt settings) vs PostgreSQL.

Each worker process runs a near-empty objective, so the time measures Optuna's storage
round trips (ask, params, heartbeat, tell) under contention, not pxopt's LRP. Worker
start-up (importing torch) is excluded: the span is from the first trial's start to the
last trial's end, read from the storage. Any FAIL trial (e.g. "database is locked")
is counted.

    python benchmarks/bench_workers.py --workers 4 8 --trials 40 [--no-postgres]

Writes benchmarks/results/workers_storage.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the toy objective and the PostgreSQL helper

from fixtures_pg import PgUnavailable, create_database, throwaway_server  # noqa: E402
from test_workers_toy import ToyFactory  # noqa: E402

from pxopt.search.pool import run_workers  # noqa: E402
from pxopt.search.storage import open_storage, open_study  # noqa: E402
from pxopt.search.workers import WorkerPlan  # noqa: E402


def measure(url: str, name: str, n_workers: int, n_trials: int, heartbeat: int | None) -> dict:
    open_study(open_storage(url), name, model_spec="bench", task={"bench": 1})
    plan = WorkerPlan(storage=url, study_name=name, n_trials=n_trials, device="cpu",
                      heartbeat_interval=heartbeat, grace_period=None if heartbeat is None else 30)
    wall = time.perf_counter()
    run_workers(ToyFactory(sleep=0.0), plan, n_workers, log=lambda _m: None)
    wall = time.perf_counter() - wall
    trials = optuna.load_study(study_name=name, storage=open_storage(url, heartbeat_interval=None)).trials
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    span = (max(ends) - min(starts)).total_seconds()
    numbers = [t.number for t in trials]
    return {
        "workers": n_workers,
        "trials": len(trials),
        "complete": sum(t.state == TrialState.COMPLETE for t in trials),
        "failed": sum(t.state == TrialState.FAIL for t in trials),
        "duplicate_numbers": len(numbers) - len(set(numbers)),
        "heartbeat_s": heartbeat,
        "trial_span_s": round(span, 2),
        "trials_per_s": round(len(trials) / span, 1) if span > 0 else None,
        "wall_s_with_startup": round(wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--trials", type=int, default=40, help="trials in total per run")
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "workers_storage.json")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.workers:
            row = measure(f"sqlite:///{tmp}/w{n}.db", f"sqlite-{n}", n, args.trials, heartbeat=60)
            rows.append({"storage": "sqlite (WAL, 60 s timeout)", **row})
            print(rows[-1], flush=True)
        if not args.no_postgres:
            try:
                with throwaway_server() as server:
                    for n in args.workers:
                        url = create_database(server, f"bench{n}")
                        row = measure(url, f"pg-{n}", n, args.trials, heartbeat=60)
                        rows.append({"storage": "postgresql (local, fsync off)", **row})
                        print(rows[-1], flush=True)
            except PgUnavailable as exc:
                print(f"postgresql skipped: {exc}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores (shared)",
        "optuna": optuna.__version__,
        "note": "near-empty objective: storage overhead only; worker start-up excluded from trial_span_s",
        "rows": rows,
    }, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
