"""torchvision VGG (with or without BatchNorm) and AlexNet, and pxopt's built-in VGGs.

Components: conv channels and the classifier's hidden neurons. Stages: in the `features`
stack, the first two pooling stages low, the remaining convs halved by count, mid taking
the odd one (`pxopt.layermap.vgg_stages`: VGG-16 convs 1-4 / 5-9 / 10-13, the reference's
split of Hatefi et al., pxp/composites.py); the classifier's Linear layers are `fc`. No
canonisation beyond the CNN engine's BatchNorm merge (a plain chain, no residuals).
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

from pxopt.families import register_family
from pxopt.families.base import Family, StageSplit
from pxopt.layermap import vgg_stages


class TorchvisionVGG(Family):
    name: ClassVar[str] = "torchvision-vgg"
    kind: ClassVar[str] = "cnn"
    priority: ClassVar[int] = 10
    summary: ClassVar[str] = "torchvision VGG / VGG-BN / AlexNet (conv channels, classifier neurons)"

    def matches(self, model: nn.Module) -> bool:
        try:
            from torchvision.models import VGG, AlexNet
        except ImportError:  # pragma: no cover
            return False
        return isinstance(model, VGG | AlexNet)

    def stage_groups(self, model: nn.Module, names: list[str],
                     example_input: Tensor | None) -> StageSplit | None:
        split = vgg_stages(model, names)
        return ("vgg", split) if split is not None else super().stage_groups(model, names, example_input)


register_family(TorchvisionVGG())
