"""Baseline criteria: random, weight magnitude, activation, gradient, Taylor, integrated gradients,
and the per-layer normaliser of the `-norm` forms (`layer_mean_normalised`).

Per sample, each component gets one number Q (summed over space / tokens / head dims);
scores are `abs` = mean |Q| and `signed` = mean Q over all reference samples, exactly like
LRP's, so ranking and curves don't know which criterion made them.
- activation: Q = mean over positions of the component's output (abs: mean over positions
  of |a|, a magnitude that does not cancel);
- gradient:   Q = sum over positions of d(target)/da;
- taylor:     Q = sum over positions of a * d(target)/da (first-order Taylor / grad x act);
- ig:         Q = sum over positions of a * mean_k d(target)/da at ((k + 1/2) / n) * a: the
              layer's output scaled from 0 to its value (midpoint Riemann sum, several
              steps per pass); computed layer by layer, since scaling one layer changes
              all later ones.
The target is the true label's logit (`objective="logit"`) or minus the CE loss ("loss").
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from pxopt.criteria.sites import Site, assert_finite, make_sites, target_logits, to_grad_input
from pxopt.errors import ConfigError
from pxopt.families import heads_family
from pxopt.scores import ComponentScores

Batches = list[tuple[Tensor, Tensor]]


class _Acc:
    """Running sums of |Q| and Q per layer, on the device."""

    def __init__(self) -> None:
        self.abs: dict[str, Tensor] = {}
        self.signed: dict[str, Tensor] = {}

    def add(self, name: str, q_abs: Tensor, q: Tensor) -> None:
        a, s = q_abs.detach().sum(0), q.detach().sum(0)
        if name in self.abs:
            self.abs[name] += a
            self.signed[name] += s
        else:
            self.abs[name], self.signed[name] = a.clone(), s.clone()

    def scores(self, criterion: str, n: int, meta: dict[str, Any]) -> ComponentScores:
        if n == 0:
            raise ConfigError(f"criterion {criterion}: no reference samples (empty batches)")
        out = ComponentScores(
            abs={k: (v / n).float() for k, v in self.abs.items()},
            signed={k: (v / n).float() for k, v in self.signed.items()},
            criterion=criterion, n_samples=n, meta=meta,
        )
        for k, v in out.abs.items():
            assert_finite(criterion, v)
            assert_finite(criterion, out.signed[k])
        return out


def random_scores(layers: list[Any], *, seed: int = 0) -> ComponentScores:
    """Uniform random scores from a seeded generator (same seed, same ranking)."""
    g = torch.Generator().manual_seed(int(seed))
    vals = {la.name: torch.rand(la.n_components, generator=g) for la in layers}
    return ComponentScores(abs=vals, signed=dict(vals), criterion="random", meta={"seed": int(seed)})


def _head_rows(n_sections: int, section: int, heads: int, hd: int, device: torch.device) -> Tensor:
    """Row indices of every head in one of the q/k/v sections: (heads, hd)."""
    del n_sections
    return section * heads * hd + torch.arange(heads, device=device)[:, None] * hd + torch.arange(hd, device=device)


def _head_weight(layer: Any, p: int) -> Tensor:
    """Per head: sum of |w|^p over its q, k and v rows of the input projection (where the
    attention keeps it is the family's answer, `Family.head_projection`)."""
    w, h = heads_family(layer).head_projection(layer)
    hd = w.shape[0] // (3 * h)
    per_row = w.detach().abs().pow(p).sum(1)
    return sum(per_row[_head_rows(3, s, h, hd, w.device)].sum(1) for s in range(3))


def weight_scores(layers: list[Any], *, p: int = 1) -> ComponentScores:
    """Sum of |w|^p of each filter / neuron's incoming weights (per head: its q, k, v rows).

    p=1: the L1 norm; p=2: the sum of squares, as Torch-Pruning's `MagnitudeImportance(p=2)`
    computes it (`w.abs().pow(p).sum(1)`, no square root; VainF/Torch-Pruning issue #329).
    Only the component's own (outgoing-channel) weights count, i.e. Torch-Pruning's
    `group_reduction="first"` on a group rooted at the layer's output channels.
    """
    if p not in (1, 2):
        raise ConfigError(f"weight criterion: p must be 1 or 2, got {p}")
    vals: dict[str, Tensor] = {}
    for la in layers:
        if la.kind == "heads":
            vals[la.name] = _head_weight(la, p)
        else:
            w = la.module.weight.detach()
            vals[la.name] = w.abs().pow(p).reshape(w.shape[0], -1).sum(1)
    return ComponentScores(abs=vals, signed=dict(vals), criterion="weight", meta={"p": p})


def layer_mean_normalised(sc: ComponentScores, criterion: str) -> ComponentScores:
    """Every layer's scores divided by the mean of its |scores| (abs and signed alike).

    Torch-Pruning's default normaliser, `normalizer="mean"` of `MagnitudeImportance`,
    `TaylorImportance` and `ActivationImportance` (`group_importance / group_importance.mean()`
    in torch_pruning/pruner/importance.py, `GroupMagnitudeImportance._normalize`), applied per
    pxopt layer (Torch-Pruning applies it per dependency group; for a layer whose channels
    are coupled to no other layer the two coincide). Each layer then has mean |score| 1, so
    the global ranking compares a component with its own layer's typical score rather than
    with raw magnitudes that differ by orders between layers. A layer whose scores are all
    zero stays zero (the denominator is clamped to the dtype's smallest normal number).
    """
    def by_layer_mean(scores: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v / ref[k].abs().mean().clamp_min(torch.finfo(v.dtype).tiny) for k, v in scores.items()}

    return ComponentScores(
        abs=by_layer_mean(sc.abs, sc.abs),
        signed=by_layer_mean(sc.signed, sc.abs),
        criterion=criterion, n_samples=sc.n_samples,
        meta=dict(sc.meta, normalised_from=sc.criterion, normaliser="layer mean of |score|"),
        token_abs=None if sc.token_abs is None else by_layer_mean(sc.token_abs, sc.token_abs),
        default_ranking=sc.default_ranking,
    )


def _forward_with_sites(model: nn.Module, sites: list[Site], x: Tensor, keep: dict[str, Tensor]) -> Tensor:
    def capture(t: Tensor, name: str) -> Tensor:
        keep[name] = t
        return t.clone()  # later in-place ops (ReLU(inplace=True)) must not change `t`

    handles = [s.register(lambda t, s=s: capture(t, s.name)) for s in sites]
    try:
        return model(x)
    finally:
        for h in handles:
            h.remove()


def activation_scores(model: nn.Module, batches: Iterable, layers: list[Any]) -> ComponentScores:
    sites = make_sites(layers)
    acc, n = _Acc(), 0
    with torch.no_grad():
        for x, _ in batches:
            keep: dict[str, Tensor] = {}
            _forward_with_sites(model, sites, x, keep)
            for s in sites:
                t = keep[s.name]
                pos = s.positions(t)
                acc.add(s.name, s.per_component(t.abs()) / pos, s.per_component(t) / pos)
            n += int(x.shape[0])
    return acc.scores("activation", n, {})


def _grad_scores(model: nn.Module, batches: Iterable, layers: list[Any], criterion: str,
                 objective: str) -> ComponentScores:
    sites = make_sites(layers)
    acc, n = _Acc(), 0
    for x, y in batches:
        keep: dict[str, Tensor] = {}
        out = _forward_with_sites(model, sites, to_grad_input(x), keep)
        ts = [keep[s.name] for s in sites]
        grads = torch.autograd.grad(target_logits(out, y, objective), ts, allow_unused=True)
        for s, t, g in zip(sites, ts, grads, strict=True):
            g = torch.zeros_like(t) if g is None else g
            q = s.per_component(g) if criterion == "gradient" else s.per_component(t.detach() * g)
            acc.add(s.name, q.abs(), q)
        n += int(x.shape[0])
    return acc.scores(criterion, n, {"objective": objective})


def gradient_scores(model: nn.Module, batches: Iterable, layers: list[Any], *,
                    objective: str = "logit") -> ComponentScores:
    return _grad_scores(model, batches, layers, "gradient", objective)


def taylor_scores(model: nn.Module, batches: Iterable, layers: list[Any], *,
                  objective: str = "logit") -> ComponentScores:
    return _grad_scores(model, batches, layers, "taylor", objective)


def ig_scores(model: nn.Module, batches: Iterable, layers: list[Any], *, steps: int = 16,
              objective: str = "logit", max_batch: int = 512) -> ComponentScores:
    """Integrated gradients of each layer's components (baseline: the layer's output = 0)."""
    if steps < 1:
        raise ConfigError(f"ig steps must be >= 1, got {steps}")
    data: Batches = list(batches)
    sites = make_sites(layers)
    acc, n = _Acc(), sum(int(x.shape[0]) for x, _ in data)
    for s in sites:
        for x, y in data:
            b = int(x.shape[0])
            per_pass = max(1, min(steps, max_batch // max(b, 1)))
            grad_sum: Tensor | None = None
            orig: Tensor | None = None
            for k0 in range(0, steps, per_pass):
                ks = torch.arange(k0, min(steps, k0 + per_pass), device=x.device)
                alphas = ((ks.to(x.dtype) + 0.5) / steps).repeat_interleave(b)
                xr = to_grad_input(x.repeat(len(ks), *([1] * (x.ndim - 1))))
                yr = y.repeat(len(ks))
                state: dict[str, Tensor] = {}

                def scale(t: Tensor, alphas: Tensor = alphas, state: dict = state) -> Tensor:
                    state["orig"] = t
                    scaled = t * alphas.view(-1, *([1] * (t.ndim - 1)))
                    state["scaled"] = scaled
                    return scaled.clone()  # protect `scaled` from later in-place ops

                h = s.register(scale)
                try:
                    out = model(xr)
                finally:
                    h.remove()
                (g,) = torch.autograd.grad(target_logits(out, yr, objective), state["scaled"])
                g = g.reshape(len(ks), b, *g.shape[1:]).sum(0)
                grad_sum = g if grad_sum is None else grad_sum + g
                if orig is None:
                    orig = state["orig"].detach()[:b]
            assert grad_sum is not None and orig is not None
            q = s.per_component(orig * grad_sum / steps)
            acc.add(s.name, q.abs(), q)
    return acc.scores("ig", n, {"steps": steps, "objective": objective})
