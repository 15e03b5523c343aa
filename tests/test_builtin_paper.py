"""The paper-scale built-ins (issue #14): the paper's architecture classes on Fashion-MNIST.

Fast tests build them (never train them on real data): they are torchvision's `resnet50`
and `vgg16_bn` and a 12-block timm `VisionTransformer`, with the module names the reference
code's layer groups refer to, on 3x32x32 inputs. Nothing here trains them: a first-use
training takes 45 minutes or more on a 2-core CPU, past CI's budget.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file
from test_builtin import _tiny_dataset

from pxopt.layers import discover_layers
from pxopt.models import describe_supported, load_model
from pxopt.models.builtin import BUILTINS, FmnistTransform, registry

ROOT = Path(__file__).resolve().parents[1]
PAPER = ("fmnist-resnet50", "fmnist-vgg16", "fmnist-vit12")

# The reference code's groups (pxp/composites.py; ../shared/METHOD.md), written out by
# module name: every conv/linear of the model must fall in exactly one of them.
RESNET50_GROUPS = {
    "low": ("conv1", "layer1."),
    "mid": ("layer2.", "layer3."),
    "high": ("layer4.",),
    "fc": ("fc",),
}
VGG16_CONVS = {
    "low": (0, 3, 7, 10),  # convs 1-4
    "mid": (14, 17, 20, 24, 27),  # convs 5-9
    "high": (30, 34, 37, 40),  # convs 10-13
}
VIT12_BLOCKS = {"low": range(0, 3), "mid": range(3, 9), "high": range(9, 12)}


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_paper_builtins_are_registered_apart_from_the_small_ones():
    assert [n for n, e in BUILTINS.items() if e.paper] == list(PAPER)
    assert {"fmnist-resnet", "fmnist-vgg", "fmnist-vit"} <= {n for n, e in BUILTINS.items() if not e.paper}
    for name in PAPER:
        entry = BUILTINS[name]
        assert entry.input_size == (3, 32, 32)
        assert entry.target >= (0.88 if "vit" in name else 0.92)
        # the input size is part of the cache key
        assert entry.key("d") != dataclasses.replace(entry, size=28, channels=1).key("d")
    # ... but not of the small built-ins' keys, which predate it (cached models stay valid)
    assert BUILTINS["fmnist-resnet"].key("d") == "ee56c46192413667"
    # the default study stays on the small ResNet
    from pxopt.search.spec import StudySpec

    assert StudySpec().model == "builtin:fmnist-resnet"


def test_resnet50_is_torchvision_resnet50():
    model = BUILTINS["fmnist-resnet50"].build()
    assert type(model) is torchvision.models.ResNet
    with torch.device("meta"):  # shapes only, no initialisation
        reference = torchvision.models.resnet50(num_classes=10)
    assert _shapes(model) == _shapes(reference)
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]
    assert isinstance(model.layer1[0], torchvision.models.resnet.Bottleneck)
    assert model.conv1.in_channels == 3 and model.conv1.kernel_size == (7, 7)


def test_vgg16_is_torchvision_vgg16_bn_with_a_slim_classifier():
    model = BUILTINS["fmnist-vgg16"].build()
    with torch.device("meta"):
        reference = torchvision.models.vgg16_bn(num_classes=10)
    assert type(model) is torchvision.models.VGG
    assert _shapes(model.features) == _shapes(reference.features)
    assert [type(m) for m in model.features] == [type(m) for m in reference.features]
    convs = [int(n) for n, m in model.features.named_children() if isinstance(m, torch.nn.Conv2d)]
    assert convs == [i for group in VGG16_CONVS.values() for i in group]
    linears = [(n, m.in_features, m.out_features) for n, m in model.classifier.named_children()
               if isinstance(m, torch.nn.Linear)]  # fmt: skip
    assert linears == [("0", 512, 512), ("3", 512, 512), ("6", 512, 10)]
    assert [type(m).__name__ for m in model.classifier] == [type(m).__name__ for m in reference.classifier]


def test_vit12_is_a_12_block_timm_vision_transformer():
    from timm.models.vision_transformer import VisionTransformer

    model = BUILTINS["fmnist-vit12"].build()
    assert type(model) is VisionTransformer
    assert len(model.blocks) == 12 and model.embed_dim == 192
    assert model.blocks[0].attn.num_heads == 3
    assert model.blocks[0].mlp.fc1.out_features == 768
    assert model.patch_embed.num_patches == 16 and model.patch_embed.proj.in_channels == 3


def test_reference_groups_apply_literally():
    """Every conv/linear (CNNs) or block (ViT) lies in exactly one of the reference's groups."""
    layers = discover_layers(BUILTINS["fmnist-resnet50"].build())
    for layer in layers:
        hits = [g for g, prefixes in RESNET50_GROUPS.items()
                if layer.name == prefixes[0] or layer.name.startswith(prefixes)]  # fmt: skip
        assert len(hits) == 1, layer.name
    assert len(layers) == 1 + 52 + 1  # conv1, 16 blocks x 3 convs + 4 downsamples, fc

    layers = discover_layers(BUILTINS["fmnist-vgg16"].build())
    convs = [int(x.name.split(".")[1]) for x in layers if x.name.startswith("features.")]
    assert sorted(convs) == sorted(i for group in VGG16_CONVS.values() for i in group)
    assert [x.name for x in layers if x.name.startswith("classifier.")] == ["classifier.0", "classifier.3", "classifier.6"]
    assert layers[-1].kind == "head" and all(x.group == "fc" for x in layers if x.name.startswith("classifier."))

    layers = discover_layers(BUILTINS["fmnist-vit12"].build())
    blocks = sorted({int(x.name.split(".")[1]) for x in layers if x.name.startswith("blocks.")})
    assert blocks == sorted(i for group in VIT12_BLOCKS.values() for i in group)
    assert sum(x.kind == "mlp" for x in layers) == 12 and sum(x.kind == "heads" for x in layers) == 12


