"""Plotly figures, the self-contained HTML report and optuna-dashboard attachments."""

from pxopt.report.figures import study_figures
from pxopt.report.html import write_report

__all__ = ["study_figures", "write_report"]
