"""The paper-comparison benchmark (benchmarks/results.py): splits, statistics, table, and a reduced run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from bench_modules import load_benchmark

from pxopt.data import TensorSet
from pxopt.errors import ConfigError, DataError

R = load_benchmark("results")


def test_split_per_class_is_disjoint_and_balanced() -> None:
    labels = torch.tensor([0] * 5 + [3] * 5 + [7] * 5)
    images = torch.arange(15, dtype=torch.float32).view(15, 1, 1, 1)  # image value = its index
    first, rest = R.split_per_class(TensorSet(images, labels), 2)
    assert torch.bincount(first.labels).tolist()[::1] == [2, 0, 0, 2, 0, 0, 0, 2]
    assert torch.bincount(rest.labels).tolist() == [3, 0, 0, 3, 0, 0, 0, 3]
    ids_first = set(first.images.flatten().tolist())
    ids_rest = set(rest.images.flatten().tolist())
    assert not ids_first & ids_rest
    assert ids_first | ids_rest == set(range(15))
    # labels stay attached to their images
    assert all(labels[int(i)] == y for i, y in zip(rest.images.flatten(), rest.labels, strict=True))


def test_split_per_class_refuses_too_few_images() -> None:
    labels = torch.tensor([0, 0, 1])
    with pytest.raises(DataError, match="class 1"):
        R.split_per_class(TensorSet(torch.zeros(3, 1, 1, 1), labels), 1)


def test_mean_se() -> None:
    mean, se = R.mean_se([0.5, 0.7, 0.9])
    assert mean == pytest.approx(0.7)
    assert se == pytest.approx(0.2 / math.sqrt(3))
    assert math.isnan(R.mean_se([0.4])[1])


def _fake_results(complete: bool = True) -> dict:
    rates = [0.0, 0.5]
    per_seed = {
        "1": {"optimised": {"area": 0.8, "top_pr": 0.5, "accuracies": [0.9, 0.7]},
              "random": {"area": 0.6, "top_pr": 0.0, "accuracies": [0.9, 0.3]}},
        # a run saved before the area had one name ("area_normalised") reads the same
        "2": {"optimised": {"area_normalised": 0.9, "top_pr": 0.5, "accuracies": [0.9, 0.9]},
              "random": {"area_normalised": 0.5, "top_pr": 0.0, "accuracies": [0.9, 0.1]}},
    }
    summary = R.summarise(per_seed, R.CRITERIA)
    settings = R.Settings(models=("resnet",), tasks=(3,), seeds=2, rates=rates)
    return {
        "format": R.RESULTS_FORMAT, "complete": complete, "command": "python benchmarks/results.py --quick",
        "machine": "test", "settings_used": settings.to_dict(), "errors": {}, "wall_seconds": 12.0,
        "settings": {"resnet-conv-3cls": {
            "model": "resnet", "components": "conv", "n_classes": 3, "class_names": ["a", "b", "c"],
            "summary": summary, "per_seed": per_seed,
            "search": {"baseline": None, "trial": 3, "search_area": 0.85, "n_complete": 3,
                       "n_pruned": 1, "n_failed": 0, "seconds": 5.0}}},
    }


def test_summary_and_table(tmp_path: Path) -> None:
    results = _fake_results(complete=False)
    sm = results["settings"]["resnet-conv-3cls"]["summary"]
    assert set(sm) == {"optimised", "random"}  # criteria without runs are left out, not zero
    assert sm["optimised"]["area_mean"] == pytest.approx(0.85)
    assert sm["random"]["curve_mean"] == pytest.approx([0.9, 0.2])
    assert sm["random"]["curve_se"][1] == pytest.approx(0.1)  # std(0.3, 0.1) / sqrt(2)
    R.write_outputs(results, tmp_path, png=False)
    md = (tmp_path / "paper_comparison.md").read_text()
    assert "PARTIAL" in md and "never saw" in md
    assert "| optimised | 0.850 ± 0.050 |" in md
    assert "best = trial 3, area 0.850 on the search split" in md
    assert "| random | 0% ± 0% |" in md
    saved = json.loads((tmp_path / "paper_comparison.json").read_text())
    assert [row["criterion"] for row in saved["table"]] == ["optimised", "random"]
    assert (tmp_path / "paper_comparison.html").stat().st_size > 1000


def test_settings_reject_unknown_model() -> None:
    with pytest.raises(ConfigError, match="unknown model"):
        R.Settings(models=("alexnet",)).validated()


def test_baselines_rank_by_their_own_aggregation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each baseline is ranked as `pxopt baselines` ranks it (its scores' default: the
    reference's "token-abs" for LRP criteria on ViT components, |score| otherwise), the
    optimised rules by the searched ranking; each run records the aggregation it used."""
    from types import SimpleNamespace

    from pxopt.scores import ComponentScores

    seen: list[tuple[str, str | None]] = []
    one = {"fc1": torch.ones(2)}

    class Pipe:
        def scores(self, rules: dict) -> ComponentScores:
            return ComponentScores(abs=one, signed=one, criterion="lrp", token_abs=one, default_ranking="token-abs")

        def criterion_scores(self, name: str, **_: object) -> ComponentScores:
            lrp = name in ("lrp-epsilon", "yeom-zplus")
            return ComponentScores(abs=one, signed=one, criterion=name, token_abs=one if lrp else None,
                                   default_ranking="token-abs" if lrp else "abs")

        def curve(self, scores: ComponentScores, ranking: str | None) -> SimpleNamespace:
            seen.append((scores.criterion, ranking))
            return SimpleNamespace(area=0.5, top_pr=0.1, accuracies=[0.9, 0.1])

    monkeypatch.setattr(R, "pipeline_for", lambda *_: Pipe())
    monkeypatch.setattr(R, "eval_task", lambda *_: None)
    s = R.Settings(criteria=("optimised", "lrp-epsilon", "yeom-zplus", "weight-norm"))
    out = R.evaluate_seed(SimpleNamespace(kind="mlp"), {"rules": {}, "ranking": "signed"}, 1, s)
    assert seen == [("lrp", "signed"), ("lrp-epsilon", None), ("yeom-zplus", None), ("weight-norm", None)]
    assert {k: v["ranking"] for k, v in out.items()} == {
        "optimised": "signed", "lrp-epsilon": "token-abs", "yeom-zplus": "token-abs", "weight-norm": "abs"}


