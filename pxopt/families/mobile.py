"""MobileNetV2/V3 and EfficientNet (torchvision and timm): everything family-specific.

Matches torchvision `MobileNetV2`, `MobileNetV3`, `EfficientNet` (MBConv blocks; the V2
FusedMBConv blocks are not matched) and timm `EfficientNet` (efficientnet_*, mobilenetv2_*,
...) and `MobileNetV3` whose blocks are all DepthwiseSeparableConv / InvertedResidual /
ConvBnAct (others, e.g. EdgeResidual, CondConv: not matched, so the generic CNN path and its
refusals apply).

LRP (registered with the generic engine, `pxopt.lrp.canonizers`):
- residual blocks: their forward is replaced by an identical one whose addition is an
  explicit Norm sum (`lrp_sum`, zennit's treatment of ResNet blocks);
- squeeze-excitation (torchvision `SqueezeExcitation`, timm `SqueezeExcite`): the global
  mean is a Norm-rule pool and the gate product x * s uses `pxopt.lrp.rules.lrp_gate`.
  Choice: signal-take-all (Arras et al. 2017, "Explaining recurrent neural network
  predictions in sentiment analysis"; Arras et al. 2019, "Explaining and interpreting
  LSTMs"): the gate s is treated as a weight that rescales the signal, all relevance goes to
  x (R_x = R). Why not AttnLRP's uniform product rule (Achtibat et al. 2024, Prop. 3.3,
  R_x = R_s = R / 2)? Here s is a function of x itself through a global pool, so half the
  relevance would be spread over all positions by the pool's Norm rule (blurring heatmaps)
  and partly absorbed by the SE convs' biases; the gate carries no evidence of its own, it
  only selects channels. Both conserve relevance; `pxopt.lrp.rules.GATE_SHARE = 0.5` gives
  the uniform rule (tests check conservation under both).
- BatchNorm is merged into the conv before it (zennit's canoniser; timm `BatchNormAct2d`
  counts as BatchNorm then its activation); SiLU / Hardswish / Hardsigmoid / ReLU6 / ReLU
  get the Pass rule (zennit's treatment of activations); torchvision's `MobileNetV2`
  top-level forward is replaced by the same one with its functional average pool as a
  Norm-rule pool.

Components (prunable): the expansion conv of each inverted residual block (its hidden
channels: with the depthwise conv and its BatchNorm following, the SE input and the
projection's input channel, masked and removed together) and the last conv of the network
(its channels go only to the pool and classifier); plus the hidden Linear of torchvision
MobileNetV3's classifier and the classifier head as in any CNN. Not components (they get an
LRP rule only, `LayerMap.rule_only`): the stem, depthwise and projection convs (projections
write the residual stream, coupled across a stage; depthwise channels are tied to the
expansion's), and the SE convs (zeroing an SE output channel gives a gate of sigmoid(0),
not a removed channel).

Stage groups: by resolution, stage k = the output resolution after k strided convs (the SE
convs and a head conv after the pool take the stage of the conv before them); five stages
(a 224x224 input: 112, 56, 28, 14, 7) split low, low, mid, mid, high by
`pxopt.layers.stage_groups`; the stem is the `input` group.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
import torchvision.models.efficientnet as _tv_eff
import torchvision.models.mobilenetv2 as _tv_mb2
import torchvision.models.mobilenetv3 as _tv_mb3
from torch import Tensor, nn
from torchvision.ops.misc import SqueezeExcitation as _TvSE

from pxopt.families import register_family
from pxopt.families.base import BlockForward, Family, StageSplit, Target
from pxopt.layermap import Layer, LayerMap, depth_group, stage_groups
from pxopt.lrp.rules import lrp_gate, lrp_norm, lrp_sum

try:
    import timm.models._efficientnet_blocks as _timm_blocks
    from timm.models.efficientnet import EfficientNet as _TimmEfficientNet
    from timm.models.mobilenetv3 import MobileNetV3 as _TimmMobileNetV3

    _TIMM_MODELS: tuple[type, ...] = (_TimmEfficientNet, _TimmMobileNetV3)
    _TIMM_BLOCKS: tuple[type, ...] = (_timm_blocks.DepthwiseSeparableConv, _timm_blocks.InvertedResidual,
                                      _timm_blocks.ConvBnAct)
    _TIMM_SE: tuple[type, ...] = (_timm_blocks.SqueezeExcite,)
except ImportError:  # pragma: no cover
    _TIMM_MODELS = _TIMM_BLOCKS = _TIMM_SE = ()

TV_MODELS: tuple[type, ...] = (_tv_mb2.MobileNetV2, _tv_mb3.MobileNetV3, _tv_eff.EfficientNet)
TV_BLOCKS: tuple[type, ...] = (_tv_mb2.InvertedResidual, _tv_mb3.InvertedResidual, _tv_eff.MBConv)
SE_TYPES: tuple[type, ...] = (_TvSE, *_TIMM_SE)


def matches(model: nn.Module) -> bool:
    """A torchvision / timm MobileNetV2/V3 or EfficientNet made only of known blocks."""
    if not isinstance(model, TV_MODELS + _TIMM_MODELS):
        return False
    if isinstance(model, _tv_eff.EfficientNet) and any(
            isinstance(m, _tv_eff.FusedMBConv) for m in model.modules()):
        return False
    if isinstance(model, _TIMM_MODELS):
        blocks = getattr(model, "blocks", None)
        if not isinstance(blocks, nn.Sequential):
            return False
        for stage in blocks:
            for block in stage:
                if type(block) not in _TIMM_BLOCKS:
                    return False
    return True


# ---------------------------------------------------------------------------------------
# LRP: forwards equal to the originals except for explicit Norm sums, pools and gates
# ---------------------------------------------------------------------------------------
def _tv_mb2_block(self: nn.Module, x: Tensor) -> Tensor:
    return lrp_sum(x, self.conv(x)) if self.use_res_connect else self.conv(x)


def _tv_mb3_block(self: nn.Module, x: Tensor) -> Tensor:
    out = self.block(x)
    return lrp_sum(out, x) if self.use_res_connect else out


def _tv_mbconv(self: nn.Module, x: Tensor) -> Tensor:
    out = self.block(x)
    if self.use_res_connect:
        return lrp_sum(self.stochastic_depth(out), x)
    return out


def _tv_mb2_model(self: nn.Module, x: Tensor) -> Tensor:
    x = self.features(x)
    x = lrp_norm(x, lambda t: nn.functional.adaptive_avg_pool2d(t, (1, 1)))
    return self.classifier(torch.flatten(x, 1))


def _tv_se(self: nn.Module, x: Tensor) -> Tensor:
    return lrp_gate(x, self._scale(x))


def _timm_se(self: nn.Module, x: Tensor) -> Tensor:
    s = lrp_norm(x, lambda t: t.mean((2, 3), keepdim=True))
    return lrp_gate(x, self.gate(self.conv_expand(self.act1(self.conv_reduce(s)))))


def _timm_skip(self: nn.Module, x: Tensor, shortcut: Tensor) -> Tensor:
    return lrp_sum(self.drop_path(x), shortcut) if self.has_skip else x


def _timm_s2d(self: nn.Module, x: Tensor) -> Tensor:
    if getattr(self, "conv_s2d", None) is not None:
        x = self.bn_s2d(self.conv_s2d(x))
    return x


def _timm_ds(self: nn.Module, x: Tensor) -> Tensor:
    shortcut = x
    x = _timm_s2d(self, x)
    x = self.se(self.aa(self.bn1(self.conv_dw(x))))
    return _timm_skip(self, self.bn2(self.conv_pw(x)), shortcut)


def _timm_ir(self: nn.Module, x: Tensor) -> Tensor:
    shortcut = x
    x = _timm_s2d(self, x)
    x = self.bn1(self.conv_pw(x))
    x = self.se(self.aa(self.bn2(self.conv_dw(x))))
    return _timm_skip(self, self.bn3(self.conv_pwl(x)), shortcut)


def _timm_cba(self: nn.Module, x: Tensor) -> Tensor:
    shortcut = x
    return _timm_skip(self, self.aa(self.bn1(self.conv(x))), shortcut)


def block_forwards() -> dict[type, BlockForward]:
    """The family's LRP forwards by exact block class."""
    out: dict[type, BlockForward] = {
        _tv_mb2.InvertedResidual: _tv_mb2_block, _tv_mb3.InvertedResidual: _tv_mb3_block,
        _tv_eff.MBConv: _tv_mbconv, _tv_mb2.MobileNetV2: _tv_mb2_model, _TvSE: _tv_se}
    if _TIMM_SE:
        out.update({_timm_blocks.SqueezeExcite: _timm_se, _timm_blocks.DepthwiseSeparableConv: _timm_ds,
                    _timm_blocks.InvertedResidual: _timm_ir, _timm_blocks.ConvBnAct: _timm_cba})
    return out


