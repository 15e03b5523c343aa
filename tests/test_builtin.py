"""Built-in reference models: training, cache keys, metadata, determinism, the CLI."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pxopt.data.sources import FASHION_MNIST_CLASSES, Dataset, Split
from pxopt.models import load_model
from pxopt.models.builtin import registry


def _tiny_dataset() -> Dataset:
    """Ten separable 'classes' (a bright square in a different place per class)."""
    rng = np.random.default_rng(0)
    splits, digest = {}, ""
    for split, n in (("train", 16), ("val", 6)):
        labels = np.repeat(np.arange(10), n)
        images = rng.integers(0, 40, size=(len(labels), 28, 28)).astype(np.uint8)
        for i, c in enumerate(labels):
            r, col = divmod(int(c), 5)
            images[i, r * 14 : r * 14 + 8, col * 5 : col * 5 + 5] = 250
        splits[split] = Split(labels=torch.from_numpy(labels), images=torch.from_numpy(images))
        digest += str(images.sum())
    return Dataset("fashion-mnist", 10, dict(enumerate(FASHION_MNIST_CLASSES)), splits,
                   source="tiny", content_hash=digest)  # fmt: skip


@pytest.fixture()
def tiny_builtins(tmp_path, monkeypatch):
    monkeypatch.setenv("PXOPT_CACHE", str(tmp_path))
    monkeypatch.setattr(registry, "_fmnist", _tiny_dataset)
    fast = {name: dataclasses.replace(e, recipe=dataclasses.replace(e.recipe, epochs=6, batch_size=16))
            for name, e in registry.BUILTINS.items()}  # fmt: skip
    monkeypatch.setattr(registry, "BUILTINS", fast)
    return tmp_path


def test_train_writes_weights_and_metadata(tiny_builtins):
    model, meta = registry.train_builtin("fmnist-resnet", device="cpu", progress=False)
    folder = tiny_builtins / "builtin"
    (trained,) = [p for p in folder.iterdir() if p.name.startswith("fmnist-resnet-")]
    stored = json.loads((trained / "meta.json").read_text())
    assert stored["test_accuracy"] == meta["test_accuracy"] and 0.0 <= stored["test_accuracy"] <= 1.0
    assert stored["recipe"]["epochs"] == 6 and stored["recipe"]["seed"] == 0
    assert set(stored["versions"]) >= {"torch", "torchvision", "timm"}
    assert stored["threads"] == torch.get_num_threads() and stored["train_seconds"] > 0
    assert 0 < stored["train_cpu_seconds"]
    assert stored["data"]["content_sha256"] == _tiny_dataset().content_hash
    weights = load_file(str(trained / "model.safetensors"))
    assert torch.equal(weights["fc.weight"], model.state_dict()["fc.weight"])
    assert meta["test_accuracy"] > 0.5  # the toy classes are trivially separable


def test_training_is_deterministic_by_seed(tiny_builtins):
    a, _ = registry.train_builtin("fmnist-resnet", device="cpu", progress=False)
    b, _ = registry.train_builtin("fmnist-resnet", device="cpu", progress=False)
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), k


def test_channels_last_training_returns_the_default_layout(tiny_builtins):
    """NHWC only speeds up training: the model handed on (and saved) is in the usual layout."""
    assert registry.BUILTINS["fmnist-vgg"].recipe.channels_last
    model, meta = registry.train_builtin("fmnist-vgg", device="cpu", progress=False)
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous() for w in convs)
    assert meta["test_accuracy"] > 0.5
    plain = dataclasses.replace(registry.BUILTINS["fmnist-vgg"].recipe, channels_last=False)
    assert registry.BUILTINS["fmnist-vgg"].key("d") != dataclasses.replace(registry.BUILTINS["fmnist-vgg"], recipe=plain).key("d")


def test_bf16_autocast_trains_and_hands_on_float32(tiny_builtins):
    """Mixed precision speeds up the training steps only: the model pxopt explains is float32."""
    bf16 = dataclasses.replace(registry.BUILTINS["fmnist-vgg"].recipe, autocast="bf16")
    registry.BUILTINS["fmnist-vgg"] = dataclasses.replace(registry.BUILTINS["fmnist-vgg"], recipe=bf16)
    model, meta = registry.train_builtin("fmnist-vgg", device="cpu", progress=False)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert meta["test_accuracy"] > 0.5 and meta["recipe"]["autocast"] == "bf16"
    with pytest.raises(ValueError, match="autocast"):
        dataclasses.replace(bf16, autocast="fp8")


def test_bf16_recipe_trains_in_float32_where_bf16_is_emulated(tiny_builtins, monkeypatch):
    """Emulated bf16 cost 1.36-3.37x the float32 step here: such a host trains in float32,
    says so, and records what the steps computed in."""
    from pxopt.models.builtin import train as train_module

    bf16 = dataclasses.replace(registry.BUILTINS["fmnist-vgg"].recipe, autocast="bf16", epochs=1)
    registry.BUILTINS["fmnist-vgg"] = dataclasses.replace(registry.BUILTINS["fmnist-vgg"], recipe=bf16)
    monkeypatch.setattr(train_module, "bf16_is_native", lambda device: False)
    seen: list[torch.dtype] = []
    real_forward = torch.nn.Linear.forward
    monkeypatch.setattr(torch.nn.Linear, "forward",
                        lambda self, x: seen.append(torch.get_autocast_dtype("cpu") if
                                                    torch.is_autocast_enabled("cpu") else x.dtype)
                        or real_forward(self, x))  # fmt: skip
    with pytest.warns(RuntimeWarning, match="no native bfloat16: training in float32"):
        _, meta = registry.train_builtin("fmnist-vgg", device="cpu", progress=False)
    assert meta["step_dtype"] == "float32" and meta["recipe"]["autocast"] == "bf16"
    assert seen and set(seen) == {torch.float32}

    monkeypatch.setattr(train_module, "bf16_is_native", lambda device: True)
    seen.clear()
    _, meta = registry.train_builtin("fmnist-vgg", device="cpu", progress=False)
    assert meta["step_dtype"] == "bfloat16" and torch.bfloat16 in seen


def test_recipes_without_autocast_keep_their_cache_keys():
    """The field came later: leaving it unset must not retrain anyone's cached models."""
    assert "autocast" not in registry.BUILTINS["fmnist-resnet"].recipe.to_dict()
    assert registry.BUILTINS["fmnist-resnet"].key("d") == "ee56c46192413667"
    entry = registry.BUILTINS["fmnist-vit"]
    with_bf16 = dataclasses.replace(entry, recipe=dataclasses.replace(entry.recipe, autocast="bf16"))
    assert with_bf16.key("d") != entry.key("d")


