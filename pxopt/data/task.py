"""A task: a dataset restricted to some classes, with a reference and a validation set,
and optionally a held-out set (`pxopt.data.heldout`) that no search objective sees.

Everything is drawn from one seed and recorded in `Task.describe()`, so a study can be
re-run on exactly the same images.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from pxopt.data.folders import decode_image, image_folder
from pxopt.data.heldout import heldout_per_class, split_indices_per_class
from pxopt.data.sources import Dataset, Split, open_dataset
from pxopt.data.tensorset import TensorSet
from pxopt.errors import DataError

BadImagePolicy = Literal["skip", "fail"]
ClassSpec = int | Sequence[int] | Sequence[str] | None
_MAX_BYTES = 8 * 2**30  # refuse to hold more than this as tensors


@dataclass
class Task:
    """Classes (model-output indices), reference and validation sets, and their recipe."""

    dataset: str
    classes: list[int]
    class_names: list[str]
    reference: TensorSet
    validation: TensorSet
    seed: int
    n_ref: int
    n_val: int | None
    info: dict[str, Any] = field(default_factory=dict)
    heldout: TensorSet | None = None  # never seen by a search objective (None: no held-out split)
    origin: TaskOrigin | None = field(default=None, repr=False, compare=False)  # None: not drawn by make_task

    def reference_batches(
        self, batch_size: int, device: str | torch.device | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.reference.batches(batch_size, device)

    def validation_batches(
        self, batch_size: int, device: str | torch.device | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.validation.batches(batch_size, device)

    def heldout_batches(
        self, batch_size: int, device: str | torch.device | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.heldout is None:
            raise DataError("this task has no held-out split (n_heldout = 0)")
        return self.heldout.batches(batch_size, device)

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable record of how the task was drawn."""
        return {
            "dataset": self.dataset,
            "classes": list(self.classes),
            "class_names": list(self.class_names),
            "seed": self.seed,
            "n_ref": self.n_ref,
            "n_val": self.n_val,
            "n_reference": len(self.reference),
            "n_validation": len(self.validation),
            **self.info,
        }


@dataclass(frozen=True)
class TaskOrigin:
    """Which images of which dataset a task holds: what `other_reference` needs to draw another
    reference set without decoding the validation and held-out images again."""

    dataset: Dataset
    reference_split: str
    one_split: bool  # reference and validation come from the same split
    reference: tuple[int, ...]
    validation: tuple[int, ...]
    heldout: tuple[int, ...]
    transform: Callable | None
    on_bad_image: BadImagePolicy

    @property
    def validation_split(self) -> str:
        return self.reference_split if self.one_split else "val"

    @property
    def used(self) -> set[int]:
        """Indices another reference set must avoid: the reference images and, in one split, all others."""
        return set(self.reference) | (set(self.validation) | set(self.heldout) if self.one_split else set())


def _class_lookup(ds: Dataset) -> dict[str, int]:
    lookup: dict[str, int] = {}
    for idx, name in ds.class_names.items():
        for alias in (name, *ds.aliases.get(idx, [])):
            lookup.setdefault(alias.strip().lower(), idx)
    return lookup


def _choose_classes(ds: Dataset, classes: ClassSpec, seed: int, ref_split: Split) -> list[int]:
    present = ds.present
    if classes is None:
        return present
    if isinstance(classes, int | np.integer) and not isinstance(classes, bool):
        counts = torch.bincount(ref_split.labels, minlength=ds.num_classes)
        candidates = [c for c in present if counts[c] > 0]
        k = int(classes)
        if not 1 <= k <= len(candidates):
            raise DataError(f"cannot choose {k} classes: the dataset has {len(candidates)} non-empty classes")
        rng = np.random.default_rng(seed)
        return sorted(int(c) for c in rng.choice(candidates, size=k, replace=False))
    if isinstance(classes, str):
        classes = [c.strip() for c in classes.split(",") if c.strip()]
    lookup = _class_lookup(ds)
    chosen: list[int] = []
    for item in classes:
        if isinstance(item, str):
            key = item.strip().lower()
            if key in lookup:
                idx = lookup[key]
            elif key.lstrip("-").isdigit():
                idx = int(key)
            else:
                close = difflib.get_close_matches(key, list(lookup), n=3)
                hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
                raise DataError(f"unknown class name {item!r} in dataset {ds.name}{hint}")
        else:
            idx = int(item)
        if idx not in ds.class_names:
            raise DataError(
                f"class index {idx} is not in dataset {ds.name} "
                f"(present: {_short(present)})"
            )
        if idx not in chosen:
            chosen.append(idx)
    if not chosen:
        raise DataError("the class list is empty")
    return sorted(chosen)


