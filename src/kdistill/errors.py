"""kdistill's exception types.

Every error says what was wrong, the value that was seen, and how to fix it. They subclass the built-in type a
caller would expect (``ValueError``, ``TypeError``), so ``except ValueError`` keeps working for code that does not
know kdistill.
"""

from __future__ import annotations

__all__ = [
    "CacheError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DependencyError",
    "ExportError",
    "KdistillError",
    "LabelError",
    "MethodError",
    "NonFiniteLossError",
    "ShapeMismatchError",
    "SmallDataWarning",
    "StudentError",
    "TeacherError",
]


class KdistillError(Exception):
    """Base class of every error kdistill raises on purpose.

    ``hint`` is the fix, printed on its own line after the problem.
    """

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\n  hint: {hint}")


class DataError(KdistillError, ValueError):
    """The data cannot be used as given: empty, NaN/inf, non-numeric, or X and y of different lengths."""


class LabelError(KdistillError, ValueError):
    """Labels that the teacher or student cannot represent (never seen by the teacher, or out of range)."""


class ShapeMismatchError(KdistillError, ValueError):
    """Teacher, student and labels disagree on a shape, most often the number of classes."""


class MethodError(KdistillError, ValueError):
    """A distillation method cannot run as configured: a bad hyper-parameter, or outputs it needs are missing."""


class TeacherError(KdistillError, TypeError):
    """The object given as teacher cannot be used as one."""


class StudentError(KdistillError, ValueError):
    """The student cannot be built or used: an unknown name, a wrong output width, bad sizing arguments."""


class CheckpointError(KdistillError, ValueError):
    """A saved run or checkpoint is missing, corrupt, or was written by an incompatible version."""


class CacheError(KdistillError, ValueError):
    """A teacher-output cache entry is corrupt, incomplete, or does not match what it claims to hold."""


class ConfigError(KdistillError, ValueError):
    """A run configuration that cannot be used: a wrong key, type or value, a missing file, a bad override.

    Raised before any training; the message names the field path (``train.optimizer.lr``), the value seen and, for
    names, the closest valid one.
    """


class NonFiniteLossError(KdistillError, FloatingPointError):
    """The training loss became NaN or inf; the message names the step and the last good checkpoint."""


class ExportError(KdistillError, RuntimeError):
    """A model could not be exported, quantized or pruned, or its export disagrees with PyTorch beyond tolerance."""


class DependencyError(KdistillError, ImportError):
    """An optional dependency is missing; the hint names the extra to install."""


class SmallDataWarning(UserWarning):
    """Too few rows for the validation split a scikit-learn estimator wanted (stratified for DistilledClassifier,
    2 labelled rows on each side for DistilledRegressor): it fell back to a stated rule instead (see
    :mod:`kdistill.sklearn`)."""
