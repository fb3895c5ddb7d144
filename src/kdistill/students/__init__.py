"""Student builders. A student is any ``nn.Module`` mapping a batch to (batch, classes) logits; a registered name
(``"mlp"``, ``"cnn"``: ``kdistill list students``) builds one sized from the data, and those can be saved and rebuilt
from a small JSON spec. A new student is one builder function and :func:`register_student` (docs/architecture.md)."""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from kdistill.errors import StudentError
from kdistill.students.base import (
    STUDENTS,
    StudentEntry,
    UnknownStudentError,
    register_student,
    register_student_family,
)
from kdistill.students.cnn import CNN
from kdistill.students.layers import Standardize
from kdistill.students.mlp import MLP, default_hidden
from kdistill.students.static import StaticEmbedding  # registers "static"
from kdistill.students.transformer import fresh_transformer, from_teacher, layer_map  # registers "transformer"
from kdistill.students.vision import build_vision_model  # registers the timm: and torchvision: families

__all__ = [
    "CNN",
    "MLP",
    "STUDENTS",
    "StaticEmbedding",
    "StudentEntry",
    "UnknownStudentError",
    "build_student",
    "build_vision_model",
    "default_hidden",
    "fresh_transformer",
    "from_teacher",
    "layer_map",
    "register_student",
    "register_student_family",
    "student_from_spec",
]

_SPEC_KEYS = ("kind", "in_shape", "num_classes")


def student_from_spec(spec: dict[str, Any]) -> nn.Module:
    """Rebuild a registered student (untrained) from the spec :func:`build_student` returned:
    ``{"kind", "in_shape", "num_classes", **params}``."""
    kind = spec.get("kind")
    if not isinstance(kind, str):
        raise StudentError(
            f"the student spec has no kind (it holds {sorted(spec)})",
            hint="rebuild from the spec build_student returned; custom modules are saved without one.",
        )
    entry = STUDENTS.get(kind)
    params = {key: value for key, value in spec.items() if key not in _SPEC_KEYS}
    module = entry.factory(spec["in_shape"], spec["num_classes"], **params)
    if not isinstance(module, nn.Module):
        raise StudentError(
            f"student builder {kind!r} returned a {type(module).__name__}, not a torch.nn.Module",
            hint="a registered student builder returns the nn.Module mapping (batch, *in_shape) to (batch, classes).",
        )
    return module


def build_student(
    student: str | nn.Module,
    train_x: torch.Tensor,
    num_classes: int,
    *,
    hidden: Sequence[int] | None = None,
    **params: Any,
) -> tuple[nn.Module, dict[str, Any] | None]:
    """Return ``(module, spec)``. For a name, builds it sized from ``train_x`` (an input standardisation named
    ``standardize`` is fitted on those rows) and returns the spec to rebuild it; for a module, returns it unchanged
    and ``None``.

    ``params`` are the builder's keyword parameters (``kdistill list students``); every student also takes
    ``in_shape``, one row's shape, to read flat rows as images (default: ``train_x.shape[1:]``). ``hidden`` is the
    MLP's widths (kept as a named argument because :func:`kdistill.distill` has it); None means not given.
    An unknown name or parameter raises :class:`UnknownStudentError` naming the closest valid one.
    """
    given = params | ({} if hidden is None else {"hidden": hidden})
    if isinstance(student, nn.Module):
        if given:
            raise StudentError(
                f"student params {sorted(given)} were given with a ready-made {type(student).__name__}",
                hint="size your own module when you build it, or pass a registered student name to size.",
            )
        return student, None
    if not isinstance(student, str):
        raise StudentError(
            f"unknown student {student!r}: a student is a registered name or a torch.nn.Module",
            hint=f"pass one of {STUDENTS.names()} or any torch.nn.Module returning (batch, classes) logits.",
        )
    entry = STUDENTS.get(student)
    STUDENTS.check_params(student, given)
    in_shape = given.pop("in_shape", None)
    shape = [int(size) for size in (in_shape if in_shape is not None else train_x.shape[1:])]
    spec = {"kind": student, "in_shape": shape, "num_classes": num_classes} | _resolved(
        entry, shape, num_classes, given
    )
    module = student_from_spec(spec)
    standardize = getattr(module, "standardize", None)
    if isinstance(standardize, Standardize):
        standardize.fit(train_x)
    return module, spec


def _resolved(entry: StudentEntry, shape: list[int], num_classes: int, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with the builder's defaults filled in (and ``resolve``'s data-sized ones), as JSON values."""
    try:
        bound = inspect.signature(entry.factory).bind(shape, num_classes, **params)
    except TypeError as exc:
        raise StudentError(
            f"student {entry.name!r} cannot take params {sorted(params)}: {exc}",
            hint="`kdistill list students` shows what each student takes.",
        ) from exc
    bound.apply_defaults()
    resolved: dict[str, Any] = {}
    for position, (name, value) in enumerate(bound.arguments.items()):
        kind = bound.signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            resolved |= value
        elif position >= 2:
            resolved[name] = value
    if entry.resolve is not None:
        resolved = entry.resolve(shape, num_classes, resolved)
    resolved = {name: _jsonable(value) for name, value in resolved.items()}
    try:
        json.dumps(resolved)
    except TypeError as exc:
        raise StudentError(
            f"student {entry.name!r}: its params {resolved} cannot be saved in the spec ({exc})",
            hint="student params are plain data (numbers, strings, lists); build other objects inside the builder.",
        ) from exc
    return resolved


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(item) for item in value]
    if isinstance(value, torch.Size):
        return list(value)
    return value