def _short(values: Sequence[int], limit: int = 12) -> str:
    text = ", ".join(str(v) for v in values[:limit])
    return text + (f", ... ({len(values)} in all)" if len(values) > limit else "")


def _per_class(labels: torch.Tensor, c: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.flatnonzero(labels.numpy() == c))


class _Loader:
    """Turns selected samples of a split into one float tensor, skipping bad images."""

    def __init__(self, transform: Callable | None, policy: BadImagePolicy) -> None:
        if policy not in ("skip", "fail"):
            raise DataError(f"on_bad_image must be 'skip' or 'fail', got {policy!r}")
        self.transform = transform
        self.policy = policy
        self.skipped: list[str] = []

    def load_one(self, split: Split, i: int) -> torch.Tensor | None:
        if split.paths is not None:
            if str(split.paths[i]) in self.skipped:  # known bad: count it once
                return None
            try:
                image = decode_image(split.paths[i])
            except DataError:
                if self.policy == "fail":
                    raise
                self.skipped.append(str(split.paths[i]))
                return None
            if self.transform is None:  # folders need one size: the standard ImageNet eval
                self.transform = _default_folder_transform()
            return self.transform(image)
        raise AssertionError("tensor splits are converted in batches")

    def load_tensor_batch(self, split: Split, idx: np.ndarray) -> torch.Tensor:
        raw = split.images[torch.from_numpy(idx)]  # type: ignore[index]
        batch_fn = getattr(self.transform, "apply_batch", None)
        if batch_fn is not None:
            return batch_fn(raw)
        if self.transform is None:
            x = raw.float().div_(255)
            return x.unsqueeze(1) if x.ndim == 3 else x
        out = []
        for img in raw.numpy():
            pil = Image.fromarray(img if img.ndim == 2 else img.transpose(1, 2, 0))
            out.append(self.transform(pil.convert("RGB")))
        return torch.stack(out) if out else torch.empty(0)


def _default_folder_transform() -> Callable:
    from torchvision.transforms import v2

    return v2.Compose([
        v2.Resize(256, antialias=True), v2.CenterCrop(224), v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])  # fmt: skip


def _draw(
    split: Split,
    classes: list[int],
    names: dict[int, str],
    n_per_class: int | None,
    rng: np.random.Generator,
    loader: _Loader,
    role: str,
    exclude: set[int] | None = None,
) -> tuple[list[int], TensorSet]:
    """Pick n_per_class (None: all) decodable samples per class; return indices and tensors."""
    chosen: list[int] = []
    labels: list[int] = []
    decoded: list[torch.Tensor] = []
    for c in classes:
        order = [int(i) for i in _per_class(split.labels, c, rng) if not exclude or int(i) not in exclude]
        if not order:
            raise DataError(f"class {names[c]!r} ({c}) has no images in the {role} split")
        if n_per_class is not None and n_per_class > len(order):
            raise DataError(
                f"n_{role[:3]}={n_per_class} but class {names[c]!r} ({c}) has only "
                f"{len(order)} images in the {role} split"
            )
        want = len(order) if n_per_class is None else n_per_class
        taken = 0
        for i in order:
            if taken == want:
                break
            if split.paths is not None:
                tensor = loader.load_one(split, i)
                if tensor is None:
                    continue
                decoded.append(tensor)
            chosen.append(i)
            labels.append(c)
            taken += 1
        if n_per_class is not None and taken < want:
            raise DataError(
                f"class {names[c]!r} ({c}) has only {taken} decodable images in the {role} "
                f"split, {want} needed"
            )
        if taken == 0:
            raise DataError(f"class {names[c]!r} ({c}) has no decodable images in the {role} split")
    y = torch.tensor(labels, dtype=torch.int64)
    if split.images is not None:
        x = loader.load_tensor_batch(split, np.asarray(chosen, dtype=np.int64))
    else:
        x = torch.stack(decoded)
    return chosen, TensorSet(images=x.contiguous(), labels=y)