def test_settings_record_the_grouping() -> None:
    from pxopt.layers import discover_layers
    from pxopt.models.builtin.archs import FmnistResNet

    rec = R.grouping_record(discover_layers(FmnistResNet()))
    assert rec["grouping"] == {"grouping": "stage", "stage_rule": "resnet"}
    assert rec["layer_groups"]["mid"] == ["layer2.0.conv1", "layer2.0.conv2", "layer2.0.downsample.0"]


@pytest.mark.slow
def test_reduced_run_on_builtin_resnet(tmp_path: Path) -> None:
    """Reduced form of the full run: real built-in ResNet, 2 trials, 2 seeds, one task."""
    s = R.Settings.quick(models=("resnet",), tasks=(3,), trials=2, seeds=2, out_dir=tmp_path / "out",
                         work_dir=tmp_path / "work", val_search=18, val_eval=24)
    results = R.run(s, command="test", log=lambda _msg: None, png=False)
    assert results["complete"], results["errors"]
    rec = results["settings"]["resnet-conv-3cls"]
    assert rec["search"]["n_trials"] >= 2
    spread = rec["search"]["complete_areas"]
    assert spread["min"] <= spread["median"] <= spread["max"] == pytest.approx(rec["search"]["search_area"])
    assert set(rec["search"]["baseline_areas"]) == {"all-epsilon", "faithful"}  # the two enqueued trials
    assert rec["grouping"]["grouping"] == "stage" and "layer2.0.conv1" in rec["layer_groups"]["mid"]
    assert rec["held_out_validation_images"] == 3 * 8
    assert sorted(rec["per_seed"]) == ["1", "2"]
    assert list(rec["summary"]) == list(R.CRITERIA)
    for name, sm in rec["summary"].items():
        assert sm["n_seeds"] == 2, name
        for key in ("area_mean", "area_se", "top_pr_mean", "top_pr_se"):
            assert math.isfinite(sm[key]), (name, key)
        assert 0.0 <= sm["area_mean"] <= 1.0
        assert len(sm["curve_mean"]) == len(s.rates)
    # the built-in model is trained: unpruned accuracy well above chance on the held-out images
    assert rec["summary"]["random"]["curve_mean"][0] > 0.6
    saved = json.loads((tmp_path / "out" / "paper_comparison.json").read_text())
    assert len(saved["table"]) == len(R.CRITERIA)
    assert "held-out" in saved["note"] or "held out" in saved["note"]


