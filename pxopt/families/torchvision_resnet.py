"""torchvision ResNet (resnet18 .. resnet152, wide / ResNeXt variants, pxopt's built-in
ResNets, which subclass it).

Components: conv channels. Stages: stem + layer1 low, layer2 .. layer(N-1) mid, layerN high
(`pxopt.layermap.resnet_stages`; the reference's split, Hatefi et al. pxp/composites.py).
LRP canonisation: BasicBlock / Bottleneck forwards with the residual addition as an
explicit sum under the Norm rule (`lrp_sum`), zennit's ResNet canonisers' treatment; the
BatchNorms are merged into their convs by the CNN engine.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from torch import Tensor, nn

from pxopt.families import register_family
from pxopt.families.base import BlockForward, ResNetStagesFamily
from pxopt.lrp.rules import lrp_sum


def _basic_block(self: nn.Module, x: Tensor) -> Tensor:
    identity = x
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    if self.downsample is not None:
        identity = self.downsample(x)
    return self.relu(lrp_sum(out, identity))


def _bottleneck(self: nn.Module, x: Tensor) -> Tensor:
    identity = x
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    if self.downsample is not None:
        identity = self.downsample(x)
    return self.relu(lrp_sum(out, identity))


class TorchvisionResNet(ResNetStagesFamily):
    name: ClassVar[str] = "torchvision-resnet"
    kind: ClassVar[str] = "cnn"
    priority: ClassVar[int] = 10
    summary: ClassVar[str] = "torchvision ResNet / ResNeXt / Wide ResNet (conv channels; stages layer1..layerN)"

    def matches(self, model: nn.Module) -> bool:
        try:
            from torchvision.models.resnet import ResNet
        except ImportError:  # pragma: no cover
            return False
        return isinstance(model, ResNet)

    def block_forwards(self) -> Mapping[type, BlockForward]:
        from torchvision.models.resnet import BasicBlock, Bottleneck

        return {BasicBlock: _basic_block, Bottleneck: _bottleneck}


register_family(TorchvisionResNet())