def test_cache_key_follows_recipe_and_data():
    entry = registry.BUILTINS["fmnist-vit"]
    other = dataclasses.replace(entry, recipe=dataclasses.replace(entry.recipe, seed=1))
    assert entry.key("data-a") != other.key("data-a")
    assert entry.key("data-a") != entry.key("data-b")
    assert entry.key("data-a") == registry.BUILTINS["fmnist-vit"].key("data-a")


def test_load_model_trains_once_then_reuses_cache(tiny_builtins, monkeypatch):
    first = load_model("builtin:fmnist-vit", device="cpu", progress=False)
    assert first.family == "vit" and "test_accuracy" in first.meta

    def fail(*args, **kwargs):
        raise AssertionError("retrained although a cached model exists")

    monkeypatch.setattr(registry, "train_builtin", fail)
    second = load_model("builtin:fmnist-vit", device="cpu")
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_cli_train_and_models(tiny_builtins, capsys):
    from pxopt.cli import main

    main(["train", "builtin:fmnist-resnet"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["name"] == "fmnist-resnet" and out["weights_file"].endswith("model.safetensors")
    main(["models"])
    assert "builtin:fmnist-vgg" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main(["train", "resnet50"])
    assert info.value.code == 2
    assert "only built-in models" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fmnist-resnet", "fmnist-vgg", "fmnist-vit"])
def test_builtin_reaches_its_accuracy_target(name):
    """Train (or load the cached) real model on Fashion-MNIST and check its test accuracy."""
    loaded = load_model(f"builtin:{name}", progress=False)
    meta = loaded.meta
    assert meta["test_accuracy"] >= registry.BUILTINS[name].target, meta
    # and the stored accuracy is real: re-evaluate the cached weights on the test set
    from pxopt.data import open_dataset, restricted_accuracy

    test = open_dataset("fashion-mnist").splits["val"]
    x = loaded.transform.apply_batch(test.images[:2000]).to(next(loaded.model.parameters()).device)
    with torch.no_grad():
        logits = torch.cat([loaded.model(x[i : i + 500]) for i in range(0, len(x), 500)])
    acc = restricted_accuracy(logits.cpu(), test.labels[:2000], list(range(10)))
    assert acc >= registry.BUILTINS[name].target - 0.02
