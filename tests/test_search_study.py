"""Studies with a fake evaluator: baselines, pruning, resume, failures, spec files."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from search_fakes import FakeEvaluator

from pxopt.errors import ConfigError, StorageError
from pxopt.search import StudySpec, baseline_trials, run_search
from pxopt.search.spec import DEFAULT_RATES


def _spec(tmp_path: Path, **kw) -> StudySpec:
    base = dict(name="t", storage=str(tmp_path / "s.db"), trials=12, seed=3,
                pruner={"name": "median", "n_startup_trials": 3, "n_warmup_steps": 2})
    base.update(kw)
    return StudySpec(**base).validated()


def test_search_runs_baselines_first_and_records_attrs(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    ev = FakeEvaluator(spec.rates)
    result = run_search(spec, ev, timings=lambda: ev.last_timings)
    trials = result.study.trials
    assert [t.user_attrs.get("baseline") for t in trials[:2]] == ["all-epsilon", "faithful"]
    assert len(result.study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))) == 12
    best = result.study.best_trial
    assert best.value == pytest.approx(best.user_attrs["curve"]["area"])
    assert best.user_attrs["rules"]["format"] == "pxopt.rules/1"
    assert set(best.user_attrs["timings"]) >= {"total_s", "attribution_s", "curve_s"}
    assert best.user_attrs["versions"]["optuna"] == optuna.__version__
    base = baseline_trials(result.study)
    assert best.value >= base["all-epsilon"].value
    # intermediate values are the partial areas, the last one equals the final area
    full = base["all-epsilon"]
    assert max(full.intermediate_values) == len(spec.rates) - 1
    assert full.intermediate_values[len(spec.rates) - 1] == pytest.approx(full.value)


def test_pruner_stops_hopeless_trials(tmp_path: Path) -> None:
    spec = _spec(tmp_path, trials=25, sampler={"name": "random"})
    ev = FakeEvaluator(spec.rates)
    study = run_search(spec, ev).study
    pruned = study.get_trials(states=(TrialState.PRUNED,))
    assert pruned, "median pruner never stopped a trial"
    assert study.best_trial.state == TrialState.COMPLETE
    for t in pruned:
        assert "curve" not in t.user_attrs  # no area from a partial curve
        assert len(t.user_attrs["partial_curve"]["accuracies"]) < len(spec.rates)


def test_resume_continues_without_replay(tmp_path: Path) -> None:
    spec = _spec(tmp_path, trials=6, sampler={"name": "random"})
    study1 = run_search(spec, FakeEvaluator(spec.rates)).study
    first = [t.params for t in study1.trials]
    result = run_search(spec.with_overrides(trials=10), FakeEvaluator(spec.rates))
    trials = result.study.trials
    assert len(trials) == 10 and result.n_new_trials == 4
    assert [t.params for t in trials[:6]] == first
    new = [t.params for t in trials[6:]]
    assert all(p not in first[2:] for p in new)  # seeds offset: no replay of old samples
    # already complete: a rerun adds nothing
    assert run_search(spec.with_overrides(trials=10), FakeEvaluator(spec.rates)).n_new_trials == 0


def test_same_name_other_model_is_refused(tmp_path: Path) -> None:
    spec = _spec(tmp_path, trials=2)
    run_search(spec, FakeEvaluator(spec.rates))
    with pytest.raises(StorageError, match="model"):
        run_search(spec.with_overrides(model="builtin:fmnist-vgg"), FakeEvaluator(spec.rates))


def test_nan_fails_trial_and_study_goes_on(tmp_path: Path) -> None:
    spec = _spec(tmp_path, trials=8, sampler={"name": "random"}, baselines=False,
                 pruner={"name": "none"})
    ev = FakeEvaluator(spec.rates, nan_if_epsilon_below=1e-4)
    study = run_search(spec, ev).study
    failed = study.get_trials(states=(TrialState.FAIL,))
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert failed and done
    assert all("NonFiniteRelevanceError" in t.user_attrs["fail_reason"] for t in failed)


def test_unreachable_storage_is_a_storage_error(tmp_path: Path) -> None:
    spec = _spec(tmp_path, storage="postgresql://nobody@127.0.0.1:1/none")
    with pytest.raises(StorageError):
        run_search(spec, FakeEvaluator(spec.rates))


def test_spec_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "x.toml"
    path.write_text(
        '[study]\nname = "x"\ntrials = 3\n[model]\nspec = "builtin:fmnist-vgg"\n'
        '[task]\nclasses = 3\nn_ref = 2\nseed = 5\n[prune]\nrates = [0.0, 0.5]\n'
        '[space.low]\nrules = ["epsilon"]\n'
    )
    spec = StudySpec.from_toml(path)
    assert (spec.name, spec.model, spec.classes, spec.task_seed) == ("x", "builtin:fmnist-vgg", 3, 5)
    assert spec.rates == [0.0, 0.5] and spec.space == {"low": {"rules": ["epsilon"]}}


@pytest.mark.parametrize(
    "text, field",
    [
        ("[study]\ntrials = 0\n", "study.trials"),
        ("[prune]\nrates = [0.5, 0.2]\n", "increasing"),
        ("[prune]\nrates = [0.0, 1.2]\n", r"\[0, 1\)"),
        ("[prune]\ncomponents = \"rows\"\n", "prune.components"),
        ("[task]\nbogus = 1\n", "task.bogus"),
        ("[weird]\n", "weird"),
        ("[pruner]\nname = \"magic\"\n", "pruner.name"),
        ("not toml ===", "TOML"),
    ],
)
def test_bad_spec_files(tmp_path: Path, text: str, field: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=field):
        StudySpec.from_toml(path)


def test_default_rates() -> None:
    assert DEFAULT_RATES[0] == 0.0 and DEFAULT_RATES[-1] == 0.95 and len(DEFAULT_RATES) == 20


def test_a_callback_that_calls_study_stop_ends_the_search(tmp_path: Path) -> None:
    """`study.stop()` in a callback (early stopping) ends the search as in plain Optuna,
    though the worker runs `optimize` one trial at a time."""
    spec = _spec(tmp_path, trials=20, sampler={"name": "random"}, pruner={"name": "none"})
    seen: list[int] = []

    def stop_after_five(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        seen.append(trial.number)
        if len(seen) == 5:
            study.stop()

    result = run_search(spec, FakeEvaluator(spec.rates), callbacks=[stop_after_five])
    assert len(result.study.trials) == 5 and seen == [0, 1, 2, 3, 4]
    # resuming the same study runs on (a stop ends one run, not the study)
    more = run_search(spec, FakeEvaluator(spec.rates))
    assert len(more.study.trials) == 20


def test_gp_sampler_searches_past_its_startup_trials(tmp_path: Path) -> None:
    """Optuna's GPSampler (point 3 of issue #14: the best final area at 100 trials on
    ResNet-50) runs a study through pxopt's spec, past its random start-up trials."""
    spec = _spec(tmp_path, trials=8, sampler={"name": "gp", "n_startup_trials": 4}, pruner={"name": "none"})
    study = run_search(spec, FakeEvaluator(spec.rates)).study
    assert isinstance(study.sampler, optuna.samplers.GPSampler)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 8 and len({str(t.params) for t in complete}) == 8
    with pytest.raises(ConfigError, match="sampler.name must be one of"):
        _spec(tmp_path, sampler={"name": "cmaes"})
