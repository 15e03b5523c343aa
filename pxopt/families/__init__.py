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
from collections.abc import Sequence
from typing import Any

from torch import nn

from pxopt.errors import UnsupportedLayerError
from pxopt.families.base import (
    BlockForward,
    Family,
    HeadSlice,
    SliceEdit,
    StageSplit,
    Target,
    first_attention,
)

__all__ = ["Family", "HeadSlice", "SliceEdit", "StageSplit", "Target", "block_forward_table",
           "families", "family_of", "heads_family", "leaf_treatment_table", "register_family", "unregister_family"]

_FAMILIES: list[Family] = []
_LOADED = False
_TABLES: dict[str, Any] = {}  # block forwards / leaf treatments of all families, per registry state
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
    _TABLES.clear()
    return family


def unregister_family(name: str) -> None:
    """Remove the family called `name` (tests that register a toy family clean up with it)."""
    _FAMILIES[:] = [f for f in _FAMILIES if f.name != name]
    _TABLES.clear()


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
        f"{cls.__module__}.{cls.__qualname__}: no supported model family matches this model"
        f"{_attention_hint(model)} (known: {', '.join(f.name for f in families())}); see "
        "`pxopt models`")


def _attention_hint(model: nn.Module) -> str:
    """Names the first attention module: why the generic CNN family does not take it."""
    found = first_attention(model)
    if found is None:
        return ""
    return (f": it is a transformer (attention module {found[0]!r}, {type(found[1]).__name__}) "
            "that no family explains")


def heads_family(layer: Any) -> Family:
    """The family that knows `layer`'s attention module: the layer's own (`Layer.family`,
    set by `discover_layers`), else the first whose `head_targets` accepts it (for layers
    built by hand). UnsupportedLayerError when none does."""
    own = getattr(layer, "family", None)
    if own is not None:
        return own
    for family in families():
        try:
            family.head_targets(layer)
        except (UnsupportedLayerError, NotImplementedError):
            continue
        return family
    module = layer.module
    raise UnsupportedLayerError(
        f"{layer.name or type(module).__name__} ({type(module).__name__}): no model family "
        "knows this attention module")


def block_forward_table() -> dict[type, BlockForward]:
    """Exact block class -> replacement forward, from every registered family (the CNN
    engine's canonisation; a family's blocks reused in another model are canonised too).
    Higher-priority families win on a shared class."""
    if "blocks" not in _TABLES:
        table: dict[type, BlockForward] = {}
        for family in reversed(families()):
            table.update(family.block_forwards())
        _TABLES["blocks"] = table
    return _TABLES["blocks"]


def leaf_treatment_table() -> Sequence[tuple[tuple[type, ...], str]]:
    """(leaf classes, treatment) that families add to the CNN engine's generic table."""
    if "leaves" not in _TABLES:
        _TABLES["leaves"] = [entry for family in families() for entry in family.leaf_treatments()]
    return _TABLES["leaves"]
