"""pxopt.models: spec parsing, offline loading from the torchvision / HF caches, file specs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file

from pxopt.errors import CheckpointError, ModelSpecError
from pxopt.models import describe_supported, load_model, parse_spec
from pxopt.models.builtin import FmnistTransform
from pxopt.models.builtin.archs import FmnistResNet


@pytest.mark.parametrize(
    ("text", "canonical", "kind"),
    [
        ("resnet50", "torchvision:resnet50", "torchvision"),
        ("torchvision:resnet50:IMAGENET1K_V2", "torchvision:resnet50:IMAGENET1K_V2", "torchvision"),
        ("timm:vit_base_patch16_224.augreg2_in21k_ft_in1k", "timm:vit_base_patch16_224.augreg2_in21k_ft_in1k", "timm"),
        ("builtin:fmnist-vit", "builtin:fmnist-vit", "builtin"),
        ("file:ck/a@b.pth@timm:resnet18", "file:ck/a@b.pth@timm:resnet18", "file"),
        ("file:x.safetensors@vgg16", "file:x.safetensors@torchvision:vgg16", "file"),
    ],
)
def test_parse_spec(text, canonical, kind):
    spec = parse_spec(text)
    assert spec.kind == kind and str(spec) == canonical


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty model spec"),
        ("hf:foo", "unknown model spec kind 'hf'"),
        ("timm:", "names no model"),
        ("file:ckpt.pth", "needs an architecture"),
        ("file:ckpt.txt@resnet18", "must end in one of"),
        ("torchvision:resnet50:V1:V2", "malformed model spec"),
    ],
)
def test_parse_spec_errors(text, message):
    with pytest.raises(ModelSpecError, match=message):
        parse_spec(text)


def test_unknown_names_suggest_close_matches(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ModelSpecError, match="unknown torchvision model 'resnet5'.*resnet50"):
        load_model("resnet5")
    with pytest.raises(ModelSpecError, match="no weights 'IMAGENET9K'.*IMAGENET1K_V1"):
        load_model("torchvision:resnet18:IMAGENET9K")
    with pytest.raises(ModelSpecError, match="unknown timm model 'vit_tiny_patch16_22'"):
        load_model("timm:vit_tiny_patch16_22")
    with pytest.raises(ModelSpecError, match="no pretrained tag 'nope'"):
        load_model("timm:test_vit.nope")
    with pytest.raises(ModelSpecError, match="unknown built-in model 'fmnist-lstm'"):
        load_model("builtin:fmnist-lstm")


def test_torchvision_missing_weights_names_file_folder_and_command(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    folder = tmp_path / "hub" / "checkpoints"
    with pytest.raises(ModelSpecError) as info:
        load_model("torchvision:mobilenet_v3_small")
    msg = str(info.value)
    assert "mobilenet_v3_small-047dcff4.pth" in msg and str(folder) in msg
    assert "torchvision.models.get_model('mobilenet_v3_small', weights='IMAGENET1K_V1')" in msg
    assert "or pass --allow-download" in msg
    assert "\n" not in msg


def test_torchvision_allow_download_fetches_into_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchvision.models.MobileNet_V3_Small_Weights.IMAGENET1K_V1
    reference = torchvision.models.mobilenet_v3_small()
    calls = []

    def fake_download(url, dst, *args, **kwargs):  # no network in tests
        calls.append((url, dst))
        torch.save(reference.state_dict(), dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    with pytest.raises(ModelSpecError, match="--allow-download"):
        load_model("mobilenet_v3_small")  # without the flag: never the network
    assert calls == []
    loaded = load_model("mobilenet_v3_small", allow_download=True)
    target = tmp_path / "hub" / "checkpoints" / Path(weights.url).name
    assert calls == [(weights.url, str(target))] and target.is_file()
    assert loaded.meta["weights_file"] == str(target)
    assert torch.equal(loaded.model.features[0][0].weight, reference.features[0][0].weight)
    load_model("mobilenet_v3_small")  # cached now: loads offline, no second download
    assert len(calls) == 1


def test_torchvision_loads_offline_from_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchvision.models.MobileNet_V3_Small_Weights.IMAGENET1K_V1
    reference = torchvision.models.mobilenet_v3_small()
    folder = tmp_path / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(reference.state_dict(), folder / Path(weights.url).name)
    loaded = load_model("mobilenet_v3_small", device="cpu")
    assert loaded.spec == "torchvision:mobilenet_v3_small:IMAGENET1K_V1"
    assert loaded.family == "cnn" and loaded.num_classes == 1000 and loaded.input_size == (3, 224, 224)
    assert loaded.class_names[0] == "tench" and not loaded.model.training
    assert all(not p.requires_grad for p in loaded.model.parameters())
    for (k, a), b in zip(loaded.model.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert loaded.transform.resize_size == [256]  # the weights' own transforms


class Evil:  # a pickled object of an arbitrary class must be refused (weights_only=True)
    def __reduce__(self):
        return (print, ("executed",))


def test_torchvision_cache_refuses_pickled_code(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    folder = tmp_path / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    weights = torchvision.models.MobileNet_V3_Small_Weights.IMAGENET1K_V1
    torch.save({"w": Evil()}, folder / Path(weights.url).name)
    with pytest.raises(CheckpointError, match=r"holds pickled code \(print\), not a plain state dict; "
                       "pxopt loads checkpoints with weights_only=True and will not run it") as info:
        load_model("mobilenet_v3_small")
    assert "\n" not in str(info.value) and len(str(info.value)) < 300


def _hf_cache(home: Path, repo: str, state: dict[str, torch.Tensor]) -> Path:
    root = home / "hub" / f"models--{repo.replace('/', '--')}"
    rev = "0123456789abcdef0123456789abcdef01234567"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(rev)
    snap = root / "snapshots" / rev
    snap.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(snap / "model.safetensors"))
    return snap / "model.safetensors"


def test_timm_missing_weights_message(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(ModelSpecError) as info:
        load_model("timm:test_vit.r160_in1k")
    msg = str(info.value)
    assert "model.safetensors" in msg
    assert str(tmp_path / "hub" / "models--timm--test_vit.r160_in1k" / "snapshots") in msg
    assert "timm.create_model('test_vit.r160_in1k', pretrained=True)" in msg
    assert "or pass --allow-download" in msg and "\n" not in msg


def test_timm_allow_download_lifts_hf_hub_offline(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as with HF_HUB_OFFLINE=1 in the environment
    reference = timm.create_model("test_vit.r160_in1k")
    calls = []

    def fake_download(repo, filename, *, cache_dir):  # no network in tests
        calls.append((repo, filename, cache_dir, constants.HF_HUB_OFFLINE))
        return str(_hf_cache(Path(cache_dir).parent, repo, reference.state_dict()))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    with pytest.raises(ModelSpecError, match="--allow-download"):
        load_model("timm:test_vit.r160_in1k")
    assert calls == []
    loaded = load_model("timm:test_vit.r160_in1k", allow_download=True)
    assert calls == [("timm/test_vit.r160_in1k", "model.safetensors", str(tmp_path / "hub"), False)]
    assert constants.HF_HUB_OFFLINE is True  # restored after the download
    assert loaded.meta["weights_file"].startswith(str(tmp_path / "hub"))
    for a, b in zip(loaded.model.state_dict().values(), reference.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_timm_loads_from_hf_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    reference = timm.create_model("test_vit.r160_in1k")
    path = _hf_cache(tmp_path, "timm/test_vit.r160_in1k", reference.state_dict())
    loaded = load_model("timm:test_vit", device="cpu")
    assert loaded.spec == "timm:test_vit.r160_in1k" and loaded.family == "vit"
    assert loaded.meta["weights_file"] == str(path)
    assert loaded.input_size == (3, 160, 160) and loaded.num_classes == 1000
    for a, b in zip(loaded.model.state_dict().values(), reference.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    x = loaded.transform(Image.new("RGB", (300, 200)))
    assert x.shape == (3, 160, 160)


def test_file_spec_pth_and_safetensors(tmp_path):
    net = FmnistResNet()
    torch.nn.init.normal_(net.fc.weight)
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}},
               tmp_path / "ckpt.pth")  # fmt: skip
    save_file(net.state_dict(), str(tmp_path / "ckpt.safetensors"))
    for name in ("ckpt.pth", "ckpt.safetensors"):
        loaded = load_model(f"file:{tmp_path / name}@builtin:fmnist-resnet", device="cpu")
        assert torch.equal(loaded.model.fc.weight, net.fc.weight)
        assert isinstance(loaded.transform, FmnistTransform) and loaded.input_size == (1, 28, 28)
        assert loaded.spec == f"file:{tmp_path / name}@builtin:fmnist-resnet"


def test_file_spec_fine_tuned_head_size_is_taken_from_checkpoint(tmp_path):
    net = torchvision.models.mobilenet_v3_small(num_classes=7)
    torch.save(net.state_dict(), tmp_path / "ft.pth")
    loaded = load_model(f"file:{tmp_path / 'ft.pth'}@mobilenet_v3_small")
    assert loaded.num_classes == 7 and loaded.class_names is None


def test_file_spec_errors(tmp_path):
    with pytest.raises(ModelSpecError, match="does not exist"):
        load_model(f"file:{tmp_path / 'none.pth'}@builtin:fmnist-resnet")
    (tmp_path / "broken.pth").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*broken.pth: Unsupported operand") as info:
        load_model(f"file:{tmp_path / 'broken.pth'}@builtin:fmnist-resnet")
    assert len(str(info.value)) < 200 + len(str(tmp_path))
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_model(f"file:{tmp_path / 'broken.safetensors'}@builtin:fmnist-resnet")
    torch.save(FmnistResNet().state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(CheckpointError, match=r"does not fit the architecture: \d+ missing keys"):
        load_model(f"file:{tmp_path / 'resnet.pth'}@builtin:fmnist-vgg")
    torch.save(FmnistResNet(widths=(16, 64, 128)).state_dict(), tmp_path / "narrow.pth")
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_model(f"file:{tmp_path / 'narrow.pth'}@builtin:fmnist-resnet")
    torch.save({"note": "no tensors"}, tmp_path / "meta.pth")
    with pytest.raises(CheckpointError, match="holds no state dict"):
        load_model(f"file:{tmp_path / 'meta.pth'}@builtin:fmnist-resnet")


def test_builtin_loads_from_cache_without_training(tmp_path, monkeypatch):
    monkeypatch.setenv("PXOPT_CACHE", str(tmp_path))
    from pxopt.models.builtin.registry import get_builtin, model_dir

    entry = get_builtin("fmnist-vit")
    folder, _ = model_dir(entry)
    net = entry.build()
    folder.mkdir(parents=True)
    save_file(net.state_dict(), str(folder / "model.safetensors"))
    (folder / "meta.json").write_text(json.dumps({"test_accuracy": 0.5}))
    loaded = load_model("builtin:fmnist-vit", device="cpu")
    assert loaded.family == "vit" and loaded.num_classes == 10 and loaded.input_size == (1, 28, 28)
    assert loaded.class_names[9] == "Ankle boot" and loaded.meta["test_accuracy"] == 0.5
    assert torch.equal(loaded.model.head.weight, net.head.weight)
    assert type(loaded.model).__name__ == "VisionTransformer"


def test_describe_supported_lists_builtins():
    text = describe_supported()
    for name in ("builtin:fmnist-resnet", "builtin:fmnist-vgg", "builtin:fmnist-vit", "timm:", "file:"):
        assert name in text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_load_on_cuda(tmp_path):
    torch.save(FmnistResNet().state_dict(), tmp_path / "r.pth")
    loaded = load_model(f"file:{tmp_path / 'r.pth'}@builtin:fmnist-resnet", device="cuda")
    assert next(loaded.model.parameters()).is_cuda
