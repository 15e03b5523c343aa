"""One self-contained HTML report of a study (plotly.js inlined: opens offline)."""

from __future__ import annotations

import html
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState

from pxopt.evaluate import AREA_DEFINITION
from pxopt.report.figures import study_figures, trial_area
from pxopt.search.naming import named_trial, naming_lines, stored_naming
from pxopt.search.study import baseline_trials

if TYPE_CHECKING:
    from pxopt.report.heatmaps import Heatmaps


def rules_json(rules: Any) -> str:
    """A rule configuration as it is written in files: indented JSON."""
    return json.dumps(rules, indent=2)


def trial_counts(study: optuna.Study) -> str:
    """'12 complete, 6 pruned, 1 failed' (states that occur, in this order)."""
    counts = {s: len(study.get_trials(deepcopy=False, states=(s,))) for s in TrialState}
    parts = [f"{n} {s.name.lower()}" for s, n in counts.items() if n]
    return ", ".join(parts) or "none"


def _summary(study: optuna.Study, heldout: Mapping[str, Any] | None = None) -> str:
    """A short HTML table: trial counts, best area and rules, baselines, held-out areas."""
    rows = [f"<tr><th>trials</th><td>{html.escape(trial_counts(study))}</td></tr>"]
    spec = study.user_attrs.get("pxopt.spec", {})
    for key in ("model", "data", "classes", "components"):
        if key in spec:
            rows.append(f"<tr><th>{key}</th><td>{html.escape(str(spec[key]))}</td></tr>")
    rows.append(f"<tr><th>area</th><td>{html.escape(AREA_DEFINITION)}</td></tr>")
    try:
        best = named_trial(study)
        rows.append(
            f"<tr><th>best</th><td>trial {best.number}: area {trial_area(best):.4f}, "
            f"Top-PR {best.user_attrs['curve']['top_pr']:.2f}, ranking {html.escape(str(best.user_attrs.get('ranking')))}"
            "</td></tr>"
        )
        rows.append(f"<tr><th>best rules</th><td><pre><code>{html.escape(rules_json(best.user_attrs.get('rules')))}"
                    "</code></pre></td></tr>")
        naming = stored_naming(study)
        if naming is not None and naming.get("rescored"):
            rows.append(f"<tr><th>named best</th><td><pre>{html.escape(chr(10).join(naming_lines(naming)))}"
                        "</pre></td></tr>")
    except ValueError:
        pass
    for name, trial in baseline_trials(study).items():
        rows.append(f"<tr><th>baseline {html.escape(name)}</th><td>trial {trial.number}: area {trial_area(trial):.4f}"
                    "</td></tr>")
    if heldout is not None:
        from pxopt.report.heldout import heldout_rows

        rows.append(heldout_rows(dict(heldout)))
    return "<table>" + "".join(rows) + "</table>"


def _stored_heldout(study: optuna.Study) -> dict[str, Any]:
    """The best trial's held-out summary as far as the study stores it."""
    from pxopt.search.heldout import heldout_summary

    try:
        best = named_trial(study)
    except ValueError:
        return {"note": "no completed trial yet"}
    return heldout_summary(study, best)


def write_report(
    study: optuna.Study,
    path: str | Path,
    *,
    rate: float | None = None,
    extra_curves: Mapping[str, Mapping[str, Any]] | None = None,
    heatmaps: Heatmaps | None = None,
    heatmaps_note: str | None = None,
    heldout: Mapping[str, Any] | None = None,
) -> Path:
    """Write the study's figures and summary into one HTML file; returns its path.

    heldout: the best trial's held-out summary (`pxopt.search.heldout.heldout_summary`);
    None: what the study stores (no model is loaded here), or the reason there is none.

    heatmaps: input relevance of reference images (`pxopt.report.heatmaps.study_heatmaps`,
    which needs the model and data); without them, `heatmaps_note` says why there are none.
    """
    figures = dict(study_figures(study, rate=rate, extra_curves=extra_curves))
    if heldout is None:
        heldout = _stored_heldout(study)
    from pxopt.report.heldout import heldout_figure

    figures = {**{k: v for k, v in figures.items() if k == "curves"}, "heldout": heldout_figure(dict(heldout)),
               **{k: v for k, v in figures.items() if k != "curves"}}
    if heatmaps is not None:
        from pxopt.report.heatmaps import heatmap_figure

        ordered = {}
        for fig_id, fig in figures.items():
            ordered[fig_id] = fig
            if fig_id == "curves":
                ordered["heatmaps"] = heatmap_figure(heatmaps)
        figures = ordered
    parts = []
    for i, (fig_id, fig) in enumerate(figures.items()):
        parts.append(
            fig.to_html(full_html=False, include_plotlyjs=(i == 0), div_id=f"fig-{fig_id}",
                        config={"displaylogo": False})
        )
        if fig_id == "curves" and heatmaps is None:
            note = heatmaps_note or "not drawn (they need the model and the data: pxopt report draws them)"
            parts.append(f"<p class=\"note\">Heatmaps: {html.escape(note)}</p>")
    title = f"pxopt study {html.escape(study.study_name)}"
    doc = (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
        f"<title>{title}</title>"
        "<style>body{font-family:sans-serif;margin:2em;max-width:1200px}"
        "th{text-align:left;padding-right:1em;vertical-align:top}code{font-size:85%}"
        "pre{margin:0}.note{color:#555}</style>"
        f"</head><body><h1>{title}</h1>{_summary(study, heldout)}"
        + "".join(f"<section>{p}</section>" for p in parts)
        + "</body></html>\n"
    )
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(doc, encoding="utf-8")
    return out
