"""Installing LRP rules on a model for the duration of a `with` block, and undoing it.

`LRPEngine(model, rules, layer_map, record)` replaces `forward` on module instances
(see `pxopt.lrp.canonizers`), puts the model in eval mode, and restores both on exit.
Parameters and buffers are never written. After each forward, `check_graph` walks the
autograd graph of the output and raises `UnsupportedLayerError` for any operation that no
rule covers (e.g. an addition hidden in an unknown block's forward), so nothing silently
falls back to the plain gradient.
"""

from __future__ import annotations

import types
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from pxopt.errors import UnsupportedLayerError
from pxopt.layermap import LayerMap
from pxopt.lrp import canonizers as cz
from pxopt.lrp.config import RuleConfig
from pxopt.lrp.rules import (
    RULE_NODE_NAMES,
    LayerRule,
    LinearOp,
    conv2d_op,
    lrp_affine,
    lrp_layer,
    lrp_layer_norm,
    lrp_norm,
    lrp_pass,
)

# Autograd nodes that may appear outside our rule functions: they carry relevance
# correctly as a plain gradient (max-pool winner takes all, reshapes) or are leaves.
GRADIENT_NODES: set[str] = {
    "torch::autograd::AccumulateGrad",
    "MaxPool2DWithIndicesBackward0",
    "MaxPool1DWithIndicesBackward0",
    "AdaptiveMaxPool2DBackward0",
    "AdaptiveMaxPool1DBackward0",
    "ViewBackward0",
    "UnsafeViewBackward0",
    "ReshapeAliasBackward0",
    "CloneBackward0",
    "SqueezeBackward0",
    "SqueezeBackward1",
    "SqueezeBackward4",
    "UnsqueezeBackward0",
    "ExpandBackward0",  # only as the producer of a view; sums of it are covered elsewhere
    "AliasBackward0",
    # concatenation: the gradient of each input is its slice of the output's, so each part
    # gets exactly the relevance of its channels (conserved; DenseNet's dense blocks)
    "CatBackward0",
    "PermuteBackward0",  # channels-last <-> NCHW around LayerNorm / Linear (ConvNeXt)
}


