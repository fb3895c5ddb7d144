"""The registry of students: ``kdistill list students``, ``student="name"`` in :func:`kdistill.distill` and
``student.kind`` in config files all read it.

A student builder is ``builder(in_shape, num_classes, **params) -> nn.Module``: ``in_shape`` is one row's shape
(from the data, or the user's ``in_shape`` param) and ``num_classes`` the teacher's width; the module maps a batch
(batch, *in_shape) to (batch, num_classes) logits. Its keyword parameters are what ``params`` accepts, read from its
signature. ``resolve(in_shape, num_classes, params) -> params`` (optional) fills data-sized defaults (the MLP's
widths) so the saved spec records the architecture that was built.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from kdistill.errors import StudentError
from kdistill.registry import Entry, Registry, UnknownNameError

__all__ = ["STUDENTS", "StudentEntry", "UnknownStudentError", "register_student", "register_student_family"]

Resolve = Callable[[Sequence[int], int, dict[str, Any]], dict[str, Any]]
_T = TypeVar("_T")


class UnknownStudentError(UnknownNameError, StudentError):
    """An unknown student name or parameter: a :class:`StudentError` and an
    :class:`~kdistill.registry.UnknownNameError` (it names the closest valid one)."""


@dataclass(frozen=True)
class StudentEntry(Entry):
    """A registered student; ``resolve`` fills data-sized defaults into its params before it is built."""

    resolve: Resolve | None = None


STUDENTS: Registry[StudentEntry] = Registry(
    "student", entry_type=StudentEntry, skip_leading=2, common_params=("in_shape",), error=UnknownStudentError
)
"""Every student builder, by name (and families such as ``"timm:"``, whose members are ``"timm:<model>"``)."""


def register_student(name: str, description: str, *, resolve: Resolve | None = None) -> Callable[[_T], _T]:
    """Decorator registering ``builder(in_shape, num_classes, **params) -> nn.Module`` as student ``name``.

    >>> @register_student("linear", "one linear layer on the flattened row")  # doctest: +SKIP
    ... def linear(in_shape, num_classes, *, bias: bool = True) -> nn.Module:
    ...     return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(in_shape), num_classes, bias=bias))
    """
    return STUDENTS.register(name, description, resolve=resolve)


def register_student_family(prefix: str, description: str, *, resolve: Resolve | None = None) -> Callable[[_T], _T]:
    """Decorator registering ``builder(variant, in_shape, num_classes, **params)`` for every ``"<prefix>:<variant>"``
    (``"timm:resnet18"`` calls it with ``variant="resnet18"``)."""
    return STUDENTS.register_family(prefix, description, resolve=resolve)
