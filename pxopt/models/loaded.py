"""The model as every other package sees it: module, preprocessing and metadata together."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn


@dataclass
class LoadedModel:
    """A ready model: eval mode, on its device, parameters frozen (requires_grad False)."""

    model: nn.Module
    spec: str  # canonical spec string (e.g. 'resnet50' -> 'torchvision:resnet50:IMAGENET1K_V2')
    transform: Callable  # PIL image -> tensor: the weights' own preprocessing
    num_classes: int
    input_size: tuple[int, int, int]
    family: str  # "cnn" | "vit": the kind of its `pxopt.families` family
    class_names: list[str] | None = None
    meta: dict = field(default_factory=dict)


@dataclass
class Built:
    """What a backend returns before `load_model` finishes (device, eval, freezing)."""

    model: nn.Module
    spec: str
    transform: Callable
    input_size: tuple[int, int, int]
    class_names: list[str] | None = None
    meta: dict = field(default_factory=dict)


def model_family(model: nn.Module) -> str:
    """The kind of the model's family ("cnn" | "vit", `pxopt.families.family_of`); raises
    UnsupportedLayerError for a model no family knows."""
    from pxopt.families import family_of

    return family_of(model).kind


def classifier_name(model: nn.Module) -> str | None:
    """Name of the last Linear layer (the classifier head in torchvision and timm models)."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    return last


def count_outputs(model: nn.Module) -> int:
    """Number of classes: out_features of the classifier, or the model's num_classes."""
    n = getattr(model, "num_classes", None)
    if isinstance(n, int) and n > 0:
        return n
    name = classifier_name(model)
    if name is None:
        raise ValueError("cannot tell the number of classes: the model has no Linear layer")
    return int(model.get_submodule(name).out_features)
