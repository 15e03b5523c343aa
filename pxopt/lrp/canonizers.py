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
- residual blocks (torchvision BasicBlock/Bottleneck, timm BasicBlock/Bottleneck): their
  forward is replaced by an equivalent one whose addition is an explicit sum with the
  Norm rule.

Other engines extend the tables with `register_treatment` / `register_residual`.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

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


def treatment_of(module: nn.Module) -> str | None:
    """The treatment of a leaf module, or None when it has none.

    A subclass counts only when it keeps its base's forward: timm's StdConv2d is a Conv2d
    whose forward standardises the weight, so the Conv2d rule (raw weight) would be wrong.
    """
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
