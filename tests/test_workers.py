"""Many workers on one study: SQLite and a real PostgreSQL server, real processes."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from fixtures_pg import pg_server, pg_url  # noqa: F401
from optuna.trial import TrialState
from test_workers_toy import ToyFactory

from pxopt.errors import ConfigError, StorageError
from pxopt.search.pool import assign_devices, run_workers
from pxopt.search.storage import open_storage, open_study
from pxopt.search.workers import WorkerContext, WorkerPlan, WorkerSetup

TASK = {"dataset": "toy"}


def _check_shared_study(url: str, n_trials: int, n_workers: int) -> None:
    """4 processes on one study: nothing lost, no duplicates, everyone worked, best agrees."""
    open_study(open_storage(url), "many", model_spec="toy", task=TASK)
    plan = WorkerPlan(storage=url, study_name="many", n_trials=n_trials, device="cpu",
                      heartbeat_interval=1, grace_period=5)
    summary = run_workers(ToyFactory(sleep=0.3, prune=True), plan, n_workers)

    assert summary.n_workers == n_workers and summary.exit_codes == [0] * n_workers
    assert not summary.interrupted
    study = optuna.load_study(study_name="many", storage=open_storage(url, heartbeat_interval=None))
    trials = study.trials
    states = {t.state for t in trials}
    assert states <= {TrialState.COMPLETE, TrialState.PRUNED}, states
    finished = len(trials)
    assert n_trials <= finished <= n_trials + n_workers - 1  # shared budget, rare overshoot
    assert summary.trials_after == finished
    numbers = [t.number for t in trials]
    assert sorted(numbers) == list(range(finished))  # none lost, none duplicated
    assert len({t._trial_id for t in trials}) == finished
    assert len({t.user_attrs["worker"] for t in trials}) >= 2  # several processes took part
    overlapping = [
        (a.number, b.number) for a in trials for b in trials
        if a.user_attrs["worker"] != b.user_attrs["worker"]
        and a.datetime_start < b.datetime_complete and b.datetime_start < a.datetime_complete
    ]
    assert overlapping  # ... at the same time, on the same study
    assert any(t.state == TrialState.COMPLETE for t in trials)
    best = max((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    # read back through a fresh connection: the same best trial
    again = optuna.load_study(study_name="many", storage=open_storage(url, heartbeat_interval=None))
    assert again.best_trial.number == best.number
    assert again.best_trial.params == best.params and again.best_trial.value == best.value


@pytest.mark.slow
def test_four_workers_share_a_sqlite_study(tmp_path):
    _check_shared_study(f"sqlite:///{tmp_path / 'many.db'}", n_trials=16, n_workers=4)


@pytest.mark.slow
def test_four_workers_share_a_postgresql_study(pg_url):  # noqa: F811
    _check_shared_study(pg_url, n_trials=16, n_workers=4)


def test_one_worker_runs_in_process_and_resume_reaches_the_target(tmp_path):
    url = str(tmp_path / "one.db")
    open_study(open_storage(url), "one", model_spec="toy", task=TASK)
    plan = WorkerPlan(storage=url, study_name="one", n_trials=3, device="cpu")
    first = run_workers(ToyFactory(sleep=0.0), plan, 1)
    assert (first.trials_before, first.trials_after, first.exit_codes) == (0, 3, [0])
    again = run_workers(ToyFactory(sleep=0.0), plan, 1)  # budget already met: nothing to do
    assert again.trials_after == 3 and again.n_workers == 0
    more = run_workers(ToyFactory(sleep=0.0), WorkerPlan(**{**plan.__dict__, "n_trials": 5}), 1)
    assert (more.trials_before, more.trials_after) == (3, 5)


def test_bad_worker_counts_and_missing_study(tmp_path):
    url = str(tmp_path / "w.db")
    plan = WorkerPlan(storage=url, study_name="absent", n_trials=2)
    with pytest.raises(ConfigError, match="--workers must be >= 1, got 0"):
        run_workers(ToyFactory(), plan, 0)
    with pytest.raises(ConfigError, match="--trials"):
        run_workers(ToyFactory(), WorkerPlan(storage=url, study_name="absent", n_trials=0), 1)
    with pytest.raises(StorageError, match="study 'absent' does not exist"):
        run_workers(ToyFactory(), plan, 1)


def test_devices_round_robin_over_visible_gpus(monkeypatch):
    assert assign_devices(5, "auto", gpus=["2", "5"]) == [
        ("cuda:0", "2"), ("cuda:0", "5"), ("cuda:0", "2"), ("cuda:0", "5"), ("cuda:0", "2")
    ]
    assert assign_devices(2, "cpu", gpus=["0", "1"]) == [("cpu", None), ("cpu", None)]
    assert assign_devices(2, "cuda:1", gpus=["0", "1"]) == [("cuda:1", None), ("cuda:1", None)]
    assert assign_devices(2, "auto", gpus=[]) == [("auto", None), ("auto", None)]
    from pxopt.search import pool

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3, 7")
    assert pool.visible_gpus() == ["3", "7"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert pool.visible_gpus() == []


def _env_factory(ctx: WorkerContext) -> WorkerSetup:
    """Records which GPU id each worker process was given (picklable: module level).

    The record is written when the worker starts, so it exists even for a worker that
    spawned too late to get one of the few trials.
    """
    import json
    import os

    record = Path(os.environ["PXOPT_TEST_RECORD"]) / f"worker-{ctx.index}.json"
    record.write_text(json.dumps({"cvd": os.environ.get("CUDA_VISIBLE_DEVICES"), "device": ctx.device}))

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("cvd", os.environ.get("CUDA_VISIBLE_DEVICES"))
        trial.set_user_attr("device", ctx.device)
        trial.set_user_attr("worker", ctx.index)
        return float(trial.suggest_float("x", 0, 1))

    return WorkerSetup(objective, optuna.samplers.RandomSampler(seed=ctx.index))


@pytest.mark.slow
def test_each_process_sees_only_its_gpu(tmp_path, monkeypatch):
    """The env var is what CUDA reads: each spawned worker gets its own GPU id."""
    import json

    from pxopt.search import pool

    monkeypatch.setattr(pool, "visible_gpus", lambda: ["4", "6"])
    monkeypatch.setenv("PXOPT_TEST_RECORD", str(tmp_path))
    url = str(tmp_path / "gpu.db")
    open_study(open_storage(url), "g", model_spec="toy", task=TASK)
    run_workers(_env_factory, WorkerPlan(storage=url, study_name="g", n_trials=6, device="auto"), 2)
    started = {i: json.loads((tmp_path / f"worker-{i}.json").read_text()) for i in (0, 1)}
    assert started == {0: {"cvd": "4", "device": "cuda:0"}, 1: {"cvd": "6", "device": "cuda:0"}}
    trials = optuna.load_study(study_name="g", storage=open_storage(url)).trials
    seen = {(t.user_attrs["worker"], t.user_attrs["cvd"], t.user_attrs["device"]) for t in trials}
    assert seen and seen <= {(0, "4", "cuda:0"), (1, "6", "cuda:0")}


def test_spec_search_runs_baselines_and_the_real_objective_in_process(tmp_path, monkeypatch):
    """The `pxopt search --workers 1` path with the search's own Objective (fake pipeline)."""
    from search_fakes import FakePipeline

    import pxopt.pipeline
    from pxopt.search import run_search
    from pxopt.search.spec import StudySpec

    monkeypatch.setattr(pxopt.pipeline.Pipeline, "from_spec", FakePipeline.from_spec)
    spec = StudySpec(name="fake", model="builtin:tiny", trials=6, storage=str(tmp_path / "f.db"),
                     rates=[0.0, 0.2, 0.4, 0.6, 0.8])
    seen: list[int] = []
    summary = run_search(spec, workers=1, progress=seen.append)
    assert (summary.trials_before, summary.trials_after, summary.exit_codes) == (0, 6, [0])
    assert seen == sorted(seen) and seen[-1] == 6
    study = optuna.load_study(study_name="fake", storage=open_storage(tmp_path / "f.db"))
    assert study.trials[0].user_attrs["baseline"] == "all-epsilon"
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)
    assert study.best_trial.user_attrs["curve"]["rates"] == [0.0, 0.2, 0.4, 0.6, 0.8]
    assert study.user_attrs["pxopt.model"] == "builtin:tiny"
    with pytest.raises(StorageError, match="created for model 'builtin:tiny'"):
        run_search(StudySpec(name="fake", model="builtin:other", trials=6,
                             storage=str(tmp_path / "f.db")), workers=1)
    with pytest.raises(ConfigError, match="--workers must be >= 1"):
        run_search(spec, workers=0)


