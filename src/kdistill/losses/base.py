"""The loss protocol and the registry of methods.

A loss receives outputs, never models: the student's :class:`~kdistill.teachers.Outputs`, the teacher's (or None for
methods that need none) and the hard labels (or None for unlabeled rows). It returns a dict of named terms whose
``"loss"`` entry is the total that is back-propagated; the engine logs every other entry as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch

from kdistill.registry import Entry, Registry, UnknownNameError
from kdistill.registry import unknown_name as unknown_name  # re-exported: it lived here first
from kdistill.teachers.base import Outputs

__all__ = ["LOSSES", "Loss", "LossInfo", "UnknownNameError", "get_loss", "list_losses", "register_loss"]


@runtime_checkable
class Loss(Protocol):
    """``needs_teacher``: whether ``teacher`` may be None. ``student_features`` / ``teacher_features``: module paths
    whose outputs the method reads from ``Outputs.features`` (teacher features make the engine run the teacher live).

    Optional: a method with a schedule (a warm-up) defines ``start_epoch(epoch, total_epochs)``, which the engine
    calls before each epoch. The teacher's ``Outputs.index`` holds the batch's row positions in the transfer set.
    A method whose teacher-side work per row is the same every epoch may define ``precompute(teacher_logits, y)``
    returning a (rows, ...) tensor or None: for a teacher whose outputs never change (cached, precomputed or
    out-of-fold targets, no augmentation) the engine calls it once and hands each batch its rows as the teacher's
    ``Outputs.precomputed`` (``kd`` packs its targets this way: ~10% faster steps on tiny students)."""

    needs_teacher: bool
    student_features: Sequence[str]
    teacher_features: Sequence[str]

    def __call__(
        self, student: Outputs, teacher: Outputs | None, target: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """Named loss terms; ``"loss"`` is the total."""
        ...


LossInfo = Entry
"""A registered method: ``name``, ``factory`` (the class or function that builds it), ``description``."""

LOSSES: Registry[Entry] = Registry("method")
"""Every method, by name (:class:`kdistill.registry.Registry`: ``name in LOSSES``, ``LOSSES[name].factory``)."""
_T = TypeVar("_T")


def register_loss(name: str, description: str) -> Callable[[_T], _T]:
    """Class decorator adding a method to the registry under ``name`` with a one-line description."""
    return LOSSES.register(name, description)


def get_loss(name: str, **params: Any) -> Loss:
    """Build the registered loss ``name`` with its hyper-parameters."""
    return LOSSES[name].factory(**params)


def list_losses() -> list[LossInfo]:
    """Every registered method, by name."""
    return LOSSES.entries()
