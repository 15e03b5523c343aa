"""The trial guard: every way a trial can fail leaves its reason, and only that trial fails.

`guard(objective)` wraps an Optuna objective: out-of-memory becomes `TrialOutOfMemory`,
a NaN or infinite value `NonFiniteRelevanceError`, both in `CAUGHT`, so
`study.optimize(..., catch=CAUGHT)` fails the trial and the study goes on; any other
error (a bug) still stops the worker, with its reason recorded first.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import optuna
import torch

from pxopt.errors import NonFiniteRelevanceError, PxoptError
from pxopt.search.storage import FAIL_REASON

Objective = Callable[[optuna.Trial], float]
INTERRUPTED = "interrupted by SIGINT (Ctrl-C); queued again for the next run"

__all__ = ["CAUGHT", "FAIL_REASON", "INTERRUPTED", "Objective", "TrialOutOfMemory", "guard"]


class TrialOutOfMemory(MemoryError):
    """A trial ran out of (GPU or host) memory; only that trial fails."""


#: Exceptions that fail one trial but let the worker go on with the next one.
CAUGHT: tuple[type[BaseException], ...] = (PxoptError, MemoryError, torch.OutOfMemoryError)


def is_oom(exc: BaseException) -> bool:
    """Torch's and Python's out-of-memory errors, and the allocator's RuntimeError."""
    if isinstance(exc, MemoryError | torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )


def set_reason(trial: optuna.Trial, reason: str) -> None:
    """Record why a trial failed, keeping a more specific reason set by the objective."""
    if FAIL_REASON not in trial.user_attrs:
        trial.set_user_attr(FAIL_REASON, reason[:1000])


def guard(objective: Objective, on_start: Callable[[optuna.Trial], None] | None = None) -> Objective:
    """Wrap an objective so every failure leaves its reason in the trial's user attributes.

    Out-of-memory becomes `TrialOutOfMemory` and a NaN/inf value `NonFiniteRelevanceError`,
    both in `CAUGHT`, so `study.optimize(..., catch=CAUGHT)` fails only that trial.
    """

    def guarded(trial: optuna.Trial) -> float:
        if on_start is not None:
            on_start(trial)
        try:
            value = objective(trial)
        except optuna.TrialPruned:
            raise
        except KeyboardInterrupt:
            set_reason(trial, INTERRUPTED)
            raise
        except BaseException as exc:
            if is_oom(exc):
                set_reason(trial, f"out of memory: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                if isinstance(exc, CAUGHT):
                    raise
                raise TrialOutOfMemory(str(exc)) from exc
            set_reason(trial, f"{type(exc).__name__}: {exc}")
            raise
        if value is None or not math.isfinite(float(value)):
            reason = f"objective value is {value}"
            set_reason(trial, f"NonFiniteRelevanceError: {reason}")
            raise NonFiniteRelevanceError(reason)
        return value

    return guarded

