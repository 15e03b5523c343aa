"""Plotly figures, the self-contained HTML report, heatmaps and optuna-dashboard attachments."""

from pxopt.report.figures import study_figures
from pxopt.report.heatmaps import Heatmaps, compute_heatmaps, study_heatmaps, write_png
from pxopt.report.html import write_report

__all__ = ["Heatmaps", "compute_heatmaps", "study_figures", "study_heatmaps", "write_png", "write_report"]
