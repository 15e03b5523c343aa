"""optuna-dashboard with pxopt's figures and a summary note attached to the study."""

from __future__ import annotations

import optuna

from pxopt.report.figures import study_figures


def attach_figures(study: optuna.Study) -> list[str]:
    """Store the report figures and a markdown note in the study (dashboard shows them)."""
    from optuna_dashboard import save_note, save_plotly_graph_object

    figures = study_figures(study)
    for fig_id, fig in figures.items():
        save_plotly_graph_object(study, fig, graph_object_id=f"pxopt-{fig_id}")
    save_note(study, _note(study))
    return list(figures)


def _note(study: optuna.Study) -> str:
    spec = study.user_attrs.get("pxopt.spec", {})
    lines = [f"# pxopt study `{study.study_name}`", ""]
    for key in ("model", "data", "classes", "components", "rates"):
        if key in spec:
            lines.append(f"- **{key}**: `{spec[key]}`")
    try:
        best = study.best_trial
        lines += [
            "",
            f"Best: trial {best.number}, area {best.value:.4f}, Top-PR {best.user_attrs['curve']['top_pr']:.2f}",
            "",
            "Export it with `pxopt export --study " + study.study_name + " --out best.json`.",
        ]
    except ValueError:
        lines.append("No completed trial yet.")
    return "\n".join(lines)


def serve(storage: str | optuna.storages.BaseStorage, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Run optuna-dashboard (blocks until interrupted)."""
    from optuna_dashboard import run_server

    run_server(storage, host=host, port=port)
