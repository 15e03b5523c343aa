"""The layer map's types and the generic CNN discovery (no family knowledge: a leaf module).

`Layer` / `LayerMap` describe the components of a model in forward order and their groups
(see `pxopt.layers` for the groupings). `discover_cnn` finds the Conv2d / Linear layers of
any CNN; a family (`pxopt.families`) passes its own stage split. The stage rules here are
the building blocks families use:

- `resnet_stages`: children `layer1` .. `layerN`: stem + layer1 / layer2 .. layer(N-1) /
  layerN (ResNet-18/50: conv1+layer1 / layer2+layer3 / layer4, downsample convs included);
- `vgg_stages`: a `features` stack with pools: the first two pooling stages low, the rest
  halved by count, mid taking the odd one (VGG-16: convs 1-4 / 5-9 / 10-13, the reference's
  split of Hatefi et al., pxp/composites.py);
- `resolution_stages`: each distinct output size of the convs is one stage (largest
  first), split by `stage_groups`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pxopt.errors import ConfigError, UnsupportedLayerError
from pxopt.vocab import DEFAULT_GROUPING, HIDDEN_GROUPS, LAYER_KINDS

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
    #: the model's `pxopt.families.Family` (set by `discover_layers`; None for hand-made maps)
    family: Any = field(default=None, repr=False, compare=False)
    #: False: the layer carries an LRP rule and relevance but its components are never pruned
    #: (e.g. ConvNeXt's depthwise convs, whose channels feed a LayerNorm: zeroing one is not
    #: removing it, so masking and physical removal would differ; see pxopt.families.convnext)
    prunable: bool = True


class LayerMap(list[Layer]):
    """Layers in forward order, with lookups used by LRP and pruning.

    `grouping` ("stage" | "count") and `stage_rule` record how the groups were made.
    """

    grouping: str = "count"
    stage_rule: str = ""
    family: Any = None  # the model's family (set by `discover_layers`)
    # Set per instance by families (never mutated in place): conv / linear layers that get an
    # LRP rule (name -> group) but have no components of their own (MobileNet depthwise
    # convs, ...), and modules whose output channels are tied to a component's (physical
    # removal treats them as followers, not as other writers of those channels).
    rule_only: dict[str, str] = {}  # noqa: RUF012
    tied: list[str] = []  # noqa: RUF012

    def prunable(self, kinds: Iterable[str] | None = None) -> list[Layer]:
        """Layers whose components may be pruned: never the classifier head, never a layer
        marked `prunable=False`."""
        wanted = set(kinds) if kinds is not None else None
        return [
            layer for layer in self
            if layer.kind != "head" and layer.prunable and (wanted is None or layer.kind in wanted)
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


def cnn_classifier_names(model: nn.Module, names: list[str] | None = None) -> list[str]:
    """The classifier Linear layers: those after the last conv (never the first layer).

    names: the Conv2d / Linear layer names in forward order (default: registration order).
    """
    modules = dict(model.named_modules())
    if names is None:
        names = [n for n, m in modules.items() if isinstance(m, (nn.Conv2d, nn.Linear))]
    convs = [i for i, n in enumerate(names) if isinstance(modules[n], nn.Conv2d)]
    last_conv = convs[-1] if convs else -1
    return [n for i, n in enumerate(names)
            if i > last_conv and i > 0 and isinstance(modules[n], nn.Linear)]


def discover_cnn(model: nn.Module, boundaries: tuple[float, float] = QUARTERS,
                 example_input: torch.Tensor | None = None, *,
                 grouping: str = DEFAULT_GROUPING,
                 stages: Callable[[list[str]], tuple[str, dict[str, str]] | None] | None = None,
                 ) -> LayerMap:
    """Conv2d / Linear layers of a CNN (registration order, or forward order if an input is given).

    stages: the family's stage split of `[first, *hidden]` names, (rule, name -> group) or
    None (then the count split); used only with grouping="stage".
    """
    modules = dict(model.named_modules())
    types = (nn.Conv2d, nn.Linear)
    if example_input is not None:
        names = forward_order(model, example_input, types)
    else:
        names = [n for n, m in modules.items() if isinstance(m, types)]
    if not names:
        raise UnsupportedLayerError(
            f"{type(model).__name__}: no Conv2d or Linear layer found, nothing to explain")
    first = names[0]
    fc = cnn_classifier_names(model, names)
    hidden = [n for n in names if n != first and n not in fc]
    groups: dict[str, str] | None = None
    layers = LayerMap()
    if grouping == "stage" and stages is not None:
        found = stages([first, *hidden])
        if found is not None:
            layers.stage_rule, groups = found
            layers.grouping = "stage"
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


# ---- stage rules: (model, [first, *hidden]) -> name -> group, None when not its kind ------


def stage_groups(n_stages: int) -> list[str]:
    """low / mid / high for each of `n_stages` stages, in order.

    Four or more: the quarter rule on the stage index (five stages give low, low, mid, mid,
    high, the split of ResNet's stem, layer1 .. layer4 and of VGG's five pooling stages);
    three: one each; two: low, high; one: no split (empty list).
    """
    if n_stages >= 4:
        return [depth_group(i, n_stages, QUARTERS) for i in range(n_stages)]
    return {3: list(HIDDEN_GROUPS), 2: [HIDDEN_GROUPS[0], HIDDEN_GROUPS[-1]]}.get(n_stages, [])


def resnet_stages(model: nn.Module, names: list[str]) -> dict[str, str] | None:
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


def vgg_stages(model: nn.Module, names: list[str]) -> dict[str, str] | None:
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


def resolution_stages(model: nn.Module, names: list[str],
                      example_input: torch.Tensor | None) -> dict[str, str] | None:
    """Any CNN, given an input: each distinct output resolution of the convs is a stage."""
    if example_input is None:
        return None
    modules = dict(model.named_modules())
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


def _components(module: nn.Module) -> int:
    if isinstance(module, nn.Conv2d):
        return int(module.out_channels)
    if isinstance(module, nn.Linear):
        return int(module.out_features)
    raise UnsupportedLayerError(f"{type(module).__name__}: unknown component count")
