"""Canonisation without copies: which module type gets which LRP treatment.

Nothing here mutates a parameter or buffer. The engine replaces `forward` on module
instances for the duration of an explanation (and deletes the instance attribute
afterwards):

- Conv2d / Linear: the configured rule (`LayerRuleFn`); a BatchNorm that directly follows
  it is merged *for the backward only* (merged weight and bias computed on the fly), the
  forward runs the original conv then the original BatchNorm so logits stay bit-identical,
  and the BatchNorm itself becomes the identity for that time.
- element-wise activations: Pass; average pools: Norm; max pools, Flatten, Dropout (eval),
  Identity, permutes: the plain gradient (winner takes all for max pools).
- TensorFlow "SAME" convs (timm's Conv2dSame in tf_efficientnet_* / tf_mobilenetv3_*,
  asymmetric padding for stride 2; `register_same_conv`): the Conv2d rule with the padding
  inside the linear map (`LinearOp.same`), as zennit sees the module's own forward; the
  padded zeros get no relevance, as with a conv's built-in padding.
- LayerNorm (channels last, and the NCHW LayerNorm2d of ConvNeXt-style models): AttnLRP's
  LayerNorm rule (`pxopt.lrp.rules.LayerNormFn`: the standard deviation held constant, so
  relevance flows through the centring and the affine map as through a linear layer);
  `layer_norm_dim` says which dimension a registered class normalises.
- blocks (torchvision BasicBlock/Bottleneck, timm BasicBlock/Bottleneck, ...): their
  forward is replaced by an equivalent one whose addition is an explicit sum with the
  Norm rule; the replacements come from the families (`Family.block_forwards`,
  `pxopt.families.block_forward_table`), as do extra leaf treatments
  (`Family.leaf_treatments`, asked before the generic table here).
`check_bn_pair` decides whether a BatchNorm may be merged into the layer registered
right before it. A family that normalises a layer's *input* (pre-activation BatchNorm,
e.g. DenseNet's BN-ReLU-Conv) names those BatchNorms (`Family.input_norms`): they are
never merged and get the epsilon rule of an element-wise affine layer instead
(`pxopt.lrp.rules.lrp_affine`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch.fx
from torch import Tensor, nn

from pxopt.errors import UnsupportedLayerError

# treatments of leaf modules
LINEAR = "linear"
BATCHNORM = "batchnorm"
PASS = "pass"
NORM = "norm"
GRADIENT = "gradient"
LAYERNORM = "layernorm"
# a BatchNorm fused with its activation (timm `BatchNormAct2d`: BatchNorm, then its `drop`
# and `act` children): merged like a BatchNorm, its children keep their own treatments
BATCHNORM_ACT = "batchnorm_act"

_TREATMENTS: list[tuple[tuple[type, ...], str]] = [
    ((nn.Conv2d, nn.Linear), LINEAR),
    ((nn.BatchNorm1d, nn.BatchNorm2d), BATCHNORM),
    (
        (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU,
         nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
         nn.Softplus, nn.Softsign, nn.LogSigmoid, nn.Tanhshrink, nn.Threshold),
        PASS,
    ),
    ((nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d), NORM),
    (
        (nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.Flatten,
         nn.Unflatten, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout),
        GRADIENT,
    ),
]

# LayerNorm classes -> the dimension they normalise (-1: channels last; 1: NCHW channels).
_LAYER_NORM_DIMS: dict[type, int] = {nn.LayerNorm: -1}
_TREATMENTS.append(((nn.LayerNorm,), LAYERNORM))

try:  # timm's own leaf modules
    from timm.layers import DropBlock2d, DropPath
    from timm.layers import LayerNorm as _TimmLayerNorm
    from timm.layers import LayerNorm2d as _TimmLayerNorm2d
    from timm.layers.activations import GELU as _TimmGELU
    from timm.layers.adaptive_avgmax_pool import FastAdaptiveAvgPool, FastAdaptiveMaxPool

    _TREATMENTS += [((FastAdaptiveAvgPool,), NORM),
                    ((FastAdaptiveMaxPool, DropPath, DropBlock2d), GRADIENT),
                    ((_TimmGELU,), PASS),
                    ((_TimmLayerNorm, _TimmLayerNorm2d), LAYERNORM)]
    _LAYER_NORM_DIMS.update({_TimmLayerNorm: -1, _TimmLayerNorm2d: 1})
except ImportError:  # pragma: no cover - timm is a dependency, but keep the engine importable
    pass

try:  # torchvision: a permute module, stochastic depth (the identity in eval mode), LayerNorm2d
    from torchvision.models.convnext import LayerNorm2d as _TvLayerNorm2d
    from torchvision.ops import StochasticDepth
    from torchvision.ops.misc import Permute

    _TREATMENTS += [((Permute, StochasticDepth), GRADIENT), ((_TvLayerNorm2d,), LAYERNORM)]
    _LAYER_NORM_DIMS[_TvLayerNorm2d] = 1
except ImportError:  # pragma: no cover
    pass

try:
    from timm.layers.linear import Linear as _TimmLinear
    from timm.layers.norm_act import BatchNormAct2d

    _TREATMENTS.append(((BatchNormAct2d,), BATCHNORM_ACT))
    _TREATMENTS.append(((_TimmLinear,), LINEAR))  # F.linear outside TorchScript: nn.Linear's forward
except ImportError:  # pragma: no cover
    pass


def bn_forward(bn: nn.Module) -> Callable[[nn.Module, Tensor], Tensor]:
    """The plain BatchNorm forward of `bn` (without the activation of a BATCHNORM_ACT module)."""
    if treatment_of(bn) == BATCHNORM_ACT:
        return nn.BatchNorm1d.forward if isinstance(bn, nn.BatchNorm1d) else nn.BatchNorm2d.forward
    return type(bn).forward


def register_treatment(types: tuple[type, ...], treatment: str) -> None:
    """Give leaf modules of `types` a treatment (LINEAR, PASS, NORM, GRADIENT); wins over earlier."""
    _TREATMENTS.insert(0, (types, treatment))


def register_layer_norm(cls: type, dim: int) -> None:
    """A LayerNorm class normalising dimension `dim` (-1 channels last, 1 NCHW) over one
    dimension with an optional per-channel affine map (`weight`, `bias`, `eps` attributes)."""
    _LAYER_NORM_DIMS[cls] = dim
    register_treatment((cls,), LAYERNORM)


def layer_norm_dim(module: nn.Module, name: str = "") -> int:
    """The dimension a LAYERNORM module normalises; refuses shapes the rule does not cover."""
    shape = tuple(getattr(module, "normalized_shape", ()))
    if len(shape) != 1:
        raise UnsupportedLayerError(
            f"layer {name!r} ({type(module).__name__}) normalises over {shape}: only LayerNorm "
            "over the channel dimension has an LRP rule")
    dim = _LAYER_NORM_DIMS.get(type(module))
    if dim is None:
        raise UnsupportedLayerError(
            f"layer {name!r} ({type(module).__name__}): a LayerNorm class without a registered "
            "normalised dimension (`pxopt.lrp.canonizers.register_layer_norm`)")
    return dim


#: Conv2d subclasses whose forward is TensorFlow "SAME" padding, then nn.Conv2d's.
_SAME_CONVS: set[type] = set()


def register_same_conv(cls: type) -> None:
    """Conv2d subclass `cls` = TensorFlow "SAME" padding, then nn.Conv2d's forward."""
    _SAME_CONVS.add(cls)


