"""The family registry: one `family_of(model)` for every model, a new family is one module.

Covers: each built-in family matches its models (and only those), transformers no family
knows (Swin before its family, timm RelPos) are refused rather than explained as CNNs, a toy
family registered from a test works through discovery, LRP and masking without any other
file edited, priorities decide between matching families, and the import graph has no
layers <-> lrp circle.
"""

from __future__ import annotations

import subprocess
import sys
from typing import ClassVar

import pytest
import timm
import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.vision_transformer import VisionTransformer as TvViT

from pxopt.errors import UnsupportedLayerError
from pxopt.families import (
    Family,
    StageSplit,
    block_forward_table,
    families,
    family_of,
    register_family,
    unregister_family,
)
from pxopt.layers import discover_layers
from pxopt.lrp import explain
from pxopt.models.loaded import model_family
from pxopt.prune.masking import Masker


def tiny_tv_vit() -> nn.Module:
    return TvViT(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16,
                 mlp_dim=32, num_classes=5)


def tiny_timm_vit() -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2,
                             num_classes=5)


@pytest.mark.parametrize("build,name,kind", [
    (lambda: torchvision.models.resnet18(num_classes=5), "torchvision-resnet", "cnn"),
    (lambda: torchvision.models.vgg11(num_classes=5), "torchvision-vgg", "cnn"),
    (lambda: torchvision.models.alexnet(num_classes=5), "torchvision-vgg", "cnn"),
    (lambda: timm.create_model("resnet18", pretrained=False, num_classes=5), "timm-resnet", "cnn"),
    (tiny_tv_vit, "torchvision-vit", "vit"),
    (tiny_timm_vit, "timm-vit", "vit"),
    (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2)),
     "generic-cnn", "cnn"),
])
def test_each_family_matches_its_models(build, name: str, kind: str) -> None:
    model = build()
    fam = family_of(model)
    assert fam.name == name and fam.kind == kind
    assert model_family(model) == kind  # LoadedModel.family asks the same registry
    others = [f.name for f in families() if f.name not in (name, "generic-cnn") and f.matches(model)]
    assert others == []  # exactly one specific family claims it


def test_the_builtin_models_subclasses_match_their_base_family() -> None:
    from pxopt.models.builtin.archs import FmnistResNet

    assert family_of(FmnistResNet()).name == "torchvision-resnet"


def test_swin_is_never_a_plain_vit_or_a_cnn() -> None:
    """Three tests used to disagree (loaded.py: a ViT; the engine: a CNN). Now only a Swin
    family may take it; without one it is refused, naming its attention module."""
    model = torchvision.models.swin_t(num_classes=5)
    try:
        fam = family_of(model)
    except UnsupportedLayerError as exc:
        assert "SwinTransformer" in str(exc) and "attention module" in str(exc)
        with pytest.raises(UnsupportedLayerError, match="SwinTransformer"):
            discover_layers(model)
        with pytest.raises(UnsupportedLayerError, match="SwinTransformer"):
            model_family(model)
    else:
        assert "swin" in fam.name
        assert fam.name not in ("torchvision-vit", "timm-vit", "generic-cnn")


