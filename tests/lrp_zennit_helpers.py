"""Helpers for the zennit parity tests: random models and the equivalent zennit composite."""

from __future__ import annotations

import timm
import torch
import torchvision
import zennit.rules as zr
from torch import nn
from zennit.canonizers import AttributeCanonizer, SequentialMergeBatchNorm
from zennit.composites import LayerMapComposite, MixedComposite, NameMapComposite, layer_map_base
from zennit.layer import Sum
from zennit.torchvision import ResNetBasicBlockCanonizer, ResNetBottleneckCanonizer

from pxopt.layers import LayerMap, discover_layers
from pxopt.lrp.config import RuleConfig, RuleSpec

COMPOSITES: dict[str, dict] = {
    "epsilon": RuleConfig.uniform({"rule": "epsilon", "epsilon": 1e-6}).to_dict(),
    "gamma": RuleConfig.uniform({"rule": "gamma", "gamma": 0.25}).to_dict(),
    "alphabeta": RuleConfig.uniform({"rule": "alphabeta", "alpha": 2.0, "beta": 1.0}).to_dict(),
    "zplus": RuleConfig.uniform({"rule": "zplus"}).to_dict(),
    "mixed": {
        "groups": {
            "input": {"rule": "zbox", "low": -3.0, "high": 3.0},
            "low": {"rule": "gamma", "gamma": 0.25},
            "mid": {"rule": "alphabeta", "alpha": 2.0, "beta": 1.0},
            "high": {"rule": "epsilon", "epsilon": 1e-6},
            "fc": {"rule": "epsilon", "epsilon": 1e-6},
        }
    },
    # the other input rules, and z+ / alpha-beta on the residual branches and the logits
    "mixed_flat": {
        "groups": {
            "input": {"rule": "flat"},
            "low": {"rule": "zplus"},
            "mid": {"rule": "epsilon", "epsilon": 1e-3},
            "high": {"rule": "alphabeta", "alpha": 3.0, "beta": 2.0},
            "fc": {"rule": "zplus"},
        }
    },
    "mixed_wsquare": {
        "groups": {
            "input": {"rule": "wsquare"},
            "low": {"rule": "alphabeta", "alpha": 1.0, "beta": 0.0},
            "mid": {"rule": "zplus"},
            "high": {"rule": "gamma", "gamma": 1.0},
            "fc": {"rule": "alphabeta", "alpha": 2.0, "beta": 1.0},
        }
    },
    # ZBox with one bound per input channel (ImageNet normalisation: -mean/std, (1-mean)/std)
    "zbox_channels": {
        "groups": {
            "input": {"rule": "zbox", "low": [-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225],
                      "high": [0.515 / 0.229, 0.544 / 0.224, 0.594 / 0.225]},
            "low": {"rule": "epsilon", "epsilon": 1e-6},
            "mid": {"rule": "alphabeta", "alpha": 1.0, "beta": 0.0},
            "high": {"rule": "zplus"},
            "fc": {"rule": "gamma", "gamma": 0.25},
        }
    },
}


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm statistics and affine parameters (default init makes tests trivial)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.2)
    return model


