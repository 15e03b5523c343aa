"""pxopt.data: datasets, class selection, task determinism, errors, device caching."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pxopt.data import make_task, open_dataset, restricted_accuracy
from pxopt.data.synsets import imagenet_wnid_index, imagenet_wnids
from pxopt.errors import DataError


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture()
def tiny_fmnist(tmp_path, monkeypatch) -> Path:
    """A 10-class Fashion-MNIST lookalike in torchvision's raw layout (12 train, 4 test per class)."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "fm"
    folder.mkdir()
    for stem, n in (("train", 12), ("t10k", 4)):
        labels = np.repeat(np.arange(10), n)
        images = rng.integers(0, 256, size=(len(labels), 28, 28))
        images[:, 0, 0] = labels  # so tests can check image/label pairing
        _write_idx(folder / f"{stem}-images-idx3-ubyte.gz", images)
        _write_idx(folder / f"{stem}-labels-idx1-ubyte.gz", labels)
    monkeypatch.setenv("PXOPT_FASHION_MNIST", str(folder))
    return folder


def test_fashion_mnist_env_folder_and_pairing(tiny_fmnist):
    ds = open_dataset("fashion-mnist")
    assert ds.source == str(tiny_fmnist)
    assert len(ds.splits["train"]) == 120 and len(ds.splits["val"]) == 40
    task = make_task(ds, classes=[2, 7], n_ref=3, n_val=2, seed=0)
    assert task.classes == [2, 7] and task.class_names == ["Pullover", "Sneaker"]
    raw = torch.round(task.reference.images[:, 0, 0, 0] * 255).long()  # transform=None: x/255
    assert torch.equal(raw, task.reference.labels)
    assert task.reference.labels.tolist() == [2, 2, 2, 7, 7, 7]
    assert len(task.validation) == 4


def test_real_fashion_mnist_counts():
    ds = open_dataset("fashion-mnist")
    assert len(ds.splits["train"]) == 60000 and len(ds.splits["val"]) == 10000
    assert torch.bincount(ds.splits["val"].labels).tolist() == [1000] * 10


def test_task_is_deterministic_by_seed_and_recorded(tiny_fmnist):
    a = make_task("fashion-mnist", classes=3, n_ref=4, n_val=2, seed=5)
    b = make_task("fashion-mnist", classes=3, n_ref=4, n_val=2, seed=5)
    c = make_task("fashion-mnist", classes=3, n_ref=4, n_val=2, seed=6)
    assert a.describe() == b.describe()
    assert torch.equal(a.reference.images, b.reference.images)
    assert a.describe()["indices_hash"] != c.describe()["indices_hash"]
    d = a.describe()
    assert d["classes"] == a.classes and d["seed"] == 5 and d["n_ref"] == 4 and len(a.classes) == 3
    assert d["n_reference"] == 12 and d["n_validation"] == 6
    assert json.loads(json.dumps(d)) == d


def test_class_names_case_insensitive_and_unknown(tiny_fmnist):
    task = make_task("fashion-mnist", classes=["trouser", "Ankle boot"], n_ref=1, n_val=1)
    assert task.classes == [1, 9]
    with pytest.raises(DataError, match=r"unknown class name 'Trowser'.*'trouser'"):
        make_task("fashion-mnist", classes=["Trowser"], n_ref=1)
    with pytest.raises(DataError, match="class index 12 is not in dataset"):
        make_task("fashion-mnist", classes=[12], n_ref=1)
    with pytest.raises(DataError, match="cannot choose 11 classes"):
        make_task("fashion-mnist", classes=11, n_ref=1)


def test_n_ref_larger_than_class(tiny_fmnist):
    with pytest.raises(DataError, match=r"n_ref=13 but class 'T-shirt/top' \(0\) has only 12"):
        make_task("fashion-mnist", classes=[0], n_ref=13)
    with pytest.raises(DataError, match="n_val=5 but class"):
        make_task("fashion-mnist", classes=[0], n_ref=1, n_val=5)


def test_model_with_too_few_outputs(tiny_fmnist):
    with pytest.raises(DataError, match="only 5 outputs"):
        make_task("fashion-mnist", classes=[7], n_ref=1, num_model_classes=5)


def test_mnist_5k_split_is_shuffled_and_stratified():
    ds = open_dataset("mnist-5k")
    train, val = ds.splits["train"], ds.splits["val"]
    assert len(train) + len(val) == 5000
    assert set(val.labels.tolist()) == set(range(10))
    assert train.labels[:50].unique().numel() == 1  # rows stay grouped by label ...
    task = make_task(ds, classes=[3, 8], n_ref=2, n_val=5, seed=1)
    assert task.reference.images.shape == (4, 1, 28, 28)


def test_missing_dataset_and_folder_errors(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="neither a known name"):
        make_task(tmp_path / "nope", n_ref=1)
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataError, match="has no class folders"):
        make_task(tmp_path / "flat", n_ref=1)
    monkeypatch.setenv("PXOPT_FASHION_MNIST", str(tmp_path / "empty"))
    monkeypatch.setattr("pxopt.data.sources.DEBIAN_FASHION_MNIST", tmp_path / "empty")
    monkeypatch.setenv("PXOPT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataError, match="Fashion-MNIST not found.*apt-get install dataset-fashion-mnist"):
        open_dataset("fashion-mnist")


def _png(path: Path, colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), colour).save(path)


