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
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from pxopt.errors import ConfigError, NonFiniteRelevanceError
from pxopt.layers import LayerMap, discover_layers
from pxopt.lrp.config import RuleConfig
from pxopt.lrp.engine import LRPEngine, check_graph
from pxopt.scores import ComponentScores, ScoreAccumulator

Start = Literal["target", "predicted", "logit"]


@dataclass
class Explanation:
    """Relevance of the inputs (`input`, like the inputs), of each component
    (`components`: module name -> (batch, n_components), summed over positions / tokens)
    and the model's logits (`output`).

    Transformer layers also give `token_abs` (module name -> (batch, n_components), the sum
    over tokens of |R|, see `pxopt.scores`) and, when asked for, `tokens` (module name ->
    (batch, tokens, n_components)). CNN layers have neither.
    """

    input: Tensor
    components: dict[str, Tensor]
    output: Tensor
    token_abs: dict[str, Tensor] = field(default_factory=dict)
    tokens: dict[str, Tensor] | None = None


def _record_names(layer_map: LayerMap, kinds: Iterable[str] | None) -> set[str]:
    return {layer.name for layer in layer_map.select(kinds)}


def _seed(output: Tensor, targets: Tensor | Sequence[int] | int | None, start: str) -> Tensor:
    """Initial relevance at the logits."""
    if output.ndim != 2:
        raise ConfigError(f"explain: the model must return logits (batch, classes), got {tuple(output.shape)}")
    if start == "predicted":
        idx = output.argmax(1)
    elif start in ("target", "logit"):
        if targets is None:
            raise ConfigError(f"start={start!r} needs targets (class indices)")
        idx = torch.as_tensor(targets, device=output.device).long().reshape(-1)
        if idx.numel() == 1 and output.shape[0] > 1:
            idx = idx.expand(output.shape[0])
        if idx.shape[0] != output.shape[0]:
            raise ConfigError(f"targets: {idx.shape[0]} labels for a batch of {output.shape[0]}")
    else:
        raise ConfigError(f"start: expected 'target', 'predicted' or 'logit', got {start!r}")
    seed = torch.zeros_like(output)
    seed.scatter_(1, idx[:, None], 1.0)
    if start == "logit":
        seed = seed * output.detach()
    return seed


def _run(engine: LRPEngine, inputs: Tensor, targets: Any, start: str) -> Explanation:
    """One forward + relevance backward with the engine installed."""
    engine.recorder.clear()
    x = inputs.detach()
    if x.is_inference():
        x = x.clone()
    x.requires_grad_(True)
    out = engine.model(x)
    check_graph(out)
    engine.check_pairs()
    seed = _seed(out, targets, start)
    (rel,) = torch.autograd.grad(out, x, seed)
    comps = {}
    for layer in engine.layer_map:
        if layer.name in engine.record:
            c = engine.recorder.data.get(layer.name)
            comps[layer.name] = c if c is not None else rel.new_zeros(x.shape[0], layer.n_components)
    engine.recorder.clear()
    # one device reduction, one host sync per batch
    total = rel.sum() + sum((c.sum() for c in comps.values()), rel.new_zeros(()))
    if not bool(torch.isfinite(total)):
        raise NonFiniteRelevanceError(
            "relevances became NaN or infinite: raise epsilon / the stabiliser, or check the "
            "model's outputs")
    return Explanation(rel.detach(), comps, out.detach())


def explain(model: nn.Module, inputs: Tensor, targets: Tensor | Sequence[int] | int | None = None,
            rules: RuleConfig | dict | str | None = None, *, start: Start = "target",
            kinds: Iterable[str] | None = None, layer_map: LayerMap | None = None) -> Explanation:
    """LRP relevances of `inputs` for `targets` under the rule configuration `rules`.

    start: "target" (one-hot 1.0 at targets), "predicted" (at the argmax) or "logit" (the
    target logit's value). kinds: record only these layer kinds (None: every layer of the
    layer map, classifier head included). layer_map: reuse a precomputed `discover_layers`.
    """
    from pxopt.families import swin
    from pxopt.lrp import vit  # ViTs have their own engine (AttnLRP); lazy: vit imports us

    if swin.matches(model):
        return swin.explain_swin(model, inputs, targets, rules, start=start, kinds=kinds)
    if vit.is_vit(model):
        return vit.explain_vit(model, inputs, targets, rules, start=start, kinds=kinds)
    cfg = RuleConfig.coerce(rules)
    lm = layer_map if layer_map is not None else discover_layers(model)
    with torch.inference_mode(False), torch.enable_grad(), \
            LRPEngine(model, cfg, lm, _record_names(lm, kinds)) as engine:
        return _run(engine, inputs, targets, start)


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
    from pxopt.families import swin
    from pxopt.lrp import vit  # ViTs have their own engine (AttnLRP); lazy: vit imports us

    if swin.matches(model):
        return swin.component_relevance_swin(model, batches, rules, kinds=kinds, start=start)
    if vit.is_vit(model):
        return vit.component_relevance_vit(model, batches, rules, kinds=kinds, start=start)
    cfg = RuleConfig.coerce(rules)
    lm = layer_map if layer_map is not None else discover_layers(model)
    sums = ScoreAccumulator()
    with torch.inference_mode(False), torch.enable_grad(), \
            LRPEngine(model, cfg, lm, _record_names(lm, kinds)) as engine:
        for images, labels in batches:
            sums.add(_run(engine, images, labels, start).components, images.shape[0])
    return sums.result("lrp", {"rules": cfg.to_dict(), "digest": cfg.digest(), "start": start})