def lopsided(model: nn.Module, every: int = 4, tiny: float = 1e-3, seed: int = 0) -> nn.Module:
    """Every `every`-th output channel of each conv / linear layer made one-sided, in place.

    Channel c = i * every gets weights of one sign only (negative for even i, positive for
    odd i); for i = 2, 3 (mod 4) a random 5 % of its weights keep the other sign, `tiny`
    times smaller. Such channels have relevance but (almost) no positive, or no negative,
    contribution: P or N of z+ / alpha-beta is 0 or ~1e-5 of |W||x|. Trained networks
    have them (residual-branch outputs, logits); random-weight models almost never do, so
    float32 tests without this would not see the cancellation of issue #13 point 4.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                w = m.weight
                for c in range(0, w.shape[0], every):
                    i = c // every
                    row = w[c].abs() * (-1.0 if i % 2 == 0 else 1.0)
                    if (i // 2) % 2:
                        flip = torch.rand(row.shape, generator=g, dtype=torch.float64) < 0.05
                        row[flip] = -row[flip] * tiny
                    w[c] = row
    return model


def make_model(name: str) -> nn.Module:
    """Random-weight model in float64 with random BatchNorm; VGG gets a slim classifier
    (same layer types, 25088 -> 64 -> 64 -> 10) so the test stays small in memory."""
    torch.manual_seed(0)
    if name.startswith("timm:"):
        model = timm.create_model(name[5:], pretrained=False, num_classes=10)
    else:
        model = getattr(torchvision.models, name)(num_classes=10)
    if isinstance(model, torchvision.models.VGG):
        model.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 64), nn.ReLU(True), nn.Dropout(),
            nn.Linear(64, 64), nn.ReLU(True), nn.Dropout(), nn.Linear(64, 10))
    return randomise_bn(model).double().eval()


class ExactMergeBatchNorm(SequentialMergeBatchNorm):
    """zennit's merge, but the emptied BatchNorm gets eps = 0 while merged.

    zennit 0.5.1 leaves `eps` in the BatchNorm it turns into the identity, so its
    canonised model scales every merged activation by (1 + eps)^-1/2 and its relevances
    drift from the model's own forward by about 1e-5 per layer (measured 3e-4 relative on
    ResNet-18). pxopt merges exactly; the parity tests fix zennit's side with this class.
    """

    def merge_batch_norm(self, modules, batch_norm):
        super().merge_batch_norm(modules, batch_norm)
        self._eps = batch_norm.eps
        batch_norm.eps = 0.0

    def remove(self):
        super().remove()
        self.batch_norm.eps = self._eps


def _bound(value):
    """A ZBox bound for zennit: a number, or per channel a (1, C, 1, 1) tensor (zennit
    broadcasts it against the input, as its docstring suggests for normalised images)."""
    if isinstance(value, tuple | list):
        return torch.tensor(value, dtype=torch.float64).view(1, -1, 1, 1)
    return value


def _zennit_rule(spec: RuleSpec):
    p = dict(spec.params)
    return {
        "epsilon": lambda: zr.Epsilon(p.get("epsilon", 1e-6)),
        "gamma": lambda: zr.Gamma(p.get("gamma", 0.25)),
        "alphabeta": lambda: zr.AlphaBeta(p.get("alpha", 2.0), p.get("beta", 1.0)),
        "zplus": zr.ZPlus,
        "flat": zr.Flat,
        "wsquare": zr.WSquare,
        "zbox": lambda: zr.ZBox(_bound(p["low"]), _bound(p["high"])),
        "norm": zr.Norm,
    }[spec.name]()


class _TimmBlockCanonizer(AttributeCanonizer):
    """zennit canonizer for timm ResNet blocks (zennit ships one only for torchvision)."""

    def __init__(self) -> None:
        super().__init__(self._attribute_map)

    @classmethod
    def _attribute_map(cls, name, module):
        from timm.models.resnet import BasicBlock, Bottleneck

        if isinstance(module, BasicBlock | Bottleneck):
            return {"forward": cls.forward.__get__(module), "canonizer_sum": Sum()}
        return None

    @staticmethod
    def forward(self, x):
        shortcut = x
        x = self.act1(self.bn1(self.conv1(x)))
        if hasattr(self, "conv3"):
            x = self.act2(self.bn2(self.conv2(x)))
            x = self.bn3(self.conv3(x))
            act = self.act3
        else:
            x = self.bn2(self.conv2(x))
            act = self.act2
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        return act(self.canonizer_sum(torch.stack([shortcut, x], dim=-1)))

    def copy(self):
        return _TimmBlockCanonizer()


def zennit_relevance(model: nn.Module, x: torch.Tensor, targets: list[int], rules: dict,
                     layer_map: LayerMap | None = None, exact_merge: bool = True):
    """Input relevance and per-channel relevance of every layer in the map, from zennit."""
    cfg = RuleConfig.coerce(rules)
    lm = layer_map or discover_layers(model)
    name_map = [((layer.name,), _zennit_rule(cfg.rule_for(layer.name, layer.group))) for layer in lm]
    if any(isinstance(m, torchvision.models.resnet.BasicBlock | torchvision.models.resnet.Bottleneck)
           for m in model.modules()):
        canonizers = [ExactMergeBatchNorm(), ResNetBottleneckCanonizer(), ResNetBasicBlockCanonizer()]
    elif type(model).__module__.startswith("timm"):
        canonizers = [ExactMergeBatchNorm(), _TimmBlockCanonizer()]
    else:
        canonizers = [ExactMergeBatchNorm()]
    if not exact_merge:
        canonizers = [SequentialMergeBatchNorm() if isinstance(c, ExactMergeBatchNorm) else c
                      for c in canonizers]
    composite = MixedComposite(
        [NameMapComposite(name_map), LayerMapComposite(layer_map_base())], canonizers=canonizers
    )
    return zennit_attribute(composite, model, lm.names(), x, targets)


def zennit_attribute(composite, model: nn.Module, names: list[str], x: torch.Tensor,  # noqa: ANN001
                     targets: list[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Input relevance of `model` under a zennit `composite`, seeded with one-hot `targets`, and
    the relevance at the output of each module in `names`, summed per channel (per-layer
    relevance as pxopt records it)."""
    comps: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    handles = []
    with composite.context(model) as hooked:
        for name in names:
            def hook(m, i, o, name=name):  # noqa: ANN001
                def grab(g):  # noqa: ANN001
                    comps[name] = g.sum(tuple(range(2, g.ndim))) if g.ndim > 2 else g
                o.register_hook(grab)
            handles.append(modules[name].register_forward_hook(hook))
        try:
            xx = x.clone().requires_grad_(True)
            out = hooked(xx)
            seed = torch.zeros_like(out)
            seed[torch.arange(len(targets)), torch.tensor(targets)] = 1.0
            (rel,) = torch.autograd.grad(out, xx, seed)
        finally:
            for h in handles:
                h.remove()
    return rel, comps
