"""What a new user meets past the default path (issue #16 items 3, 4, 7, 9).

Components from the model's layer map, `--model` keeping the default study's settings,
ImageNet models needing `--data`, one quiet progress display that counts a resumed
study, and no files left behind by a failed command.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from search_fakes import FakePipeline
from typer.testing import CliRunner

import pxopt.models
import pxopt.pipeline
from pxopt.cli import app, main
from pxopt.cli.search_cmd import find_default_spec, is_imagenet_model, load_spec
from pxopt.errors import ConfigError
from pxopt.layers import discover_layers
from pxopt.models.builtin import get_builtin
from pxopt.models.loaded import LoadedModel
from pxopt.search.components import resolve_components
from pxopt.search.spec import StudySpec

REPO = Path(__file__).resolve().parents[1]


def _error(args: list[str], capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and err.endswith(lines[0]) and "Traceback" not in err, err
    return lines[0]


def _layer_map(name: str):
    return discover_layers(get_builtin(name).build(10))


# --- item 3: components from the layer map ----------------------------------------------------


def test_auto_components_follow_the_layer_map() -> None:
    assert resolve_components("auto", _layer_map("fmnist-resnet")) == "conv"
    assert resolve_components("auto", _layer_map("fmnist-vgg")) == "conv"
    assert resolve_components("auto", _layer_map("fmnist-vit")) == "mlp"
    assert resolve_components("heads", _layer_map("fmnist-vit")) == "heads"


def test_auto_components_on_torchvision_and_timm_vits() -> None:
    # the other case: torchvision's vit_b_16 (here the same class, small) and timm's
    import timm
    from torchvision.models import VisionTransformer

    for vit in (VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=16,
                                  mlp_dim=32, num_classes=3),
                timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, num_classes=3)):
        layers = discover_layers(vit.eval())
        assert resolve_components("auto", layers) == "mlp"
        with pytest.raises(ConfigError, match="leave 1 layer"):
            resolve_components("conv", layers)


@pytest.mark.parametrize(("model", "components", "left"), [
    ("fmnist-vit", "conv", "only patch_embed.proj"),  # the old silent default on a ViT
    ("fmnist-resnet", "heads", "none"),
    ("fmnist-resnet", "mlp", "none"),
])
def test_components_leaving_one_layer_are_refused(model: str, components: str, left: str) -> None:
    with pytest.raises(ConfigError) as exc:
        resolve_components(components, _layer_map(model), f"builtin:{model}")
    message = str(exc.value)
    assert "\n" not in message and left in message and f"builtin:{model}" in message
    assert "--components" in message


def _untrained_vit(spec: str, **_kw) -> LoadedModel:
    return LoadedModel(get_builtin("fmnist-vit").build(10).eval(), "builtin:fmnist-vit", lambda x: x,
                       10, (1, 28, 28), "vit")


def test_cli_refuses_conv_on_a_vit_and_leaves_no_database(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(pxopt.models, "load_model", _untrained_vit)
    monkeypatch.chdir(tmp_path)
    err = _error(["search", "--model", "builtin:fmnist-vit", "--components", "conv"], capsys)
    assert "patch_embed.proj" in err and "mlp" in err
    assert not list(tmp_path.rglob("*.db")) and not (tmp_path / "studies").exists()  # item 9


# --- item 4: --model keeps the default study's settings; ImageNet needs --data ---------------


def test_model_flag_keeps_the_default_studys_settings(fake: Path) -> None:
    default = StudySpec.from_toml(find_default_spec())
    assert default.threads == 1 and default.timeout is not None  # what the test relies on
    spec = load_spec(None, model="builtin:fmnist-vit", trials=5)
    assert spec.name == "builtin-fmnist-vit" and spec.model == "builtin:fmnist-vit" and spec.trials == 5
    assert spec.components == "auto"  # the ViT's layer map decides, not the ResNet's "conv"
    for name in ("threads", "timeout", "sampler", "pruner", "space", "n_ref", "n_val", "batch_size", "data",
                 "classes", "rates"):
        assert getattr(spec, name) == getattr(default, name), name
    explicit = load_spec(None, model="builtin:fmnist-vit", components="heads", data="/img", timeout=9.0)
    assert explicit.components == "heads" and explicit.timeout == 9.0
    assert explicit.classes is None  # the default's 10 Fashion-MNIST classes do not carry to other data
    assert load_spec(None).name == default.name


@pytest.mark.parametrize(("model", "imagenet"), [
    ("resnet50", True), ("torchvision:vit_b_16", True), ("timm:vit_base_patch16_224", True),
    ("file:ft.pth@torchvision:resnet18", True), ("builtin:fmnist-vit", False),
    ("file:ft.pth@builtin:fmnist-resnet", False),
])
def test_imagenet_models_are_recognised(model: str, imagenet: bool) -> None:
    assert is_imagenet_model(model) is imagenet


def test_imagenet_model_without_data_says_what_to_pass(fake: Path, capsys: pytest.CaptureFixture) -> None:
    err = _error(["search", "--model", "torchvision:vgg16"], capsys)
    assert "--data /path/to/imagenet" in err and "--classes" in err and "--class-names" in err
    assert not (fake / "studies").exists()
    err = _error(["baselines", "--model", "resnet50"], capsys)
    assert "--data /path/to/imagenet" in err
    # with --data the same command goes ahead (the fake pipeline stands in for the folder)
    out = CliRunner().invoke(app, ["search", "--model", "resnet50", "--data", str(fake), "--classes", "3",
                                   "--trials", "2", "--no-report"], catch_exceptions=False)
    assert out.exit_code == 0, out.output


# --- item 7: one quiet progress display that counts what the study holds --------------------


def test_progress_counts_a_resumed_study_and_optuna_stays_quiet(fake: Path, capfd: pytest.CaptureFixture) -> None:
    args = ["search", "--model", "builtin:tiny", "--study", "p", "--rates", "0:1:0.25", "--no-report"]
    main([*args, "--trials", "3"])
    out = capfd.readouterr()
    text = out.out + out.err
    assert "finished trials" in text and "3/3" in text
    assert "Trial 0 finished" not in text and "A new study created" not in text  # Optuna's INFO lines
    main([*args, "--trials", "3"])  # the study already holds 3
    text = "".join(capfd.readouterr())
    assert "3/3" in text and "0/3" not in text
    main([*args, "--trials", "4", "--verbose"])
    text = "".join(capfd.readouterr())
    assert "3/4" not in text.split("Trial 3 finished")[-1]  # the bar ends at 4/4 after Optuna's line
    assert "Trial 3 finished" in text and "4/4" in text


def test_progress_on_a_terminal_never_draws_zero_for_a_resumed_study(
        fake: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a terminal gets every frame, the first one drawn as the bar starts: it must not say 0/N
    import io

    from rich.console import Console

    import pxopt.cli.search_cmd as search_cmd

    args = ["search", "--model", "builtin:tiny", "--study", "t", "--rates", "0:1:0.25", "--no-report"]
    main([*args, "--trials", "3"])
    screen = io.StringIO()
    monkeypatch.setattr(search_cmd, "console", Console(file=screen, force_terminal=True, width=100))
    main([*args, "--trials", "4"])
    frames = screen.getvalue()
    assert "3/4" in frames and "4/4" in frames
    assert "0/4" not in frames, frames


def test_progress_callback_starts_at_the_stored_count(fake: Path) -> None:
    from pxopt.search import run_search

    spec = load_spec(None, model="builtin:tiny", name="c", trials=2, rates=[0.0, 0.5])
    seen: list[int] = []
    run_search(spec, pipeline=FakePipeline(spec), progress=seen.append, log=lambda _m: None)
    assert seen[0] == 0 and seen[-1] == 2
    seen.clear()
    run_search(spec.with_overrides(trials=3), pipeline=FakePipeline(spec), progress=seen.append,
               log=lambda _m: None)
    assert seen[0] == 2 and seen[-1] == 3


# --- item 9: leaks ----------------------------------------------------------------------------


def test_failed_model_load_leaves_no_database(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    def broken(_spec, **_kw):
        raise ConfigError("no such model")

    monkeypatch.setattr(pxopt.pipeline.Pipeline, "from_spec", broken)
    monkeypatch.chdir(tmp_path)
    assert "no such model" in _error(["search", "--model", "builtin:x", "--study", "s"], capsys)
    assert "no such model" in _error(["search", "--model", "builtin:x", "--storage", "elsewhere/s.db"], capsys)
    assert list(tmp_path.rglob("*")) == []


def test_export_of_a_missing_study_creates_nothing(fake: Path, capsys: pytest.CaptureFixture) -> None:
    for storage in ("missing.db", f"sqlite:///{fake / 'missing2.db'}"):
        err = _error(["export", "--study", "nope", "--storage", storage], capsys)
        assert "no study file" in err
    err = _error(["report", "--study", "nope", "--storage", "missing.db"], capsys)
    assert "no study file" in err
    assert list(fake.rglob("*")) == []


def test_one_trial_budget_queues_one_baseline(fake: Path) -> None:
    result = CliRunner().invoke(app, ["search", "--model", "builtin:tiny", "--study", "one", "--trials", "1",
                                      "--no-report"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="one", storage=f"sqlite:///{fake / 'studies' / 'one.db'}")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE]
    assert study.trials[0].user_attrs["baseline"] == "all-epsilon"


def test_study_lock_files_are_git_ignored() -> None:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    readme_outputs = ("best.json", "pruned.pt", "pruned.pt2", "pruned.json", "heatmaps.png")
    study_outputs = ("studies/default.db", "studies/default.db.lock", "studies/default.db-wal",
                     "studies/default-report.html", "studies/default-best.json",
                     "studies/default-baselines.json", "studies/default-baselines.html")
    for path in (*study_outputs, *readme_outputs):
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO).returncode == 0, path


def test_make_test_fast_installs_the_test_tools_first() -> None:
    rules = (REPO / "Makefile").read_text().splitlines()
    target = next(line for line in rules if line.startswith("test-fast:"))
    assert "install-test" in target.split(":", 1)[1].split()


def test_first_use_training_time_is_quoted_alike_everywhere() -> None:
    # README, the default study and the notebook once said 5-8 min and ~2-3 min for the same
    # training; they now quote one measurement, the README's
    texts = {name: (REPO / name).read_text(encoding="utf-8")
             for name in ("README.md", "studies/default.toml", "notebooks/quickstart.ipynb")}
    readme = texts["README.md"]
    first_use = readme[readme.index("`make search` trains the built-in Fashion-MNIST ResNet"):][:200]
    measured = re.search(r"(\d+:\d\d) measured", first_use)
    assert measured, first_use
    for name, text in texts.items():
        assert f"{measured.group(1)} measured" in text, name
        assert not re.search(r"\b(5-8|2-3) min", text), name
