"""User-facing errors.

Every error a user can cause with bad input derives from `PxoptError`, so the CLI can
print its one-line message and exit with code 2 instead of a traceback, and a search
can fail just that trial with the message recorded.
"""

from __future__ import annotations


class PxoptError(Exception):
    """An error caused by the user's input; its message is one self-explanatory line."""


class ConfigError(PxoptError, ValueError):
    """Invalid rule configuration, study spec, rates or other settings."""


class ModelSpecError(PxoptError, ValueError):
    """Unknown model spec, or weights that cannot be found offline."""


class CheckpointError(PxoptError):
    """A checkpoint that cannot be read or does not fit its architecture."""


class DataError(PxoptError):
    """Missing, empty or unreadable dataset, or a task it cannot satisfy."""


class UnsupportedLayerError(PxoptError, TypeError):
    """A layer the LRP engine has no rule for (never silently falls back to the gradient)."""


class NonFiniteRelevanceError(PxoptError, ArithmeticError):
    """Relevances became NaN or infinite (e.g. an epsilon too small for the model)."""


class StorageError(PxoptError):
    """A study storage that cannot be reached, or a study that does not fit the request."""
