"""Report figures and the self-contained HTML; headless Chromium renders it (slow)."""

from __future__ import annotations

import html as html_lib
import itertools
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from search_fakes import FakeEvaluator, FakePipeline

from pxopt.evaluate import AREA, AREA_DEFINITION, curve_area, partial_area
from pxopt.report import study_figures, study_heatmaps, write_report
from pxopt.report.figures import PALETTE
from pxopt.search import SearchSpace, StudySpec, run_search

STUDIES = sorted(Path(__file__).resolve().parents[1].glob("studies/*.toml"))


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("report")
    spec = StudySpec(name="r", storage=str(tmp / "r.db"), trials=8, seed=1).validated()
    ev = FakeEvaluator(spec.rates)
    attrs = {"pxopt.total_macs": 1000.0, "pxopt.layer_macs": {"layer1": 5.0}, "pxopt.layer_sizes": {"layer1": 100}}
    return run_search(spec, ev, timings=lambda: ev.last_timings, study_attrs=attrs).study


def test_figures_have_data(study) -> None:
    figs = study_figures(study)
    assert set(figs) == {"history", "importances", "curves", "per_layer", "area_vs_macs"}
    curves = figs["curves"]
    names = [t.name for t in curves.data]
    assert any(n.startswith("best") for n in names) and any("all-epsilon" in n for n in names)
    assert len(figs["area_vs_macs"].data[0].x) == len(study.get_trials(states=(__import__("optuna").trial.TrialState.COMPLETE,)))
    assert all(0 <= x <= 1 for x in figs["area_vs_macs"].data[0].x)
    bars = figs["per_layer"].data[0]
    assert list(bars.x) == ["layer1"] and bars.y[0] > 0


def test_report_is_self_contained(study, tmp_path: Path) -> None:
    path = write_report(study, tmp_path / "r.html")
    text = path.read_text()
    assert "<script src=\"http" not in text and "cdn.plot.ly" not in text.split("</script>")[-1]
    assert len(re.findall(r'id="fig-', text)) == 6 and 'id="fig-heldout"' in text
    assert "Heatmaps: not drawn" in text  # says why, instead of leaving them out silently


@pytest.fixture(scope="module")
def pruned_study(tmp_path_factory: pytest.TempPathFactory):
    """A study where the median pruner stopped some trials."""
    tmp = tmp_path_factory.mktemp("pruned")
    spec = StudySpec(name="p", storage=str(tmp / "p.db"), trials=16, seed=3, sampler={"name": "random"},
                     pruner={"name": "median", "n_startup_trials": 3, "n_warmup_steps": 2}).validated()
    study = run_search(spec, FakeEvaluator(spec.rates)).study
    assert study.get_trials(states=(TrialState.PRUNED,)), "the fixture needs pruned trials"
    return study


def test_history_shows_pruned_trials_as_pruned(pruned_study) -> None:
    fig = study_figures(pruned_study)["history"]
    traces = {t.name.split(" ")[0]: t for t in fig.data}
    pruned = pruned_study.get_trials(states=(TrialState.PRUNED,))
    complete = pruned_study.get_trials(states=(TrialState.COMPLETE,))
    assert list(traces["pruned"].x) == [t.number for t in pruned]
    assert list(traces["complete"].x) == [t.number for t in complete]
    # pruned: their recorded value (Optuna's: the last intermediate value), the area of the
    # rates reached, on the complete trials' scale, with a marker of their own
    rates = pruned_study.user_attrs["pxopt.spec"]["rates"]
    for t, y in zip(pruned, traces["pruned"].y, strict=True):
        assert y == pytest.approx(t.value)
        assert y == pytest.approx(partial_area(rates, t.user_attrs["partial_curve"]["accuracies"]))
    for t, y in zip(complete, traces["complete"].y, strict=True):
        assert y == pytest.approx(t.value)
    assert traces["pruned"].marker.symbol not in traces["complete"].marker.symbol
    assert traces["pruned"].marker.color != traces["complete"].marker.color
    assert f"{len(pruned)} pruned" in fig.layout.title.text
    assert fig.layout.yaxis.title.text.startswith(AREA)


