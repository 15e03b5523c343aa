"""Plotly figures of a study: the same objects go into the HTML report and the dashboard.

Every function reads only what the study stores (trial values and user attributes), so
a report can be made on any machine that can open the storage, without the model.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import optuna
import plotly.graph_objects as go
from optuna.trial import FrozenTrial, TrialState

from pxopt.search.study import baseline_trials


def _complete(study: optuna.Study) -> list[FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if "curve" in t.user_attrs]


def _empty(title: str, reason: str) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=reason, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    fig.update_layout(title=title, xaxis_visible=False, yaxis_visible=False)
    return fig


def history_figure(study: optuna.Study) -> go.Figure:
    """Area of every trial in order, with the best so far (Optuna's own plot)."""
    if not _complete(study):
        return _empty("Optimisation history", "no completed trial yet")
    fig = optuna.visualization.plot_optimization_history(study, target_name="area under curve")
    fig.update_layout(title="Optimisation history")
    return fig


def importance_figure(study: optuna.Study) -> go.Figure:
    """fANOVA parameter importances (needs a few completed trials with varied parameters)."""
    if len(_complete(study)) < 3:
        return _empty("Parameter importances", "needs at least 3 completed trials")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fig = optuna.visualization.plot_param_importances(study, target_name="area under curve")
    except (ValueError, RuntimeError, ZeroDivisionError) as exc:
        return _empty("Parameter importances", f"not available: {exc}")
    fig.update_layout(title="Parameter importances (fANOVA)")
    return fig


def curves_figure(
    study: optuna.Study,
    extra: Mapping[str, Mapping[str, Any]] | None = None,
) -> go.Figure:
    """Accuracy vs pruning rate: best trial against the baselines (and optional criteria)."""
    fig = go.Figure()
    curves: dict[str, Mapping[str, Any]] = {}
    try:
        best = study.best_trial
        curves[f"best (trial {best.number})"] = best.user_attrs["curve"]
    except (ValueError, KeyError):
        return _empty("Accuracy vs pruning rate", "no completed trial yet")
    for name, trial in baseline_trials(study).items():
        curves[f"{name} (trial {trial.number})"] = trial.user_attrs["curve"]
    curves.update(dict(extra or {}))
    for name, curve in curves.items():
        area = curve.get("area")
        label = f"{name}: area {area:.4f}" if isinstance(area, int | float) else name
        fig.add_trace(go.Scatter(x=curve["rates"], y=curve["accuracies"], mode="lines+markers", name=label))
    fig.update_layout(
        title="Accuracy vs pruning rate",
        xaxis_title="pruning rate (fraction of components removed)",
        yaxis_title="top-1 accuracy on the task",
        yaxis_range=[0, 1.02],
    )
    return fig


def _nearest(rates: list[float], rate: float) -> int:
    return min(range(len(rates)), key=lambda i: abs(rates[i] - rate))


def per_layer_figure(trial: FrozenTrial, rate: float | None = None,
                     n_components: Mapping[str, int] | None = None) -> go.Figure:
    """Components pruned per layer at `rate` (default: the trial's Top-PR)."""
    curve = trial.user_attrs.get("curve", {})
    per_layer = curve.get("pruned_per_layer") or {}
    if not per_layer:
        return _empty("Pruned components per layer", "the trial recorded no per-layer counts")
    rate = curve.get("top_pr", 0.0) if rate is None else rate
    i = _nearest(curve["rates"], rate)
    names = list(per_layer)
    counts = [per_layer[n][i] for n in names]
    fig = go.Figure(go.Bar(x=names, y=counts, name="pruned"))
    if n_components:
        fig.add_trace(go.Bar(x=names, y=[n_components.get(n, 0) - c for n, c in zip(names, counts, strict=True)],
                             name="kept"))
        fig.update_layout(barmode="stack")
    fig.update_layout(
        title=f"Pruned components per layer at rate {curve['rates'][i]:.2f} (trial {trial.number})",
        xaxis_title="layer",
        yaxis_title="components",
    )
    return fig


def macs_left(curve: Mapping[str, Any], rate: float, layer_macs: Mapping[str, float],
              total_macs: float) -> float:
    """Estimated fraction of MACs left at `rate`: each pruned component removes its own share."""
    per_layer = curve.get("pruned_per_layer") or {}
    i = _nearest(curve["rates"], rate)
    saved = sum(layer_macs.get(name, 0.0) * counts[i] for name, counts in per_layer.items())
    return max(total_macs - saved, 0.0) / total_macs if total_macs > 0 else float("nan")


def area_vs_macs_figure(study: optuna.Study) -> go.Figure:
    """Each trial's area against the MACs left at its Top-PR (estimated from layer MACs)."""
    layer_macs = study.user_attrs.get("pxopt.layer_macs")
    total = study.user_attrs.get("pxopt.total_macs")
    trials = _complete(study)
    if not layer_macs or not total or not trials:
        return _empty("Area vs MACs", "the study has no MACs record or no completed trial")
    xs = [macs_left(t.user_attrs["curve"], t.user_attrs["curve"]["top_pr"], layer_macs, total) for t in trials]
    fig = go.Figure(
        go.Scatter(
            x=xs,
            y=[t.value for t in trials],
            mode="markers",
            text=[f"trial {t.number}, Top-PR {t.user_attrs['curve']['top_pr']:.2f}" for t in trials],
            marker={"color": [t.user_attrs["curve"]["top_pr"] for t in trials], "colorscale": "Viridis",
                    "showscale": True, "colorbar": {"title": "Top-PR"}},
        )
    )
    fig.update_layout(
        title="Area vs MACs left at Top-PR (estimate: pruned components' own MACs)",
        xaxis_title="fraction of MACs left at Top-PR",
        yaxis_title="area under curve",
    )
    return fig


def study_figures(study: optuna.Study, *, rate: float | None = None,
                  extra_curves: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, go.Figure]:
    """All report figures by id (ids are used by the dashboard too)."""
    figures = {
        "history": history_figure(study),
        "importances": importance_figure(study),
        "curves": curves_figure(study, extra_curves),
    }
    try:
        best = study.best_trial
        figures["per_layer"] = per_layer_figure(best, rate, study.user_attrs.get("pxopt.layer_sizes"))
    except ValueError:
        figures["per_layer"] = _empty("Pruned components per layer", "no completed trial yet")
    figures["area_vs_macs"] = area_vs_macs_figure(study)
    return figures
