"""torchvision DenseNet (densenet121/161/169/201 and small `DenseNet(...)` variants).

Structure (torchvision.models.densenet): `features` = conv0, norm0, relu0, pool0, then dense
blocks `denseblockK` (a `_DenseBlock` of `_DenseLayer`s) separated by `transitionK`
(norm, relu, 1x1 conv, 2x2 average pool), then `norm5`; the forward ends with a functional
ReLU, global average pool and the `classifier` Linear. A dense layer computes
`conv2(relu2(norm2(conv1(relu1(norm1(cat(previous features)))))))`: its BatchNorm `norm1`
comes *before* its conv (pre-activation BN-ReLU-Conv) and normalises the concatenation of
every earlier feature map of the block; `norm2` directly follows `conv1`.

LRP treatment (and why)
- BatchNorm right after a conv (`norm0` after `conv0`, `norm2` after `conv1`): merged into
  the conv for the backward, as everywhere in pxopt (zennit's `MergeBatchNorm`).
- BatchNorm on a layer's input (`norm1` of each dense layer, each transition's `norm`,
  `norm5`): it cannot be folded into the conv that follows it, because a ReLU sits in
  between (the fusion of Guillemot et al. 2020, "Breaking Batch Normalization for better
  explainability ... through LRP", arXiv:2002.11018, and zennit's `MergeBatchNorm` need the
  BatchNorm directly after the linear layer), nor into the convs before it, because each of
  their output channels is normalised differently by every later layer that reads it (and,
  for the stem, a max pool sits in between). It is therefore its own layer: an element-wise
  affine map y = s x + c (s = gamma / sqrt(var + eps), c = beta - mean s, eval mode) with
  the epsilon rule R_x = s x R_y / stab(s x + c) (`pxopt.lrp.rules.lrp_affine`, stabiliser
  1e-6), exactly what zennit's `Epsilon` hook computes on a BatchNorm module (the parity
  tests use that). Hui & Binder 2019 ("BatchNorm Decomposition for Deep Neural Network
  Interpretation", IWANN, LNCS 11507) compare the choices for BatchNorm layers: the identity
  rule (zennit's default `Pass` for an unmerged BatchNorm) performs poorly on DenseNet, where
  the BatchNorm normalises concatenated features; the epsilon rule works but can misbehave
  where the shift cancels the input (their MobileNet case); they also propose a rule of
  their own, not implemented here. The epsilon rule treats the shift as any bias is treated
  under the epsilon rule (it absorbs its share), so it agrees with the merged case (where the
  shift is the merged conv's bias) up to the stabiliser, whereas Pass would treat the same
  operation differently depending on where it sits. On a bias-free variant (zero running
  mean and BN bias) the network conserves relevance exactly (tests, float64).
- Concatenation: `torch.cat`'s gradient gives each input its slice of the output's
  relevance, so every earlier feature map receives exactly the relevance of its channels,
  summed over all later layers that read it (the engine allows `CatBackward0` generically).
- The model's forward (functional ReLU and adaptive average pool) and the dense layer's
  (optionally checkpointed) forward are replaced for the explanation by equal forwards
  whose ReLU has the Pass rule and whose average pool has the Norm rule (as for ResNets).

Components: the output channels of every conv (conv0, each dense layer's bottleneck conv1
and growth conv2, each transition's conv); the classifier is the head (never pruned).
- conv1 (bn_size * growth_rate channels) feeds only its own layer's norm2 -> relu2 -> conv2:
  zeroing conv1's row and norm2's channel is removing the channel (masking); slicing drops
  it from conv1 / norm2 and from conv2's input.
- conv0, conv2 and transition convs are global: their channels are concatenated into the
  input of every later dense layer of the block and of the block's transition (or norm5),
  each behind a pre-activation BatchNorm that would turn a zeroed channel into the constant
  relu(shift). Masking therefore also zeroes the channel's weight and bias in every such
  BatchNorm (`feature_readers` gives each with the channel's offset in its concatenation;
  the family's `mask_targets`), so the later layers see
  exactly what they see once the channel is removed; Torch-Pruning removes the channel from
  all of them (it follows the concatenations), and the pruned copy equals the masked model.
  Slicing (`slice_plan`) drops the pruned global channels from their producers and, in
  every reader, from the BatchNorm and the reading layer's input (conv1, the transition
  conv, the classifier), as Torch-Pruning does; bottleneck channels use the generic pairs.

Stage groups (rule "densenet"): dense blocks are the stages, each transition with the block
before it (it runs at that block's resolution), the stem (conv0) with the first block:
block 1 low, the last block high, the blocks between mid (densenet121: blocks 1 / 2-3 / 4,
the grouping of ResNet's layer1 / layer2-3 / layer4); two blocks: low, high.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pxopt.errors import UnsupportedLayerError
from pxopt.families import register_family
from pxopt.families.base import BlockForward, Family, SliceEdit, SlicePlan, StageSplit, Target
from pxopt.lrp.rules import lrp_norm, lrp_pass

try:
    from torchvision.models.densenet import DenseNet, _DenseBlock, _DenseLayer, _Transition
except ImportError:  # pragma: no cover - torchvision is a dependency
    DenseNet = _DenseBlock = _DenseLayer = _Transition = None  # type: ignore[assignment,misc]


def _dense_layer_forward(self: nn.Module, x: Tensor | list[Tensor]) -> Tensor:
    """`_DenseLayer.forward` without gradient checkpointing (eval mode: dropout is off)."""
    prev = [x] if isinstance(x, Tensor) else list(x)
    bottleneck = self.conv1(self.relu1(self.norm1(torch.cat(prev, 1))))
    return self.conv2(self.relu2(self.norm2(bottleneck)))


def _densenet_forward(self: nn.Module, x: Tensor) -> Tensor:
    """`DenseNet.forward` with the final ReLU under Pass and the global pool under Norm."""
    out = lrp_pass(self.features(x), torch.relu)
    out = lrp_norm(out, lambda t: F.adaptive_avg_pool2d(t, (1, 1)))
    return self.classifier(torch.flatten(out, 1))


class DenseNetFamily(Family):
    """What pxopt knows about torchvision DenseNet (see the module docstring).

    Protocol methods used: `stage_groups` (dense blocks), `block_forwards`, `input_norms`
    (the pre-activation BatchNorms the engine must not merge), `mask_targets` (a global
    channel is also zeroed in every BatchNorm that reads it: `readers`, `feature_readers`,
    `reader_targets`) and `slice_plan` (those channels sliced out of producers and readers).
    """

    name = "torchvision-densenet"
    kind = "cnn"
    priority = 10
    summary = ("torchvision DenseNet (densenet121/161/169/201): every conv's channels; "
               "pre-activation BatchNorm under its own epsilon rule, concatenations conserved")

    def matches(self, model: nn.Module) -> bool:
        return DenseNet is not None and isinstance(model, DenseNet) \
            and type(model).forward is DenseNet.forward

    # ---- structure -------------------------------------------------------------------
    @staticmethod
    def blocks(model: nn.Module) -> list[str]:
        """Names of the dense blocks' children of `features` (denseblock1, ...), in order."""
        return [n for n, m in model.features.named_children() if isinstance(m, _DenseBlock)]

    def stage_groups(self, model: nn.Module, names: list[str],
                     example_input: Tensor | None = None) -> StageSplit | None:
        """Dense blocks as stages (transition with its block, stem with block 1)."""
        if not self.matches(model):
            return None
        n = len(self.blocks(model))
        if n < 2:
            return super().stage_groups(model, names, example_input)
        out: dict[str, str] = {}
        stage = 1
        for name in names:
            parts = name.split(".")
            if len(parts) > 1 and parts[0] == "features":
                child = parts[1]
                if child.startswith("denseblock") and child[10:].isdigit():
                    stage = int(child[10:])
                elif child.startswith("transition") and child[10:].isdigit():
                    stage = int(child[10:])
            out[name] = "low" if stage == 1 else "high" if stage == n else "mid"
        return "densenet", out

    @staticmethod
    def readers(model: nn.Module) -> list[Reader]:
        """Every pre-activation BatchNorm with the producers of the channels it normalises
        (in concatenation order) and the layer that reads its output (after the ReLU).

        conv0 (through norm0, relu0, pool0) and each transition conv (through its pool) start
        a block's feature list, each dense layer's conv2 appends to it; every dense layer's
        norm1 (read by its conv1) sees the list so far, the transition's norm (read by its
        conv) or norm5 (read by the classifier, after the global pool) sees all of it.
        """
        out: list[Reader] = []
        current: list[tuple[str, nn.Module]] = []

        def read(bn_name: str, bn: nn.Module, consumer: nn.Module) -> None:
            width = sum(int(m.out_channels) for _, m in current)
            if getattr(bn, "num_features", width) != width:
                raise UnsupportedLayerError(
                    f"layer {bn_name!r} normalises {bn.num_features} channels but its dense "
                    f"block's concatenation has {width}: not torchvision's DenseNet structure")
            out.append(Reader(bn_name, bn, consumer, list(current)))

        for cname, child in model.features.named_children():
            full = f"features.{cname}"
            if cname == "conv0" and isinstance(child, nn.Conv2d):
                current = [(full, child)]
            elif isinstance(child, _DenseBlock):
                for lname, layer in child.items():
                    read(f"{full}.{lname}.norm1", layer.norm1, layer.conv1)
                    current.append((f"{full}.{lname}.conv2", layer.conv2))
            elif isinstance(child, _Transition):
                read(f"{full}.norm", child.norm, child.conv)
                current = [(f"{full}.conv", child.conv)]
            elif cname == "norm5":
                read(full, child, model.classifier)
        return out

    def feature_readers(self, model: nn.Module) -> dict[str, list[tuple[str, nn.Module, int]]]:
        """Producer conv -> the pre-activation BatchNorms that read its channels, each with
        the offset of those channels in the concatenation it normalises."""
        out: dict[str, list[tuple[str, nn.Module, int]]] = {}
        for r in self.readers(model):
            offset = 0
            for producer, module in r.producers:
                out.setdefault(producer, []).append((r.name, r.bn, offset))
                offset += int(module.out_channels)
        return out

    def slice_plan(self, model: nn.Module, names: set[str]) -> SlicePlan | None:
        """Slicing of the global channels (`Family.slice_plan`): each
        pruned channel leaves its producer (and norm0 for conv0) and, in every reader, the
        BatchNorm and the reading layer's input columns; exact on the masked model (those
        channels contribute 0) and cheaper than scattering them back."""
        if not self.matches(model):
            return None
        readers = self.readers(model)
        producers = {p for r in readers for p, _ in r.producers}
        if not producers or not producers <= names:
            return None  # e.g. only the bottlenecks prunable: the generic pairs do it
        return SlicePlan(sorted(producers), lambda pruned: _slice_edits(model, readers, pruned))

    def mask_targets(self, model: nn.Module, layer: Any) -> list[Target]:
        """The conv's own targets (weight row, following BatchNorm) and `reader_targets`."""
        from pxopt.prune.targets import channel_targets

        return channel_targets(model, layer) + (self.reader_targets(model, layer) or [])

    def reader_targets(self, model: nn.Module, layer: Any) -> list[Target] | None:
        """For a channel of conv0, a growth conv2 or a transition conv: its channel in every
        pre-activation BatchNorm that reads it (weight and bias; the running mean for a
        non-affine one), so that BatchNorm outputs 0 there, not relu(shift): the later
        layers then see exactly what they would see with the channel removed."""
        if not self.matches(model):
            return None
        readers = self.feature_readers(model).get(layer.name)
        if not readers:
            return None
        out: list[Target] = []
        for _, bn, offset in readers:
            shift = _offset(offset)
            if bn.weight is None and bn.bias is None:
                out.append(Target(bn.running_mean, 0, shift))
            for t in (bn.weight, bn.bias):
                if t is not None:
                    out.append(Target(t, 0, shift))
        return out

    # ---- LRP -------------------------------------------------------------------------
    def block_forwards(self) -> Mapping[type, BlockForward]:
        return {DenseNet: _densenet_forward, _DenseLayer: _dense_layer_forward}

    def input_norms(self, model: nn.Module) -> list[str]:
        """The pre-activation BatchNorms: norm1 of each dense layer, each transition's
        norm, and norm5 (not merged; epsilon rule of their affine map)."""
        if not self.matches(model):
            return []
        out = []
        for name, module in model.named_modules():
            if isinstance(module, _DenseLayer):
                out.append(f"{name}.norm1")
            elif isinstance(module, _Transition):
                out.append(f"{name}.norm")
        if hasattr(model.features, "norm5"):
            out.append("features.norm5")
        return out


