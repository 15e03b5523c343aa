"""Tiny models and a tiny layer map for the pruning / evaluation / criteria tests.

The real `pxopt.layers.discover_layers` is written in parallel; this stand-in follows the
contract (docs/INTERFACES.md section 2) closely enough for these tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock


@dataclass
class Layer:
    name: str
    module: nn.Module
    kind: str
    group: str
    n_components: int
    depth: int


class TinyLayerMap(list):
    def prunable(self, kinds):
        kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
        return [layer for layer in self if layer.kind in kinds and layer.kind != "head"]


def simple_layer_map(model: nn.Module, head: str) -> TinyLayerMap:
    """Conv2d -> 'conv', Linear -> 'linear' (the one named `head` -> 'head'),
    timm Attention / MHA -> 'heads', Linear named '*fc1' -> 'mlp'."""
    out = TinyLayerMap()
    depth = 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.MultiheadAttention) or (hasattr(mod, "qkv") and hasattr(mod, "num_heads")):
            out.append(Layer(name, mod, "heads", "mid", mod.num_heads, depth))
        elif isinstance(mod, nn.Conv2d):
            out.append(Layer(name, mod, "conv", "mid", mod.out_channels, depth))
        elif isinstance(mod, nn.Linear) and not name.endswith(("qkv", "proj", "fc2", "out_proj")):
            kind = "head" if name == head else ("mlp" if name.endswith("fc1") else "linear")
            out.append(Layer(name, mod, kind, "fc" if kind == "head" else "mid", mod.out_features, depth))
        else:
            continue
        depth += 1
    return out


def randomise_bn(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BN statistics and affine parameters (default init hides BN-shift bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.randn(n, generator=g))
                m.bias.copy_(torch.randn(n, generator=g))


class TinyResNet(nn.Module):
    """Stem conv + one residual block + a conv chain + hidden linear + classifier."""

    def __init__(self, in_ch: int = 1, width: int = 8, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(in_ch, width, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.block = BasicBlock(width, width)
        self.features = nn.Sequential(
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.hidden = nn.Linear(8 * width, 16)
        self.act = nn.ReLU()
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.relu(self.bn(self.stem(x)))
        x = self.block(x)
        x = self.features(x)
        x = torch.flatten(self.pool(x), 1)
        return self.fc(self.act(self.hidden(x)))


def calibrate_classifier(model: nn.Module, fc: nn.Linear, x: torch.Tensor) -> None:
    """Standardise the classifier's inputs on `x`, so that random models' predictions
    depend on the input (otherwise one class wins everywhere)."""
    seen = {}
    h = fc.register_forward_pre_hook(lambda m, a: seen.__setitem__("f", a[0]))
    with torch.no_grad():
        model(x)
        h.remove()
        f = seen["f"].reshape(-1, fc.in_features)
        fc.weight.div_(f.std(0) + 1e-6)
        fc.bias.sub_(fc.weight @ f.mean(0))


def tiny_resnet(seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    m = TinyResNet(**kw)
    randomise_bn(m, seed)
    m.eval()
    calibrate_classifier(m, m.fc, torch.randn(256, m.stem.in_channels, 28, 28))
    return m


def tiny_vit(seed: int = 0) -> nn.Module:
    import timm

    torch.manual_seed(seed)
    m = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=7, in_chans=1,
        embed_dim=32, depth=2, num_heads=4, num_classes=10,
    )
    m.eval()
    nn.init.normal_(m.head.weight)  # timm may zero-initialise the head
    calibrate_classifier(m, m.head, torch.randn(256, 1, 28, 28))
    return m


_TRAINED: dict[str, nn.Module] = {}


def trained_tiny_resnet(epochs: int = 3) -> nn.Module:
    """TinyResNet trained for a few seconds on MNIST-5k (cached per test session)."""
    if "resnet" not in _TRAINED:
        from pxopt.data import open_dataset

        split = open_dataset("mnist-5k").splits["train"]
        x = split.images.float().div(255).unsqueeze(1)
        y = split.labels
        torch.manual_seed(0)
        model = TinyResNet(width=8)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(epochs):
            perm = torch.randperm(len(x))
            for i in range(0, len(x), 64):
                idx = perm[i:i + 64]
                opt.zero_grad()
                nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        _TRAINED["resnet"] = model
    return _TRAINED["resnet"]
