"""Report figures and the self-contained HTML; headless Chromium renders it (slow)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from search_fakes import FakeEvaluator

from pxopt.report import study_figures, write_report
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
    assert len(re.findall(r'id="fig-', text)) == 5


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
    path = write_report(study, tmp_path / "r.html")
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
        "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000", "--dump-dom", path.as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    # every figure drew its SVG (plotly adds one .main-svg per plot layer)
    for fig_id in ("history", "importances", "curves", "per_layer", "area_vs_macs"):
        block = dom.split(f'id="fig-{fig_id}"', 1)[1][:200_000]
        assert "main-svg" in block, f"figure {fig_id} did not render"
    # Chromium logs every console message (console.error, uncaught exceptions) as
    # ...:CONSOLE:... on stderr, without the level: a clean report logs nothing at all.
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    assert not console, console