def test_a_user_error_in_a_worker_process_reaches_the_parent_as_one_line(tmp_path):
    from test_workers_toy import broken_data

    from pxopt.errors import DataError

    url = str(tmp_path / "e.db")
    open_study(open_storage(url), "e", model_spec="toy", task=TASK)
    plan = WorkerPlan(storage=url, study_name="e", n_trials=4, device="cpu")
    with pytest.raises(DataError, match=r"^dataset folder '/nowhere' does not exist \(worker 0\)$"):
        run_workers(broken_data, plan, 2)
    assert optuna.load_study(study_name="e", storage=open_storage(url)).trials == []


def test_no_private_optuna_function_or_module_is_used() -> None:
    # issue #16 item 11: Optuna's public API only (fail_stale_trials, record_heartbeat, ...).
    # Found from the syntax tree, so strings such as a logger's name do not count.
    import ast

    root = Path(__file__).resolve().parents[1] / "pxopt"
    used = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("optuna"):
                parts = node.module.split(".") + [a.name for a in node.names]
                used += [f"{path.name}: from {node.module} import ..." for p in parts if p.startswith("_")][:1]
            elif isinstance(node, ast.Import):
                used += [f"{path.name}: import {a.name}" for a in node.names
                         if a.name.startswith("optuna") and any(p.startswith("_") for p in a.name.split("."))]
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_"):
                base = node.value
                while isinstance(base, ast.Attribute):
                    base = base.value
                if isinstance(base, ast.Name) and base.id == "optuna":
                    used.append(f"{path.name}:{node.lineno}: optuna...{node.attr}")
    assert not used, used
