"""Naming the best trial after re-scoring (pxopt.search.naming): the other draws of reference
and validation images (`other_reference`,
`Pipeline.with_other_images`), the choice, its record in the study, and `pxopt search` /
`export` / `report` following the named trial."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import optuna
import pytest
import torch
from optuna.distributions import FloatDistribution
from search_fakes import FakePipeline, run_cli
from test_heldout import _ids, _indexed
from test_search_pipeline import _tiny_cnn

from pxopt.data import make_task, other_reference
from pxopt.data.sources import Dataset, Split
from pxopt.errors import DataError, NonFiniteRelevanceError
from pxopt.export import export_trial
from pxopt.pipeline import Pipeline
from pxopt.search.naming import (
    ATTR_RESCORED,
    candidates,
    name_best,
    name_study_best,
    named_trial,
    reference_seeds,
    stored_naming,
)
from pxopt.search.study import SPEC_ATTR


# -- another reference set of the same task ---------------------------------------------------
@pytest.mark.parametrize("one_split", [False, True])
def test_other_reference_redraws_only_the_reference_images(one_split: bool) -> None:
    ds = _indexed(40, one_split=one_split)
    task = make_task(ds, n_ref=3, n_val=5, seed=7, n_heldout=15)
    other = other_reference(task, 108)
    assert torch.equal(other.validation.images, task.validation.images)
    assert torch.equal(other.heldout.images, task.heldout.images)
    assert other.classes == task.classes and torch.bincount(other.reference.labels).tolist() == [3, 3, 3]
    assert _ids(other.reference.images) != _ids(task.reference.images)
    # never a validation or held-out image, even where all come from one split
    seen = _ids(task.validation.images) | _ids(task.heldout.images) | _ids(task.reference.images)
    assert not _ids(other.reference.images) & seen
    assert other.describe()["reference_seed"] == 108 and other.describe()["heldout_hash"] == task.describe()["heldout_hash"]
    again = other_reference(make_task(ds, n_ref=3, n_val=5, seed=7, n_heldout=15), 108)
    assert torch.equal(again.reference.images, other.reference.images)


@pytest.mark.parametrize("one_split", [False, True])
def test_other_validation_is_none_of_the_tasks_images_or_the_tasks_own_where_none_are_left(one_split: bool) -> None:
    ds = _indexed(40, one_split=one_split)
    task = make_task(ds, n_ref=3, n_val=5, seed=7, n_heldout=15)
    other = other_reference(task, 108, validation=True)
    assert other.info["validation_redrawn"] and torch.bincount(other.validation.labels).tolist() == [5, 5, 5]
    new_val, new_ref = _ids(other.validation.images), _ids(other.reference.images)
    assert not new_val & (_ids(task.validation.images) | _ids(task.heldout.images) | _ids(task.reference.images))
    assert not (new_val & new_ref if one_split else set())  # one split: never an image in both roles
    assert torch.equal(other.heldout.images, task.heldout.images)
    again = other_reference(task, 108, validation=True)
    assert torch.equal(again.validation.images, other.validation.images)
    assert other.describe()["indices_hash"] != other_reference(task, 108).describe()["indices_hash"]
    # too few unused images for another validation set: the task's own, and the record says so
    tight = make_task(_indexed(20, one_split=one_split), n_ref=2, n_val=8, seed=0, n_heldout=24)
    kept = other_reference(tight, 101, validation=True)
    assert kept.info["validation_redrawn"] is False and kept.validation is tight.validation
    assert not _ids(kept.reference.images) & _ids(tight.reference.images)


def test_other_reference_decodes_only_the_new_reference_images(tmp_path: Path, monkeypatch) -> None:
    """On an image folder, another reference set costs n_ref decodes per class, not the task's
    validation and held-out images again (they are shared, not redrawn)."""
    from PIL import Image

    import pxopt.data.task as task_module

    for c in range(3):
        for j in range(20):
            path = tmp_path / f"class{c}" / f"{j}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (c * 80, j * 12, 5)).save(path)
    task = make_task(tmp_path, n_ref=2, n_val=3, seed=1, n_heldout=6)
    decoded: list[str] = []
    real = task_module.decode_image
    monkeypatch.setattr(task_module, "decode_image", lambda p: decoded.append(str(p)) or real(p))
    other = other_reference(task, 105)
    assert len(decoded) == 6 and other.validation is task.validation and other.heldout is task.heldout
    assert not {str(p) for p in decoded} & {str(task.origin.dataset.splits["all"].paths[i])
                                            for i in task.origin.used}
    assert other.describe()["indices_hash"] != task.describe()["indices_hash"]


def test_no_other_reference_set_where_the_task_used_every_image() -> None:
    ds = _indexed(20, one_split=True)
    other_reference(make_task(ds, n_ref=4, n_val=5, seed=0, n_heldout=0), 101)  # 11 per class left: fine
    for n_val, n_heldout in ((None, 0), (5, 300)):  # validation, or the held-out split, takes the rest
        task = make_task(ds, n_ref=4, n_val=n_val, seed=0, n_heldout=n_heldout)
        with pytest.raises(DataError, match="no other reference set of 4 images per class"):
            other_reference(task, 101)


def _random_dataset() -> Dataset:
    g = torch.Generator().manual_seed(3)

    def split(n: int) -> Split:
        return Split(labels=torch.arange(3).repeat_interleave(n),
                     images=torch.randint(0, 256, (3 * n, 8, 8), generator=g, dtype=torch.uint8))

    return Dataset("random8", 3, {0: "a", 1: "b", 2: "c"}, {"train": split(30), "val": split(30)})


def _pipeline() -> Pipeline:
    from pxopt.layers import discover_layers

    model = _tiny_cnn()
    task = make_task(_random_dataset(), n_ref=4, n_val=6, seed=0, n_heldout=12)
    return Pipeline(model=model, task=task, layer_map=discover_layers(model), kinds=("conv",),
                    rates=[0.0, 0.25, 0.5, 0.75], device=torch.device("cpu"), batch_size=16)


def test_pipeline_with_other_images_shares_model_and_held_out_images() -> None:
    pipe = _pipeline()
    pipe.evaluate(RULES["eps"], "abs")
    pipe.heldout_batches()
    other = pipe.with_other_images(101)
    assert other.model is pipe.model and other.task.describe()["reference_seed"] == 101
    assert other.task.info["validation_redrawn"] and other.task.heldout is pipe.task.heldout
    assert other.heldout_batches() is pipe.heldout_batches()
    assert other.task.validation.labels.tolist() == pipe.task.validation.labels.tolist()
    assert not torch.equal(other.task.validation.images, pipe.task.validation.images)
    assert other.validation_batches() is not pipe.validation_batches()
    assert not torch.equal(other.task.reference.images, pipe.task.reference.images)
    assert not other._cache and len(pipe._cache) == 1  # relevances of another reference set are its own
    a, b = pipe.evaluate(RULES["gamma"], "abs"), other.evaluate(RULES["gamma"], "abs")
    assert a.rates == b.rates and pipe.task.reference is not other.task.reference
    with pytest.raises(DataError, match="not drawn by make_task"):
        Pipeline(model=pipe.model, task=dataclasses.replace(pipe.task, origin=None), layer_map=pipe.layer_map,
                 kinds=("conv",), rates=[0.0, 0.5], device=torch.device("cpu")).with_other_images(1)


# -- the choice ---------------------------------------------------------------------------------
def _rules(rule: dict) -> dict:
    return {"format": "pxopt.rules/1", "groups": {g: dict(rule) for g in ("input", "low", "mid", "high", "fc")}}


RULES = {
    "eps": _rules({"rule": "epsilon", "epsilon": 1e-6}),
    "gamma": _rules({"rule": "gamma", "gamma": 0.25}),
    "ab": _rules({"rule": "alphabeta", "alpha": 2.0, "beta": 1.0}),
    "zplus": _rules({"rule": "zplus"}),
    "eps1": _rules({"rule": "epsilon", "epsilon": 0.5}),
}


def _study(values: dict[str, float], *, task_seed: int = 0) -> optuna.Study:
    """Complete trials with the given search values (the order of `values`), all-epsilon first."""
    study = optuna.create_study(direction="maximize")
    study.set_user_attr(SPEC_ATTR, {"task_seed": task_seed, "rescore_top": 2, "rescore_sets": 2})
    for i, (name, value) in enumerate(values.items()):
        curve = {"rates": [0.0, 1.0], "accuracies": [value, value], "top_pr": 0.0}
        attrs = {"rules": RULES[name], "ranking": "abs", "curve": curve}
        if name == "eps":
            attrs["baseline"] = "all-epsilon"
        study.add_trial(optuna.trial.create_trial(
            value=value, params={"x": float(i)}, distributions={"x": FloatDistribution(0, 10)}, user_attrs=attrs))
    return study


def test_the_highest_rescored_mean_is_named_not_the_luckiest_search_area() -> None:
    pipe = _pipeline()
    seeds = reference_seeds(0, 2)
    truth = {n: sum(pipe.with_other_images(s).evaluate(RULES[n], "abs").area for s in seeds) / 2
             for n in ("eps", "gamma", "ab", "zplus")}
    worst = min(("gamma", "ab", "zplus"), key=truth.get)
    # the trial worst on other reference sets has the best search area: the lucky one
    values = {"eps": 0.50, "gamma": 0.60, "ab": 0.61, "zplus": 0.62}
    values[worst] = 0.70
    study = _study(values)
    assert [t.number for t in candidates(study, 2)][-1] == 0  # all-epsilon re-scored beside the 2 best
    rec = name_best(study, top=2, sets=2, pipeline=pipe)
    names = [next(n for n in RULES if RULES[n] == study.trials[c["trial"]].user_attrs["rules"]) for c in rec["candidates"]]
    for c, n in zip(rec["candidates"], names, strict=True):
        assert c["mean"] == pytest.approx(truth[n], abs=1e-9)
    expect = max(names, key=truth.get)
    assert names[[c["trial"] for c in rec["candidates"]].index(rec["named"])] == expect
    assert rec["search_best"] == study.best_trial.number and rec["rescored"]
    assert named_trial(study).number == rec["named"]
    assert stored_naming(study) == rec


def test_stored_areas_are_reused_and_a_new_best_makes_the_naming_stale() -> None:
    class Counting(FakePipeline):
        calls = 0

        def __init__(self) -> None:
            from pxopt.search.spec import StudySpec

            super().__init__(StudySpec(rates=[0.0, 0.5, 1.0]))

        def with_other_images(self, seed: int) -> FakePipeline:
            Counting.calls += 1
            return super().with_other_images(seed)

    study = _study({"eps": 0.5, "gamma": 0.6, "ab": 0.55})
    first = name_best(study, top=2, sets=2, pipeline=Counting())
    n_scored = len(study.user_attrs[ATTR_RESCORED])
    assert n_scored == 3 * 2  # the 2 best and all-epsilon, on 2 sets
    assert name_study_best(study, load=lambda: pytest.fail("nothing to re-score: no model is loaded")).number \
        == first["named"]
    # a better trial arrives (a resumed search): the naming is stale, the study's best stands until renamed
    study.add_trial(optuna.trial.create_trial(
        value=0.9, params={"x": 9.0}, distributions={"x": FloatDistribution(0, 10)},
        user_attrs={"rules": RULES["zplus"], "ranking": "abs", "curve": {"rates": [0, 1], "accuracies": [.9, .9],
                                                                          "top_pr": 0.0}}))
    assert stored_naming(study) is None and named_trial(study).number == 3
    name_study_best(study, load=Counting)  # (settings from the study's spec: top 2, 2 sets)
    assert len(study.user_attrs[ATTR_RESCORED]) == n_scored + 2  # only the new trial was re-scored
    assert stored_naming(study) is not None


def test_a_candidate_failing_on_another_reference_set_is_recorded_and_never_named() -> None:
    class NanOnGamma(FakePipeline):
        def __init__(self) -> None:
            from pxopt.search.spec import StudySpec

            super().__init__(StudySpec(rates=[0.0, 0.5, 1.0]))

        def with_other_images(self, seed: int) -> FakePipeline:
            other = NanOnGamma()
            other.reference_seed = seed
            return other

        def scores(self, rules):
            if self.reference_seed is not None and rules == RULES["gamma"]:
                raise NonFiniteRelevanceError("relevances are NaN or infinite under these rules")
            return super().scores(rules)

    study = _study({"eps": 0.5, "gamma": 0.9, "zplus": 0.6})
    rec = name_best(study, top=2, sets=2, pipeline=NanOnGamma())
    gamma = next(c for c in rec["candidates"] if c["trial"] == 1)
    assert gamma["mean"] is None and "NaN" in gamma["failed"]
    assert rec["named"] != 1 and rec["search_best"] == 1


def test_no_rescoring_names_the_search_best_and_older_studies_stay_as_they_were() -> None:
    study = _study({"eps": 0.5, "gamma": 0.6})
    rec = name_best(study, top=0, sets=2, pipeline=None)
    assert rec["named"] == 1 and not rec["rescored"] and stored_naming(study) is not None
    older = _study({"eps": 0.5, "gamma": 0.6})
    older.set_user_attr(SPEC_ATTR, {"task_seed": 0})  # made before naming existed
    assert name_study_best(older, load=lambda: pytest.fail("no naming asked for")).number == 1
    with pytest.raises(ValueError):
        name_best(optuna.create_study(direction="maximize"), top=2, sets=2)


# -- pxopt search, export, report -------------------------------------------------------------
SEARCH = ["search", "--model", "builtin:tiny", "--study", "n", "--rates", "0:1:0.25", "--trials", "8"]


def test_search_names_the_best_after_rescoring_and_export_and_report_follow(fake: Path) -> None:
    before = FakePipeline.rescore_calls_total
    out = run_cli([*SEARCH, "--rescore-top", "3", "--rescore-sets", "2"])
    study = optuna.load_study(study_name="n", storage=f"sqlite:///{fake / 'studies' / 'n.db'}")
    rec = stored_naming(study)
    assert rec is not None and rec["rescored"] and len(rec["seeds"]) == 2
    n_best = min(3, len(rec["candidates"]))
    eps = " and all-epsilon" if len(rec["candidates"]) > 3 else ""
    assert f"named:  trial {rec['named']} after re-scoring the {n_best} best trials{eps} on 2 other" in out
    assert rec["other_validation"] == [True, True] and "2 other reference and validation sets" in out
    assert FakePipeline.rescore_calls_total - before == 2 * len(rec["candidates"])
    assert f"best:   trial {rec['named']}," in out
    exported = json.loads((fake / "studies" / "n-best.json").read_text())
    assert exported["trial"] == rec["named"] and exported["naming"]["named"] == rec["named"]
    assert exported["heldout"]["rows"]["optimised"]["trial"] == rec["named"]
    # pxopt export and report name the same trial without re-scoring again
    again = FakePipeline.rescore_calls_total
    out = run_cli(["export", "--study", "n", "--out", str(fake / "e.json")])
    assert json.loads((fake / "e.json").read_text())["trial"] == rec["named"]
    out = run_cli(["report", "--study", "n", "--heatmaps", "0"])
    html = (fake / "studies" / "n-report.html").read_text()
    assert f"trial {rec['named']}: area" in html and "named best" in html
    assert FakePipeline.rescore_calls_total == again
    assert export_trial(study)["trial"] == rec["named"]


def test_search_without_rescoring_names_the_search_best(fake: Path) -> None:
    before = FakePipeline.rescore_calls_total
    out = run_cli([*SEARCH, "--rescore-top", "0"])
    study = optuna.load_study(study_name="n", storage=f"sqlite:///{fake / 'studies' / 'n.db'}")
    assert "named:" not in out and FakePipeline.rescore_calls_total == before
    assert json.loads((fake / "studies" / "n-best.json").read_text())["trial"] == study.best_trial.number


def test_rescore_settings_are_checked() -> None:
    from pxopt.errors import ConfigError
    from pxopt.search.spec import StudySpec

    assert StudySpec().rescore_top == 5 and StudySpec().rescore_sets == 2
    assert StudySpec.from_dict({"study": {"rescore_top": 3, "rescore_sets": 1}}).rescore_top == 3
    with pytest.raises(ConfigError, match="study.rescore_top must be an integer >= 0"):
        StudySpec(rescore_top=-1).validated()
    with pytest.raises(ConfigError, match="rescore_sets"):
        StudySpec(rescore_sets=True).validated()
    assert "rescore_top" not in StudySpec().identity()  # naming never splits a study


def test_candidates_are_the_best_complete_trials_earliest_first_then_all_epsilon() -> None:
    study = _study({"eps": 0.80, "gamma": 0.84, "ab": 0.84, "zplus": 0.82})
    dist = {"x": FloatDistribution(0, 10)}
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED, value=0.95, params={"x": 1.0},
                                              distributions=dist))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, params={"x": 2.0},
                                              distributions=dist))
    assert [t.number for t in candidates(study, 2)] == [1, 2, 0]  # ties: the earlier; all-epsilon joins
    assert [t.number for t in candidates(study, 3)] == [1, 2, 3, 0]
    assert [t.number for t in candidates(study, 10)] == [1, 2, 3, 0]  # only complete trials


def test_one_candidate_per_rule_configuration() -> None:
    study = _study({"eps": 0.80, "gamma": 0.84, "ab": 0.83})
    dist = {"x": FloatDistribution(0, 10)}
    attrs = dict(study.trials[1].user_attrs)  # TPE proposing gamma again, a little luckier
    study.add_trial(optuna.trial.create_trial(value=0.85, params={"x": 5.0}, distributions=dist, user_attrs=attrs))
    assert [t.number for t in candidates(study, 2)] == [3, 2, 0]


def test_search_says_when_rescoring_fails_and_names_the_search_best(fake: Path, monkeypatch) -> None:
    from pxopt.errors import DataError

    def no_images(self, seed):
        raise DataError("no other reference set of 10 images per class: class 'x' has only 3")

    monkeypatch.setattr(FakePipeline, "with_other_images", no_images)
    out = run_cli([*SEARCH])
    assert "re-scoring failed (no other reference set of 10 images per class" in out
    study = optuna.load_study(study_name="n", storage=f"sqlite:///{fake / 'studies' / 'n.db'}")
    assert stored_naming(study) is None
    assert json.loads((fake / "studies" / "n-best.json").read_text())["trial"] == study.best_trial.number


def test_an_error_midway_names_nothing_and_keeps_the_areas_computed() -> None:
    from pxopt.search.spec import StudySpec

    class OutOfMemoryOnTheSecondSet(FakePipeline):
        def __init__(self) -> None:
            super().__init__(StudySpec(rates=[0.0, 0.5, 1.0]))

        def with_other_images(self, seed: int) -> FakePipeline:
            if seed == reference_seeds(0, 2)[1]:
                raise MemoryError("out of memory")
            return super().with_other_images(seed)

    study = _study({"eps": 0.5, "gamma": 0.6, "ab": 0.55})
    with pytest.raises(MemoryError):
        name_best(study, top=2, sets=2, pipeline=OutOfMemoryOnTheSecondSet())
    assert len(study.user_attrs[ATTR_RESCORED]) == 3 and stored_naming(study) is None
    assert name_study_best(study, pipeline=OutOfMemoryOnTheSecondSet()).number == study.best_trial.number


def test_the_naming_line_says_which_images_were_new() -> None:
    from pxopt.search.naming import naming_lines

    rows = [{"trial": t, "baseline": None, "search_area": 0.5, "areas": [0.5, 0.5], "mean": 0.5, "failed": None}
            for t in (3, 4)]
    rec = {"top": 2, "seeds": [101, 102], "candidates": rows, "named": 3, "search_best": 3, "rescored": True}
    assert "2 other reference and validation sets" in naming_lines({**rec, "other_validation": [True, True]})[0]
    kept = naming_lines({**rec, "other_validation": [False, False]})[0]
    assert "2 other reference sets (the search's validation images: too few others)" in kept
