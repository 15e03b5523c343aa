"""`pxopt explain` and the heatmap grid: sizes, colours (sign of the relevance), zennit's colours."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

import pxopt.models
from pxopt.cli import app, main
from pxopt.models.loaded import LoadedModel
from pxopt.report.heatmaps import (
    CAPTION,
    HEADER,
    LEGEND,
    MARGIN,
    bwr_rgb,
    compute_heatmaps,
    png_layout,
    render_png,
)

GROUPS = ("input", "low", "mid", "high", "fc")
EPS = {"rule": "epsilon", "epsilon": 1e-6}


def _rules(**groups) -> dict:
    return {"format": "pxopt.rules/1", "groups": {g: groups.get(g, EPS) for g in GROUPS}}


def _export(path: Path, model: str, rules: dict) -> Path:
    rates, accs = [0.0, 0.5], [0.9, 0.5]
    data = {
        "format": "pxopt.export/1", "study": "t", "trial": 3, "rules": rules, "ranking": "abs",
        "components": "conv", "model": model,
        "task": {"data": "fashion-mnist", "classes": 3, "n_ref": 2, "n_val": 4, "seed": 0, "batch_size": 8},
        "curve": {"rates": rates, "accuracies": accs}, "area": 0.7, "top_pr": 0.0, "versions": {},
    }
    path.write_text(json.dumps(data))
    return path


def _signed_model() -> nn.Module:
    """8x8 grey -> 2 logits. Class 0 weighs the left half +1, the right half -0.5: on a white
    image its epsilon relevance is positive on the left and negative on the right."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2, bias=False))
    w = torch.zeros(2, 8, 8)
    w[0, :, :4] = 1.0
    w[0, :, 4:] = -0.5
    with torch.no_grad():
        model[1].weight.copy_(w.reshape(2, 64))
    return model.eval().requires_grad_(False)


def _grey(image: Image.Image) -> torch.Tensor:
    img = image.convert("L").resize((8, 8))
    return torch.tensor(np.asarray(img), dtype=torch.float32)[None] / 255.0


