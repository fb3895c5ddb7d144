"""The loss protocol and the registry of methods.

A loss receives outputs, never models: the student's :class:`~kdistill.teachers.Outputs`, the teacher's (or None for
methods that need none) and the hard labels (or None for unlabeled rows). It returns a dict of named terms whose
``"loss"`` entry is the total that is back-propagated; the engine logs every other entry as it is.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch

from kdistill.errors import KdistillError
from kdistill.teachers.base import Outputs

__all__ = ["LOSSES", "Loss", "LossInfo", "UnknownNameError", "get_loss", "list_losses", "register_loss"]


class UnknownNameError(KdistillError, KeyError):
    """A name that is not in a registry; the message lists the valid names and the closest one."""

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0] if self.args else ""


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


@dataclass(frozen=True)
class LossInfo:
    name: str
    factory: Callable[..., Loss]
    description: str


LOSSES: dict[str, LossInfo] = {}
_T = TypeVar("_T")


def register_loss(name: str, description: str) -> Callable[[_T], _T]:
    """Class decorator adding a method to the registry under ``name`` with a one-line description."""

    def decorate(factory: _T) -> _T:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is registered twice")
        LOSSES[name] = LossInfo(name, factory, description)  # type: ignore[arg-type]
        return factory

    return decorate


def unknown_name(kind: str, name: str, known: Sequence[str]) -> UnknownNameError:
    close = difflib.get_close_matches(name, known, n=1)
    suggestion = f"did you mean {close[0]!r}? " if close else ""
    return UnknownNameError(f"unknown {kind} {name!r}", hint=f"{suggestion}valid names: {', '.join(sorted(known))}")


def get_loss(name: str, **params: Any) -> Loss:
    """Build the registered loss ``name`` with its hyper-parameters."""
    if name not in LOSSES:
        raise unknown_name("method", name, list(LOSSES))
    return LOSSES[name].factory(**params)


def list_losses() -> list[LossInfo]:
    """Every registered method, by name."""
    return [LOSSES[name] for name in sorted(LOSSES)]