def test_paired_comparison_matches_scipy() -> None:
    from scipy import stats

    a = [0.52, 0.55, 0.50, 0.58, 0.53]
    b = [0.42, 0.44, 0.43, 0.41, 0.45]
    p = R.paired_comparison(a, b)
    d = [x - y for x, y in zip(a, b, strict=True)]
    mean = sum(d) / 5
    sd = math.sqrt(sum((v - mean) ** 2 for v in d) / 4)
    half = stats.t.ppf(0.975, 4) * sd / math.sqrt(5)
    assert p["n_seeds"] == 5 and p["n_positive"] == 5 and p["n_negative"] == 0
    assert p["mean_diff"] == pytest.approx(mean)
    assert p["ci95"] == pytest.approx([mean - half, mean + half])
    assert p["t_p"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert p["wilcoxon_p"] == pytest.approx(stats.wilcoxon(d).pvalue)
    assert p["wilcoxon_p"] == pytest.approx(0.0625)  # exact: 2 / 2**5, all five differences positive


def test_paired_comparison_degenerate_cases() -> None:
    one = R.paired_comparison([0.5], [0.4])
    assert one["mean_diff"] == pytest.approx(0.1) and math.isnan(one["ci95"][0]) and math.isnan(one["t_p"])
    same = R.paired_comparison([0.5, 0.6], [0.5, 0.6])  # no difference: no test, not p = 1 by fiat
    assert same["mean_diff"] == 0.0 and math.isnan(same["t_p"]) and math.isnan(same["wilcoxon_p"])


def test_paired_row_in_table(tmp_path: Path) -> None:
    results = _fake_results()
    rec = results["settings"]["resnet-conv-3cls"]
    for seed, eps in (("1", 0.7), ("2", 0.75)):
        rec["per_seed"][seed]["lrp-epsilon"] = {"area": eps, "top_pr": 0.25, "accuracies": [0.9, 0.5]}
    rec["summary"] = R.summarise(rec["per_seed"], R.CRITERIA)
    rec["paired"] = R.paired_summary(rec["per_seed"])
    assert rec["paired"]["area"]["mean_diff"] == pytest.approx(0.125)  # (0.8-0.7 + 0.9-0.75) / 2
    assert rec["paired"]["top_pr"]["mean_diff"] == pytest.approx(0.25)
    R.write_outputs(results, tmp_path, png=False)
    md = (tmp_path / "paper_comparison.md").read_text()
    assert "| optimised − lrp-epsilon: mean [95 % CI], p (t / Wilcoxon) | +0.125 [" in md
    assert "(n 2) |" in md
    saved = json.loads((tmp_path / "paper_comparison.json").read_text())
    assert saved["paired"]["resnet-conv-3cls"]["area"]["n_seeds"] == 2


def _toy_study(values: list[float], patience: int):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    it = iter(values)
    callback = R.StopAfterNoImprovement(patience)
    study.optimize(lambda _t: next(it), n_trials=len(values), callbacks=[callback])
    return study, callback


def test_patience_stops_after_n_trials_without_improvement() -> None:
    # best at trial 2 (0.9); trials 3, 4, 5 do not improve -> stop after trial 5 with patience 3
    study, cb = _toy_study([0.1, 0.5, 0.9, 0.2, 0.9, 0.3, 0.95, 0.99], patience=3)
    assert cb.stopped and len(study.trials) == 6
    # an improvement resets the count: best at 1, 3, 5; never 3 in a row without one
    study, cb = _toy_study([0.1, 0.2, 0.1, 0.3, 0.2, 0.4, 0.1, 0.1], patience=3)
    assert not cb.stopped and len(study.trials) == 8


def test_patience_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="patience"):
        R.StopAfterNoImprovement(0)


