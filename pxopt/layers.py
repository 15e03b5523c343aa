"""Layer discovery: the prunable components of a model, in forward order, grouped by depth.

`discover_layers` asks each registered discovery function in turn (the ViT engine
registers its own with `register_discoverer`); the CNN one is the fall-back. Groups:
the first conv is `input`; the hidden conv/linear layers are split low/mid/high by their
position among the hidden layers (default first quarter / middle half / last quarter);
the classifier linear layers after the last conv are `fc`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from pxopt.errors import ConfigError, UnsupportedLayerError

KINDS = ("conv", "linear", "mlp", "heads", "head")


@dataclass
class Layer:
    """One layer whose output components (channels, neurons, heads) get relevance."""

    name: str
    module: nn.Module
    kind: str  # "conv" | "linear" | "mlp" | "heads" | "head" (classifier)
    group: str  # "input" | "low" | "mid" | "high" | "fc"
    n_components: int
    depth: int  # position among the hidden layers (blocks for ViTs); -1 input, >= n for fc


class LayerMap(list[Layer]):
    """Layers in forward order, with lookups used by LRP and pruning."""

    def prunable(self, kinds: Iterable[str] | None = None) -> list[Layer]:
        """Layers whose components may be pruned: never the classifier head."""
        wanted = set(kinds) if kinds is not None else None
        return [
            layer for layer in self
            if layer.kind != "head" and (wanted is None or layer.kind in wanted)
        ]

    def by_name(self) -> dict[str, Layer]:
        return {layer.name: layer for layer in self}

    def names(self) -> list[str]:
        return [layer.name for layer in self]

    def select(self, kinds: Iterable[str] | None = None) -> list[Layer]:
        """All layers (head included) of the given kinds; all layers for None."""
        wanted = set(kinds) if kinds is not None else None
        return [layer for layer in self if wanted is None or layer.kind in wanted]


Discoverer = Callable[[nn.Module, tuple[float, float]], LayerMap | None]
_DISCOVERERS: list[Discoverer] = []


def register_discoverer(fn: Discoverer) -> Discoverer:
    """Add a discovery function; it returns a LayerMap, or None when the model isn't its kind.

    Functions registered later are tried first, so specific ones (ViT) win over the CNN
    fall-back.
    """
    _DISCOVERERS.insert(0, fn)
    return fn


def depth_group(depth: int, n_hidden: int, boundaries: tuple[float, float]) -> str:
    """low / mid / high by the relative position of a hidden layer."""
    frac = depth / max(n_hidden, 1)
    if frac < boundaries[0]:
        return "low"
    if frac >= boundaries[1]:
        return "high"
    return "mid"


def _check_boundaries(boundaries: Sequence[float]) -> tuple[float, float]:
    if len(boundaries) != 2:
        raise ConfigError(f"boundaries: expected two fractions, got {boundaries!r}")
    lo, hi = float(boundaries[0]), float(boundaries[1])
    if not 0.0 <= lo <= hi <= 1.0:
        raise ConfigError(f"boundaries: need 0 <= low <= high <= 1, got {boundaries!r}")
    return lo, hi


def forward_order(model: nn.Module, example_input: torch.Tensor,
                  types: tuple[type, ...]) -> list[str]:
    """Names of modules of `types` in the order a forward pass first calls them."""
    order: list[str] = []
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, types):
            handles.append(module.register_forward_pre_hook(
                lambda m, a, name=name: order.append(name) if name not in order else None))
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for h in handles:
            h.remove()
    return order


def discover_cnn(model: nn.Module, boundaries: tuple[float, float],
                 example_input: torch.Tensor | None = None) -> LayerMap:
    """Conv2d / Linear layers of a CNN (registration order, or forward order if an input is given)."""
    modules = dict(model.named_modules())
    types = (nn.Conv2d, nn.Linear)
    if example_input is not None:
        names = forward_order(model, example_input, types)
    else:
        names = [n for n, m in modules.items() if isinstance(m, types)]
    if not names:
        raise UnsupportedLayerError(
            f"{type(model).__name__}: no Conv2d or Linear layer found, nothing to explain")
    convs = [i for i, n in enumerate(names) if isinstance(modules[n], nn.Conv2d)]
    last_conv = convs[-1] if convs else -1
    first = names[0]
    fc = [
        n for i, n in enumerate(names)
        if i > last_conv and n != first and isinstance(modules[n], nn.Linear)
    ]
    hidden = [n for n in names if n != first and n not in fc]
    layers = LayerMap()
    m0 = modules[first]
    layers.append(Layer(first, m0, "conv" if isinstance(m0, nn.Conv2d) else "linear", "input",
                        _components(m0), -1))
    for depth, name in enumerate(hidden):
        m = modules[name]
        kind = "conv" if isinstance(m, nn.Conv2d) else "linear"
        layers.append(Layer(name, m, kind, depth_group(depth, len(hidden), boundaries),
                            _components(m), depth))
    for i, name in enumerate(fc):
        m = modules[name]
        kind = "head" if i == len(fc) - 1 else "linear"
        layers.append(Layer(name, m, kind, "fc", _components(m), len(hidden) + i))
    return layers


def _components(module: nn.Module) -> int:
    if isinstance(module, nn.Conv2d):
        return int(module.out_channels)
    if isinstance(module, nn.Linear):
        return int(module.out_features)
    raise UnsupportedLayerError(f"{type(module).__name__}: unknown component count")


def discover_layers(model: nn.Module, boundaries: Sequence[float] = (0.25, 0.75), *,
                    example_input: torch.Tensor | None = None) -> LayerMap:
    """The layer map of `model` (see the module docstring for the grouping)."""
    import pxopt.lrp.vit  # noqa: F401  (registers the ViT discoverer; lazy: it imports us)

    bounds = _check_boundaries(boundaries)
    for fn in _DISCOVERERS:
        found = fn(model, bounds)
        if found is not None:
            return found
    return discover_cnn(model, bounds, example_input)