def test_unknown_attention_models_are_refused_by_name() -> None:
    class MyAttention(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x.softmax(-1) * x

    model = nn.Sequential(nn.Linear(4, 4), MyAttention(), nn.Linear(4, 2))
    with pytest.raises(UnsupportedLayerError, match=r"no supported model family.*'1', MyAttention"):
        family_of(model)
    with pytest.raises(UnsupportedLayerError, match="MyAttention"):
        explain(model, torch.randn(2, 4), [0, 1])


# --------------------------------------------------------------------------- a toy family


class Gate(nn.Module):
    """A leaf no generic table knows: x * sigmoid(x) (element-wise: the Pass rule fits)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(x)


class ToyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.gate = Gate()
        self.body = nn.Conv2d(4, 6, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(6 * 8 * 8, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.body(self.gate(self.stem(x))))
        return self.fc(x.flatten(1))


class ToyFamily(Family):
    name: ClassVar[str] = "test-toy"
    priority: ClassVar[int] = 50
    summary: ClassVar[str] = "a test's toy family"

    def matches(self, model: nn.Module) -> bool:
        return type(model) is ToyNet

    def stage_groups(self, model: nn.Module, names: list[str],
                     example_input: Tensor | None) -> StageSplit | None:
        return "toy", {n: "high" for n in names}

    def leaf_treatments(self):  # type: ignore[override]
        from pxopt.lrp.canonizers import PASS

        return [((Gate,), PASS)]


@pytest.fixture()
def toy_family():
    fam = register_family(ToyFamily())
    yield fam
    unregister_family(fam.name)


def test_unknown_leaf_is_refused_without_its_family() -> None:
    with pytest.raises(UnsupportedLayerError, match="'gate' \\(Gate\\)"):
        explain(ToyNet(), torch.randn(1, 3, 8, 8), [0])


def test_a_registered_family_makes_a_new_model_work(toy_family: Family) -> None:
    torch.manual_seed(0)
    model = ToyNet().double()
    lm = discover_layers(model)
    assert lm.family is toy_family and lm.stage_rule == "toy"
    assert [(la.name, la.group) for la in lm] == [("stem", "input"), ("body", "high"), ("fc", "fc")]
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    eps = {"rule": "epsilon", "epsilon": 1e-12}
    # bias-free: the input relevance sums to the target logit (conservation through Pass)
    for m in (model.stem, model.body, model.fc):
        nn.init.zeros_(m.bias)
    rules = {"groups": {g: eps for g in ("input", "low", "mid", "high", "fc")}}
    exp = explain(model, x, [0, 2], rules, start="logit")
    logits = model(x)
    assert torch.allclose(exp.input.sum((1, 2, 3)), logits[[0, 1], [0, 2]], rtol=1e-6, atol=1e-9)
    # masking through the family's default targets
    with Masker(model, lm, "conv") as masker:
        masker.set_pruned({"body": torch.tensor([True, False, False, False, False, True])})
        acts = {}
        h = model.body.register_forward_hook(lambda m, a, out: acts.setdefault("body", out))
        model(x)
        h.remove()
        assert float(acts["body"][:, [0, 5]].abs().max()) == 0.0


def test_priority_decides_and_unregister_restores(toy_family: Family) -> None:
    class Greedy(Family):
        name: ClassVar[str] = "test-greedy"
        priority: ClassVar[int] = 60

        def matches(self, model: nn.Module) -> bool:
            return isinstance(model, ToyNet)

    register_family(Greedy())
    try:
        assert family_of(ToyNet()).name == "test-greedy"
    finally:
        unregister_family("test-greedy")
    assert family_of(ToyNet()).name == "test-toy"


def test_block_canonisation_comes_from_the_families() -> None:
    from timm.models.resnet import Bottleneck as TimmBottleneck
    from torchvision.models.resnet import BasicBlock, Bottleneck

    table = block_forward_table()
    assert {BasicBlock, Bottleneck, TimmBottleneck} <= set(table)


# --------------------------------------------------------------------------- import graph


def test_layers_import_first_in_a_fresh_interpreter() -> None:
    """No import circle: pxopt.layers imports neither engine (it used to import
    pxopt.lrp.vit for a side effect while vit imported back from lrp/explain), and the layer
    map works right after. One subprocess: importing torch in a fresh interpreter is slow."""
    code = ("import sys\n"
            "import pxopt.layers, pxopt.lrp.explanation, pxopt.layermap\n"
            "bad = [m for m in ('pxopt.lrp.vit', 'pxopt.lrp.engine') if m in sys.modules]\n"
            "assert not bad, bad\n"
            "import torchvision\n"
            "lm = pxopt.layers.discover_layers(torchvision.models.resnet18())\n"
            "assert lm.family.name == 'torchvision-resnet', lm.family\n"
            "from pxopt.lrp.vit import explain_vit\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_pxopt_models_lists_every_family() -> None:
    from pxopt.models import describe_supported

    text = describe_supported()
    for fam in families():
        assert fam.name in text and fam.summary in text
