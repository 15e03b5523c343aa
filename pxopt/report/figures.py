"""Plotly figures of a study: the same objects go into the HTML report and the dashboard.

Every function reads only what the study stores (trial values and user attributes), so
a report can be made on any machine that can open the storage, without the model.
Areas (`pxopt.evaluate.AREA_DEFINITION`) are recomputed from the stored curves, so a
study of an older pxopt (whose values were the plain trapezoid) is drawn on the same scale.
Pruned trials are drawn as pruned, at the area of the rates they reached (a lower bound).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import optuna
import plotly.graph_objects as go
from optuna.trial import FrozenTrial, TrialState

from pxopt.evaluate import AREA, AREA_TITLE, curve_area, partial_area
from pxopt.search.naming import named_trial, search_best
from pxopt.search.objective import OBJECTIVE_ID, study_objective
from pxopt.search.study import baseline_trials

#: One colour per curve, told apart at a glance: black (the best trial), D3's ten, then
#: colours of Plotly's Dark24 / Alphabet and Kelly's set, each >= 70 (RGB distance) from
#: every earlier one and none too light on white.
PALETTE: tuple[str, ...] = (
    "#000000", "#1F77B4", "#FF7F0E", "#2CA02C", "#D62728", "#9467BD", "#8C564B", "#E377C2",
    "#BCBD22", "#17BECF", "#393B79", "#DA16FF", "#750D86", "#511CFB", "#FC0080", "#620042",
    "#3283FE", "#16FF32", "#FBE426", "#A1CAF1", "#C2B280", "#2B3D26",
)
PRUNED_COLOUR = "#9a9a9a"
COMPLETE_COLOUR = "#1F77B4"
BEST_SO_FAR_COLOUR = "#D62728"
_DASHES = ("solid", "dash", "dot", "dashdot")


def curve_styles(n: int) -> list[dict[str, Any]]:
    """Line styles for n curves: a different colour each (then colour + dash, past the palette)."""
    return [{"color": PALETTE[i % len(PALETTE)], "dash": _DASHES[(i // len(PALETTE)) % len(_DASHES)]}
            for i in range(n)]


def _complete(study: optuna.Study) -> list[FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if "curve" in t.user_attrs]


def trial_area(trial: FrozenTrial) -> float:
    """The area of a complete trial, from its stored curve."""
    curve = trial.user_attrs["curve"]
    return curve_area(curve["rates"], curve["accuracies"])


def rate_grid(study: optuna.Study) -> list[float] | None:
    """The study's rates (its spec; else any complete trial's curve)."""
    rates = study.user_attrs.get("pxopt.spec", {}).get("rates")
    if rates:
        return [float(r) for r in rates]
    done = _complete(study)
    return list(done[0].user_attrs["curve"]["rates"]) if done else None


def pruned_area(trial: FrozenTrial, rates: list[float] | None, current: bool = True) -> tuple[float, float] | None:
    """(area of the rates reached, last rate reached) of a pruned trial, or None if unknown.

    The rates not reached count as accuracy 0: a lower bound of the trial's area, on the
    same scale as complete trials (Optuna stores the same number as the trial's value).
    `current`: the study's values are the current objective's, so the trial's value may
    stand in for a missing partial curve.
    """
    part = trial.user_attrs.get("partial_curve")
    if part and rates and part.get("accuracies"):
        return partial_area(rates, part["accuracies"]), float(part["rates"][-1])
    step = trial.last_step
    if current and trial.value is not None and step is not None and rates and step < len(rates):
        return float(trial.value), float(rates[step])
    return None


def _empty(title: str, reason: str) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=reason, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    fig.update_layout(title=title, xaxis_visible=False, yaxis_visible=False)
    return fig


def history_figure(study: optuna.Study) -> go.Figure:
    """Area of every trial in order, the best so far, and pruned trials marked as pruned."""
    trials = study.get_trials(deepcopy=False)
    done = _complete(study)
    rates = rate_grid(study)
    current = study_objective(study) == OBJECTIVE_ID
    pruned = [(t, pruned_area(t, rates, current)) for t in trials if t.state == TrialState.PRUNED]
    pruned = [(t, v) for t, v in pruned if v is not None]
    n_failed = sum(t.state == TrialState.FAIL for t in trials)
    title = (f"Optimisation history ({len(done)} complete, "
             f"{sum(t.state == TrialState.PRUNED for t in trials)} pruned, {n_failed} failed)")
    if not done and not pruned:
        return _empty(title, "no finished trial yet")
    fig = go.Figure()
    if done:
        areas = [trial_area(t) for t in done]
        names = [t.user_attrs.get("baseline") for t in done]
        fig.add_trace(go.Scatter(
            x=[t.number for t in done], y=areas, mode="markers", name="complete (diamond: a baseline)",
            marker={"color": COMPLETE_COLOUR, "size": 8, "symbol": ["diamond" if b else "circle" for b in names]},
            text=[f"trial {t.number}" + (f" (baseline {b})" if b else "") for t, b in zip(done, names, strict=True)],
            hovertemplate="%{text}: area %{y:.4f}<extra></extra>",
        ))
        best, xs, ys = -float("inf"), [], []
        for t, a in sorted(zip(done, areas, strict=True), key=lambda p: p[0].number):
            best = max(best, a)
            xs.append(t.number)
            ys.append(best)
        last = max([t.number for t, _ in pruned], default=xs[-1])
        if last > xs[-1]:  # the best stays the best until the last finished trial
            xs.append(last)
            ys.append(best)
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name="best so far", line={"color": BEST_SO_FAR_COLOUR},
                                 line_shape="hv", hoverinfo="skip"))
    if pruned:
        fig.add_trace(go.Scatter(
            x=[t.number for t, _ in pruned], y=[v for _, (v, _r) in pruned], mode="markers",
            name="pruned (area of the rates reached: a lower bound)",
            marker={"color": PRUNED_COLOUR, "size": 8, "symbol": "x-thin", "line": {"width": 2, "color": PRUNED_COLOUR}},
            text=[f"trial {t.number} pruned after rate {r:.2f}" for t, (_v, r) in pruned],
            hovertemplate="%{text}: area >= %{y:.4f}<extra></extra>",
        ))
    fig.update_layout(title=title, xaxis_title="trial", yaxis_title=AREA_TITLE,
                      legend={"orientation": "h", "y": -0.2})
    return fig


def importance_figure(study: optuna.Study) -> go.Figure:
    """fANOVA parameter importances (needs a few completed trials with varied parameters)."""
    if len(_complete(study)) < 3:
        return _empty("Parameter importances", "needs at least 3 completed trials")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fig = optuna.visualization.plot_param_importances(study, target_name=AREA)
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
        best = named_trial(study)
        curves[f"best (trial {best.number})"] = best.user_attrs["curve"]
        first = search_best(study)
        if first.number != best.number:  # named after re-scoring: the search's own pick too
            curves[f"search split's best (trial {first.number})"] = first.user_attrs["curve"]
    except (ValueError, KeyError):
        return _empty("Accuracy vs pruning rate", "no completed trial yet")
    for name, trial in baseline_trials(study).items():
        curves[f"{name} (trial {trial.number})"] = trial.user_attrs["curve"]
    curves.update(dict(extra or {}))
    for (name, curve), line in zip(curves.items(), curve_styles(len(curves)), strict=True):
        # the area from the curve itself: tables and studies of older pxopt versions stored
        # the plain trapezoid under "area"
        label = f"{name}: area {curve_area(curve['rates'], curve['accuracies']):.4f}"
        if name.startswith("best"):
            line = {**line, "width": 3}
        fig.add_trace(go.Scatter(x=curve["rates"], y=curve["accuracies"], mode="lines+markers", name=label,
                                 line=line, marker={"color": line["color"]}))
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
            y=[trial_area(t) for t in trials],
            mode="markers",
            text=[f"trial {t.number}, Top-PR {t.user_attrs['curve']['top_pr']:.2f}" for t in trials],
            marker={"color": [t.user_attrs["curve"]["top_pr"] for t in trials], "colorscale": "Viridis",
                    "showscale": True, "colorbar": {"title": "Top-PR"}},
        )
    )
    fig.update_layout(
        title="Area vs MACs left at Top-PR (estimate: pruned components' own MACs)",
        xaxis_title="fraction of MACs left at Top-PR",
        yaxis_title=AREA_TITLE,
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
        best = named_trial(study)
        figures["per_layer"] = per_layer_figure(best, rate, study.user_attrs.get("pxopt.layer_sizes"))
    except ValueError:
        figures["per_layer"] = _empty("Pruned components per layer", "no completed trial yet")
    figures["area_vs_macs"] = area_vs_macs_figure(study)
    return figures
