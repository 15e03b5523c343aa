"""Bayesian optimisation of LRP rule configurations with Optuna.

The verbs: `StudySpec.from_toml` (what to search), `SearchSpace.build` (which rules),
`run_search(spec, evaluate)` (create or resume the study and optimise).
"""

from pxopt.search.space import SearchSpace
from pxopt.search.spec import StudySpec
from pxopt.search.study import SearchResult, baseline_trials, open_study, run_search

__all__ = ["SearchResult", "SearchSpace", "StudySpec", "baseline_trials", "open_study", "run_search"]