def is_same_padded(module: nn.Module) -> bool:
    """A registered TensorFlow-"SAME" conv (exact type)."""
    return type(module) in _SAME_CONVS


try:
    from timm.layers import Conv2dSame as _TimmConv2dSame

    register_same_conv(_TimmConv2dSame)
except ImportError:  # pragma: no cover
    pass


def treatment_of(module: nn.Module) -> str | None:
    """The treatment of a leaf module, or None when it has none.

    A subclass counts only when it keeps its base's forward: timm's StdConv2d is a Conv2d
    whose forward standardises the weight, so the Conv2d rule (raw weight) would be wrong.
    Registered "SAME" convs (exact types) are the exception: their padding is in the op.
    """
    from pxopt.families import leaf_treatment_table

    if type(module) in _SAME_CONVS:
        return LINEAR
    forward = type(module).forward
    for types, treatment in [*leaf_treatment_table(), *_TREATMENTS]:
        if any(isinstance(module, t) and forward is t.forward for t in types):
            return treatment
    return None


# ---------------------------------------------------------------------------------------
# block canonisation: replacement forwards by exact block class, from the families
# ---------------------------------------------------------------------------------------
def residual_forward_of(module: nn.Module) -> Callable[[nn.Module, Tensor], Tensor] | None:
    """The replacement forward of `module`'s exact class that some registered family gives
    (`Family.block_forwards`), or None. Exact type: a subclass may have changed its forward."""
    from pxopt.families import block_forward_table

    return block_forward_table().get(type(module))