# ---------------------------------------------------------------------------------------
# Structure: components, rule-only convs, stage groups, tied channels
# ---------------------------------------------------------------------------------------
@dataclass
class Structure:
    """The family's view of one model (names are `named_modules` names)."""

    components: list[str] = field(default_factory=list)  # prunable convs, forward order
    rule_only: dict[str, str] = field(default_factory=dict)  # conv -> group (no components)
    groups: dict[str, str] = field(default_factory=dict)  # component conv -> group
    followers: dict[str, list[str]] = field(default_factory=dict)  # expansion -> [dw, dw's BN]
    tied: list[str] = field(default_factory=list)  # modules whose out channels follow a component
    stages: int = 0


_STRUCTURES: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, Structure]] = weakref.WeakKeyDictionary()


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def structure(model: nn.Module) -> Structure:
    """Components, rule-only convs and stage groups of a matched model (cached per model)."""
    modules = dict(model.named_modules())
    key = tuple((n, id(m)) for n, m in modules.items() if isinstance(m, nn.Conv2d))
    cached = _STRUCTURES.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    se_convs = {f"{n}.{c}" for n, m in modules.items() if isinstance(m, SE_TYPES)
                for c, sub in m.named_modules() if isinstance(sub, nn.Conv2d)}
    convs = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)]
    main = [n for n in convs if n not in se_convs]
    st = Structure()
    # stage of each conv: number of strided main convs up to and including it
    stage_of: dict[str, int] = {}
    k = 0
    for n in convs:
        m = modules[n]
        if n not in se_convs and max(m.stride) > 1:
            k += 1
        stage_of[n] = k
    n_stages = max(stage_of.values()) if stage_of else 0
    split = stage_groups(n_stages) or ["mid"] * max(n_stages, 1)
    st.stages = n_stages

    def group(n: str) -> str:
        return split[min(max(stage_of[n], 1), n_stages) - 1] if n_stages else "mid"

    block_of = {n: b for b, m in modules.items() if isinstance(m, TV_BLOCKS + _TIMM_BLOCKS)
                for n in modules if n.startswith(b + ".")}
    for i, n in enumerate(main):
        m = modules[n]
        nxt = modules[main[i + 1]] if i + 1 < len(main) else None
        if i == 0:
            st.rule_only[n] = "input"
        elif i == len(main) - 1:
            st.components.append(n)
            st.groups[n] = split[-1] if split else "mid"
        elif (nxt is not None and _is_depthwise(nxt) and m.groups == 1 and nxt.in_channels == m.out_channels
              and n in block_of and block_of.get(main[i + 1]) == block_of[n]):
            st.components.append(n)
            st.groups[n] = group(n)
            dw = main[i + 1]
            st.followers[n] = [dw, *([_bn_after(modules, dw)] if _bn_after(modules, dw) else [])]
            st.tied.append(dw)
            block = block_of[n]
            st.tied += [c for c in se_convs if c.startswith(block + ".") and c.endswith(("fc2", "conv_expand"))]
        else:
            st.rule_only[n] = group(n)
    for n in se_convs:
        # an SE conv takes the group of the depthwise conv before it (the block's stage)
        before = [c for c in main if convs.index(c) < convs.index(n)]
        st.rule_only[n] = group(before[-1]) if before and before[-1] in stage_of else "mid"
    _STRUCTURES[model] = (key, st)
    return st


