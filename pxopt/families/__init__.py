"""Model families: the registry and `family_of(model)`, the one place a model's kind is decided.

    from pxopt.families import family_of
    fam = family_of(model)        # e.g. <family torchvision-resnet>; UnsupportedLayerError if none
    fam.layer_map(model, ...)     # see `pxopt.families.base.Family` for the protocol

Families register themselves with `register_family` when their module is imported; every
module of this package is imported the first time the registry is used, so adding a family
is adding one module here (docs/INTERFACES.md, "Adding a model family").
"""

from __future__ import annotations

import importlib
import pkgutil

from torch import nn

from pxopt.errors import UnsupportedLayerError
from pxopt.families.base import Family, HeadSlice, SliceEdit, StageSplit, Target

__all__ = ["Family", "HeadSlice", "SliceEdit", "StageSplit", "Target", "families", "family_of",
           "register_family", "unregister_family"]

_FAMILIES: list[Family] = []
_LOADED = False
_NOT_FAMILIES = {"base", "transformer"}  # modules of this package that define no family


def register_family(family: Family) -> Family:
    """Add `family` to the registry (replacing one of the same name); returns it.

    Families are asked in decreasing `priority` (ties: the later registration first), so a
    specific family wins over a general one whatever the import order.
    """
    if not family.name:
        raise ValueError(f"{type(family).__name__}: a family needs a name")
    _FAMILIES[:] = [f for f in _FAMILIES if f.name != family.name]
    _FAMILIES.insert(0, family)
    _FAMILIES.sort(key=lambda f: -f.priority)  # stable: later registrations stay first on ties
    return family


def unregister_family(name: str) -> None:
    """Remove the family called `name` (tests that register a toy family clean up with it)."""
    _FAMILIES[:] = [f for f in _FAMILIES if f.name != name]


def _load_builtin() -> None:
    """Import every module of this package once, so each registers its families."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for info in pkgutil.iter_modules(__path__):
        if info.name not in _NOT_FAMILIES and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def families() -> list[Family]:
    """Registered families, in the order `family_of` asks them."""
    _load_builtin()
    return list(_FAMILIES)


def family_of(model: nn.Module) -> Family:
    """The family of `model`: the first registered family (by priority) whose `matches` is
    true. Raises UnsupportedLayerError naming the model's class when none does."""
    for family in families():
        if family.matches(model):
            return family
    cls = type(model)
    raise UnsupportedLayerError(
        f"{cls.__module__}.{cls.__qualname__}: no supported model family matches this model "
        f"(known: {', '.join(f.name for f in families())}); see `pxopt models`")