def test_transform_pads_and_replicates():
    t = BUILTINS["fmnist-resnet50"].transform()
    images = torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8)
    x = t.apply_batch(images)
    assert x.shape == (4, 3, 32, 32)
    assert torch.equal(x[:, 0], x[:, 2])
    small = FmnistTransform().apply_batch(images)
    assert torch.equal(x[:, :, 2:30, 2:30], small.expand(-1, 3, -1, -1))
    background = FmnistTransform().apply_batch(torch.zeros(1, 28, 28, dtype=torch.uint8))[0, 0, 0, 0]
    assert torch.all(x[:, :, :2] == background) and torch.all(x[:, :, :, -2:] == background)
    # PIL path (folders, heatmaps) agrees with the batch path
    pil = Image.fromarray(images[0].numpy())
    assert torch.equal(t(pil), x[0])
    assert t(Image.new("RGB", (64, 48))).shape == (3, 32, 32)
    assert "padded to 32x32" in repr(t)


@pytest.mark.parametrize("name", PAPER)
def test_forward_on_a_tiny_batch(name):
    entry = BUILTINS[name]
    torch.manual_seed(0)
    model = entry.build().eval()
    x = entry.transform().apply_batch(torch.randint(0, 256, (2, 28, 28), dtype=torch.uint8))
    with torch.no_grad():
        assert model(x).shape == (2, 10)


def test_load_from_cache_and_plain_torchvision_checkpoint(tmp_path, monkeypatch):
    """A cached model loads without training; torchvision's own resnet50 weights fit it."""
    monkeypatch.setenv("PXOPT_CACHE", str(tmp_path))
    entry = registry.get_builtin("fmnist-resnet50")
    folder, _ = registry.model_dir(entry)
    net = torchvision.models.resnet50(num_classes=10)
    folder.mkdir(parents=True)
    save_file(net.state_dict(), str(folder / "model.safetensors"))
    (folder / "meta.json").write_text(json.dumps({"test_accuracy": 0.5}))
    loaded = load_model("builtin:fmnist-resnet50", device="cpu")
    assert loaded.family == "cnn" and loaded.input_size == (3, 32, 32) and loaded.num_classes == 10
    assert isinstance(loaded.transform, FmnistTransform) and loaded.transform.size == 32
    assert torch.equal(loaded.model.fc.weight, net.fc.weight)
    # and a torchvision checkpoint as a file spec on this architecture
    torch.save(net.state_dict(), tmp_path / "tv.pth")
    loaded = load_model(f"file:{tmp_path / 'tv.pth'}@builtin:fmnist-resnet50", device="cpu")
    assert loaded.input_size == (3, 32, 32) and torch.equal(loaded.model.conv1.weight, net.conv1.weight)


def test_models_lists_them_apart():
    text = describe_supported()
    small, paper = text.split("paper's architectures", 1)
    for name in PAPER:
        assert f"builtin:{name}" in paper and f"builtin:{name}" not in small
    assert "builtin:fmnist-resnet " in small


@pytest.fixture()
def tiny_paper(tmp_path, monkeypatch):
    """An empty cache and a toy training set: 'training' the paper models takes seconds."""
    monkeypatch.setenv("PXOPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(registry, "_fmnist", _tiny_dataset)
    fast = {name: dataclasses.replace(e, recipe=dataclasses.replace(e.recipe, epochs=1, batch_size=32))
            for name, e in registry.BUILTINS.items()}  # fmt: skip
    monkeypatch.setattr(registry, "BUILTINS", fast)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_train_cli_on_toy_data(tiny_paper, capsys):
    from pxopt.cli import main

    main(["train", "builtin:fmnist-vit12", "--threads", "1"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["name"] == "fmnist-vit12"
    meta = json.loads(Path(out["weights_file"]).with_name("meta.json").read_text())
    assert meta["input_size"] == [3, 32, 32] and len(meta["accuracy_per_epoch"]) == 1
    assert meta["arch"]["depth"] == 12


def test_search_from_empty_cache_on_toy_data(tiny_paper):
    """`pxopt search --model builtin:fmnist-resnet50` trains the model (here on toy data) and searches."""
    from typer.testing import CliRunner

    from pxopt.cli import app

    result = CliRunner().invoke(app, ["search", "--model", "builtin:fmnist-resnet50", "--trials", "2",
                                      "--n-ref", "1", "--n-val", "2", "--rates", "0:1:0.25", "--no-report"],
                                catch_exceptions=False)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "best:" in result.output
    assert list((tiny_paper / "cache" / "builtin").glob("fmnist-resnet50-*/model.safetensors"))
    assert (tiny_paper / "studies" / "builtin-fmnist-resnet50.db").is_file()