def test_every_curve_has_its_own_colour(study) -> None:
    from pxopt.cli.report_cmd import CRITERIA

    rates = study.best_trial.user_attrs["curve"]["rates"]
    extra = {f"criterion {c}": {"rates": rates, "accuracies": [0.5] * len(rates)} for c in CRITERIA}
    fig = study_figures(study, extra_curves=extra)["curves"]
    colours = [t.line.color for t in fig.data]
    assert len(fig.data) == len(extra) + 1 + 2  # best, two baselines, the criteria
    assert len(set(colours)) == len(colours), colours
    assert all(c in PALETTE for c in colours)
    assert all(t.marker.color == t.line.color for t in fig.data)

    def rgb(c: str) -> tuple[int, ...]:
        return tuple(int(c[i:i + 2], 16) for i in (1, 3, 5))

    # told apart at a glance, not just different hex codes (two blues were the complaint)
    assert min(math.dist(rgb(a), rgb(b)) for a, b in itertools.combinations(PALETTE, 2)) >= 70


def test_report_shows_rules_as_json_and_one_area(study, tmp_path: Path) -> None:
    text = write_report(study, tmp_path / "r.html").read_text()
    block = re.search(r"<th>best rules</th><td><pre><code>(.*?)</code></pre>", text, re.S)
    assert block, "no rules block"
    assert json.loads(html_lib.unescape(block.group(1))) == study.best_trial.user_attrs["rules"]
    assert "{'format'" not in html_lib.unescape(text)  # no Python dict anywhere
    assert html_lib.escape(AREA_DEFINITION) in text
    best = study.best_trial
    assert f"area {best.value:.4f}" in text  # the trial's value is the area shown
    assert "complete" in text and "{'complete'" not in html_lib.unescape(text)


def test_report_heatmaps(study, tmp_path: Path) -> None:
    pipeline = FakePipeline(StudySpec(name="r").validated())
    maps = study_heatmaps(study, pipeline, n_images=3)
    assert maps.images.shape == (3, 8, 8, 3) and maps.captions[0].startswith("class zero")
    assert list(maps.relevance)[1] == "all-epsilon"
    assert list(maps.relevance)[0].startswith(f"best rules (trial {study.best_trial.number}")
    text = write_report(study, tmp_path / "h.html", heatmaps=maps).read_text()
    assert len(re.findall(r'id="fig-', text)) == 7 and 'id="fig-heatmaps"' in text
    assert "Heatmaps: not drawn" not in text
    from pxopt.report.heatmaps import BWR, heatmap_figure

    fig = heatmap_figure(maps)
    heat = [t for t in fig.data if t.type == "heatmap"]
    images = [t for t in fig.data if t.type == "image"]
    assert len(heat) == 3 * 2 and len(images) == 3
    for t in heat:  # diverging map centred at 0, each heatmap scaled to its own max |R|
        assert (t.zmin, t.zmid, t.zmax) == (-1.0, 0.0, 1.0)
        assert [list(c) for c in t.colorscale] == BWR
        assert max(abs(v) for row in t.z for v in row) == pytest.approx(1.0)


def _legacy_study(tmp_path: Path, spec: StudySpec) -> optuna.Study:
    """A study as an older pxopt left it: trapezoid values, no objective record."""
    from pxopt.search.storage import open_storage, open_study

    study = open_study(open_storage(spec.storage), spec.name, model_spec=spec.model,
                       task={k: v for k, v in spec.identity().items() if k != "model"})
    study.set_user_attr("pxopt.spec", spec.to_dict())
    rates = spec.rates
    for i, accs in enumerate(([0.9, 0.8, 0.6, 0.3], [0.9, 0.85, 0.8, 0.7])):
        trap = sum((rates[k + 1] - rates[k]) * (accs[k] + accs[k + 1]) / 2 for k in range(len(rates) - 1))
        curve = {"rates": rates, "accuracies": accs, "area": trap, "area_normalised": trap / (rates[-1] - rates[0]),
                 "top_pr": 0.0, "pruned_per_layer": {}}
        rules = {"format": "pxopt.rules/1", "groups": {g: {"rule": "epsilon", "epsilon": 1e-6}
                                                       for g in ("input", "low", "mid", "high", "fc")}}
        study.add_trial(optuna.trial.create_trial(
            value=trap, intermediate_values={k: 0.0 for k in range(len(rates))},
            user_attrs={"curve": curve, "rules": rules, "ranking": "abs", "area": trap, "top_pr": 0.0,
                        **({"baseline": "all-epsilon"} if i == 0 else {})}))
    return study