# ---------------------------------------------------------------------------------------
# BatchNorms that normalise a layer's input (pre-activation): not merged, own epsilon rule
# ---------------------------------------------------------------------------------------
def input_norms(model: nn.Module, family: object | None = None) -> set[str]:
    """Names of the model's pre-activation BatchNorms, as its family declares them
    (`Family.input_norms`); empty when no family knows the model."""
    if family is None:
        from pxopt.families import family_of

        try:
            family = family_of(model)
        except UnsupportedLayerError:
            return set()
    return set(family.input_norms(model))  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------
# BatchNorm merging: is the BatchNorm registered after a conv / linear really its BatchNorm?
# ---------------------------------------------------------------------------------------
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)
_PAIR_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[tuple, str | None]] = weakref.WeakKeyDictionary()
_GRAPHS: weakref.WeakKeyDictionary[nn.Module, torch.fx.Graph | None] = weakref.WeakKeyDictionary()


def _out_features(module: nn.Module) -> int | None:
    if isinstance(module, nn.Conv2d):
        return int(module.out_channels)
    if isinstance(module, nn.Linear):
        return int(module.out_features)
    return None


class _LeafTracer(torch.fx.Tracer):
    """Conv, Linear and BatchNorm (subclasses too, e.g. timm's BatchNormAct2d) stay leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (nn.Conv2d, nn.Linear, *_BN_TYPES)) or super().is_leaf_module(m, qualname)


def _graph_problem(model: nn.Module, name: str, bn_name: str) -> str | None:
    """Why `bn_name` is not the only consumer of `name`'s output in the traced forward of their
    closest common parent; None when it is, or when that forward cannot be traced (the
    engine's run-time check then decides)."""
    a, b = name.split("."), bn_name.split(".")
    n = 0
    while n < min(len(a), len(b)) - 1 and a[n] == b[n]:
        n += 1
    prefix = ".".join(a[:n])
    parent = model.get_submodule(prefix) if prefix else model
    if parent not in _GRAPHS:  # one trace per parent module, shared by its pairs
        try:
            _GRAPHS[parent] = _LeafTracer().trace(parent)
        except Exception:  # any tracing failure: no graph knowledge here
            _GRAPHS[parent] = None
    graph = _GRAPHS[parent]
    if graph is None:
        return None
    local, bn_local = ".".join(a[n:]), ".".join(b[n:])
    calls = [node for node in graph.nodes if node.op == "call_module" and node.target == local]
    if len(calls) != 1:  # called twice or not at all: the run-time check decides
        return None
    users = list(calls[0].users)
    if len(users) == 1 and users[0].op == "call_module" and users[0].target == bn_local:
        return None
    went = ", ".join(str(u.target) if u.op != "output" else "the output" for u in users) or "nothing"
    return (f"layer {bn_name!r} ({type(model.get_submodule(bn_name)).__name__}) is registered right "
            f"after {name!r} but the forward sends that layer's output to {went} in "
            f"{prefix or 'the model'!r}: a BatchNorm can only be merged into the layer whose "
            "output it alone normalises")


def check_bn_pair(model: nn.Module, name: str, module: nn.Module, bn_name: str, bn: nn.Module) -> None:
    """Refuse (UnsupportedLayerError) to merge BatchNorm `bn_name` into layer `name`.

    The candidate comes from registration order (zennit's rule); it must also normalise the
    layer's output channels (equal counts; DenseNet's BatchNorm before each conv fails
    here), and where torch.fx traces the two modules' closest common parent, the layer's
    output must go to that BatchNorm and nowhere else. Cached per model and module pair.
    """
    n_out = _out_features(module)
    if n_out is not None and int(bn.num_features) != n_out:
        raise UnsupportedLayerError(
            f"layer {bn_name!r} ({type(bn).__name__}, {bn.num_features} features) is registered "
            f"right after {name!r} ({type(module).__name__}, {n_out} outputs) but cannot normalise "
            "its output: BatchNorm placed elsewhere than directly after a conv/linear layer "
            "(e.g. before it, as in DenseNet) is not supported")
    key = (name, bn_name, id(module), id(bn))
    per_model = _PAIR_CACHE.setdefault(model, {})
    if key not in per_model:
        per_model[key] = _graph_problem(model, name, bn_name)
    if per_model[key] is not None:
        raise UnsupportedLayerError(per_model[key])
