"""Teacher adapters: whatever the model, the engine sees one protocol (:class:`Teacher`)."""

from __future__ import annotations

import builtins
import os
from pathlib import Path
from typing import Any

from torch import nn

from kdistill.errors import TeacherError
from kdistill.teachers.base import PROB_FLOOR, Outputs, Teacher, TopK, probs_to_logits, teacher_logits
from kdistill.teachers.callable import CallableTeacher
from kdistill.teachers.ensemble import EnsembleTeacher
from kdistill.teachers.file import FileTeacher, save_teacher_outputs
from kdistill.teachers.hf import HFTeacher
from kdistill.teachers.onnx import OnnxTeacher
from kdistill.teachers.sklearn import SklearnTeacher
from kdistill.teachers.torch import TorchTeacher

__all__ = [
    "PROB_FLOOR",
    "CallableTeacher",
    "EnsembleTeacher",
    "FileTeacher",
    "HFTeacher",
    "OnnxTeacher",
    "Outputs",
    "SklearnTeacher",
    "Teacher",
    "TopK",
    "TorchTeacher",
    "as_teacher",
    "probs_to_logits",
    "save_teacher_outputs",
    "teacher_logits",
]

_ADAPTERS = (SklearnTeacher, TorchTeacher, CallableTeacher, EnsembleTeacher, FileTeacher, OnnxTeacher)


def _is_transformers_model(obj: Any) -> bool:
    return isinstance(obj, nn.Module) and type(obj).__module__.startswith("transformers.") and hasattr(obj, "config")


def as_teacher(obj: Any) -> Teacher:
    """Wrap ``obj`` in the adapter that fits it.

    A Teacher is kept as is; a transformers model becomes :class:`HFTeacher`, any other ``torch.nn.Module`` a
    :class:`TorchTeacher`, a fitted scikit-learn classifier a :class:`SklearnTeacher`, a list or tuple of teachers an
    :class:`EnsembleTeacher` (mean of probabilities), a path to an ``.onnx`` file an :class:`OnnxTeacher`, and a
    plain function ``batch -> scores`` a :class:`CallableTeacher`. Precomputed outputs need the rows they belong
    to: use ``FileTeacher(path, inputs=X)``.
    """
    if isinstance(obj, _ADAPTERS):
        return obj
    if _is_transformers_model(obj):
        return HFTeacher(obj)
    if isinstance(obj, nn.Module):
        return TorchTeacher(obj)
    if hasattr(obj, "fit") and (hasattr(obj, "predict_proba") or hasattr(obj, "decision_function")):
        return SklearnTeacher(obj)
    if hasattr(obj, "fit") and hasattr(obj, "predict"):
        return SklearnTeacher(obj)  # raises the specific "neither predict_proba nor decision_function" error
    if isinstance(obj, Teacher):
        return obj
    if isinstance(obj, (list, tuple)):
        return EnsembleTeacher(obj)
    if isinstance(obj, (str, os.PathLike)):
        path = Path(obj)
        if path.suffix == ".onnx":
            return OnnxTeacher(path)
        raise TeacherError(
            f"cannot use a {type(obj).__name__} as a teacher: {str(path)!r} is not the path of an .onnx file",
            hint="pass an .onnx file, or for precomputed outputs FileTeacher(path, inputs=X) "
            "(it needs the rows the outputs belong to).",
        )
    if builtins.callable(obj):  # the submodule kdistill.teachers.callable shadows the builtin here
        return CallableTeacher(obj)
    raise TeacherError(
        f"cannot use a {type(obj).__name__} as a teacher",
        hint="pass a fitted scikit-learn classifier, a torch.nn.Module, a transformers model, an .onnx path, a "
        "function batch -> scores, a list of teachers, or an object following kdistill.Teacher.",
    )
