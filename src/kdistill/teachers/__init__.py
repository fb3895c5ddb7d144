"""Teacher adapters: whatever the model, the engine sees one protocol (:class:`Teacher`). Each adapter registers
itself (:mod:`kdistill.teachers.registry`); :func:`as_teacher` picks the first that accepts the object."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, cast, runtime_checkable

import numpy as np
import torch

from kdistill.errors import TeacherError
from kdistill.teachers.base import PROB_FLOOR, Outputs, Teacher, TeacherBase, TopK, probs_to_logits, teacher_logits
from kdistill.teachers.callable import CallableTeacher
from kdistill.teachers.ensemble import EnsembleTeacher
from kdistill.teachers.file import FileTeacher, save_teacher_outputs
from kdistill.teachers.hf import HFTeacher
from kdistill.teachers.onnx import OnnxTeacher
from kdistill.teachers.registry import ADAPTERS, UnknownTeacherError, adapter_types, dispatch_order, register_adapter
from kdistill.teachers.sentence import SentenceEncoder, SentenceTeacher
from kdistill.teachers.sklearn import SklearnTeacher
from kdistill.teachers.torch import TorchTeacher

__all__ = [
    "ADAPTERS",
    "PROB_FLOOR",
    "CallableTeacher",
    "EnsembleTeacher",
    "FileTeacher",
    "HFTeacher",
    "OnnxTeacher",
    "Outputs",
    "SentenceEncoder",
    "SentenceTeacher",
    "SklearnTeacher",
    "Teacher",
    "TeacherBase",
    "TopK",
    "TorchTeacher",
    "UnknownTeacherError",
    "as_teacher",
    "probs_to_logits",
    "register_adapter",
    "save_teacher_outputs",
    "teacher_logits",
]


@runtime_checkable
class _CoreTeacher(Protocol):
    """The protocol's required members, without the optional size ones."""

    classes: np.ndarray | None

    @property
    def num_classes(self) -> int | None: ...

    def fingerprint(self) -> str: ...

    def __call__(self, x: torch.Tensor, *, features: Sequence[str] = ()) -> Outputs: ...


class _WithDefaults(TeacherBase):
    """An object following the protocol's core members, given :class:`TeacherBase`'s size defaults (or its own
    ``size_bytes`` / ``parameter_count`` if it has one of them). Every other attribute is the object's."""

    def __init__(self, teacher: _CoreTeacher) -> None:
        self.teacher = teacher
        self.classes: np.ndarray | None = teacher.classes

    def __getattr__(self, name: str) -> Any:
        if name == "teacher" or name.startswith("__"):  # not set yet (copying, unpickling); protocols stay ours
            raise AttributeError(name)
        return getattr(self.teacher, name)

    @property
    def num_classes(self) -> int | None:
        return self.teacher.num_classes

    def fingerprint(self) -> str:
        return self.teacher.fingerprint()

    def __call__(self, x: torch.Tensor, *, features: Sequence[str] = ()) -> Outputs:
        return self.teacher(x, features=features)

    def size_bytes(self) -> int | None:
        own = getattr(self.teacher, "size_bytes", None)
        return None if own is None else own()

    def parameter_count(self) -> int | None:
        own = getattr(self.teacher, "parameter_count", None)
        return None if own is None else own()


def as_teacher(obj: Any) -> Teacher:
    """Wrap ``obj`` in the adapter that fits it (``kdistill list teachers`` lists them).

    An adapter is kept as is, and so is any object following :class:`Teacher` (one with only its core members,
    ``classes``, ``num_classes``, ``fingerprint`` and ``__call__``, gets unknown size and parameter count). Otherwise
    the registered adapters are tried in order: a transformers model becomes :class:`HFTeacher`, any other
    ``torch.nn.Module`` a :class:`TorchTeacher`, a fitted scikit-learn classifier a :class:`SklearnTeacher`, a list or
    tuple of teachers an :class:`EnsembleTeacher` (mean of probabilities), a path to an ``.onnx`` file an
    :class:`OnnxTeacher`, and a plain function ``batch -> scores`` a :class:`CallableTeacher`. Precomputed outputs
    need the rows they belong to: use ``FileTeacher(path, inputs=X)``.
    """
    if isinstance(obj, (*adapter_types(), Teacher)):
        return cast(Teacher, obj)
    if isinstance(obj, _CoreTeacher):
        return _WithDefaults(obj)
    for entry in dispatch_order():
        assert entry.accepts is not None
        if entry.accepts(obj):
            return cast(Teacher, entry.factory(obj))
    if isinstance(obj, (str, os.PathLike)):
        path = Path(obj)
        raise TeacherError(
            f"cannot use a {type(obj).__name__} as a teacher: {str(path)!r} is not the path of an .onnx file",
            hint="pass an .onnx file, or for precomputed outputs FileTeacher(path, inputs=X) "
            "(it needs the rows the outputs belong to).",
        )
    raise TeacherError(
        f"cannot use a {type(obj).__name__} as a teacher",
        hint="pass a fitted scikit-learn classifier, a torch.nn.Module, a transformers model, an .onnx path, a "
        "function batch -> scores, a list of teachers, or an object following kdistill.Teacher "
        "(`kdistill list teachers` lists the adapters).",
    )
