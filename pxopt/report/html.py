"""One self-contained HTML report of a study (plotly.js inlined: opens offline)."""

from __future__ import annotations

import html
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from pxopt.report.figures import study_figures
from pxopt.search.study import baseline_trials


def _summary(study: optuna.Study) -> str:
    """A short HTML table: trial counts, best area and rules, baselines."""
    counts = {s.name.lower(): len(study.get_trials(deepcopy=False, states=(s,))) for s in TrialState}
    rows = [f"<tr><th>trials</th><td>{html.escape(str({k: v for k, v in counts.items() if v}))}</td></tr>"]
    spec = study.user_attrs.get("pxopt.spec", {})
    for key in ("model", "data", "classes", "components"):
        if key in spec:
            rows.append(f"<tr><th>{key}</th><td>{html.escape(str(spec[key]))}</td></tr>")
    try:
        best = study.best_trial
        rows.append(
            f"<tr><th>best</th><td>trial {best.number}: area {best.value:.4f}, "
            f"Top-PR {best.user_attrs['curve']['top_pr']:.2f}, ranking {best.user_attrs.get('ranking')}</td></tr>"
        )
        rows.append(f"<tr><th>best rules</th><td><code>{html.escape(str(best.user_attrs.get('rules')))}</code></td></tr>")
    except ValueError:
        pass
    for name, trial in baseline_trials(study).items():
        rows.append(f"<tr><th>baseline {html.escape(name)}</th><td>trial {trial.number}: area {trial.value:.4f}</td></tr>")
    return "<table>" + "".join(rows) + "</table>"


def write_report(
    study: optuna.Study,
    path: str | Path,
    *,
    rate: float | None = None,
    extra_curves: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """Write the study's figures and summary into one HTML file; returns its path."""
    figures = study_figures(study, rate=rate, extra_curves=extra_curves)
    parts = []
    for i, (fig_id, fig) in enumerate(figures.items()):
        parts.append(
            fig.to_html(full_html=False, include_plotlyjs=(i == 0), div_id=f"fig-{fig_id}",
                        config={"displaylogo": False})
        )
    title = f"pxopt study {html.escape(study.study_name)}"
    doc = (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
        f"<title>{title}</title>"
        "<style>body{font-family:sans-serif;margin:2em;max-width:1200px}"
        "th{text-align:left;padding-right:1em;vertical-align:top}code{font-size:85%}</style>"
        f"</head><body><h1>{title}</h1>{_summary(study)}"
        + "".join(f"<section>{p}</section>" for p in parts)
        + "</body></html>\n"
    )
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(doc, encoding="utf-8")
    return out
