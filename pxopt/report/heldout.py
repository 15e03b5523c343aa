"""The report's held-out figure and summary rows (`pxopt.search.heldout.heldout_summary`).

Drawn from the summary alone (stored in the study), so a report needs no model for it once
the search, `pxopt export` or `pxopt report` has evaluated the held-out images.
"""

from __future__ import annotations

import html
from typing import Any

import plotly.graph_objects as go

#: Colours of their own (not the palette of the trial curves): the best trial, the baseline.
HELDOUT_COLOURS = {"optimised": "#6A1B9A", "all-epsilon": "#E65100"}
HELDOUT_TITLE = "Held-out images: does the best configuration generalise?"


def heldout_figure(summary: dict[str, Any]) -> go.Figure:
    """Held-out curves (solid) of the best trial and all-epsilon, their search-split curves dotted."""
    fig = go.Figure()
    rows = summary.get("rows")
    if not rows:
        fig.update_layout(title=f"{HELDOUT_TITLE} ({summary.get('note', 'no held-out split')})",
                          annotations=[{"text": html.escape(str(summary.get("note", ""))), "showarrow": False,
                                        "xref": "paper", "yref": "paper", "x": 0.5, "y": 0.5}])
        return fig
    for name, row in rows.items():
        colour = HELDOUT_COLOURS.get(name, "#000000")
        fig.add_trace(go.Scatter(
            x=row["heldout_curve"]["rates"], y=row["heldout_curve"]["accuracies"], mode="lines+markers",
            name=f"{row['label']}, held-out: area {row['heldout_area']:.4f}", legendgroup=name,
            line={"color": colour, "width": 3},
            hovertemplate=f"{row['label']} held-out<br>rate %{{x}}<br>acc %{{y:.3f}}<extra></extra>"))
        fig.add_trace(go.Scatter(
            x=row["search_curve"]["rates"], y=row["search_curve"]["accuracies"], mode="lines",
            name=f"{row['label']}, search split: area {row['search_area']:.4f}", legendgroup=name,
            line={"color": colour, "width": 1.5, "dash": "dot"},
            hovertemplate=f"{row['label']} search split<br>rate %{{x}}<br>acc %{{y:.3f}}<extra></extra>"))
    fig.update_layout(
        title=f"{HELDOUT_TITLE} ({summary['n_images']} images the search never saw; dotted: the search split)",
        xaxis_title="pruning rate", yaxis_title="top-1 accuracy on the task", yaxis_range=[0, 1.02],
        template="plotly_white", legend={"orientation": "v", "x": 1.02, "y": 1.0},
    )
    return fig


def heldout_rows(summary: dict[str, Any]) -> str:
    """Summary-table rows: search-split and held-out area side by side, or why there are none."""
    rows = summary.get("rows")
    if not rows:
        return f"<tr><th>held-out</th><td>{html.escape(str(summary.get('note', 'no held-out split')))}</td></tr>"
    cells = "".join(
        f"<tr><td>{html.escape(r['label'])}</td><td>{r['search_area']:.4f}</td><td>{r['heldout_area']:.4f}</td></tr>"
        for r in rows.values())
    note = f"<p class=\"note\">{html.escape(summary['note'])}</p>" if summary.get("note") else ""
    return (f"<tr><th>held-out ({summary['n_images']} images)</th><td><table>"
            "<tr><th></th><th>search-split area</th><th>held-out area</th></tr>"
            f"{cells}</table>{note}</td></tr>")
