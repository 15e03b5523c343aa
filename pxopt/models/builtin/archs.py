"""Architectures of the built-in Fashion-MNIST reference models.

The small ones are the library classes of the ImageNet models (torchvision `ResNet` with
`BasicBlock`, torchvision `VGG`, timm `VisionTransformer`), only smaller, so every code
path that runs on ImageNet models (module names, layer discovery, canonisers, attention
rewriting) is exercised on them. The defaults are the built-ins' architectures; the registry
also passes them explicitly, because only its arguments enter the cache key.

The paper-scale ones are the architectures of the paper's experiments: torchvision's
`resnet50` and `vgg16_bn` with every block unchanged, and a timm `VisionTransformer` with
12 blocks, all on 3x32x32 inputs (see `transform.py`). VGG-16 gets a slimmer classifier,
still three linear layers at `classifier.0/3/6`.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet
from torchvision.models.vgg import VGG


class FmnistResNet(ResNet):
    """torchvision ResNet for 1x28x28: 3x3 stem, no max-pool, three BasicBlock stages.

    Module names follow torchvision (`conv1`, `bn1`, `layer1.0.conv1`, ..., `fc`); there
    is no `layer4` and no `maxpool`.
    """

    def __init__(
        self,
        widths: tuple[int, ...] = (32, 64, 128),
        blocks: tuple[int, ...] = (1, 1, 1),
        stem_stride: int = 2,
        in_channels: int = 1,
        num_classes: int = 10,
    ) -> None:
        nn.Module.__init__(self)
        self._norm_layer = nn.BatchNorm2d
        self.inplanes = widths[0]
        self.dilation = 1
        self.groups = 1
        self.base_width = 64
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=stem_stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.stages = len(widths)
        for i, (w, n) in enumerate(zip(widths, blocks, strict=True)):
            setattr(self, f"layer{i + 1}", self._make_layer(BasicBlock, w, n, stride=1 if i == 0 else 2))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(self.stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def vgg_features(cfg: tuple[int | str, ...], in_channels: int = 1, batch_norm: bool = True) -> nn.Sequential:
    """torchvision's `make_layers`, but with a configurable number of input channels."""
    layers: list[nn.Module] = []
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            conv = nn.Conv2d(in_channels, int(v), kernel_size=3, padding=1)
            layers += [conv, nn.BatchNorm2d(int(v)), nn.ReLU(inplace=True)] if batch_norm else [conv, nn.ReLU(inplace=True)]
            in_channels = int(v)
    return nn.Sequential(*layers)


def fmnist_vgg(
    cfg: tuple[int | str, ...] = (16, "M", 32, "M", 64, 64, "M"),
    hidden: int = 256,
    dropout: float = 0.3,
    batch_norm: bool = True,
    in_channels: int = 1,
    num_classes: int = 10,
    pool: int = 3,
) -> VGG:
    """torchvision VGG with a small `features` stack and a two-layer classifier."""
    model = VGG(vgg_features(cfg, in_channels, batch_norm), num_classes=num_classes, init_weights=False)
    width = [v for v in cfg if v != "M"][-1]
    model.avgpool = nn.AdaptiveAvgPool2d((pool, pool))
    model.classifier = nn.Sequential(
        nn.Linear(int(width) * pool * pool, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(p=dropout),
        nn.Linear(hidden, num_classes),
    )
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
    return model


def fmnist_vit(
    patch_size: int = 7,
    embed_dim: int = 96,
    depth: int = 4,
    num_heads: int = 4,
    mlp_ratio: float = 2.0,
    in_channels: int = 1,
    num_classes: int = 10,
) -> nn.Module:
    """timm VisionTransformer on 28x28: 16 patches of 7x7 plus a class token."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=28,
        patch_size=patch_size,
        in_chans=in_channels,
        num_classes=num_classes,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        global_pool="token",
    )


# -- paper-scale architectures ---------------------------------------------------------------


def paper_resnet50(num_classes: int = 10, zero_init_residual: bool = False) -> ResNet:
    """torchvision `resnet50(num_classes=...)` as it is (Bottleneck blocks 3-4-6-3, 7x7 stem).

    On 32x32 inputs layer1..layer4 run at 8, 4, 2 and 1 pixels. `zero_init_residual` (each
    block's last BN starts at zero, Goyal et al. 2017) only changes the initialisation: every
    block starts as the identity, which trains a 50-layer net from scratch faster.
    """
    from torchvision.models import resnet50

    return resnet50(num_classes=num_classes, zero_init_residual=zero_init_residual)


def paper_vgg16_bn(num_classes: int = 10, hidden: int = 512, dropout: float = 0.5) -> VGG:
    """torchvision's `VGG` with `vgg16_bn`'s features (13 convs, `features.0`-`features.40`).

    At 32x32 the features end at 512x1x1, so the 7x7 average pool and the 25088-4096-4096
    classifier become a 1x1 pool and 512-hidden-hidden-classes: three linears at
    `classifier.0/3/6` with ReLU and dropout between them, as in torchvision. The model is
    assembled as `VGG.__init__` does it, without first building (and initialising) the
    119 M-parameter ImageNet classifier only to replace it; the initialisation is
    torchvision's.
    """
    from torchvision.models.vgg import cfgs, make_layers

    model = VGG.__new__(VGG)
    nn.Module.__init__(model)
    model.features = make_layers(cfgs["D"], batch_norm=True)
    model.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    model.classifier = nn.Sequential(
        nn.Linear(512, hidden),
        nn.ReLU(True),
        nn.Dropout(p=dropout),
        nn.Linear(hidden, hidden),
        nn.ReLU(True),
        nn.Dropout(p=dropout),
        nn.Linear(hidden, num_classes),
    )
    for m in model.modules():  # torchvision's VGG initialisation
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.constant_(m.bias, 0)
    return model


def paper_vit(
    patch_size: int = 8,
    embed_dim: int = 192,
    depth: int = 12,
    num_heads: int = 3,
    mlp_ratio: float = 4.0,
    img_size: int = 32,
    num_classes: int = 10,
) -> nn.Module:
    """timm VisionTransformer with 12 blocks (ViT-B's depth, ViT-Ti's width) on 3x32x32.

    Patch 8 gives 4x4 patches plus the class token (the small built-in's patch 7 on 28x28
    gives as many).
    """
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=img_size,
        patch_size=patch_size,
        in_chans=3,
        num_classes=num_classes,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        global_pool="token",
    )