def _bn_after(modules: dict[str, nn.Module], name: str) -> str | None:
    """The BatchNorm registered right after conv `name` (its own: same channel count)."""
    names = list(modules)
    i = names.index(name)
    for cand in names[i + 1:i + 2]:
        m = modules[cand]
        if isinstance(m, nn.BatchNorm2d) and m.num_features == modules[name].out_channels:
            return cand
    return None


def discover(model: nn.Module, boundaries: tuple[float, float], grouping: str = "stage") -> LayerMap:
    """The layer map of a matched model (module docstring). grouping="count": the components
    by position (`boundaries`) instead of stages; the rule-only convs keep their stage group."""
    st = structure(model)
    modules = dict(model.named_modules())
    layers = LayerMap()
    for depth, n in enumerate(st.components):
        layers.append(Layer(n, modules[n], "conv", st.groups[n], int(modules[n].out_channels), depth))
    linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    for i, n in enumerate(linears):
        kind = "head" if i == len(linears) - 1 else "linear"
        layers.append(Layer(n, modules[n], kind, "fc", int(modules[n].out_features),
                            len(st.components) + i))
    if grouping == "count":
        hidden = [la for la in layers if la.group != "fc"]
        for i, la in enumerate(hidden):
            la.group = depth_group(i, len(hidden), boundaries)
    layers.rule_only = dict(st.rule_only)
    layers.tied = list(st.tied)
    layers.grouping = grouping
    layers.stage_rule = "resolution" if grouping == "stage" else ""
    return layers


