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
  the conv for the backward, as everywhere in pxopt (zennit's `MergeBatchNorm`; Montavon et
  al. 2019, "Layer-wise relevance propagation: an overview", sec. 10.2.1, fold BN into the
  adjacent linear layer).
- BatchNorm on a layer's input (`norm1` of each dense layer, each transition's `norm`,
  `norm5`): it cannot be folded into the conv that follows it, because a ReLU sits in
  between, nor into the convs before it, because each of their output channels is
  normalised differently by every later layer that reads it (and, for the stem, a max pool
  sits in between). It is therefore its own layer: an element-wise affine map
  y = s x + c (s = gamma / sqrt(var + eps), c = beta - mean s, eval mode) with the epsilon
  rule R_x = s x R_y / stab(s x + c) (`pxopt.lrp.rules.lrp_affine`, stabiliser 1e-6). This
  is the "BN as a linear layer with the epsilon rule" of Hui & Binder 2019 ("BatchNorm
  Decomposition for Deep Neural Network Interpretation", IWANN), and exactly what zennit's
  `Epsilon` hook computes on a BatchNorm module. The shift c absorbs its share of relevance
  as any bias does under the epsilon rule, so the treatment agrees with the merged case
  (where the shift is the merged conv's bias) up to the stabiliser; the alternative of
  zennit's default for an unmerged BatchNorm, Pass (R_x = R_y), ignores the shift and would
  treat the same operation differently depending on where it sits. On a bias-free variant
  (zero running mean and BN bias) both are the identity on relevance and the network
  conserves relevance exactly.
- Concatenation: `torch.cat`'s gradient gives each input its slice of the output's
  relevance, so every earlier feature map receives exactly the relevance of its channels,
  summed over all later layers that read it (the engine allows `CatBackward0` generically).
- The model's forward (functional ReLU and adaptive average pool) and the dense layer's
  (optionally checkpointed) forward are replaced for the explanation by equal forwards
  whose ReLU has the Pass rule and whose average pool has the Norm rule (as for ResNets).

Components (conv channels)
- prunable: the bottleneck `conv1` of every dense layer (bn_size * growth_rate channels).
  A channel feeds only its own layer's norm2 -> relu2 -> conv2, so zeroing conv1's row and
  norm2's channel is exactly removing it (masking, slicing and Torch-Pruning all agree).
- recorded but not pruned (`Layer.prunable = False`): `conv0`, every growth conv `conv2`
  and each transition's `conv`. Their channels are concatenated into the input of every
  later layer of the block (and the next transition), where a pre-activation BatchNorm
  turns a zeroed channel into the constant relu(c): zeroing the producer is not removing
  the channel, and removing it is global (every later norm1 / conv1 loses an input).
- classifier: the head (never pruned).

Stage groups (rule "densenet"): dense blocks are the stages, each transition with the block
before it (it runs at that block's resolution), the stem (conv0) with the first block:
block 1 low, the last block high, the blocks between mid (densenet121: blocks 1 / 2-3 / 4,
the grouping of ResNet's layer1 / layer2-3 / layer4); two blocks: low, high.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pxopt.layers import register_stage_rule, register_unprunable
from pxopt.lrp import canonizers as cz
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


class DenseNetFamily:
    """What pxopt knows about torchvision DenseNet (see the module docstring)."""

    name = "torchvision-densenet"
    kind = "cnn"
    summary = ("torchvision DenseNet (densenet121/161/169/201): bottleneck conv channels; "
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
                     example_input: Tensor | None = None) -> dict[str, str] | None:
        """Dense blocks as stages (transition with its block, stem with block 1)."""
        if not self.matches(model):
            return None
        blocks = self.blocks(model)
        n = len(blocks)
        if n < 2:
            return None
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
        return out

    def unprunable(self, model: nn.Module) -> list[str]:
        """conv0, the growth convs (conv2) and the transition convs (see the docstring)."""
        if not self.matches(model):
            return []
        out = ["features.conv0"]
        for name, module in model.named_modules():
            if isinstance(module, _DenseLayer):
                out.append(f"{name}.conv2")
            elif isinstance(module, _Transition):
                out.append(f"{name}.conv")
        return out

    # ---- LRP -------------------------------------------------------------------------
    def block_forwards(self) -> dict[type, Any]:
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


FAMILY = DenseNetFamily()


def _stage_rule(model: nn.Module, modules: dict[str, nn.Module], names: list[str],
                example_input: Tensor | None) -> dict[str, str] | None:
    return FAMILY.stage_groups(model, names, example_input)


def _register() -> None:
    if DenseNet is None:  # pragma: no cover
        return
    for cls, fwd in FAMILY.block_forwards().items():
        cz.register_residual(cls, fwd)
    cz.register_input_norms(FAMILY.input_norms)
    register_unprunable(FAMILY.unprunable)
    register_stage_rule("densenet", _stage_rule)


_register()