def test_older_studies_are_refused_for_search_and_converted_for_reading(tmp_path: Path) -> None:
    from pxopt.errors import StorageError
    from pxopt.export import export_trial
    from pxopt.search.objective import OBJECTIVE_ATTR

    spec = StudySpec(name="old", storage=str(tmp_path / "old.db"), trials=4, rates=[0.0, 0.2, 0.4, 0.6]).validated()
    study = _legacy_study(tmp_path, spec)
    with pytest.raises(StorageError, match="older pxopt.*trapezoid"):
        run_search(spec, FakeEvaluator(spec.rates))
    assert len(study.trials) == 2  # nothing added
    # reading: every area is the mean accuracy, recomputed from the stored curves
    best = study.best_trial
    want = curve_area(best.user_attrs["curve"]["rates"], best.user_attrs["curve"]["accuracies"])
    assert want == pytest.approx(best.value / 0.6)
    exported = export_trial(study)
    assert exported["area"] == pytest.approx(want) and exported["area_definition"] == AREA_DEFINITION
    history = study_figures(study)["history"]
    assert max(history.data[0].y) == pytest.approx(want)
    text = write_report(study, tmp_path / "old.html").read_text()
    assert f"area {want:.4f}" in text and f"area {best.value:.4f}" not in text
    # a study of yet another objective is refused too
    spec2 = spec.with_overrides(name="other", storage=str(tmp_path / "other.db"))
    run_search(spec2.with_overrides(trials=2), FakeEvaluator(spec2.rates))
    other = optuna.load_study(study_name="other", storage=f"sqlite:///{tmp_path / 'other.db'}")
    assert other.metric_names == [AREA] and other.user_attrs[OBJECTIVE_ATTR]["name"] == AREA
    other.set_user_attr(OBJECTIVE_ATTR, {"id": "accuracy-at-30-percent", "definition": "accuracy at rate 0.3"})
    with pytest.raises(StorageError, match="accuracy at rate 0.3"):
        run_search(spec2.with_overrides(trials=4), FakeEvaluator(spec2.rates))


@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_study_specs_parse(path: Path) -> None:
    spec = StudySpec.from_toml(path)
    family = "vit" if spec.components in ("mlp", "heads") else "cnn"
    space = SearchSpace.build(spec.space, family=family)
    assert space.baselines(), "every shipped study starts with baselines"
    assert spec.name == path.stem


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.mark.slow
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is not installed")
def test_report_renders_in_headless_chromium(study, tmp_path: Path) -> None:
    maps = study_heatmaps(study, FakePipeline(StudySpec(name="r").validated()), n_images=2)
    path = write_report(study, tmp_path / "r.html", heatmaps=maps)
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
        "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000", "--dump-dom", path.as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    # every figure drew its SVG (plotly adds one .main-svg per plot layer)
    for fig_id in ("history", "importances", "curves", "heldout", "heatmaps", "per_layer", "area_vs_macs"):
        block = dom.split(f'id="fig-{fig_id}"', 1)[1][:200_000]
        assert "main-svg" in block, f"figure {fig_id} did not render"
    # Chromium logs every console message (console.error, uncaught exceptions) as
    # ...:CONSOLE:... on stderr, without the level: a clean report logs nothing at all.
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    assert not console, console
