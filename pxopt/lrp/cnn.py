"""The CNN engine's entry points: module rules installed by `LRPEngine`, one forward and one
relevance backward per batch (`Family.explain`'s default; `pxopt.lrp.explain` dispatches)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from pxopt.errors import NonFiniteRelevanceError
from pxopt.layermap import LayerMap
from pxopt.lrp.config import RuleConfig
from pxopt.lrp.engine import LRPEngine, check_graph
from pxopt.lrp.explanation import Explanation, seed_relevance
from pxopt.scores import ComponentScores, ScoreAccumulator


def _record_names(layer_map: LayerMap, kinds: Iterable[str] | None) -> set[str]:
    return {layer.name for layer in layer_map.select(kinds)}


def _layer_map(model: nn.Module, layer_map: LayerMap | None) -> LayerMap:
    if layer_map is not None:
        return layer_map
    from pxopt.layers import discover_layers  # the family's layer map

    return discover_layers(model)


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
    seed = seed_relevance(out, targets, start)
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


def explain_cnn(model: nn.Module, inputs: Tensor, targets: Any = None, rules: Any = None, *,
                start: str = "target", kinds: Iterable[str] | None = None,
                layer_map: LayerMap | None = None) -> Explanation:
    """`pxopt.lrp.explain` with the CNN engine (see there for the arguments)."""
    cfg = RuleConfig.coerce(rules)
    lm = _layer_map(model, layer_map)
    with torch.inference_mode(False), torch.enable_grad(), \
            LRPEngine(model, cfg, lm, _record_names(lm, kinds)) as engine:
        return _run(engine, inputs, targets, start)


def component_relevance_cnn(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]],
                            rules: Any = None, *, kinds: Iterable[str] | None = None,
                            layer_map: LayerMap | None = None,
                            start: str = "target") -> ComponentScores:
    """`pxopt.lrp.component_relevance` with the CNN engine."""
    cfg = RuleConfig.coerce(rules)
    lm = _layer_map(model, layer_map)
    sums = ScoreAccumulator()
    with torch.inference_mode(False), torch.enable_grad(), \
            LRPEngine(model, cfg, lm, _record_names(lm, kinds)) as engine:
        for images, labels in batches:
            sums.add(_run(engine, images, labels, start).components, images.shape[0])
    return sums.result("lrp", {"rules": cfg.to_dict(), "digest": cfg.digest(), "start": start})
