"""Bayesian optimisation of LRP rule configurations with Optuna.

The verbs: `StudySpec.from_toml` (what to search), `SearchSpace.build` (which rules),
`run_search(spec, workers=N)` (load the model once, create or resume the study, optimise
with N worker processes; `pxopt search` calls the same function).
"""

from pxopt.search.space import SearchSpace
from pxopt.search.spec import StudySpec
from pxopt.search.study import SearchResult, baseline_trials, open_study, run_search

__all__ = ["SearchResult", "SearchSpace", "StudySpec", "baseline_trials", "open_study", "run_search"]
