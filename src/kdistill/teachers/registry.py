"""The registry of teacher adapters: what :func:`kdistill.as_teacher` can wrap, and ``kdistill list teachers``.

Each adapter class registers itself with :func:`register_adapter`: a name, a one-line description, and ``accepts``,
a test on the object a user passes (``None``: only built explicitly, like ``FileTeacher(path, inputs=X)``).
:func:`~kdistill.as_teacher` tries the adapters in increasing ``order`` and wraps the object in the first that
accepts it. An adapter's parameters are its constructor's keywords after the wrapped object.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from kdistill.errors import TeacherError
from kdistill.registry import Entry, Registry, UnknownNameError

__all__ = ["ADAPTERS", "AdapterEntry", "UnknownTeacherError", "register_adapter"]

_T = TypeVar("_T")


class UnknownTeacherError(UnknownNameError, TeacherError):
    """An unknown adapter name or parameter, with the closest valid one."""


@dataclass(frozen=True)
class AdapterEntry(Entry):
    """``factory``: the adapter class, called with the object to wrap. ``accepts(obj)``: whether ``as_teacher`` wraps
    ``obj`` in it (None: never automatically). ``order``: lower is tried first (transformers before any module)."""

    accepts: Callable[[Any], bool] | None = None
    order: int = 100


ADAPTERS: Registry[AdapterEntry] = Registry(
    "teacher adapter", entry_type=AdapterEntry, skip_leading=1, error=UnknownTeacherError
)
"""Every teacher adapter, by name."""


def register_adapter(
    name: str, description: str, *, accepts: Callable[[Any], bool] | None = None, order: int = 100
) -> Callable[[_T], _T]:
    """Class decorator registering a teacher adapter (a class following :class:`~kdistill.Teacher`, best built on
    :class:`~kdistill.teachers.base.TeacherBase`)."""
    return ADAPTERS.register(name, description, accepts=accepts, order=order)


def dispatch_order() -> list[AdapterEntry]:
    """The adapters that ``as_teacher`` may pick, in the order it tries them."""
    return sorted((entry for entry in ADAPTERS.entries() if entry.accepts is not None), key=lambda e: e.order)


def adapter_types() -> tuple[type, ...]:
    """Every registered adapter class: an instance of one is already a teacher."""
    return tuple(entry.factory for entry in ADAPTERS.entries() if isinstance(entry.factory, type))
