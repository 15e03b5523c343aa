"""Canonisation without copies: which module type gets which LRP treatment.

Nothing here mutates a parameter or buffer. The engine replaces `forward` on module
instances for the duration of an explanation (and deletes the instance attribute
afterwards):

- Conv2d / Linear: the configured rule (`LayerRuleFn`); a BatchNorm that directly follows
  it is merged *for the backward only* (merged weight and bias computed on the fly), the
  forward runs the original conv then the original BatchNorm so logits stay bit-identical,
  and the BatchNorm itself becomes the identity for that time.
- element-wise activations: Pass; average pools: Norm; max pools, Flatten, Dropout (eval),
  Identity: the plain gradient (winner takes all for max pools).
- residual blocks (torchvision BasicBlock/Bottleneck, timm BasicBlock/Bottleneck, timm
  DepthwiseSeparableConv/InvertedResidual): their forward is replaced by an equivalent one
  whose addition is an explicit sum with the Norm rule.
- TensorFlow "SAME" convs (timm's Conv2dSame, asymmetric padding for stride 2): the
  Conv2d rule with the padding inside the linear map (`LinearOp.same`), as zennit sees
  the module's own forward; the padded zeros get no relevance, as with built-in padding.
- BatchNorm with a fused tail (timm's BatchNormAct2d = BatchNorm, then its `drop` and
  `act` children): merged like a BatchNorm; the tail runs after it with its own leaves'
  treatments (ReLU6 etc.: Pass), as zennit would treat an unfused BatchNorm + activation.

Other engines extend the tables with `register_treatment` / `register_residual` /
`register_same_conv` / `register_bn_tail`.
`check_bn_pair` decides whether a BatchNorm may be merged into the layer registered
right before it.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch.fx
from torch import Tensor, nn

from pxopt.errors import UnsupportedLayerError
from pxopt.lrp.rules import lrp_sum

# treatments of leaf modules
LINEAR = "linear"
BATCHNORM = "batchnorm"
PASS = "pass"
NORM = "norm"
GRADIENT = "gradient"

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

try:  # timm's own leaf modules
    from timm.layers import DropBlock2d, DropPath
    from timm.layers.adaptive_avgmax_pool import FastAdaptiveAvgPool, FastAdaptiveMaxPool

    _TREATMENTS += [((FastAdaptiveAvgPool,), NORM),
                    ((FastAdaptiveMaxPool, DropPath, DropBlock2d), GRADIENT)]
except ImportError:  # pragma: no cover - timm is a dependency, but keep the engine importable
    pass


def register_treatment(types: tuple[type, ...], treatment: str) -> None:
    """Give leaf modules of `types` a treatment (LINEAR, PASS, NORM, GRADIENT); wins over earlier."""
    _TREATMENTS.insert(0, (types, treatment))


#: Conv2d subclasses whose forward is TensorFlow "SAME" padding, then nn.Conv2d's.
_SAME_CONVS: set[type] = set()
#: BatchNorm subclasses whose forward is "the base BatchNorm, then a tail": type ->
#: (base BatchNorm forward, tail(module, x)).
_BN_TAILS: dict[type, tuple[Callable[[nn.Module, Tensor], Tensor], Callable[[nn.Module, Tensor], Tensor]]] = {}


def register_same_conv(cls: type) -> None:
    """Conv2d subclass `cls` = TensorFlow "SAME" padding, then nn.Conv2d's forward."""
    _SAME_CONVS.add(cls)


def register_bn_tail(cls: type, base_forward: Callable[[nn.Module, Tensor], Tensor],
                     tail: Callable[[nn.Module, Tensor], Tensor]) -> None:
    """BatchNorm subclass `cls` = `base_forward` (a plain BatchNorm) then `tail(module, x)`."""
    _BN_TAILS[cls] = (base_forward, tail)


def is_same_padded(module: nn.Module) -> bool:
    """A registered TensorFlow-"SAME" conv (exact type)."""
    return type(module) in _SAME_CONVS


def bn_parts(module: nn.Module) -> tuple[Callable[[nn.Module, Tensor], Tensor],
                                         Callable[[nn.Module, Tensor], Tensor] | None]:
    """(plain BatchNorm forward, tail or None) of a BatchNorm-treated module."""
    if type(module) in _BN_TAILS:
        return _BN_TAILS[type(module)]
    return type(module).forward, None


def is_fused_leaf(module: nn.Module) -> bool:
    """A module with children that the engine treats as one leaf (a BatchNorm with a tail)."""
    return type(module) in _BN_TAILS


def treatment_of(module: nn.Module) -> str | None:
    """The treatment of a leaf module, or None when it has none.

    A subclass counts only when it keeps its base's forward: timm's StdConv2d is a Conv2d
    whose forward standardises the weight, so the Conv2d rule (raw weight) would be wrong.
    Registered "SAME" convs and BatchNorms with a tail (exact types) are the exceptions.
    """
    if type(module) in _SAME_CONVS:
        return LINEAR
    if type(module) in _BN_TAILS:
        return BATCHNORM
    forward = type(module).forward
    for types, treatment in _TREATMENTS:
        if any(isinstance(module, t) and forward is t.forward for t in types):
            return treatment
    return None