def test_imagenet_folder_uses_wnid_order(tmp_path):
    tench, goldfish_last = imagenet_wnids()[0], imagenet_wnids()[999]
    coffee = "n07920052"
    for split in ("train", "val"):
        for i, w in enumerate((coffee, tench, goldfish_last)):
            for j in range(3):
                _png(tmp_path / split / w / f"{j}.png", (i * 80, j * 60, 10))
    task = make_task(tmp_path, classes=None, n_ref=2, n_val=None, seed=0)
    index = imagenet_wnid_index()
    assert task.classes == sorted(index[w] for w in (coffee, tench, goldfish_last))
    assert task.classes == [0, index[coffee], 999]
    assert "espresso" in task.class_names
    assert task.reference.images.shape == (6, 3, 224, 224)
    assert task.validation.labels.tolist() == [0, 0, 0, index[coffee]] * 1 + [index[coffee]] * 2 + [999] * 3
    assert task.describe()["label_space"] == 1000
    by_name = make_task(tmp_path, classes=["espresso", "n01440764"], n_ref=1)
    assert by_name.classes == [0, index[coffee]]
    # a model with its own 3-class head: folders numbered 0..2 instead
    own = make_task(tmp_path, classes=None, n_ref=1, num_model_classes=3)
    assert own.classes == [0, 1, 2]


def test_generic_image_folder_single_split_and_bad_images(tmp_path):
    for cls in ("cats", "dogs"):
        for j in range(4):
            _png(tmp_path / cls / f"{j}.png", (j * 50, 0, 0))
    (tmp_path / "dogs" / "broken.png").write_bytes(b"not a png")
    task = make_task(tmp_path, classes=["dogs"], n_ref=2, seed=0)
    assert task.classes == [1] and task.class_names == ["dogs"]
    assert len(task.reference) == 2 and len(task.validation) == 2  # disjoint, broken one skipped
    assert task.describe()["skipped_images"] == 1
    assert task.describe()["reference_from_validation_split"] is True
    with pytest.raises(DataError, match="cannot decode image .*broken.png"):
        make_task(tmp_path, classes=["dogs"], n_ref=2, seed=0, on_bad_image="fail")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"class 'empty' \(2\) has no images"):
        make_task(tmp_path, classes=["empty"], n_ref=1)


def test_restricted_accuracy_and_zero_logits():
    logits = torch.tensor([[5.0, -1.0, -2.0, 0.5], [9.0, -3.0, -1.0, 0.0], [0.0, 2.0, 1.0, 0.0]])
    labels = torch.tensor([2, 2, 1])
    classes = [1, 2]
    # argmax over classes 1 and 2 only: -1 vs -2 -> 1 (wrong); -3 vs -1 -> 2 (right); 2 vs 1 -> 1 (right)
    assert restricted_accuracy(logits, labels, classes) == pytest.approx(2 / 3)
    # reference semantics: the other logits become 0 and win against negative chosen ones
    assert restricted_accuracy(logits, labels, classes, zero_logits=True) == pytest.approx(1 / 3)


def test_batches_move_to_device_once(tiny_fmnist):
    task = make_task("fashion-mnist", classes=[1, 2], n_ref=5, n_val=4, seed=0)
    batches = list(task.reference_batches(4, "cpu"))
    assert [len(b[1]) for b in batches] == [4, 4, 2]
    first = next(task.validation_batches(100, "cpu"))[0]
    again = next(task.validation_batches(100, "cpu"))[0]
    assert first.data_ptr() == again.data_ptr()  # the cached copy, not a new transfer
    x, y = task.validation.on("cpu")
    assert torch.equal(torch.cat([b[0] for b in task.validation_batches(3, "cpu")]), x)
    assert y.dtype == torch.int64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batches_on_cuda(tiny_fmnist):
    task = make_task("fashion-mnist", classes=[1, 2], n_ref=2, n_val=2)
    x, _ = next(task.reference_batches(8, "cuda"))
    assert x.is_cuda
    assert next(task.reference_batches(8, "cuda"))[0].data_ptr() == x.data_ptr()


def test_fashion_mnist_from_torchvision_raw_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("PXOPT_FASHION_MNIST", raising=False)
    monkeypatch.setattr("pxopt.data.sources.DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    monkeypatch.setenv("PXOPT_CACHE", str(tmp_path / "cache"))
    raw = tmp_path / "cache" / "data" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    labels = np.arange(10).repeat(2)
    for stem in ("train", "t10k"):  # uncompressed, as torchvision leaves them
        header = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (20, 28, 28))
        (raw / f"{stem}-images-idx3-ubyte").write_bytes(header + bytes(20 * 784))
        (raw / f"{stem}-labels-idx1-ubyte").write_bytes(
            bytes([0, 0, 8, 1]) + (20).to_bytes(4, "big") + labels.astype(np.uint8).tobytes()
        )
    ds = open_dataset("fashion-mnist")
    assert ds.source == str(raw) and len(ds.splits["val"]) == 20
    (raw / "t10k-images-idx3-ubyte").write_bytes(header + bytes(100))  # truncated
    from pxopt.data.sources import _read_idx

    with pytest.raises(DataError, match="truncated"):
        _read_idx(raw / "t10k-images-idx3-ubyte")
