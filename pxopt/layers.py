"""Layer discovery: the prunable components of a model, in forward order, grouped by stage.

`discover_layers` asks the model's family (`pxopt.families.family_of`) for its layer map.
Groups: the first layer is `input`, the classifier linear layers after the last conv are
`fc`, and the hidden layers are split low / mid / high by one of two groupings
(`pxopt.vocab.GROUPINGS`):

- "stage" (default): by the network's stages, as the reference code of Hatefi et al.
  (pxp/composites.py) groups them; each family says what its stages are
  (`Family.stage_groups`, built from the rules in `pxopt.layermap`).
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
which stage rule ("resnet", "vgg", "blocks", "resolution"; "" for count), `.family` the
model's family. The types and the generic CNN discovery live in `pxopt.layermap`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pxopt.errors import ConfigError
from pxopt.families import family_of
from pxopt.layermap import (
    KINDS,
    QUARTERS,
    Layer,
    LayerMap,
    _check_boundaries,
    depth_group,
    discover_cnn,
    forward_order,
    stage_groups,
)
from pxopt.vocab import DEFAULT_GROUPING, GROUPINGS, check_choice

__all__ = ["KINDS", "QUARTERS", "Layer", "LayerMap", "depth_group", "discover_cnn",
           "discover_layers", "forward_order", "stage_groups"]


def discover_layers(model: nn.Module, boundaries: Sequence[float] | None = None, *,
                    grouping: str = DEFAULT_GROUPING,
                    example_input: torch.Tensor | None = None) -> LayerMap:
    """The layer map of `model` (see the module docstring for the groupings).

    boundaries: the count split's fractions (default first quarter / middle half / last
    quarter); only with grouping="count". example_input: order the layers by a forward pass
    instead of registration order, and find the stages of unknown CNNs by resolution.
    Raises UnsupportedLayerError when no family knows the model.
    """
    check_choice(grouping, GROUPINGS, "grouping")
    if boundaries is not None and grouping != "count":
        raise ConfigError("boundaries: apply to grouping='count' only (stages have their own split)")
    bounds = _check_boundaries(QUARTERS if boundaries is None else boundaries)
    family = family_of(model)
    found = family.layer_map(model, bounds, grouping=grouping, example_input=example_input)
    found.family = family
    for layer in found:
        layer.family = family
    return found
