"""Layer discovery: the prunable components of a model, in forward order, grouped by stage.

`discover_layers` asks each registered discovery function in turn (the ViT engine
registers its own with `register_discoverer`); the CNN one is the fall-back. Groups: the
first layer is `input`, the classifier linear layers after the last conv are `fc`, and the
hidden layers are split low / mid / high by one of two groupings (`pxopt.vocab.GROUPINGS`):

- "stage" (default): by the network's stages, as the reference code of Hatefi et al.
  (pxp/composites.py) groups them.
  - ResNets (children `layer1` .. `layerN`): stem + layer1 / layer2 .. layer(N-1) / layerN,
    i.e. conv1+layer1 / layer2+layer3 / layer4 for ResNet-18/50, downsample convs included.
  - VGG-style (`features` with max-pools): the first two pooling stages are low, the
    remaining convs are halved by count, mid taking the odd one. For VGG-16 that is convs
    1-4 / 5-9 / 10-13 (vgg16_bn features.0-10 / 14-27 / 30-40), the reference's split,
    which is not aligned with stages 3-5 (conv 10 ends stage 4 but is high).
  - ViTs: blocks by quarters (12 blocks: 0-2 / 3-8 / 9-11; 24: 0-5 / 6-17 / 18-23).
  - anything else, given an `example_input`: by spatial resolution, each distinct output
    size of the convs one stage (largest first), stages split by `stage_groups`; without an
    input or with a single resolution it falls back to "count".
- "count": by position among the hidden layers (first quarter / middle half / last quarter
  by default, `boundaries`), pxopt's grouping before stages.

The first layer keeps its own group `input` (its rule shapes heatmaps); pruning studies give
it the low group's rule. `LayerMap.grouping` says which grouping was used, `.stage_rule`
which stage rule ("resnet", "vgg", "blocks", "resolution"; "" for count).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pxopt.errors import ConfigError, UnsupportedLayerError
from pxopt.vocab import DEFAULT_GROUPING, GROUPINGS, LAYER_KINDS, check_choice

KINDS = LAYER_KINDS
QUARTERS = (0.25, 0.75)  # the count split's default boundaries, and the ViT blocks' split


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
    """Layers in forward order, with lookups used by LRP and pruning.

    `grouping` ("stage" | "count") and `stage_rule` record how the groups were made.
    """

    grouping: str = "count"
    stage_rule: str = ""

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

    def groups(self) -> dict[str, list[str]]:
        """Group -> names of its layers, in forward order (JSON-safe; stored with studies)."""
        out: dict[str, list[str]] = {}
        for layer in self:
            out.setdefault(layer.group, []).append(layer.name)
        return out

    def describe_grouping(self) -> dict[str, str]:
        """{"grouping": "stage" | "count", "stage_rule": ...} (stored with studies and exports)."""
        return {"grouping": self.grouping, "stage_rule": self.stage_rule}


Discoverer = Callable[[nn.Module, tuple[float, float]], LayerMap | None]
_DISCOVERERS: list[Discoverer] = []


def register_discoverer(fn: Discoverer) -> Discoverer:
    """Add a discovery function; it returns a LayerMap, or None when the model isn't its kind.

    Functions registered later are tried first, so specific ones (ViT) win over the CNN
    fall-back. They get the count split's boundaries (the quarters under the stage grouping,
    where blocks are the stages); `discover_layers` records the grouping on the result.
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
    _probe(model, example_input, handles)
    return order