def make_task(
    dataset: str | Path | Dataset,
    *,
    classes: ClassSpec = None,
    n_ref: int = 10,
    n_val: int | None = None,
    seed: int = 0,
    transform: Callable | None = None,
    num_model_classes: int | None = None,
    on_bad_image: BadImagePolicy = "skip",
    allow_download: bool = False,
    n_heldout: int = 0,
) -> Task:
    """Draw a task from a dataset.

    classes: None (all), k (chosen by seed), model-output indices, or class names
    (folder names, WNIDs, ImageNet names, Fashion-MNIST names; case-insensitive).
    n_ref: reference images per class from the train split. n_val: validation images per
    class (None: all). With a single split (a plain class-folder tree) the validation set
    is drawn from the images not used as reference. transform: PIL image -> tensor (the
    model's preprocessing; an `apply_batch(uint8 tensor)` attribute is used when present).
    n_heldout: held-out images per task (split evenly over the classes; fewer where the
    validation split has fewer images left; 0: none; none either with n_val None), drawn as
    the tail of each class's validation draw, so the validation images are those of the
    same task without them. Another draw of the same task's images: `other_reference`.
    """
    if n_ref < 1:
        raise DataError(f"n_ref must be >= 1, got {n_ref}")
    if n_val is not None and n_val < 1:
        raise DataError(f"n_val must be >= 1 or None (all), got {n_val}")
    if isinstance(dataset, Dataset):
        ds = dataset
    elif num_model_classes not in (None, 1000) and Path(dataset).expanduser().is_dir():
        ds = image_folder(Path(dataset).expanduser(), wnid_order=False)
    else:
        ds = open_dataset(dataset, allow_download=allow_download)
    if "train" in ds.splits and "val" in ds.splits:
        ref_split, val_split = ds.splits["train"], ds.splits["val"]
        ref_split_name = "train"
    else:  # one split only (e.g. just val/): reference and validation drawn disjointly
        ref_split_name, ref_split = next(iter(ds.splits.items()))
        val_split = ref_split
    chosen = _choose_classes(ds, classes, seed, ref_split)
    if num_model_classes is not None and max(chosen) >= num_model_classes:
        raise DataError(
            f"dataset {ds.name} uses class index {max(chosen)} but the model has only "
            f"{num_model_classes} outputs"
        )
    loader = _Loader(transform, on_bad_image)
    rng = np.random.default_rng(seed)
    # n_val None (all): every validation image is the objective's; none is left to hold out
    left = 0 if n_val is None else _left_for_heldout(val_split, chosen, n_val, n_ref if val_split is ref_split else 0)
    n_held = heldout_per_class(n_heldout, len(chosen), left)
    _check_size(ref_split, val_split, chosen, n_ref, n_val, n_held)
    ref_idx, reference = _draw(ref_split, chosen, ds.class_names, n_ref, rng, loader, "reference")
    exclude = set(ref_idx) if val_split is ref_split else None
    val_idx, validation = _draw(
        val_split, chosen, ds.class_names, None if n_val is None else n_val + n_held, rng, loader,
        "validation", exclude,
    )
    heldout, held_idx = None, []
    if n_held:
        head, tail = split_indices_per_class(validation.labels, n_last=n_held)
        held_idx = [val_idx[i] for i in tail.tolist()]
        val_idx = [val_idx[i] for i in head.tolist()]
        heldout = TensorSet(validation.images[tail].contiguous(), validation.labels[tail])
        validation = TensorSet(validation.images[head].contiguous(), validation.labels[head])
    digest = hashlib.sha256(json.dumps([ref_idx, val_idx]).encode()).hexdigest()[:16]
    info = {
        "source": ds.source,
        "content_hash": ds.content_hash[:16] if ds.content_hash else None,
        "label_space": ds.num_classes,
        "reference_split": ref_split_name,
        "reference_from_validation_split": val_split is ref_split,
        "indices_hash": digest,
        "skipped_images": len(loader.skipped),
        "skipped_examples": loader.skipped[:5],
    }
    if n_heldout:  # (absent from tasks without one: their record is that of older pxopt versions)
        info.update({
            "n_heldout": n_heldout,
            "heldout_per_class": n_held,
            "n_heldout_images": len(held_idx),
            "heldout_hash": hashlib.sha256(json.dumps(held_idx).encode()).hexdigest()[:16] if held_idx else None,
        })  # fmt: skip
    return Task(
        dataset=ds.name,
        classes=chosen,
        class_names=[ds.class_names[c] for c in chosen],
        reference=reference,
        validation=validation,
        seed=seed,
        n_ref=n_ref,
        n_val=n_val,
        info=info,
        heldout=heldout,
        origin=TaskOrigin(ds, ref_split_name, val_split is ref_split, tuple(ref_idx), tuple(val_idx),
                          tuple(held_idx), transform, on_bad_image),
    )


