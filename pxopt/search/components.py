"""Which components a study prunes: decided by the model's layer map unless the spec says.

`components = "auto"` asks the layer map: a transformer (its map has MLP layers) prunes
MLP neurons, a CNN prunes conv channels. MLP neurons rather than heads because they are
the paper's headline ViT setting (area 0.87, 57 % prunable at 95 % accuracy) and there are
many of them (the built-in ViT has 16 heads in all, too few for a 20-rate curve). Any
choice that leaves fewer than two layers to prune is refused: a global ranking over one
layer is no ranking (a CNN setting on a ViT would prune only its patch embedding).
"""

from __future__ import annotations

from collections.abc import Iterable

from pxopt.errors import ConfigError
from pxopt.search.spec import AUTO_COMPONENTS, COMPONENTS

#: "auto" takes the first of these that has at least `MIN_LAYERS` prunable layers.
AUTO_ORDER = ("mlp", "conv", "heads")
#: Fewer prunable layers than this is not a study.
MIN_LAYERS = 2


def prunable_layers(layer_map: Iterable, components: str) -> list[str]:
    """Names of the layers whose components `components` prunes (never the classifier)."""
    kinds = set(COMPONENTS[components])
    return [layer.name for layer in layer_map
            if layer.kind in kinds and layer.kind != "head" and getattr(layer, "prunable", True)]


def resolve_components(requested: str, layer_map: Iterable, model: str = "the model") -> str:
    """The concrete components for `requested` ("auto" or a key of COMPONENTS) on this model.

    Raises `ConfigError` (one line) when the choice leaves fewer than two layers to prune.
    """
    layers = list(layer_map)
    counts = {name: len(prunable_layers(layers, name)) for name in COMPONENTS}
    usable = [name for name in COMPONENTS if counts[name] >= MIN_LAYERS]
    if requested == AUTO_COMPONENTS:
        for name in AUTO_ORDER:
            if counts.get(name, 0) >= MIN_LAYERS:
                return name
        raise ConfigError(f"{model} has fewer than {MIN_LAYERS} prunable layers of any kind: nothing to search")
    if requested not in COMPONENTS:
        raise ConfigError(f"prune.components must be one of {sorted(COMPONENTS)}, got {requested!r}")
    if counts[requested] < MIN_LAYERS:
        names = prunable_layers(layers, requested)
        what = f"only {names[0]}" if names else "none"
        hint = f"use --components {' or '.join(usable)}" if usable else "this model cannot be searched"
        raise ConfigError(
            f"components {requested!r} leave {len(names)} layer(s) of {model} to prune ({what}): {hint}"
        )
    return requested
