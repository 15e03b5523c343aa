"""Image folders: ImageNet-style (`train/`, `val/`, WNID class folders) and any ImageFolder.

WNID folders are numbered by the 1000-class ImageNet order (not 0..k-1 over the folders
present, as torchvision's ImageFolder would), so a subset of ImageNet keeps the indices
of a pretrained head.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from pxopt.data.sources import IMAGE_EXTENSIONS, Dataset, Split, is_wnid
from pxopt.data.synsets import imagenet_descriptions, imagenet_wnid_index
from pxopt.errors import DataError

SPLIT_NAMES = {"train": ("train",), "val": ("val", "validation", "valid", "test")}


def _class_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_in(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not p.name.startswith(".")
    )


def _split_roots(root: Path) -> dict[str, Path]:
    roots = {}
    for split, names in SPLIT_NAMES.items():
        for name in names:
            if (root / name).is_dir():
                roots[split] = root / name
                break
    return roots or {"all": root}


def image_folder(root: Path, *, wnid_order: bool | None = None) -> Dataset:
    """Scan `root` into a `Dataset` (paths only; images are decoded when a task needs them).

    `wnid_order`: number WNID folders by the ImageNet-1k order (None: when every class
    folder is a known WNID).
    """
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist or is not a folder")
    roots = _split_roots(root)
    per_split: dict[str, dict[str, list[Path]]] = {}
    for split, split_root in roots.items():
        folders = _class_folders(split_root)
        if not folders:
            raise DataError(f"{split_root} has no class folders (expected <root>/[train|val]/<class>/<images>)")
        per_split[split] = {f.name: _images_in(f) for f in folders}
    names = sorted({n for classes in per_split.values() for n in classes})
    wnid_index = imagenet_wnid_index()
    all_wnids = all(is_wnid(n) and n in wnid_index for n in names)
    if wnid_order is None:
        wnid_order = all_wnids
    elif wnid_order and not all_wnids:
        bad = next(n for n in names if n not in wnid_index)
        raise DataError(f"class folder {bad!r} in {root} is not an ImageNet-1k WNID")
    if wnid_order:
        index = {n: wnid_index[n] for n in names}
        descriptions = imagenet_descriptions()
        class_names = {index[n]: descriptions[index[n]].split(", ")[0] for n in names}
        aliases = {index[n]: [n, *descriptions[index[n]].split(", ")] for n in names}
        num_classes = 1000
    else:
        index = {n: i for i, n in enumerate(names)}
        class_names = {i: n for n, i in index.items()}
        aliases = {}
        num_classes = len(names)
    splits = {}
    for split, classes in per_split.items():
        paths = [p for n in sorted(classes) for p in classes[n]]
        labels = [index[n] for n in sorted(classes) for _ in classes[n]]
        splits[split] = Split(labels=torch.tensor(labels, dtype=torch.int64), paths=paths)
    return Dataset(
        name=str(root),
        num_classes=num_classes,
        class_names=class_names,
        splits=splits,
        aliases=aliases,
        source=str(root),
    )


def decode_image(path: Path) -> Image.Image:
    """Open an image fully as RGB; raise DataError naming the file if it cannot be decoded."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot decode image {path}: {exc}") from exc
