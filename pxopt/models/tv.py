"""torchvision models: weights from `$TORCH_HOME/hub/checkpoints/`, offline unless allowed
(`allow_download`: torchvision's URL is fetched into that folder).

torchvision itself would unpickle the cached file with `weights_only=False`; pxopt routes
the builder's weight loading through `torch.load(..., weights_only=True)` instead.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from unittest import mock
from urllib.parse import urlparse

import torch
import torchvision
from torchvision.models import _api as tv_api

from pxopt.errors import ModelSpecError
from pxopt.models.checkpoint import read_state_dict
from pxopt.models.loaded import Built


def checkpoint_dir() -> Path:
    """Where torchvision caches weights (follows TORCH_HOME at call time)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _builder(name: str):
    try:
        return torchvision.models.get_model_builder(name)
    except ValueError:
        close = difflib.get_close_matches(name, torchvision.models.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ModelSpecError(f"unknown torchvision model {name!r}{hint}") from None


def weights_enum(name: str, tag: str | None):
    """The weights enum member for `tag` (None or 'DEFAULT': the default weights)."""
    _builder(name)
    try:
        enum = torchvision.models.get_model_weights(name)
    except ValueError:
        if tag:
            raise ModelSpecError(f"torchvision model {name!r} has no pretrained weights") from None
        return None
    key = tag or "DEFAULT"
    try:
        return enum[key] if key != "DEFAULT" else enum.DEFAULT
    except KeyError:
        members = ", ".join(m.name for m in enum)
        raise ModelSpecError(
            f"torchvision model {name!r} has no weights {tag!r} (available: {members})"
        ) from None


def weights_file(weights) -> Path:
    return checkpoint_dir() / Path(urlparse(weights.url).path).name


def fetch_command(name: str, weights) -> str:
    return (
        f'python -c "import torchvision; torchvision.models.get_model('
        f"'{name}', weights='{weights.name}')\""
    )


def _transform_of(weights):
    if weights is not None:
        return weights.transforms()
    from torchvision.models import ResNet50_Weights

    return ResNet50_Weights.IMAGENET1K_V2.transforms()  # standard ImageNet eval preprocessing


def _input_size(transform) -> tuple[int, int, int]:
    crop = getattr(transform, "crop_size", None) or [224]
    return (3, int(crop[0]), int(crop[-1]))


def build(
    name: str, tag: str | None, *, pretrained: bool, allow_download: bool, num_classes: int | None = None
) -> Built:
    """Build torchvision model `name`; with `pretrained`, load its weights from the cache."""
    builder = _builder(name)
    weights = weights_enum(name, tag)
    transform = _transform_of(weights)
    meta: dict = {"library": "torchvision", "torchvision_version": torchvision.__version__}
    if pretrained and weights is None:
        raise ModelSpecError(
            f"torchvision model {name!r} has no pretrained weights; load your own with "
            f"file:<checkpoint>@torchvision:{name}"
        )
    if not pretrained or weights is None:
        kwargs = {"num_classes": num_classes} if num_classes else {}
        model = builder(weights=None, **kwargs)
        class_names = list(weights.meta["categories"]) if weights and not num_classes else None
        spec = f"torchvision:{name}" + (f":{weights.name}" if weights and tag else "")
        return Built(model, spec, transform, _input_size(transform), class_names, meta)
    path = weights_file(weights)
    if not path.is_file() and not allow_download:
        raise ModelSpecError(
            f"weights file {path.name} for torchvision:{name}:{weights.name} not found in "
            f"{path.parent}; on a machine with internet run {fetch_command(name, weights)} "
            f"and copy the file into that folder (or set TORCH_HOME), or pass --allow-download"
        )

    def safe_load(url: str, *args, **kwargs) -> dict:
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(path), progress=True)
        return read_state_dict(path)

    with mock.patch.object(tv_api, "load_state_dict_from_url", safe_load):
        try:
            model = builder(weights=weights)
        except RuntimeError as exc:  # a state dict that does not fit
            from pxopt.errors import CheckpointError

            first = str(exc).strip().splitlines()[0]
            raise CheckpointError(f"weights file {path} does not fit torchvision:{name}: {first}") from exc
    meta.update(weights_file=str(path), weights=weights.name, metrics=dict(weights.meta.get("_metrics", {})))
    return Built(
        model,
        f"torchvision:{name}:{weights.name}",
        transform,
        _input_size(transform),
        list(weights.meta["categories"]),
        meta,
    )