def _images(folder: Path, n: int, size: int, value: int = 255) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((size, size, 3), value - 20 * i, dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


@pytest.fixture()
def signed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    def load(spec: str, device: str = "auto", **_kw) -> LoadedModel:
        return LoadedModel(model=_signed_model(), spec=spec, transform=_grey, num_classes=2,
                           input_size=(1, 8, 8), family="cnn", class_names=["left", "other"])

    monkeypatch.setattr(pxopt.models, "load_model", load)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _run(args: list[str]) -> str:
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _cell(png: np.ndarray, lay: dict, row: int, col: int) -> np.ndarray:
    y0 = HEADER + row * (lay["cell_h"] + CAPTION + MARGIN)
    x0 = MARGIN + col * (lay["cell_w"] + MARGIN)
    return png[y0:y0 + lay["cell_h"], x0:x0 + lay["cell_w"]]


def test_explain_png_size_and_relevance_sign(signed: Path) -> None:
    config = _export(signed / "best.json", "fake:signed", _rules(low={"rule": "gamma", "gamma": 0.25}))
    folder = _images(signed / "imgs", 3, 8)
    out = _run(["explain", "--config", str(config), "--images", str(folder), "-o", "heat.png"])
    assert "heatmaps of 3 images" in out and "all-epsilon" in out and "heat.png" in out
    png = np.asarray(Image.open(signed / "heat.png").convert("RGB"))
    # 3 rows (images) x 3 columns (image, the config's rules, all-epsilon); 8x8 -> 112x112 cells
    lay = png_layout(3, 3, 8, 8)
    assert lay["cell_w"] == lay["cell_h"] == 112
    assert png.shape == (lay["height"], lay["width"], 3)
    assert (lay["width"], lay["height"]) == (MARGIN + 3 * (112 + MARGIN), HEADER + 3 * (112 + CAPTION + MARGIN) + LEGEND)
    for row in range(3):
        for col in (1, 2):
            cell = _cell(png, lay, row, col).astype(int)
            left, right = cell[:, :40], cell[:, -40:]
            # red = positive: (255, 0, 0) where the relevance is largest
            assert (left == [255, 0, 0]).all(), left[0, 0]
            # blue = negative: blue channel full, red and green at half (-0.5 of the largest)
            assert (right[..., 2] == 255).all() and (abs(right[..., 0] - 128) <= 1).all()
            assert (right[..., 0] == right[..., 1]).all()
        image = _cell(png, lay, row, 0)
        assert (image == image[0, 0]).all()  # the (uniform) input image, rescaled for display


def test_the_input_rule_shapes_the_heatmap(signed: Path) -> None:
    """flat at the input (the layer's only group here) spreads relevance evenly: no blue."""
    config = _export(signed / "flat.json", "fake:signed", _rules(input={"rule": "flat"}))
    folder = _images(signed / "imgs", 1, 8)
    _run(["explain", "--config", str(config), "--images", str(folder), "-o", "flat.png"])
    png = np.asarray(Image.open(signed / "flat.png").convert("RGB")).astype(int)
    lay = png_layout(1, 3, 8, 8)
    flat, eps = _cell(png, lay, 0, 1), _cell(png, lay, 0, 2)
    assert (flat == [255, 0, 0]).all()  # uniform positive relevance
    assert (eps[:, -40:, 2] == 255).all() and (eps[:, -40:, 0] < 200).all()  # epsilon: blue on the right


def test_explain_label_and_rules_file(signed: Path) -> None:
    rules = signed / "rules.json"
    rules.write_text(json.dumps(_rules(input={"rule": "zplus"})))
    folder = _images(signed / "imgs", 2, 8)
    out = _run(["explain", "-c", str(rules), "-i", str(folder / "img1.png"), "-o", "one.png",
                "--model", "fake:signed", "--label", "0", "--no-epsilon"])
    assert "heatmaps of 1 images under rules.json ->" in out
    assert Image.open(signed / "one.png").size == (png_layout(1, 2, 8, 8)["width"], png_layout(1, 2, 8, 8)["height"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--images", "empty"], "holds no images"),
        (["--images", "missing"], "neither a folder nor a file"),
        (["--images", "imgs", "--label", "5"], "--label"),
        (["--images", "imgs", "--config", "rules.json"], "--model"),
        (["--images", "imgs", "--max-images", "0"], "--max-images"),
        (["--images", "imgs", "--config", "missing.json"], "does not exist"),
    ],
)
def test_explain_user_errors(signed: Path, capsys: pytest.CaptureFixture, args: list[str], message: str) -> None:
    _export(signed / "best.json", "fake:signed", _rules())
    (signed / "rules.json").write_text(json.dumps(_rules()))
    (signed / "empty").mkdir()
    _images(signed / "imgs", 1, 8)
    argv = ["explain", "--config", "best.json", *args]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and message in err, err


def test_explain_on_a_real_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The export's model spec (a checkpoint of the built-in ResNet architecture), its own
    preprocessing (28x28 grey), LRP with canonised BatchNorm: a PNG of the expected size."""
    from pxopt.models.builtin import get_builtin

    torch.manual_seed(0)
    ckpt = tmp_path / "ckpt.pth"
    torch.save(get_builtin("fmnist-resnet").build(10).state_dict(), ckpt)
    config = _export(tmp_path / "best.json", f"file:{ckpt}@builtin:fmnist-resnet",
                     _rules(input={"rule": "flat"}, low={"rule": "zplus"}))
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):  # other sizes and colour: the model's transform makes them 28x28 grey
        Image.fromarray(rng.integers(0, 255, (40 + i, 36, 3), dtype=np.uint8)).save(folder / f"x{i}.jpg")
    monkeypatch.chdir(tmp_path)
    out = _run(["explain", "--config", str(config), "--images", str(folder), "--out", "h.png", "--device", "cpu"])
    assert "heatmaps of 2 images" in out
    lay = png_layout(2, 3, 28, 28)
    assert lay["scale"] == 4 and Image.open(tmp_path / "h.png").size == (lay["width"], lay["height"])


def test_colours_match_zennit_imgify() -> None:
    """bwr_rgb is zennit's imgify(symmetric=True, cmap='bwr') up to its 256-entry palette.

    imgify's own steps (its PIL palette image does not load with Pillow 13): symmetric
    bounds, 0..255 indices, zennit's "bwr" palette.
    """
    zimage = pytest.importorskip("zennit.image")
    rng = np.random.default_rng(1)
    rel = rng.normal(size=(12, 16)) * np.linspace(0.1, 2.0, 16)
    vmin, vmax = zimage.interval_norm_bounds(rel, symmetric=True, dim=(0, 1))
    index = ((rel - vmin) / (vmax - vmin) * 255).clip(0, 255).astype(np.uint8)
    theirs = np.asarray(zimage.palette("bwr", 1.0), dtype=int).reshape(-1, 3)[index]
    ours = bwr_rgb(rel).astype(int)
    assert np.abs(ours - theirs).max() <= 3


def test_render_grid_directly() -> None:
    model = _signed_model()
    x = torch.ones(2, 1, 8, 8)
    maps = compute_heatmaps(model, x, {"a": _rules(), "b": _rules(input={"rule": "flat"})}, captions=["p", "q"])
    assert maps.columns == ["image", "a", "b"] and maps.relevance["a"].shape == (2, 8, 8)
    assert maps.relevance["a"][0, 0, 0] > 0 > maps.relevance["a"][0, 0, 7]
    img = render_png(maps, min_cell=16)
    assert img.size == (png_layout(2, 3, 8, 8, 16)["width"], png_layout(2, 3, 8, 8, 16)["height"])