@dataclass
class Reader:
    """A pre-activation BatchNorm, the producers of its input channels (in order) and the
    layer reading its output (conv1, a transition conv, or the classifier)."""

    name: str
    bn: nn.Module
    consumer: nn.Module
    producers: list[tuple[str, nn.Module]]


def _kept(mask: Tensor | None, n: int) -> Tensor:
    """Kept channel indices; one (masked, zero) channel when all are pruned."""
    if mask is None:
        return torch.arange(n)
    keep = (~mask.to("cpu", torch.bool)).nonzero().flatten()
    return keep if keep.numel() else torch.zeros(1, dtype=torch.long)


def _slice_edits(model: nn.Module, readers: list[Reader], pruned: Mapping[str, Tensor]) -> list[SliceEdit]:
    edits: list[SliceEdit] = []
    keeps: dict[str, Tensor] = {}
    for r in readers:
        for name, module in r.producers:
            keeps.setdefault(name, _kept(pruned.get(name), int(module.out_channels)))
    if not any(k.numel() < int(model.get_submodule(n).out_channels) for n, k in keeps.items()):
        return []
    device = next(model.parameters()).device
    for name, keep in keeps.items():
        module = model.get_submodule(name)
        edits += [SliceEdit(module, "_parameters", attr, 0, keep.to(device)) for attr in ("weight", "bias")]
        if name == "features.conv0":  # its BatchNorm; relu0 and pool0 are channel-wise
            edits += _bn_edits(model.features.norm0, keep.to(device))
    for r in readers:
        offset, parts = 0, []
        for name, module in r.producers:
            parts.append(keeps[name] + offset)
            offset += int(module.out_channels)
        idx = torch.cat(parts).to(device)
        edits += _bn_edits(r.bn, idx)
        edits.append(SliceEdit(r.consumer, "_parameters", "weight", 1, idx))
    return edits


def _bn_edits(bn: nn.Module, idx: Tensor) -> list[SliceEdit]:
    return [SliceEdit(bn, "_parameters", a, 0, idx) for a in ("weight", "bias")] + \
        [SliceEdit(bn, "_buffers", a, 0, idx) for a in ("running_mean", "running_var")]


def _offset(offset: int) -> Any:
    def shift(idx: Tensor) -> Tensor:
        return idx + offset

    return shift


FAMILY = DenseNetFamily()


if DenseNet is not None:  # pragma: no branch - torchvision is a dependency
    register_family(FAMILY)
