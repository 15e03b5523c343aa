"""ConvNeXt (torchvision `convnext_*` and timm `convnext_*`): LRP, components and stages.

Structure: a patchify stem (4x4 conv + LayerNorm2d), four stages of blocks separated by
downsampling layers (LayerNorm2d + 2x2 conv), and a head (global average pool, LayerNorm2d,
Linear). A block is 7x7 depthwise conv -> (permute to channels last) LayerNorm -> pwconv1
(Linear C -> 4C) -> GELU -> pwconv2 (Linear 4C -> C) -> (permute back) -> layer scale
(a per-channel constant multiply) -> residual sum. timm's `conv_mlp=True` variant uses
LayerNorm2d and 1x1 convs instead of the permutes and Linears.

LRP (each choice and its source):
- LayerNorm and LayerNorm2d: AttnLRP's LayerNorm treatment (Achtibat et al., "AttnLRP:
  Attention-Aware Layer-Wise Relevance Propagation for Transformers", ICML 2024; lxt's
  `lxt.efficient.patches.layer_norm_forward`, parity tested): the standard deviation is a
  constant (identity rule on the normalisation), so relevance flows through
  the centring and the affine map as through a linear layer (z-rule, conserving for a zero
  bias). Generic: `pxopt.lrp.rules.LayerNormFn`, registered per class (nn.LayerNorm, timm
  LayerNorm / LayerNorm2d, torchvision's ConvNeXt LayerNorm2d) in `pxopt.lrp.canonizers`.
- GELU: the identity rule for element-wise activations (AttnLRP; zennit's Pass).
- layer scale: a per-channel constant multiply y = gamma * z is a diagonal linear map whose
  z-rule is R_z = z gamma R / y = R: relevance passes unchanged (`lrp_pass`). For LRP-0 /
  epsilon this equals merging gamma into pwconv2; sign-sensitive rules (z+, alpha-beta,
  gamma) on pwconv2 see its own weights, gamma applied after them.
- permutes: plain gradient (a reshuffle moves relevance with its value).
- residual sum: the Norm rule (`lrp_sum`), as for ResNets (zennit's canonisers).
- 7x7 depthwise, stem, downsampling convs and the Linears: the group's layer rule.

Components: the inverted-bottleneck hidden neurons (pwconv1's 4C outputs, kind "mlp"; for
timm conv_mlp=True its 1x1 conv's channels, kind "conv"). Zeroing one makes GELU output 0,
so pwconv2 gets nothing from it: masking equals removing the neuron (pwconv1 row, pwconv2
column), and these two layers hold almost all of a block's weights (8 C^2 of 8 C^2 + 49 C). Every other channel (stem,
depthwise, pwconv2, downsampling) lives on the residual stream and is normalised by a
LayerNorm over channels: a zeroed channel still shifts the LayerNorm's mean and variance,
so masking it differs from removing it. Those layers stay in the layer map (they carry rules
and relevance) with `prunable=False`.

Stage groups (the ResNet rule, `stage_groups(4)`): stem + stage 1 low, stages 2-3 mid,
stage 4 high; a downsampling layer belongs to the stage it opens (as ResNet's downsample
convs do); the classifier is fc. The count grouping splits the hidden layers by position.

Implements the family protocol (`pxopt.families.base.Family`): `layer_map`, `stage_groups`,
`classifier_names`, `block_forwards` (the blocks' LRP forwards), `removable`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from torch import Tensor, nn

from pxopt.families import register_family
from pxopt.families.base import Family
from pxopt.lrp.rules import lrp_pass, lrp_sum
from pxopt.vocab import DEFAULT_GROUPING

STAGE_RULE = "convnext"


def _tv_classes() -> tuple[type, type] | None:
    try:
        from torchvision.models.convnext import CNBlock, ConvNeXt
    except ImportError:  # pragma: no cover
        return None
    return ConvNeXt, CNBlock


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


def stage_of(name: str) -> int | None:
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


def is_hidden_neuron(name: str) -> bool:
    """pwconv1, whose outputs are the MLP neurons: torchvision `block.3`, timm `mlp.fc1`."""
    return name.endswith(".block.3") or name.endswith(".mlp.fc1")


class ConvNeXtFamily(Family):
    """torchvision and timm ConvNeXt (see the module docstring)."""

    name: ClassVar[str] = "convnext"
    kind: ClassVar[str] = "cnn"
    priority: ClassVar[int] = 10
    summary: ClassVar[str] = ("ConvNeXt (torchvision convnext_*, timm convnext_*): inverted-"
                              "bottleneck MLP neurons; LayerNorm by AttnLRP's rule")

    def matches(self, model: nn.Module) -> bool:
        classes = [c for c in (_tv_classes(), _timm_classes()) if c is not None]
        return any(isinstance(model, c[0]) and type(model).forward is c[0].forward for c in classes)

    # ------------------------------------------------------------------ structure
    def _convs(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]

    def classifier_names(self, model: nn.Module) -> list[str]:
        return [n for n, _ in self._convs(model) if stage_of(n) is None]

    def stage_groups(self, model: nn.Module, names: list[str],
                     example_input: Tensor | None) -> tuple[str, dict[str, str]] | None:
        stages = {n: stage_of(n) or 0 for n in names}
        from pxopt.layermap import stage_groups

        split = stage_groups(1 + max(stages.values(), default=0))
        if not split:
            return None
        return STAGE_RULE, {n: split[k] for n, k in stages.items()}

    def layer_map(self, model: nn.Module, boundaries: tuple[float, float], *,
                  grouping: str = DEFAULT_GROUPING, example_input: Tensor | None = None) -> Any:
        """Every conv / linear layer (they all carry rules); only pwconv1 is prunable."""
        from pxopt import layermap as lmod

        layers_ = self._convs(model)
        head = set(self.classifier_names(model))
        body = [(n, m) for n, m in layers_ if n not in head]
        (first, m0), hidden = body[0], body[1:]
        split = self.stage_groups(model, [n for n, _ in body], example_input) \
            if grouping == "stage" else None
        layers = lmod.LayerMap()
        layers.grouping, layers.stage_rule = ("stage", split[0]) if split else ("count", "")
        layers.append(lmod.Layer(first, m0, "conv", "input", int(m0.out_channels), -1, prunable=False))
        for depth, (n, m) in enumerate(hidden):
            neuron = is_hidden_neuron(n)
            if isinstance(m, nn.Conv2d):
                kind, size = "conv", int(m.out_channels)
            else:
                kind, size = ("mlp" if neuron else "linear"), int(m.out_features)
            group = split[1][n] if split else lmod.depth_group(depth, len(hidden), boundaries)
            layers.append(lmod.Layer(n, m, kind, group, size, depth, prunable=neuron))
        tail = [(n, m) for n, m in layers_ if n in head]
        for i, (n, m) in enumerate(tail):
            kind = "head" if i == len(tail) - 1 else "linear"
            layers.append(lmod.Layer(n, m, kind, "fc", int(m.out_features), len(hidden) + i,
                                     prunable=False))
        return layers

    # ------------------------------------------------------------------ LRP
    def block_forwards(self) -> Mapping[type, Callable[..., Tensor]]:
        out: dict[type, Callable[..., Tensor]] = {}
        tv, timm = _tv_classes(), _timm_classes()
        if tv is not None:
            out[tv[1]] = _tv_block
        if timm is not None:
            out[timm[1]] = _timm_block
        return out

    # ------------------------------------------------------------------ components
    def removable(self, layer: Any) -> bool:
        """Only the MLP neurons: every other channel is normalised by a LayerNorm."""
        return bool(getattr(layer, "prunable", True)) and layer.kind != "heads"


FAMILY = register_family(ConvNeXtFamily())

