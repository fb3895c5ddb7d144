"""The loss base class (its optional hooks), duck-typed losses, and the registry of methods.

A loss receives outputs, never models: the student's :class:`~kdistill.teachers.Outputs`, the teacher's (or None for
methods that need none) and the hard labels (or None for unlabeled rows). It returns a dict of named terms whose
``"loss"`` entry is the total that is back-propagated; the engine logs every other entry as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

import torch
from torch import nn

from kdistill.errors import MethodError
from kdistill.registry import Entry, Registry, UnknownNameError
from kdistill.registry import unknown_name as unknown_name  # re-exported: it lived here first
from kdistill.teachers.base import Outputs

__all__ = [
    "LOSSES",
    "BaseLoss",
    "Loss",
    "LossInfo",
    "UnknownNameError",
    "as_loss",
    "defines_hook",
    "get_loss",
    "list_losses",
    "register_loss",
]


@runtime_checkable
class Loss(Protocol):
    """What the engine calls: ``loss(student, teacher, target)`` returns named terms whose ``"loss"`` is the total.

    ``needs_teacher``: whether ``teacher`` may be None. ``student_features`` / ``teacher_features``: module paths
    whose outputs the method reads from ``Outputs.features`` (teacher features make the engine run the teacher live
    or bank them). The teacher's ``Outputs.index`` holds the batch's row positions in the transfer set.

    The optional hooks (``prepare``, ``start_epoch``, ``precompute``) are declared, with no-op defaults, on
    :class:`BaseLoss`, which every built-in method subclasses. A loss object that only has what this protocol names
    keeps working: :func:`as_loss` gives it the hooks.
    """

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


class BaseLoss:
    """Base class of every method: the :class:`Loss` attributes with their defaults, and the optional hooks with
    no-op defaults, so the engine may call each hook on any loss.

    A method subclasses it (``class MyLoss(BaseLoss)`` with ``__call__``; learned parts:
    ``class MyLoss(nn.Module, BaseLoss)`` with ``forward``) and overrides the hooks it needs.
    """

    needs_teacher: bool = True
    student_features: Sequence[str] = ()
    teacher_features: Sequence[str] = ()

    if TYPE_CHECKING:  # declared for the type checker only, so nn.Module losses keep nn.Module.__call__ -> forward

        def __call__(
            self, student: Outputs, teacher: Outputs | None, target: torch.Tensor | None
        ) -> dict[str, torch.Tensor]: ...

    def prepare(self, student: Outputs, teacher: Outputs | None, rows: int) -> None:
        """Build lazy parts from a dry batch before the optimizer exists (FitNets projectors, CRD's memory bank for
        ``rows`` rows). ``student``: the model's outputs on the first rows (eval mode, no gradients); ``teacher``:
        the teacher's on the same rows, with its features when the method reads some. Default: nothing (and
        :func:`~kdistill.losses.prepare_loss` then skips the dry batch)."""

    def start_epoch(self, epoch: int, total_epochs: int) -> None:
        """Called by the engine before each epoch (0-based), for schedules inside a loss (DKD's warm-up).
        Default: nothing."""

    def precompute(self, teacher_logits: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor | None:
        """For a teacher whose outputs never change (cached, precomputed or out-of-fold targets, no augmentation):
        the teacher-side work per row done once, as a (rows, width) tensor that the engine hands each batch as its
        rows in the teacher's ``Outputs.precomputed`` (``kd`` packs its targets this way: ~10% faster steps on tiny
        students). ``teacher_logits``: the dense (rows, classes) logits of the whole transfer set (never called for
        top-k-only teachers); ``target``: (rows,) or None. Default: None (nothing to precompute)."""
        return None


_HOOKS = ("prepare", "start_epoch", "precompute")


class _Forwarding(BaseLoss):
    """Shared by the two wrappers :func:`as_loss` returns: the wrapped object's attributes and the hooks it has."""

    inner: Any

    def _copy_attributes(self, inner: Loss) -> None:
        self.needs_teacher = bool(getattr(inner, "needs_teacher", True))
        self.student_features = tuple(getattr(inner, "student_features", ()))
        self.teacher_features = tuple(getattr(inner, "teacher_features", ()))

    def prepare(self, student: Outputs, teacher: Outputs | None, rows: int) -> None:
        hook = getattr(self.inner, "prepare", None)
        if hook is not None:
            hook(student, teacher, rows)

    def start_epoch(self, epoch: int, total_epochs: int) -> None:
        hook = getattr(self.inner, "start_epoch", None)
        if hook is not None:
            hook(epoch, total_epochs)

    def precompute(self, teacher_logits: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor | None:
        hook = getattr(self.inner, "precompute", None)
        return None if hook is None else hook(teacher_logits, target)


class _DuckTyped(_Forwarding):
    """A loss object that does not subclass :class:`BaseLoss`, seen through the base class's interface."""

    def __init__(self, inner: Loss) -> None:
        self.inner = inner
        self._copy_attributes(inner)

    def __call__(
        self, student: Outputs, teacher: Outputs | None, target: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        return self.inner(student, teacher, target)

    def __getattr__(self, name: str) -> Any:  # at_equal, batch_order_invariant, hyper-parameters
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


class _DuckTypedModule(nn.Module, _Forwarding):
    """:class:`_DuckTyped` for an ``nn.Module`` loss: registered as the submodule ``inner``, so its parameters are
    trained and its state is checkpointed (under ``inner.``)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self._copy_attributes(inner)  # type: ignore[arg-type]

    def forward(
        self, student: Outputs, teacher: Outputs | None, target: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        result: dict[str, torch.Tensor] = self.inner(student, teacher, target)
        return result

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if "inner" not in modules:
                raise
            return getattr(modules["inner"], name)


def as_loss(loss: Loss) -> BaseLoss:
    """``loss`` itself when it subclasses :class:`BaseLoss`, else a wrapper with the base class's interface (the
    hooks it lacks are no-ops; ``nn.Module`` losses stay modules), so the engine may call every hook directly."""
    if isinstance(loss, BaseLoss):
        return loss
    if not callable(loss):
        raise MethodError(
            f"a loss must be callable as loss(student, teacher, target), got {type(loss).__name__}",
            hint="subclass kdistill.losses.BaseLoss, or pass a registered method name (kdistill list methods).",
        )
    return _DuckTypedModule(loss) if isinstance(loss, nn.Module) else _DuckTyped(loss)


def defines_hook(loss: object, name: str) -> bool:
    """Whether ``loss`` has hook ``name`` (``"prepare"``, ``"start_epoch"`` or ``"precompute"``) doing something:
    False for the base class's no-op and for a wrapped object without it. Lets the engine skip work (the dry batch
    of :func:`~kdistill.losses.prepare_loss`) that only a real hook needs."""
    if name not in _HOOKS:
        raise ValueError(f"unknown loss hook {name!r}; the hooks are {', '.join(_HOOKS)}")
    if isinstance(loss, _Forwarding):
        return defines_hook(loss.inner, name)
    hook = getattr(type(loss), name, None)
    if hook is None:
        return callable(getattr(loss, name, None))  # set on the instance
    return hook is not getattr(BaseLoss, name)


LOSSES: Registry[Entry] = Registry("method")
"""Every method, by name (:class:`kdistill.registry.Registry`: ``name in LOSSES``, ``LOSSES[name].factory``)."""
_T = TypeVar("_T")


def register_loss(name: str, description: str) -> Callable[[_T], _T]:
    """Class decorator adding a method to the registry under ``name`` with a one-line description."""
    return LOSSES.register(name, description)


def get_loss(name: str, **params: Any) -> Loss:
    """Build the registered loss ``name`` with its hyper-parameters. The result is always a :class:`BaseLoss` (a
    duck-typed registration comes wrapped by :func:`as_loss`), so it has every hook; typed as :class:`Loss` for the
    callers that mix it with users' loss objects."""
    return as_loss(LOSSES[name].factory(**params))


def list_losses() -> list[LossInfo]:
    """Every registered method, by name."""
    return LOSSES.entries()
