"""Public entry points: relevance of inputs and components for one batch or a reference set.

    exp = explain(model, images, labels, {"groups": {...}})
    exp.input                 # relevance of every input value, like images
    exp.components["layer1.0.conv1"]   # (batch, out_channels), summed over space
    exp.output                # the model's logits (bit-identical to model(images))

    scores = component_relevance(model, batches, rules)   # ComponentScores, criterion "lrp"

The model is left exactly as it was: no parameter or buffer is written, instance-level
forwards are removed, training flags restored, no hooks registered. Works when called
under `torch.no_grad()` or `torch.inference_mode()`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

from torch import Tensor, nn

from pxopt.errors import NonFiniteRelevanceError
from pxopt.families import family_of
from pxopt.layermap import LayerMap
from pxopt.lrp.config import RuleConfig
from pxopt.lrp.explanation import Explanation, seed_relevance
from pxopt.scores import ComponentScores

Start = Literal["target", "predicted", "logit"]
_seed = seed_relevance  # older name, kept for callers

__all__ = ["Explanation", "Start", "check_explainable", "component_relevance", "explain"]


def explain(model: nn.Module, inputs: Tensor, targets: Tensor | Sequence[int] | int | None = None,
            rules: RuleConfig | dict | str | None = None, *, start: Start = "target",
            kinds: Iterable[str] | None = None, layer_map: LayerMap | None = None) -> Explanation:
    """LRP relevances of `inputs` for `targets` under the rule configuration `rules`.

    start: "target" (one-hot 1.0 at targets), "predicted" (at the argmax) or "logit" (the
    target logit's value). kinds: record only these layer kinds (None: every layer of the
    layer map, classifier head included). layer_map: reuse a precomputed `discover_layers`.
    The model's family (`pxopt.families.family_of`) picks the engine: module rules for
    CNNs, AttnLRP for transformers.
    """
    return family_of(model).explain(model, inputs, targets, rules, start=start, kinds=kinds,
                          layer_map=layer_map)


def check_explainable(model: nn.Module, example: Tensor, layer_map: LayerMap | None = None) -> None:
    """Raise `UnsupportedLayerError` now if `explain` cannot explain `model` (unknown layers,
    BatchNorm that cannot be merged, ops without a rule), e.g. before a search starts.

    Explains the first sample of `example` (one forward and backward, default rules);
    relevances that turn out non-finite are left to the rules actually used.
    """
    try:
        explain(model, example[:1], None, None, start="predicted", kinds=(), layer_map=layer_map)
    except NonFiniteRelevanceError:
        pass


def component_relevance(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]],
                        rules: RuleConfig | dict | str | None = None, *,
                        kinds: Iterable[str] | None = None, layer_map: LayerMap | None = None,
                        start: Start = "target") -> ComponentScores:
    """Mean over all samples of |R| and of R per component, accumulated on the device
    (`ComponentScores`; for ViTs also sum_t |R_t|, their default ranking "token-abs").

    batches: (images, labels) already on the model's device; labels are the targets.
    """
    return family_of(model).component_relevance(model, batches, rules, kinds=kinds,
                                                layer_map=layer_map, start=start)
