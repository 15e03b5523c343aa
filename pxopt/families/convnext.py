"""ConvNeXt (torchvision `convnext_*` and timm `convnext_*`): LRP, components and stages.

Structure: a patchify stem (4x4 conv + LayerNorm2d), four stages of blocks separated by
downsampling layers (LayerNorm2d + 2x2 conv), and a head (global average pool, LayerNorm2d,
Linear). A block is 7x7 depthwise conv -> (permute to channels last) LayerNorm -> pwconv1
(Linear C -> 4C) -> GELU -> pwconv2 (Linear 4C -> C) -> (permute back) -> layer scale
(a per-channel constant multiply) -> residual sum. timm's `conv_mlp=True` variant uses
LayerNorm2d and 1x1 convs instead of the permutes and Linears.

LRP (each choice and its source):
- LayerNorm and LayerNorm2d: AttnLRP's LayerNorm treatment (Achtibat et al., "AttnLRP:
  Attention-Aware Layer-Wise Relevance Propagation for Transformers", ICML 2024, Sec. 3.3;
  lxt's `layer_norm` rule): the standard deviation is a constant, so relevance flows through
  the centring and the affine map as through a linear layer (z-rule, conserving for a zero
  bias). Generic: `pxopt.lrp.rules.LayerNormFn`, registered per class in
  `pxopt.lrp.canonizers` (torchvision's LayerNorm2d is registered here).
- GELU: the identity rule for element-wise activations (AttnLRP Sec. 3.3; zennit's Pass).
- layer scale: a per-channel constant multiply y = gamma * z is a diagonal linear map whose
  z-rule is R_z = z gamma R / y = R: relevance passes unchanged (`lrp_pass`).
- permutes: plain gradient (a reshuffle moves relevance with its value).
- residual sum: the Norm rule (`lrp_sum`), as for ResNets (zennit's canonisers).
- 7x7 depthwise, stem, downsampling convs and the Linears: the group's layer rule.

Components: the inverted-bottleneck hidden neurons (pwconv1's 4C outputs, kind "mlp"; for
timm conv_mlp=True its 1x1 conv's channels, kind "conv"). Zeroing one makes GELU output 0,
so pwconv2 gets nothing from it: masking equals removing the neuron (pwconv1 row, pwconv2
column), and they hold ~2/3 of each block's parameters. Every other channel (stem,
depthwise, pwconv2, downsampling) lives on the residual stream and is normalised by a
LayerNorm over channels: a zeroed channel still shifts the LayerNorm's mean and variance,
so masking it differs from removing it. Those layers stay in the layer map (they carry rules
and relevance) with `prunable=False`.

Stage groups (the ResNet rule, `pxopt.layers.stage_groups`): stem + stage 1 low, stages
2-3 mid, stage 4 high; a downsampling layer belongs to the stage it opens (as ResNet's
downsample convs do); the classifier is fc.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from pxopt.layers import Layer, LayerMap, register_discoverer, stage_groups
from pxopt.lrp import canonizers as cz
from pxopt.lrp.rules import lrp_pass, lrp_sum

STAGE_RULE = "convnext"


def _tv_classes() -> tuple[type, type, type] | None:
    try:
        from torchvision.models.convnext import CNBlock, ConvNeXt, LayerNorm2d
    except ImportError:  # pragma: no cover
        return None
    return ConvNeXt, CNBlock, LayerNorm2d


def _timm_classes() -> tuple[type, type] | None:
    try:
        from timm.models.convnext import ConvNeXt, ConvNeXtBlock
    except ImportError:  # pragma: no cover
        return None
    return ConvNeXt, ConvNeXtBlock


def _scaled(x: Tensor, scale: Callable[[Tensor], Tensor]) -> Tensor:
    """Layer scale: relevance passes unchanged (z-rule of a diagonal linear map)."""
    return lrp_pass(x, scale)


def _tv_block(self: nn.Module, x: Tensor) -> Tensor:
    """torchvision CNBlock.forward with the layer scale and the residual sum made explicit."""
    ls = self.layer_scale
    y = _scaled(self.block(x), lambda t: ls * t)
    return lrp_sum(self.stochastic_depth(y), x)


def _timm_block(self: nn.Module, x: Tensor) -> Tensor:
    """timm ConvNeXtBlock.forward with the layer scale and the residual sum made explicit."""
    shortcut = x
    x = self.conv_dw(x)
    if self.use_conv_mlp:
        x = self.mlp(self.norm(x))
    else:
        x = self.mlp(self.norm(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
    if self.gamma is not None:
        gamma = self.gamma.reshape(1, -1, 1, 1)
        x = _scaled(x, lambda t: t.mul(gamma))
    return lrp_sum(self.drop_path(x), self.shortcut(shortcut))


class ConvNeXtFamily:
    """The family adapter: what it matches, its layer map, its LRP canonisation."""

    name = "convnext"
    label = "ConvNeXt (torchvision convnext_*, timm convnext_*): inverted-bottleneck MLP neurons"

    def matches(self, model: nn.Module) -> bool:
        classes = [c for c in (_tv_classes(), _timm_classes()) if c is not None]
        return any(isinstance(model, c[0]) for c in classes)

    _installed = False

    def install(self) -> None:
        """Register the blocks' forwards and torchvision's LayerNorm2d with the CNN engine (once)."""
        if ConvNeXtFamily._installed:
            return
        ConvNeXtFamily._installed = True
        tv = _tv_classes()
        if tv is not None:
            cz.register_residual(tv[1], _tv_block)
            cz.register_layer_norm(tv[2], 1)
        timm = _timm_classes()
        if timm is not None:
            cz.register_residual(timm[1], _timm_block)

    def stage_of(self, model: nn.Module, name: str) -> int | None:
        """Stage index (0-3) of a layer; None for the head. torchvision: features.0 stem,
        features.(2k+1) stage k, features.(2k) its downsampling; timm: stem, stages.k."""
        top, _, rest = name.partition(".")
        if top == "features":
            k = int(rest.split(".", 1)[0])
            return k // 2 if k > 0 else 0
        if top == "stem":
            return 0
        if top == "stages":
            return int(rest.split(".", 1)[0])
        return None

    @staticmethod
    def _is_hidden_neuron(model: nn.Module, name: str) -> bool:
        """pwconv1: torchvision `block.3`, timm `mlp.fc1`."""
        return name.endswith(".block.3") or name.endswith(".mlp.fc1")

    def layer_map(self, model: nn.Module, boundaries: tuple[float, float]) -> LayerMap | None:
        if not self.matches(model):
            return None
        self.install()
        names = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
        body = [(n, m) for n, m in names if self.stage_of(model, n) is not None]
        head = [(n, m) for n, m in names if self.stage_of(model, n) is None]
        n_stages = 1 + max(self.stage_of(model, n) or 0 for n, _ in body)
        split = stage_groups(n_stages) or ["mid"] * n_stages
        layers = LayerMap()
        layers.grouping, layers.stage_rule = "stage", STAGE_RULE
        first, hidden = body[0], body[1:]
        m0 = first[1]
        layers.append(Layer(first[0], m0, "conv", "input", int(m0.out_channels), -1, prunable=False))
        for depth, (n, m) in enumerate(hidden):
            neuron = self._is_hidden_neuron(model, n)
            if isinstance(m, nn.Conv2d):
                kind, size = "conv", int(m.out_channels)
            else:
                kind, size = ("mlp" if neuron else "linear"), int(m.out_features)
            group = split[self.stage_of(model, n) or 0]
            layers.append(Layer(n, m, kind, group, size, depth, prunable=neuron))
        for i, (n, m) in enumerate(head):
            kind = "head" if i == len(head) - 1 else "linear"
            layers.append(Layer(n, m, kind, "fc", int(m.out_features), len(hidden) + i,
                                prunable=False))
        return layers


FAMILY = ConvNeXtFamily()
FAMILY.install()


def discover_convnext(model: nn.Module, boundaries: tuple[float, float]) -> LayerMap | None:
    """`pxopt.layers` discoverer: the ConvNeXt layer map, None for other models."""
    return FAMILY.layer_map(model, boundaries)


register_discoverer(discover_convnext)