def other_reference(task: Task, reference_seed: int, *, validation: bool = False) -> Task:
    """The same task with another reference set: n_ref images per class drawn with
    `reference_seed` among those the task used for none of reference, validation and held-out.
    Only the new images are decoded; the held-out set is shared.

    validation: also another validation set of the task's size (n_val per class), drawn among
    the images the task leaves unused, where the dataset has enough (else the task's own is
    kept; `info["validation_redrawn"]` says which). The best trials of a search are re-scored
    this way before one is named (`pxopt.search.naming`): a trial that was lucky on the search's
    reference *or* validation images shows it there, and the held-out images stay unseen.
    A `DataError` where too few images are left for another reference set."""
    origin = task.origin
    if origin is None:
        raise DataError("this task was not drawn by make_task: it cannot draw another reference set")
    names, rng = origin.dataset.class_names, np.random.default_rng(reference_seed)
    loader = _Loader(origin.transform, origin.on_bad_image)
    try:
        ref_idx, reference = _draw(origin.dataset.splits[origin.reference_split], task.classes, names, task.n_ref,
                                   rng, loader, "reference", origin.used)
    except DataError as exc:
        raise DataError(f"no other reference set of {task.n_ref} images per class: {exc}") from exc
    val_idx, val_set, redrawn = list(origin.validation), task.validation, False
    if validation and task.n_val is not None:
        # one split: every image the task or the new reference set holds; else the validation split's own
        taken = origin.used | set(ref_idx) if origin.one_split else set(origin.validation) | set(origin.heldout)
        try:
            val_idx, val_set = _draw(origin.dataset.splits[origin.validation_split], task.classes, names, task.n_val,
                                     rng, loader, "validation", taken)
            redrawn = True
        except DataError:  # too few unused images: the task's own validation set
            pass
    digest = hashlib.sha256(json.dumps([ref_idx, val_idx]).encode()).hexdigest()[:16]
    info = {**task.info, "indices_hash": digest, "reference_seed": reference_seed}
    if validation:
        info["validation_redrawn"] = redrawn
    return dataclasses.replace(task, reference=reference, validation=val_set, info=info)


def _left_for_heldout(split: Split, classes: list[int], n_val: int, n_ref: int) -> int:
    """Images per class the held-out set may take: the fewest any class has beyond its
    reference (same split) and validation images."""
    counts = torch.bincount(split.labels, minlength=max(classes) + 1)
    return max(0, min(int(counts[c]) for c in classes) - n_ref - n_val)


def _check_size(ref: Split, val: Split, classes: list[int], n_ref: int, n_val: int | None,
                n_held: int = 0) -> None:
    """Refuse tasks whose tensors would not fit comfortably in memory (full ImageNet val)."""
    if ref.paths is None:
        return
    counts = torch.bincount(val.labels, minlength=max(classes) + 1)
    n_val_total = sum(int(counts[c]) for c in classes) if n_val is None else n_val * len(classes)
    n = n_ref * len(classes) + n_val_total + (0 if n_val is None else n_held * len(classes))
    est = n * 3 * 224 * 224 * 4
    if est > _MAX_BYTES:
        raise DataError(
            f"the task would hold {n} images (~{est / 2**30:.0f} GiB) in memory; "
            f"choose fewer classes or set n_val"
        )