def check_graph(output: Tensor, extra_allowed: set[str] | frozenset[str] = frozenset()) -> None:
    """Raise if the graph of `output` contains an operation that no LRP rule covers."""
    allowed = GRADIENT_NODES | RULE_NODE_NAMES | set(extra_allowed)
    seen: set[int] = set()
    stack = [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        name = node.name()
        if name not in allowed:
            op = name.removesuffix("Backward0").removesuffix("Backward1").lower()
            where = _layer_below(node)
            raise UnsupportedLayerError(
                f"operation {op!r}{f' after layer {where!r}' if where else ''} in the model's "
                "forward is not inside a layer with an LRP rule (an unknown block or functional "
                "op); refusing to fall back to the plain gradient"
            )
        stack.extend(fn for fn, _ in node.next_functions)


def _layer_below(node: Any, limit: int = 200) -> str | None:
    """Name of the nearest rule layer feeding `node` (to say where an unknown op sits)."""
    queue, seen = [node], set()
    while queue and len(seen) < limit:
        cur = queue.pop(0)
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        layer = getattr(cur, "layer", None)
        if layer is not None and getattr(layer, "name", ""):
            return layer.name
        queue.extend(fn for fn, _ in cur.next_functions)
    return None


def _leaves(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Leaf modules depth-first in registration order (zennit's `collect_leaves`); a
    BatchNorm fused with its activation (timm BatchNormAct2d) counts as one leaf."""
    children = list(module.named_children())
    if not children or cz.treatment_of(module) == cz.BATCHNORM_ACT:
        yield prefix, module
    for name, child in children:
        yield from _leaves(child, f"{prefix}.{name}" if prefix else name)


def _op_of(module: nn.Module) -> LinearOp:
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros":
            raise UnsupportedLayerError(
                f"Conv2d with padding_mode={module.padding_mode!r} has no LRP rule")
        return conv2d_op(module.stride, module.padding, module.dilation, module.groups,
                         module.weight.shape, same=cz.is_same_padded(module))
    return LinearOp("linear")


#: Merged BatchNorm scale and bias per layer, reused while the parameters are unchanged:
#: a search calls `explain` once per trial on the same model, and recomputing the merge
#: costs ~10 tiny kernels per layer (on a GPU, more than the layer's LRP itself).
_MERGE_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, tuple]] = weakref.WeakKeyDictionary()


def _tensor_state(*tensors: Tensor | None) -> tuple:
    """Identity, storage and in-place version of each tensor: changes whenever one is edited."""
    return tuple(None if t is None else (id(t), t.data_ptr(), t._version) for t in tensors)


def _merged(module: nn.Module, bn: nn.Module | None) -> tuple[Tensor | None, Tensor | None]:
    """Per-output-channel scale and bias of `module` with the following BatchNorm merged in.

    zennit's formula (scale = gamma / sqrt(var + eps), bias = (b - mean) * scale + beta);
    the weight itself is never copied: LRP uses weight * scale implicitly.
    """
    b = None if module.bias is None else module.bias.detach()
    if bn is None:
        return None, b
    key = (id(bn), bn.eps, _tensor_state(module.bias, bn.weight, bn.bias, bn.running_mean,
                                         bn.running_var))
    cached = _MERGE_CACHE.get(module)
    if cached is not None and cached[0] == key:
        return cached[1]
    var, mean = bn.running_var.detach(), bn.running_mean.detach()
    gamma = bn.weight.detach() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.detach() if bn.bias is not None else torch.zeros_like(var)
    scale = gamma / (var + bn.eps) ** 0.5
    b = ((b if b is not None else torch.zeros_like(mean)) - mean) * scale + beta
    _MERGE_CACHE[module] = (key, (scale, b))
    return scale, b


class Recorder:
    """Per-layer relevance at the layer output, (batch, n_components), filled in the backward."""

    def __init__(self) -> None:
        self.data: dict[str, Tensor] = {}

    def callback(self, name: str, op: LinearOp) -> Any:
        def record(r: Tensor) -> None:
            c = op.channel_sum(r.detach())
            prev = self.data.get(name)
            self.data[name] = c if prev is None else prev + c

        return record

    def clear(self) -> None:
        self.data = {}


class LRPEngine:
    """Context manager: model with LRP rules installed (see module docstring)."""

    def __init__(self, model: nn.Module, rules: RuleConfig, layer_map: LayerMap,
                 record: set[str] | None = None) -> None:
        self.model = model
        self.rules = rules
        self.layer_map = layer_map
        self.record = set(layer_map.names()) if record is None else set(record)
        self.recorder = Recorder()
        self._patched: list[tuple[nn.Module, Any]] = []
        self._training: list[tuple[nn.Module, bool]] = []
        self._pairs: list[tuple[str, str, nn.Module]] = []  # merged (layer, BatchNorm name, BatchNorm)

    # ---- install / uninstall --------------------------------------------------------------
    def __enter__(self) -> LRPEngine:
        try:
            self._install()
        except BaseException:
            self._uninstall()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._uninstall()

    def _patch(self, module: nn.Module, fn: Any, *, bind: bool = False) -> None:
        """Set an instance-level forward (a method of the module when `bind`)."""
        self._patched.append((module, module.__dict__.get("forward")))
        module.__dict__["forward"] = types.MethodType(fn, module) if bind else fn

    def check_pairs(self) -> None:
        """After a forward: raise if a merged BatchNorm did not run right after its layer."""
        for layer_name, bn_name, bn in self._pairs:
            if bn.__dict__.pop("_pxopt_expected", None) is not None:
                raise UnsupportedLayerError(
                    f"layer {bn_name!r} (BatchNorm) did not run on the output of {layer_name!r} "
                    "in the forward, so it cannot be merged for LRP")

    def _uninstall(self) -> None:
        for module, previous in reversed(self._patched):
            module.__dict__.pop("_pxopt_expected", None)
            if previous is None:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = previous
        self._patched.clear()
        self._pairs = []
        for module, flag in self._training:
            module.training = flag
        self._training.clear()
        self.recorder.clear()

    def _install(self) -> None:
        model = self.model
        self._training = [(m, m.training) for m in model.modules()]
        model.eval()
        # layers that only get a rule (no recorded components, e.g. depthwise convs) too
        groups = {**getattr(self.layer_map, "rule_only", {}),
                  **{layer.name: layer.group for layer in self.layer_map}}
        self.rules.check_overrides(set(groups))
        leaves = list(_leaves(model))
        # BatchNorm directly after a conv/linear in registration order (zennit's rule),
        # checked against channel counts and the traced graph (`check_bn_pair`); the forward
        # checks at run time that the BatchNorm receives exactly the layer's output
        # (`_merged_bn_forward`, `check_pairs`).
        # BatchNorms that a family declares as normalising a layer's input are never merged
        # (`Family.input_norms`): they get their own epsilon rule (`_affine_forward`).
        pre_norms = cz.input_norms(model, getattr(self.layer_map, "family", None))
        pairs: dict[str, tuple[str, nn.Module]] = {}
        paired_bn: dict[int, str] = {}
        for (name, mod), (bn_name, nxt) in zip(leaves, leaves[1:], strict=False):
            if bn_name in pre_norms:
                continue
            if cz.treatment_of(mod) == cz.LINEAR and \
                    cz.treatment_of(nxt) in (cz.BATCHNORM, cz.BATCHNORM_ACT):
                if not nxt.track_running_stats or nxt.running_var is None:
                    raise UnsupportedLayerError(
                        f"layer {bn_name!r} ({type(nxt).__name__}) has no running statistics "
                        "and cannot be merged for LRP")
                cz.check_bn_pair(model, name, mod, bn_name, nxt)
                pairs[name] = (bn_name, nxt)
                paired_bn[id(nxt)] = name
        self._pairs = [(name, bn_name, bn) for name, (bn_name, bn) in pairs.items()]

        for name, module in model.named_modules():
            residual = cz.residual_forward_of(module)
            if residual is not None:
                self._patch(module, residual, bind=True)
                continue
            if cz.treatment_of(module) == cz.BATCHNORM_ACT:
                paired = paired_bn.get(id(module))
                self._patch(module, _bn_act_forward(name, paired), bind=True)
                continue
            if next(module.children(), None) is not None:
                continue  # containers: their leaves carry the rules; check_graph guards the rest
            treatment = cz.treatment_of(module)
            if treatment is None:
                raise UnsupportedLayerError(
                    f"layer {name!r} ({type(module).__name__}) has no LRP rule; supported: "
                    "Conv2d, Linear, BatchNorm, LayerNorm, element-wise activations, pools, "
                    "Flatten, Dropout")
            if treatment == cz.LINEAR:
                if name not in groups:
                    raise UnsupportedLayerError(
                        f"layer {name!r} ({type(module).__name__}) is not in the layer map")
                bn = pairs.get(name, (None, None))[1]
                self._install_linear(name, module, bn, groups[name])
            elif treatment == cz.BATCHNORM and name in pre_norms:
                if not module.track_running_stats or module.running_var is None:
                    raise UnsupportedLayerError(
                        f"layer {name!r} ({type(module).__name__}) has no running statistics: "
                        "in eval mode it is not an element-wise affine map with an LRP rule")
                self._patch(module, _affine_forward(module))
            elif treatment == cz.BATCHNORM:
                if id(module) in paired_bn:
                    self._patch(module, _merged_bn_forward(name, paired_bn[id(module)]), bind=True)
                else:  # a BatchNorm not after a linear layer: Pass, as in zennit
                    self._patch(module, _pass_forward(module))
            elif treatment == cz.PASS:
                self._patch(module, _pass_forward(module))
            elif treatment == cz.NORM:
                self._patch(module, _norm_forward(module))
            elif treatment == cz.LAYERNORM:
                self._patch(module, _layer_norm_forward(module, cz.layer_norm_dim(module, name)))
            # GRADIENT: leave the module alone

    def _install_linear(self, name: str, module: nn.Module, bn: nn.Module | None,
                        group: str) -> None:
        op = _op_of(module)
        scale, bias = _merged(module, bn)
        cls_forward = type(module).forward
        if bn is None:
            def true_forward(x: Tensor) -> Tensor:
                return cls_forward(module, x)
        else:
            bn_forward = cz.bn_forward(bn)

            def true_forward(x: Tensor) -> Tensor:
                return bn_forward(bn, cls_forward(module, x))

        rule = LayerRule(
            self.rules.rule_for(name, group), op, module.weight, bias, out_scale=scale,
            forward_fn=true_forward,
            recorder=self.recorder.callback(name, op) if name in self.record else None,
            name=name,
        )
        def forward(x: Tensor) -> Tensor:
            out = lrp_layer(x, rule)
            if bn is not None:
                bn.__dict__["_pxopt_expected"] = out  # checked (and dropped) by the BatchNorm
            return out

        self._patch(module, forward)


def _merged_bn_forward(bn_name: str, layer_name: str) -> Any:
    def forward(self: nn.Module, x: Tensor) -> Tensor:
        expected = self.__dict__.pop("_pxopt_expected", None)
        if expected is not x:
            raise UnsupportedLayerError(
                f"layer {bn_name!r} (BatchNorm) does not directly follow {layer_name!r} in the "
                "forward, so it cannot be merged for LRP")
        return x  # already applied inside the merged conv/linear

    return forward


def _bn_act_forward(bn_name: str, layer_name: str | None) -> Any:
    """timm BatchNormAct2d: the BatchNorm merged into `layer_name` (or Pass when unpaired),
    then its own `drop` and `act` children (patched with their own treatments)."""
    merged = _merged_bn_forward(bn_name, layer_name) if layer_name is not None else None

    def forward(self: nn.Module, x: Tensor) -> Tensor:
        if merged is not None:
            x = merged(self, x)
        else:
            x = lrp_pass(x, lambda t: cz.bn_forward(self)(self, t))
        return self.act(self.drop(x))

    return forward


def _pass_forward(module: nn.Module) -> Any:
    cls_forward = type(module).forward
    inplace = bool(getattr(module, "inplace", False))

    def fn(x: Tensor) -> Tensor:
        # an in-place activation would overwrite a tensor saved for the backward
        if inplace:
            return torch.relu(x) if type(module) is nn.ReLU else cls_forward(module, x.clone())
        return cls_forward(module, x)

    def forward(x: Tensor) -> Tensor:
        return lrp_pass(x, fn)

    return forward


def _affine_forward(module: nn.Module) -> Any:
    """A BatchNorm on a layer's input: the epsilon rule of its affine map (`lrp_affine`)."""
    cls_forward = type(module).forward

    def fn(x: Tensor) -> Tensor:
        return cls_forward(module, x)

    def forward(x: Tensor) -> Tensor:
        return lrp_affine(x, fn)

    return forward


def _norm_forward(module: nn.Module) -> Any:
    cls_forward = type(module).forward

    def fn(x: Tensor) -> Tensor:
        return cls_forward(module, x)

    def forward(x: Tensor) -> Tensor:
        return lrp_norm(x, fn)

    return forward


def _layer_norm_forward(module: nn.Module, dim: int) -> Any:
    cls_forward = type(module).forward

    def fn(x: Tensor) -> Tensor:
        return cls_forward(module, x)

    def forward(x: Tensor) -> Tensor:
        return lrp_layer_norm(x, fn, module.weight, dim, module.eps)

    return forward
