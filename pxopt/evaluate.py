"""Accuracy-vs-pruning-rate curves, their area and Top-PR.

Definitions (also in docs/INTERFACES.md section 7):
- accuracy: argmax over the task's classes only (the logits of other classes are ignored,
  not zeroed), compared with the labels (model-output indices);
- `area` (the one figure of merit: the search's objective, the report's, the export's and
  the dashboard's "area"): the mean accuracy over the rate span, i.e. the trapezoid rule
  (`numpy.trapezoid`) over the given rates divided by (last rate - first rate), in [0, 1]
  (`AREA_DEFINITION`); a single rate gives its accuracy. `meta["area_relative"]` divides
  further by the unpruned accuracy;
- `top_pr`: the highest rate of the grid whose accuracy is >= 95 % of the unpruned one.

Cost: the validation batches are moved to the device once, every rate is one inference
pass over them, masks grow in place (nested rates, no model copies), a rate whose prune
set equals the previous one reuses its accuracy, where safe the zeroed channels are
sliced out of conv->BN->ReLU->conv and fc1->act->fc2 pairs (mode "slice"/"auto"), and a
pruned pass starts from the stored unpruned activations after the last block it leaves
untouched (`pxopt.prune.prefix`; with a global ranking, early blocks are often pruned last),
and a prune set that severs the network (every input-to-output path through a fully pruned
layer, so the logits are the same for every image) costs one batch (`pxopt.prune.severed`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from pxopt.data.accuracy import restricted_correct
from pxopt.device import resolve_device
from pxopt.errors import ConfigError
from pxopt.prune import Cap, Masker, PruneOrder, global_order
from pxopt.prune.prefix import PrefixCache, default_budget
from pxopt.prune.severed import SeveredDetector
from pxopt.prune.slicing import Slicer
from pxopt.scores import ComponentScores
from pxopt.vocab import DEFAULT_RATES, OnRate, check_rates

__all__ = ["DEFAULT_RATES", "TOP_PR_FRACTION", "Curve", "OnRate", "accuracy_curve", "check_rates",
           "curve_area", "top_pruning_rate"]

TOP_PR_FRACTION = 0.95

#: The name of the figure of merit everywhere (JSON keys, figures, CLI output, dashboard).
AREA = "area"
#: What it is, in one line (report, dashboard note, export, README).
AREA_DEFINITION = (
    "area = mean accuracy over the pruning-rate span (trapezoid rule over the rates, "
    "divided by last rate - first rate; in [0, 1])"
)
#: Axis title of figures that plot it.
AREA_TITLE = "area (mean accuracy over the rate span)"


@dataclass
class Curve:
    """One accuracy-vs-pruning-rate curve; JSON-serialisable through `to_dict`."""

    rates: list[float]
    accuracies: list[float]
    area: float  # mean accuracy over the rate span (`curve_area`)
    top_pr: float
    pruned_per_layer: dict[str, list[int]]
    stopped_early_at: float | None = None  # first rate recorded as chance without evaluating
    chance: float = 0.0
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rates": list(self.rates), "accuracies": list(self.accuracies), "area": self.area,
            "top_pr": self.top_pr,
            "pruned_per_layer": {k: list(v) for k, v in self.pruned_per_layer.items()},
            "stopped_early_at": self.stopped_early_at, "chance": self.chance, "meta": dict(self.meta),
        }


def curve_area(rates: Sequence[float], accuracies: Sequence[float]) -> float:
    """The area: mean accuracy over the rate span (trapezoid rule / span, `AREA_DEFINITION`).

    A single rate gives its accuracy; no rate gives 0.
    """
    r = np.asarray(rates, dtype=np.float64)
    a = np.asarray(accuracies, dtype=np.float64)
    if r.size < 2:
        return float(a[0]) if a.size else 0.0
    return float(np.trapezoid(a, r)) / float(r[-1] - r[0])


def partial_area(rates: Sequence[float], accuracies: Sequence[float]) -> float:
    """The area of a curve known up to rate `len(accuracies) - 1` of the grid `rates`.

    The trapezoid over the rates reached, divided by the span of the *whole* grid: the
    rates not reached count as accuracy 0, so it is a lower bound of the final area, on
    the same scale, and it equals the area once the curve is complete. At a given step
    it differs from the plain partial trapezoid only by the grid's constant span, so
    pruners that compare trials step by step (median, percentile) decide the same way.
    """
    n = len(accuracies)
    if n == 0:
        return 0.0
    if len(rates) < 2:
        return float(accuracies[0])
    r = np.asarray(rates[:n], dtype=np.float64)
    a = np.asarray(accuracies, dtype=np.float64)
    done = float(np.trapezoid(a, r)) if n >= 2 else 0.0
    return done / float(rates[-1] - rates[0])


def top_pruning_rate(rates: Sequence[float], accuracies: Sequence[float], unpruned: float,
                     fraction: float = TOP_PR_FRACTION) -> float:
    """Highest rate whose accuracy keeps >= `fraction` of the unpruned accuracy (0.0 if none)."""
    ok = [r for r, a in zip(rates, accuracies, strict=True) if a >= fraction * unpruned - 1e-12]
    return max(ok) if ok else 0.0


def _scores_dict(scores: ComponentScores | Mapping[str, torch.Tensor], ranking: str | None) -> Mapping[str, torch.Tensor]:
    if isinstance(scores, ComponentScores):
        try:
            return scores.select(ranking)  # type: ignore[arg-type]
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
    return scores


def _materialise(task: Any, batches: Iterable | None, batch_size: int, device: torch.device) -> list:
    src = batches if batches is not None else task.validation_batches(batch_size, device)
    out = [(x.to(device, non_blocking=True), y.to(device, non_blocking=True)) for x, y in src]
    if not out:
        raise ConfigError("the task has no validation images")
    return out


Forward = Callable[[int, torch.Tensor], torch.Tensor]


@torch.inference_mode()
def _accuracy(model: nn.Module, batches: list, classes: torch.Tensor, forward: Forward | None = None) -> float:
    """Task accuracy, counted on the device with one host sync per call.

    `forward(batch_index, x)` replaces `model(x)` (e.g. to resume from stored activations).
    """
    correct = torch.zeros((), dtype=torch.long, device=classes.device)
    n = 0
    for i, (x, y) in enumerate(batches):
        out = forward(i, x) if forward is not None else model(x)
        correct += restricted_correct(out, y, classes)
        n += y.numel()
    return float(correct.item()) / n


@torch.inference_mode()
def _severed_accuracy(model: nn.Module, data: list, classes: torch.Tensor, detector: SeveredDetector | None,
                      fully_pruned: list[str]) -> float | None:
    """Accuracy from one batch when the prune set makes the logits input-independent: the
    first batch must show identical logits for every image (as the graph says it must),
    otherwise None and the caller runs the full pass."""
    if detector is None or not fully_pruned or not detector.severed(fully_pruned):
        return None
    out = model(data[0][0])
    if not bool((out == out[:1]).all()):
        return None
    row = out[:1]
    return _accuracy(model, data, classes, lambda i, x: row.expand(x.shape[0], -1))


def _plan_prefix(model: nn.Module, masker: Masker, order: PruneOrder, rates: Sequence[float],
                 data: list, budget: int) -> tuple[PrefixCache | None, dict[int, int | None], str]:
    """The prefix cache and, per prune count, the stored cut a pass can resume from."""
    if budget <= 0:
        return None, {}, "off"
    cache = PrefixCache(model, budget)
    with torch.inference_mode():
        per_item = cache.verify(data[0][0]) if cache.enabled else None
    if per_item is None:
        return None, {}, cache.reason
    n_items = sum(int(x.shape[0]) for x, _ in data)
    starts: dict[int, int | None] = {}
    for rate in rates:
        k = order.count(rate)
        if k > 0 and k not in starts:
            written = masker.tensors_written(order.pruned_first(k))
            starts[k] = cache.latest_cut_before(cache.first_touched(written))
    cache.plan(list(starts.values()), lambda pos: per_item[pos] * n_items)
    return cache, {k: cache.resume_point(s) for k, s in starts.items()}, "on"


def accuracy_curve(
    model: nn.Module,
    task: Any,
    layer_map: Iterable[Any],
    scores: ComponentScores | Mapping[str, torch.Tensor] | None,
    *,
    kinds: str | Sequence[str],
    ranking: str | None = None,
    rates: Sequence[float] = DEFAULT_RATES,
    device: str | torch.device | None = None,
    on_rate: OnRate | None = None,
    stop_at_chance: bool = False,
    chance_margin: float = 0.01,
    most_relevant_first: bool = False,
    cap: Cap | None = None,
    order: PruneOrder | None = None,
    batch_size: int = 256,
    batches: Iterable | None = None,
    mode: str = "auto",
    prefix_cache_bytes: int | None = None,
    detect_severed: bool = True,
) -> Curve:
    """Prune the globally lowest-ranked components at each rate and measure task accuracy.

    `ranking`: how `ComponentScores` are aggregated (`pxopt.scores.RANKINGS`); None uses the
    scores' default (the reference's: "abs" for conv channels, "token-abs" for ViTs).

    `task` needs `classes` and `validation_batches(batch_size, device)` (or pass `batches`
    already on the device to skip the transfer, e.g. across the trials of a search).
    `on_rate(i, rate, accuracy)` runs after each rate and may raise (e.g. optuna.TrialPruned);
    masks are undone in every case. With `stop_at_chance`, once two consecutive rates are
    within `chance_margin` of chance (1 / number of classes), the remaining rates are
    recorded as chance without evaluating and `stopped_early_at` names the first of them.
    `mode`: "mask" (masks only), "slice" / "auto" (also slice zeroed channels out where exact).
    `prefix_cache_bytes`: memory for the unpruned activations at block boundaries, from which
    a pruned pass resumes past its unpruned first blocks (`pxopt.prune.prefix`; 0 = off,
    None = a quarter of the memory free on the device).
    `detect_severed`: a rate whose prune set makes the logits input-independent is evaluated
    on one batch (`pxopt.prune.severed`). Both shortcuts leave the curve unchanged.
    """
    if mode not in ("auto", "mask", "slice"):
        raise ConfigError(f"mode must be 'auto', 'mask' or 'slice', got {mode!r}")
    rs = check_rates(rates)
    dev = resolve_device(device) if device is not None else next(model.parameters()).device
    classes = torch.as_tensor(list(task.classes), dtype=torch.long, device=dev)
    if classes.numel() < 1:
        raise ConfigError("the task has no classes")
    chance = 1.0 / classes.numel()
    if ranking is None and isinstance(scores, ComponentScores):
        ranking = scores.default_ranking
    if order is None:
        if scores is None:
            raise ConfigError("accuracy_curve needs scores or a precomputed order")
        order = global_order(_scores_dict(scores, ranking), layer_map, kinds,
                             most_relevant_first=most_relevant_first, cap=cap)
    data = _materialise(task, batches, batch_size, dev)

    accs: list[float] = []
    counts = {name: [] for name in order.names}
    stopped: float | None = None
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    evaluated = reused = 0
    unpruned: float | None = None
    masker = Masker(model, layer_map, kinds)
    slicer = Slicer(model, layer_map, kinds) if mode != "mask" else None
    budget = default_budget(dev) if prefix_cache_bytes is None else prefix_cache_bytes
    prefix, resume, prefix_state = _plan_prefix(model, masker, order, rs, data, budget)
    severed = SeveredDetector(model) if detect_severed else None
    resumed = shortcut = 0

    def forward_for(k: int) -> Forward | None:
        if prefix is None:
            return None
        if k == 0:
            prefix.clear()
            return prefix.record
        start = resume.get(k)
        return None if start is None else (lambda i, x: prefix.run(i, x, start))

    try:
        if rs[0] > 0.0:  # Top-PR needs the unpruned accuracy
            unpruned = _accuracy(model, data, classes, forward_for(0))
        prev_k = -1
        for i, rate in enumerate(rs):
            k = order.count(rate)
            for name, c in order.per_layer_counts(rate).items():
                counts[name].append(c)
            if stopped is not None:
                acc = chance
            elif k == prev_k:
                acc = accs[-1]
                reused += 1
            else:
                pruned = order.pruned_first(k)
                if slicer is not None:
                    slicer.undo()
                masker.set_pruned(pruned)
                if slicer is not None:
                    slicer.apply(pruned)
                acc = _severed_accuracy(model, data, classes, severed, masker.fully_pruned())
                if acc is not None:
                    shortcut += 1
                else:
                    fwd = forward_for(k)
                    resumed += int(k > 0 and fwd is not None)
                    acc = _accuracy(model, data, classes, fwd)
                evaluated += 1
            prev_k = k
            accs.append(acc)
            if unpruned is None:
                unpruned = acc
            if on_rate is not None:
                on_rate(i, rate, acc)
            if (stop_at_chance and stopped is None and i + 1 < len(rs) and len(accs) >= 2
                    and all(a <= chance + chance_margin for a in accs[-2:])):
                stopped = rs[i + 1]
    finally:
        if prefix is not None:
            prefix.clear()
        if slicer is not None:
            slicer.undo()
        masker.restore()
        model.train(was_training)
    area = curve_area(rs, accs)
    assert unpruned is not None
    return Curve(
        rates=rs, accuracies=accs, area=area,
        top_pr=top_pruning_rate(rs, accs, unpruned), pruned_per_layer=counts,
        stopped_early_at=stopped, chance=chance,
        meta={
            "unpruned_accuracy": unpruned,
            "area_relative": (area / unpruned) if unpruned > 0 else math.nan,
            "n_validation": sum(int(y.numel()) for _, y in data),
            "kinds": list(kinds) if not isinstance(kinds, str) else [kinds],
            "ranking": ranking, "most_relevant_first": most_relevant_first,
            "cap": cap.to_dict() if cap else None, "capped": dict(order.capped),
            "n_components": order.n_total, "mode": mode,
            "sliced_layers": slicer.sliceable if slicer is not None else [],
            "passes": evaluated + (1 if rs[0] > 0.0 else 0), "reused": reused,
            "prefix_cache": prefix_state, "prefix_cache_bytes": budget, "resumed_passes": resumed,
            "severed_passes": shortcut,
            "seconds": time.perf_counter() - t0,
        },
    )