# ---------------------------------------------------------------------------------------
# residual blocks: forwards identical to the originals except for an explicit Norm sum
# ---------------------------------------------------------------------------------------
def _tv_basic_block(self: nn.Module, x: Tensor) -> Tensor:
    identity = x
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    if self.downsample is not None:
        identity = self.downsample(x)
    return self.relu(lrp_sum(out, identity))


def _tv_bottleneck(self: nn.Module, x: Tensor) -> Tensor:
    identity = x
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    if self.downsample is not None:
        identity = self.downsample(x)
    return self.relu(lrp_sum(out, identity))


def _timm_tail(self: nn.Module, x: Tensor, shortcut: Tensor) -> Tensor:
    if self.se is not None:
        x = self.se(x)
    if self.drop_path is not None:
        x = self.drop_path(x)
    if self.downsample is not None:
        shortcut = self.downsample(shortcut)
    return lrp_sum(x, shortcut)


def _timm_basic_block(self: nn.Module, x: Tensor) -> Tensor:
    shortcut = x
    x = self.aa(self.act1(self.drop_block(self.bn1(self.conv1(x)))))
    x = self.bn2(self.conv2(x))
    return self.act2(_timm_tail(self, x, shortcut))


def _timm_bottleneck(self: nn.Module, x: Tensor) -> Tensor:
    shortcut = x
    x = self.act1(self.bn1(self.conv1(x)))
    x = self.aa(self.act2(self.drop_block(self.bn2(self.conv2(x)))))
    x = self.bn3(self.conv3(x))
    return self.act3(_timm_tail(self, x, shortcut))


_RESIDUALS: list[tuple[type, Callable[[nn.Module, Tensor], Tensor]]] = []


def register_residual(cls: type, forward: Callable[[nn.Module, Tensor], Tensor]) -> None:
    """Replace the forward of blocks of `cls` by `forward` (with lrp_sum for the addition)."""
    _RESIDUALS.insert(0, (cls, forward))


def residual_forward_of(module: nn.Module) -> Callable[[nn.Module, Tensor], Tensor] | None:
    for cls, fwd in _RESIDUALS:
        if type(module) is cls:  # exact type: a subclass may have changed its forward
            return fwd
    return None


try:
    from torchvision.models.resnet import BasicBlock as _TvBasic
    from torchvision.models.resnet import Bottleneck as _TvBottleneck

    register_residual(_TvBasic, _tv_basic_block)
    register_residual(_TvBottleneck, _tv_bottleneck)
except ImportError:  # pragma: no cover
    pass

try:
    from timm.models.resnet import BasicBlock as _TimmBasic
    from timm.models.resnet import Bottleneck as _TimmBottleneck

    register_residual(_TimmBasic, _timm_basic_block)
    register_residual(_TimmBottleneck, _timm_bottleneck)
except ImportError:  # pragma: no cover
    pass


def _timm_dw_separable(self: nn.Module, x: Tensor) -> Tensor:
    if self.conv_s2d is not None:
        raise UnsupportedLayerError("timm DepthwiseSeparableConv with space-to-depth (conv_s2d) has no LRP rule")
    shortcut = x
    x = self.se(self.aa(self.bn1(self.conv_dw(x))))
    x = self.bn2(self.conv_pw(x))
    return lrp_sum(self.drop_path(x), shortcut) if self.has_skip else x


def _timm_inverted_residual(self: nn.Module, x: Tensor) -> Tensor:
    if self.conv_s2d is not None:
        raise UnsupportedLayerError("timm InvertedResidual with space-to-depth (conv_s2d) has no LRP rule")
    shortcut = x
    x = self.bn2(self.conv_dw(self.bn1(self.conv_pw(x))))
    x = self.bn3(self.conv_pwl(self.se(self.aa(x))))
    return lrp_sum(self.drop_path(x), shortcut) if self.has_skip else x


def _timm_bn_act_tail(self: nn.Module, x: Tensor) -> Tensor:
    return self.act(self.drop(x))


try:  # timm's MobileNet / EfficientNet pieces (EfficientNet-Lite: no squeeze-excitation)
    from timm.layers import BatchNormAct2d as _TimmBnAct
    from timm.layers import Conv2dSame as _TimmConv2dSame
    from timm.models._efficientnet_blocks import DepthwiseSeparableConv as _TimmDs
    from timm.models._efficientnet_blocks import InvertedResidual as _TimmIr

    register_residual(_TimmDs, _timm_dw_separable)
    register_residual(_TimmIr, _timm_inverted_residual)
    register_same_conv(_TimmConv2dSame)
    register_bn_tail(_TimmBnAct, nn.BatchNorm2d.forward, _timm_bn_act_tail)
except ImportError:  # pragma: no cover
    pass


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
