"""`compute_scores`: one entry point for every criterion named in `pxopt.criteria.CRITERIA`."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from pxopt.criteria import LAYER_MEAN_NORMALISED, baselines, check_criteria
from pxopt.errors import ConfigError
from pxopt.prune._layers import prunable_layers
from pxopt.scores import ComponentScores


def _lrp(model: nn.Module, batches: Iterable, layer_map: Any, kinds: tuple[str, ...],
         rule: dict[str, Any], criterion: str, normalise: bool) -> ComponentScores:
    from pxopt.lrp import RuleConfig, component_relevance

    sc = component_relevance(model, batches, RuleConfig.uniform(rule), kinds=kinds, layer_map=layer_map)
    names = {la.name for la in prunable_layers(layer_map, kinds)}
    abs_, signed, tok = ({k: v for k, v in d.items() if k in names}
                         for d in (sc.abs, sc.signed, sc.select("token-abs")))
    if normalise:  # Yeom et al.: each layer's relevances divided by their L1 norm
        den = {k: v.abs().sum().clamp_min(torch.finfo(v.dtype).tiny) for k, v in abs_.items()}
        abs_ = {k: v / den[k] for k, v in abs_.items()}
        signed = {k: v / den[k] for k, v in signed.items()}
        tok = {k: v / v.sum().clamp_min(torch.finfo(v.dtype).tiny) for k, v in tok.items()}
    meta = dict(sc.meta, layer_l1_normalised=normalise)
    return ComponentScores(abs=abs_, signed=signed, criterion=criterion, n_samples=sc.n_samples, meta=meta,
                           token_abs=tok, default_ranking=sc.default_ranking)


def compute_scores(name: str, model: nn.Module, batches: Iterable, layer_map: Any, *,
                   kinds: str | Sequence[str] | None = None, seed: int = 0, steps: int = 16,
                   objective: str = "logit", epsilon: float = 1e-6, **kw: Any) -> ComponentScores:
    """Scores of criterion `name` on the reference `batches` ((images, labels) on the device).

    seed: random; steps: ig; objective: "logit" (target logit) or "loss" for the gradient
    family; epsilon: lrp-epsilon. `*-norm` names are their raw criterion's scores divided
    by each layer's mean (`baselines.layer_mean_normalised`).
    """
    check_criteria([name])
    if kw:
        raise ConfigError(f"criterion {name}: unknown option(s) {sorted(kw)}")
    if objective not in ("logit", "loss"):
        raise ConfigError(f"objective must be 'logit' or 'loss', got {objective!r}")
    layers = prunable_layers(layer_map, kinds)
    if not layers:
        raise ConfigError(f"criterion {name}: no prunable layers of kind(s) {kinds}")
    ks = tuple(dict.fromkeys(la.kind for la in layers))
    if name in LAYER_MEAN_NORMALISED:
        raw, opts = LAYER_MEAN_NORMALISED[name]
        return baselines.layer_mean_normalised(
            _raw(raw, model, batches, layer_map, layers, ks, seed=seed, steps=steps, objective=objective,
                 epsilon=epsilon, **opts), name)
    return _raw(name, model, batches, layer_map, layers, ks, seed=seed, steps=steps, objective=objective,
                epsilon=epsilon)


def _raw(name: str, model: nn.Module, batches: Iterable, layer_map: Any, layers: list[Any],
         ks: tuple[str, ...], *, seed: int, steps: int, objective: str, epsilon: float,
         p: int = 1) -> ComponentScores:
    if name == "random":
        return baselines.random_scores(layers, seed=seed)
    if name == "weight":
        return baselines.weight_scores(layers, p=p)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(False), torch.enable_grad():
            if name == "activation":
                return baselines.activation_scores(model, batches, layers)
            if name == "gradient":
                return baselines.gradient_scores(model, batches, layers, objective=objective)
            if name == "taylor":
                return baselines.taylor_scores(model, batches, layers, objective=objective)
            if name == "ig":
                return baselines.ig_scores(model, batches, layers, steps=steps, objective=objective)
            if name == "yeom-zplus":
                return _lrp(model, batches, layer_map, ks, {"rule": "zplus"}, name, normalise=True)
            if name == "lrp-epsilon":
                return _lrp(model, batches, layer_map, ks, {"rule": "epsilon", "epsilon": epsilon}, name,
                            normalise=False)
    finally:
        model.train(was_training)
    raise AssertionError(f"criterion {name!r} is in CRITERIA but has no implementation")


__all__ = ["compute_scores"]
