"""Teacher adapters: whatever the model, the engine sees one protocol (:class:`Teacher`)."""

from __future__ import annotations

from typing import Any

from torch import nn

from kdistill.errors import TeacherError
from kdistill.teachers.base import PROB_FLOOR, Outputs, Teacher, probs_to_logits, teacher_logits
from kdistill.teachers.sklearn import SklearnTeacher
from kdistill.teachers.torch import TorchTeacher

__all__ = [
    "PROB_FLOOR",
    "Outputs",
    "SklearnTeacher",
    "Teacher",
    "TorchTeacher",
    "as_teacher",
    "probs_to_logits",
    "teacher_logits",
]


def as_teacher(obj: Any) -> Teacher:
    """Wrap ``obj`` in the adapter that fits it: a Teacher as is, a torch module, or a scikit-learn classifier."""
    if isinstance(obj, (SklearnTeacher, TorchTeacher)):
        return obj
    if isinstance(obj, nn.Module):
        return TorchTeacher(obj)
    if hasattr(obj, "fit") and (hasattr(obj, "predict_proba") or hasattr(obj, "decision_function")):
        return SklearnTeacher(obj)
    if hasattr(obj, "fit") and hasattr(obj, "predict"):
        return SklearnTeacher(obj)  # raises the specific "neither predict_proba nor decision_function" error
    if isinstance(obj, Teacher):
        return obj
    raise TeacherError(
        f"cannot use a {type(obj).__name__} as a teacher",
        hint="pass a fitted scikit-learn classifier, a torch.nn.Module, or an object following kdistill.Teacher.",
    )