def test_models_accept_any_builtin_name() -> None:
    assert R.model_spec("resnet") == "builtin:fmnist-resnet"
    assert R.model_spec("fmnist-vgg") == "builtin:fmnist-vgg"
    assert R.model_spec("builtin:fmnist-vit") == "builtin:fmnist-vit"
    names = R.builtin_names()
    assert R.Settings(models=tuple(names)).validated().models == tuple(names)
    assert R.Settings().trials >= 100 and R.Settings().patience == 50 and R.Settings().val_eval >= 300


def test_cli_runs_only_the_components_asked_on_an_explicit_grid(tmp_path: Path) -> None:
    """`--components heads --rates ...`: one kind of a ViT, on the grid given (e.g. one reaching 0.99)."""
    from typer.testing import CliRunner

    args = ["--models", "vit", "--tasks", "3", "--components", "heads", "--rates", "0,0.3,0.6,0.9,0.99",
            "--quick", "--trials", "2", "--seeds", "2", "--val-search", "9", "--val-eval", "12",
            "--out-dir", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work"), "--no-png"]
    result = CliRunner().invoke(R.app, args)
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "out" / "paper_comparison.json").read_text())
    assert list(saved["settings"]) == ["vit-heads-3cls"]
    assert saved["settings_used"]["rates"] == [0.0, 0.3, 0.6, 0.9, 0.99]
    assert saved["settings_used"]["components"] == ["heads"]
    assert len(saved["settings"]["vit-heads-3cls"]["summary"]["random"]["curve_mean"]) == 5


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["--components", "filters"], "unknown component kind 'filters'"),
        (["--rates", "0,0.5,0.3"], "rates must be strictly increasing"),
        (["--rates", "0,0.5,1.0"], "rates must lie in [0, 1)"),
        (["--rates", "0.5"], "at least 2 points"),
        (["--rates", "0,a"], "--rates: expected"),
        (["--models", "vit", "--components", "conv"], "has none of the components ['conv']"),
    ],
)
def test_cli_refuses_bad_components_and_grids_in_one_line(tmp_path: Path, args: list[str], reason: str) -> None:
    from typer.testing import CliRunner

    result = CliRunner().invoke(R.app, [*args, "--quick", "--out-dir", str(tmp_path), "--work-dir",
                                        str(tmp_path / "w"), "--no-png"])
    assert result.exit_code == 2
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and reason in lines[0], result.output
    assert "Traceback" not in result.output


def test_patience_stops_a_pxopt_search(tmp_path: Path) -> None:
    """The callback must stop `run_search` itself (not only a plain `study.optimize`)."""
    from search_fakes import FakeEvaluator

    from pxopt.search import StudySpec, run_search

    spec = StudySpec(name="p", storage=str(tmp_path / "s.db"), trials=40, seed=1, sampler={"name": "random"},
                     pruner={"name": "none"}).validated()
    patience = R.StopAfterNoImprovement(5)
    study = run_search(spec, FakeEvaluator(spec.rates), callbacks=[patience]).study
    assert patience.stopped
    assert len(study.trials) == study.best_trial.number + 1 + 5 < 40


def test_a_resumed_protocol_search_refuses_retrained_weights(tmp_path: Path) -> None:
    """The protocol's studies resume from --work-dir; a built-in retrained with another recipe
    keeps its name, so the weights' fingerprint, not the name, decides whether trials mix."""
    import torch

    from pxopt.errors import StorageError
    from pxopt.models import load_model

    s = R.Settings.quick(models=("resnet",), tasks=(3,), trials=2, seeds=1, out_dir=tmp_path / "out",
                         work_dir=tmp_path / "work", val_search=9, val_eval=12)
    loaded = load_model(R.model_spec("resnet"), device="cpu", progress=False)
    setting = R.build_setting("resnet", "conv", 3, loaded, s)
    R.search(setting, s, log=lambda _msg: None)
    R.search(setting, s, log=lambda _msg: None)  # the same weights resume
    with torch.no_grad():
        next(loaded.model.parameters()).add_(0.01)
    with pytest.raises(StorageError, match="other weights"):
        R.search(setting, s, log=lambda _msg: None)
