"""The grouping option of a study: spec field, study identity, study attributes, export."""

from __future__ import annotations

from pathlib import Path

import pytest
from search_fakes import FakeEvaluator

from pxopt.errors import ConfigError, StorageError
from pxopt.export import export_trial, validate_export
from pxopt.search import StudySpec, run_search


def _spec(tmp_path: Path, **kw) -> StudySpec:
    base = dict(name="g", storage=str(tmp_path / "s.db"), trials=3, seed=1,
                rates=[0.0, 0.3, 0.6], sampler={"name": "random"}, pruner={"name": "none"})
    base.update(kw)
    return StudySpec(**base).validated()


def test_spec_field(tmp_path: Path) -> None:
    assert StudySpec().grouping == "stage"
    path = tmp_path / "x.toml"
    path.write_text('[prune]\ncomponents = "conv"\ngrouping = "count"\n')
    assert StudySpec.from_toml(path).grouping == "count"
    path.write_text('[prune]\ngrouping = "depth"\n')
    with pytest.raises(ConfigError, match="prune.grouping"):
        StudySpec.from_toml(path)


def test_grouping_is_part_of_the_identity() -> None:
    stage, count = StudySpec(), StudySpec(grouping="count")
    assert stage.identity()["grouping"] == "stage"
    # "count" was every study's grouping before the option: its identity is unchanged
    assert "grouping" not in count.identity()
    assert {k: v for k, v in stage.identity().items() if k != "grouping"} == count.identity()


def test_resuming_with_another_grouping_is_refused(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    run_search(spec, FakeEvaluator(spec.rates))
    with pytest.raises(StorageError, match="made with grouping 'stage', not 'count'"):
        run_search(spec.with_overrides(grouping="count"), FakeEvaluator(spec.rates))
    # the same grouping resumes
    assert run_search(spec.with_overrides(trials=4), FakeEvaluator(spec.rates)).n_new_trials == 1


def test_a_study_made_before_the_option_resumes_with_count(tmp_path: Path) -> None:
    old = _spec(tmp_path, grouping="count")
    study = run_search(old, FakeEvaluator(old.rates)).study
    stored = dict(study.user_attrs["pxopt.spec"])
    del stored["grouping"]  # what older pxopt stored
    study.set_user_attr("pxopt.spec", stored)
    with pytest.raises(StorageError, match="grouping 'count', not 'stage'.*grouping = 'count'"):
        run_search(old.with_overrides(grouping="stage"), FakeEvaluator(old.rates))
    assert run_search(old.with_overrides(trials=4), FakeEvaluator(old.rates)).n_new_trials == 1


def test_export_records_the_grouping(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    groups = {"input": ["conv1"], "low": ["layer1.0.conv1"], "mid": ["layer2.0.conv1"],
              "high": ["layer3.0.conv1"], "fc": ["fc"]}
    study = run_search(spec, FakeEvaluator(spec.rates),
                       study_attrs={"pxopt.grouping": {"grouping": "stage", "stage_rule": "resnet"},
                                    "pxopt.layer_groups": groups}).study
    data = export_trial(study)
    assert data["grouping"] == "stage" and data["layer_groups"] == groups
    # the rules of every trial give the first layer the low group's rule
    assert data["rules"]["groups"]["input"] == data["rules"]["groups"]["low"]
    older = {k: v for k, v in data.items() if k not in ("grouping", "layer_groups")}
    assert validate_export(older)["grouping"] == "count"  # files written before the option
    with pytest.raises(ConfigError, match="grouping"):
        validate_export({**data, "grouping": "depth"})
    with pytest.raises(ConfigError, match="layer_groups"):
        validate_export({**data, "layer_groups": {"low": "conv1"}})