def mask_followers(model: nn.Module, layer: object) -> list[tuple[Tensor, int]]:
    """Extra tensors to zero (dim 0 rows) so a pruned expansion channel is zero after the
    depthwise conv and its BatchNorm too (as if removed, which Torch-Pruning does)."""
    if not matches(model):
        return []
    names = structure(model).followers.get(getattr(layer, "name", ""), [])
    out: list[tuple[Tensor, int]] = []
    for n in names:
        m = model.get_submodule(n)
        for t in (m.weight, m.bias):
            if t is not None:
                out.append((t, 0))
    return out



# ---------------------------------------------------------------------------------------
# The family adapter (pxopt.families.base protocol)
# ---------------------------------------------------------------------------------------

class MobileFamily(Family):
    """MobileNetV2/V3 and EfficientNet, torchvision and timm (see the module docstring).

    Beyond the protocol, its layer maps carry `rule_only` (convs with a rule but no
    components: stem, depthwise, projection, SE) and `tied` (depthwise convs and SE
    expansions whose channels follow an expansion conv's), read by the CNN engine and by
    physical removal.
    """

    name = "mobilenet-efficientnet"
    kind = "cnn"
    priority = 10
    summary = ("MobileNetV2/V3, EfficientNet (torchvision, timm): expansion-conv channels "
               "(with their depthwise conv), last conv; SE gates signal-take-all")

    def matches(self, model: nn.Module) -> bool:
        try:
            return matches(model)
        except Exception:  # noqa: BLE001 - the protocol: never raise
            return False

    def layer_map(self, model: nn.Module, boundaries: tuple[float, float], *, grouping: str,
                  example_input: Tensor | None) -> LayerMap:
        return discover(model, boundaries, grouping)

    def stage_groups(self, model: nn.Module, names: list[str],
                     example_input: Tensor | None) -> StageSplit | None:
        st = structure(model)
        return "resolution", {n: st.groups.get(n, st.rule_only.get(n, "mid")) for n in names}

    def block_forwards(self) -> dict[type, BlockForward]:
        return block_forwards()

    def mask_targets(self, model: nn.Module, layer: Layer) -> list[Target]:
        from pxopt.prune.targets import channel_targets, identity

        return [*channel_targets(model, layer),
                *(Target(t, d, identity) for t, d in mask_followers(model, layer))]


register_family(MobileFamily())
