"""The fall-back family: any CNN of Conv2d / Linear layers that no specific family claims.

It matches every model without an attention module (a transformer no family knows, e.g.
Swin without its family, is refused by `family_of` rather than explained as a CNN). The
CNN engine still refuses, naming the module, every layer it has no rule for. Stages: the
first of the ResNet rule (children `layer1` .. `layerN`), the VGG rule (a `features`
stack with pools) and the resolution rule (given an example input) that answers.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

from pxopt.families import register_family
from pxopt.families.base import Family, StageSplit, first_attention
from pxopt.layermap import resnet_stages, vgg_stages


def has_attention(model: nn.Module) -> bool:
    """True when some submodule is an attention module (`first_attention`): such a model is
    no plain CNN."""
    return first_attention(model) is not None


class GenericCNN(Family):
    name: ClassVar[str] = "generic-cnn"
    kind: ClassVar[str] = "cnn"
    priority: ClassVar[int] = -100
    summary: ClassVar[str] = ("any other CNN of Conv2d / Linear / BatchNorm / element-wise layers "
                              "(conv channels; unknown layers refused by name)")

    def matches(self, model: nn.Module) -> bool:
        return not has_attention(model)

    def stage_groups(self, model: nn.Module, names: list[str],
                     example_input: Tensor | None) -> StageSplit | None:
        for rule, split in (("resnet", resnet_stages(model, names)),
                            ("vgg", vgg_stages(model, names))):
            if split is not None:
                return rule, split
        return super().stage_groups(model, names, example_input)


register_family(GenericCNN())
