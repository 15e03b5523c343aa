"""What follows a prunable layer: its BatchNorm (for exact masks) and its consumer (for slicing).

Found by tracing the layer's parent module with torch.fx (small, usually traceable even
when the whole model is not); where tracing fails, the BatchNorm is found by module
registration order and no consumer is reported (slicing is then simply not used).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

_BN = (nn.BatchNorm1d, nn.BatchNorm2d)
# Channel-wise ops that map a zero channel to a zero channel and keep channel identity.
_PASS_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Identity, nn.Dropout, nn.MaxPool2d, nn.AvgPool2d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
)
_PASS_FUNCTIONS = {F.relu, F.relu6, F.gelu, F.silu, F.dropout, torch.relu}


@dataclass
class Following:
    """The BatchNorm right after a layer (or None) and the next weight layer if sliceable."""

    bn: nn.Module | None
    bn_name: str | None
    consumer: nn.Module | None
    consumer_name: str | None


def _parent_name(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _bn_by_order(model: nn.Module, name: str, out_features: int) -> tuple[str | None, nn.Module | None]:
    """Fallback: the next registered module after `name` is a matching BatchNorm."""
    names = [n for n, _ in model.named_modules()]
    mods = dict(model.named_modules())
    try:
        i = names.index(name)
    except ValueError:
        return None, None
    if i + 1 < len(names):
        nxt = mods[names[i + 1]]
        if isinstance(nxt, _BN) and nxt.num_features == out_features and \
                _parent_name(names[i + 1]) == _parent_name(name):
            return names[i + 1], nxt
    return None, None


class _BNLeafTracer(torch.fx.Tracer):
    """BatchNorm subclasses (timm's BatchNormAct2d: BatchNorm + activation) stay leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _BN) or super().is_leaf_module(m, qualname)


def _trace(parent: nn.Module) -> torch.fx.GraphModule | None:
    try:
        return torch.fx.GraphModule(parent, _BNLeafTracer().trace(parent))
    except Exception:  # any tracing failure means: no graph knowledge here
        return None


_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[tuple[str, int, int], Following]] = weakref.WeakKeyDictionary()


def find_following(model: nn.Module, name: str, out_features: int) -> Following:
    """BatchNorm directly after layer `name` and, if the path is only BN + element-wise ops
    ending in an ungrouped conv / linear, that consumer (whose inputs can then be sliced).

    Cached per model (tracing costs about as much as a validation pass on small models and
    every curve needs it); the key includes the layer module's id, so replacing it re-traces.
    """
    key = (name, int(out_features), id(model.get_submodule(name)))
    per_model = _CACHE.setdefault(model, {})
    if key not in per_model:
        per_model[key] = _find_following(model, name, out_features)
    return per_model[key]


def _find_following(model: nn.Module, name: str, out_features: int) -> Following:
    pname = _parent_name(name)
    parent = model.get_submodule(pname) if pname else model
    local = name[len(pname) + 1:] if pname else name
    gm = _trace(parent)
    if gm is None:
        bn_name, bn = _bn_by_order(model, name, out_features)
        return Following(bn, bn_name, None, None)
    nodes = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == local]
    if len(nodes) != 1:  # module used twice (or not at all): no safe statement about it
        bn_name, bn = _bn_by_order(model, name, out_features)
        return Following(bn, bn_name, None, None)
    node = nodes[0]
    bn = bn_name = None
    first = True
    while True:
        users = list(node.users)
        if len(users) != 1:
            break
        nxt = users[0]
        if nxt.op == "call_module":
            mod = gm.get_submodule(nxt.target)
            full = f"{pname}.{nxt.target}" if pname else nxt.target
            if first and isinstance(mod, _BN) and mod.num_features == out_features:
                bn, bn_name = model.get_submodule(full), full
            elif isinstance(mod, _PASS_MODULES):
                pass
            elif isinstance(mod, nn.Conv2d) and mod.groups == 1 and mod.in_channels == out_features \
                    and len(nxt.args) == 1:
                return Following(bn, bn_name, model.get_submodule(full), full)
            elif isinstance(mod, nn.Linear) and mod.in_features == out_features and len(nxt.args) == 1:
                return Following(bn, bn_name, model.get_submodule(full), full)
            else:
                break
        elif nxt.op == "call_function" and nxt.target in _PASS_FUNCTIONS and nxt.args[0] is node:
            pass
        else:
            break
        node = nxt
        first = False
    return Following(bn, bn_name, None, None)
