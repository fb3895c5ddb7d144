"""kdistill: distil a large teacher into a small, fast student, and report honestly whether it worked.

>>> import kdistill
>>> result = kdistill.distill(teacher, "mlp", (X_train, y_train), val=(X_val, y_val), test=(X_test, y_test))
>>> print(result.report)
"""

from __future__ import annotations

from kdistill.api import DistillResult, distill, load
from kdistill.errors import (
    CacheError,
    CheckpointError,
    ConfigError,
    DataError,
    KdistillError,
    LabelError,
    MethodError,
    NonFiniteLossError,
    ShapeMismatchError,
    StudentError,
    TeacherError,
)
from kdistill.losses import KDLoss, get_loss, kd_loss, list_losses
from kdistill.report import Report
from kdistill.sklearn import DistilledClassifier, DistilledRegressor
from kdistill.teachers import Outputs, Teacher, as_teacher

__version__ = "0.1.0"

__all__ = [
    "CacheError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DistillResult",
    "DistilledClassifier",
    "DistilledRegressor",
    "KDLoss",
    "KdistillError",
    "LabelError",
    "MethodError",
    "NonFiniteLossError",
    "Outputs",
    "Report",
    "ShapeMismatchError",
    "StudentError",
    "Teacher",
    "TeacherError",
    "__version__",
    "as_teacher",
    "distill",
    "get_loss",
    "kd_loss",
    "list_losses",
    "load",
]