def _probe(model: nn.Module, example_input: torch.Tensor, handles: list) -> None:
    """One forward pass in eval mode (BatchNorm statistics untouched), then remove `handles`."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            model(example_input)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training


def discover_cnn(model: nn.Module, boundaries: tuple[float, float] = QUARTERS,
                 example_input: torch.Tensor | None = None, *,
                 grouping: str = DEFAULT_GROUPING) -> LayerMap:
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
    groups: dict[str, str] | None = None
    layers = LayerMap()
    if grouping == "stage":
        for rule, fn in _STAGE_RULES:
            groups = fn(model, modules, [first, *hidden], example_input)
            if groups is not None:
                layers.grouping, layers.stage_rule = "stage", rule
                break
    m0 = modules[first]
    layers.append(Layer(first, m0, "conv" if isinstance(m0, nn.Conv2d) else "linear", "input",
                        _components(m0), -1))
    for depth, name in enumerate(hidden):
        m = modules[name]
        kind = "conv" if isinstance(m, nn.Conv2d) else "linear"
        group = groups[name] if groups is not None else depth_group(depth, len(hidden), boundaries)
        layers.append(Layer(name, m, kind, group, _components(m), depth))
    for i, name in enumerate(fc):
        m = modules[name]
        kind = "head" if i == len(fc) - 1 else "linear"
        layers.append(Layer(name, m, kind, "fc", _components(m), len(hidden) + i))
    return layers


# ---- stage rules: (model, modules, [first, *hidden], example_input) -> name -> group ------
# Each returns None when the model is not its kind; the first that answers wins.
StageRule = Callable[[nn.Module, dict[str, nn.Module], list[str], torch.Tensor | None],
                     dict[str, str] | None]


def stage_groups(n_stages: int) -> list[str]:
    """low / mid / high for each of `n_stages` stages, in order.

    Four or more: the quarter rule on the stage index (five stages give low, low, mid, mid,
    high, the split of ResNet's stem, layer1 .. layer4 and of VGG's five pooling stages);
    three: one each; two: low, high; one: no split (empty list).
    """
    if n_stages >= 4:
        return [depth_group(i, n_stages, QUARTERS) for i in range(n_stages)]
    return {3: ["low", "mid", "high"], 2: ["low", "high"]}.get(n_stages, [])


def _resnet_stages(model: nn.Module, modules: dict[str, nn.Module], names: list[str],
                   example_input: torch.Tensor | None) -> dict[str, str] | None:
    """ResNets (torchvision, timm, the built-in): stem + layer1 low, last layerN high."""
    children = dict(model.named_children())
    n = 0
    while f"layer{n + 1}" in children:
        n += 1
    if n < 2:
        return None
    out: dict[str, str] = {}
    seen_stage = False
    for name in names:
        top = name.split(".", 1)[0]
        if top.startswith("layer") and top[5:].isdigit() and 1 <= int(top[5:]) <= n:
            k = int(top[5:])
            out[name] = "low" if k == 1 else "high" if k == n else "mid"
            seen_stage = True
        elif seen_stage:
            return None  # a conv after the stages (not a plain ResNet): let another rule decide
        else:
            out[name] = "low"  # the stem (conv1, or timm's deep stem conv1.0/.3/.6)
    return out


def _vgg_stages(model: nn.Module, modules: dict[str, nn.Module], names: list[str],
                example_input: torch.Tensor | None) -> dict[str, str] | None:
    """VGG-style `features` stacks: pooling stages 1-2 low, the other convs halved by count."""
    features = getattr(model, "features", None)
    if not isinstance(features, nn.Sequential):
        return None
    stage, stage_of = 0, {}
    for child_name, child in features.named_children():
        if isinstance(child, nn.MaxPool2d | nn.AvgPool2d):
            stage += 1
        elif isinstance(child, nn.Conv2d):
            stage_of[f"features.{child_name}"] = stage
    if set(names) - set(stage_of) or not names:
        return None  # a conv outside the plain features stack
    stages = sorted(set(stage_of[n] for n in names))
    if len(stages) < 3:
        return None
    low = [n for n in names if stage_of[n] in stages[:2]]
    rest = [n for n in names if n not in low]
    n_mid = (len(rest) + 1) // 2
    return {**{n: "low" for n in low}, **{n: "mid" for n in rest[:n_mid]},
            **{n: "high" for n in rest[n_mid:]}}


def _resolution_stages(model: nn.Module, modules: dict[str, nn.Module], names: list[str],
                       example_input: torch.Tensor | None) -> dict[str, str] | None:
    """Any CNN, given an input: each distinct output resolution of the convs is a stage."""
    if example_input is None:
        return None
    sizes: dict[str, int] = {}

    def record(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, out: torch.Tensor) -> None:
            sizes.setdefault(name, int(out.shape[-2] * out.shape[-1]))
        return hook

    _probe(model, example_input, [modules[n].register_forward_hook(record(n)) for n in names
                                   if isinstance(modules[n], nn.Conv2d)])
    levels = sorted(set(sizes.values()), reverse=True)
    split = stage_groups(len(levels))
    if not split:
        return None
    out: dict[str, str] = {}
    group = split[0]
    for name in names:  # a linear layer between convs joins the stage before it
        if name in sizes:
            group = split[levels.index(sizes[name])]
        out[name] = group
    return out


_STAGE_RULES: list[tuple[str, StageRule]] = [
    ("resnet", _resnet_stages),
    ("vgg", _vgg_stages),
    ("resolution", _resolution_stages),
]


def _components(module: nn.Module) -> int:
    if isinstance(module, nn.Conv2d):
        return int(module.out_channels)
    if isinstance(module, nn.Linear):
        return int(module.out_features)
    raise UnsupportedLayerError(f"{type(module).__name__}: unknown component count")


def discover_layers(model: nn.Module, boundaries: Sequence[float] | None = None, *,
                    grouping: str = DEFAULT_GROUPING,
                    example_input: torch.Tensor | None = None) -> LayerMap:
    """The layer map of `model` (see the module docstring for the groupings).

    boundaries: the count split's fractions (default first quarter / middle half / last
    quarter); only with grouping="count". example_input: order the layers by a forward pass
    instead of registration order, and find the stages of unknown CNNs by resolution.
    """
    import pxopt.families.swin  # noqa: F401  (registers the Swin discoverer; lazy: it imports us)
    import pxopt.lrp.vit  # noqa: F401  (registers the ViT discoverer; lazy: it imports us)

    check_choice(grouping, GROUPINGS, "grouping")
    if boundaries is not None and grouping != "count":
        raise ConfigError("boundaries: apply to grouping='count' only (stages have their own split)")
    bounds = _check_boundaries(QUARTERS if boundaries is None else boundaries)
    for fn in _DISCOVERERS:
        takes = getattr(fn, "takes_grouping", False)  # families with their own stage rule (Swin)
        found = fn(model, bounds, grouping) if takes else fn(model, bounds)  # type: ignore[call-arg]
        if found is not None:
            # ViT blocks are the stages: both groupings split them by `bounds`, quarters by default
            found.grouping = grouping
            if not takes:
                found.stage_rule = "blocks" if grouping == "stage" else ""
            return found
    return discover_cnn(model, bounds, example_input, grouping=grouping)
