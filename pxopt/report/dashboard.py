"""optuna-dashboard with pxopt's figures and a summary note attached to the study."""

from __future__ import annotations

import warnings

import optuna

from pxopt.evaluate import AREA, AREA_DEFINITION
from pxopt.report.figures import study_figures, trial_area
from pxopt.report.html import rules_json, trial_counts
from pxopt.search.naming import named_trial
from pxopt.search.objective import OBJECTIVE_ID, study_objective

#: The dashboard's name for the values of a study made by an older pxopt.
LEGACY_METRIC = "trapezoid area (older pxopt)"


def attach_figures(study: optuna.Study) -> list[str]:
    """Store the report figures and a markdown note in the study (dashboard shows them).

    Also names the study's objective for the dashboard's own plots (`area`, or the older
    trapezoid area for a study made before the area became the mean accuracy).
    """
    from optuna_dashboard import save_note, save_plotly_graph_object

    metric = AREA if study_objective(study) == OBJECTIVE_ID else LEGACY_METRIC
    if study.metric_names != [metric]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([metric])
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
    lines += [f"- **trials**: {trial_counts(study)}", "", f"The objective: {AREA_DEFINITION}.", "",
              "Pruned trials: Optuna records as their value the area of the rates they reached "
              "(the rates not reached count as 0, so it is a lower bound); pxopt's figure "
              "`pxopt-history` marks them as pruned."]
    if study_objective(study) != OBJECTIVE_ID:
        lines += ["", f"This study was made by an older pxopt: its trial values are the {LEGACY_METRIC} "
                  "(not divided by the rate span); pxopt's figures show the area recomputed from the curves."]
    try:
        best = named_trial(study)
        lines += [
            "",
            f"Best: trial {best.number}, area {trial_area(best):.4f}, Top-PR {best.user_attrs['curve']['top_pr']:.2f}, "
            f"ranking `{best.user_attrs.get('ranking')}`, rules:",
            "",
            "```json",
            rules_json(best.user_attrs.get("rules")),
            "```",
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
