"""timm ResNet (`timm.models.resnet.ResNet`: resnet18 .. resnet152, deep-stem and
anti-aliased variants with plain BasicBlock / Bottleneck).

Components: conv channels. Stages as torchvision's: the stem (conv1, or the deep stem's
conv1.0 / .3 / .6) + layer1 low, the middle stages mid, the last stage high. LRP
canonisation: the blocks' forwards with the residual addition as `lrp_sum` (Norm rule),
the optional squeeze-excitation and drop path kept as they run; the blocks' own
`act*` / `aa` / `drop_block` modules are leaves with their generic treatments.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from torch import Tensor, nn

from pxopt.families import register_family
from pxopt.families.base import BlockForward, ResNetStagesFamily
from pxopt.lrp.rules import lrp_sum


def _tail(self: nn.Module, x: Tensor, shortcut: Tensor) -> Tensor:
    if self.se is not None:
        x = self.se(x)
    if self.drop_path is not None:
        x = self.drop_path(x)
    if self.downsample is not None:
        shortcut = self.downsample(shortcut)
    return lrp_sum(x, shortcut)


def _basic_block(self: nn.Module, x: Tensor) -> Tensor:
    shortcut = x
    x = self.aa(self.act1(self.drop_block(self.bn1(self.conv1(x)))))
    x = self.bn2(self.conv2(x))
    return self.act2(_tail(self, x, shortcut))


def _bottleneck(self: nn.Module, x: Tensor) -> Tensor:
    shortcut = x
    x = self.act1(self.bn1(self.conv1(x)))
    x = self.aa(self.act2(self.drop_block(self.bn2(self.conv2(x)))))
    x = self.bn3(self.conv3(x))
    return self.act3(_tail(self, x, shortcut))


class TimmResNet(ResNetStagesFamily):
    name: ClassVar[str] = "timm-resnet"
    kind: ClassVar[str] = "cnn"
    priority: ClassVar[int] = 10
    summary: ClassVar[str] = "timm ResNet (conv channels; stages layer1..layer4)"

    def matches(self, model: nn.Module) -> bool:
        try:
            from timm.models.resnet import ResNet
        except ImportError:  # pragma: no cover
            return False
        return isinstance(model, ResNet)

    def block_forwards(self) -> Mapping[type, BlockForward]:
        try:
            from timm.models.resnet import BasicBlock, Bottleneck
        except ImportError:  # pragma: no cover
            return {}
        return {BasicBlock: _basic_block, Bottleneck: _bottleneck}


register_family(TimmResNet())
