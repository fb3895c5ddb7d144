"""Helpers shared by the methods: checked access to outputs and features, hyper-parameter checks, the CE term.

Not a method itself (nothing here is registered).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F

from kdistill.errors import MethodError
from kdistill.teachers.base import Outputs

__all__ = [
    "LayerPairLoss",
    "as_target",
    "check_non_negative",
    "check_positive",
    "flatten_rows",
    "get_feature",
    "layer_pairs",
    "require_target",
    "require_teacher",
    "with_cross_entropy",
]


def require_teacher(teacher: Outputs | None, method: str) -> Outputs:
    """``teacher``, or a :class:`MethodError` saying that ``method`` needs the teacher's outputs."""
    if teacher is None:
        raise MethodError(
            f"method {method!r} needs the teacher's outputs, got None",
            hint="pass a teacher (distill(teacher, ...)); 'ce' and 'byot' are the methods that need none.",
        )
    return teacher


def require_target(target: torch.Tensor | None, method: str) -> torch.Tensor:
    """``target``, or a :class:`MethodError` saying that ``method`` needs hard labels."""
    if target is None:
        raise MethodError(f"method {method!r} needs hard labels, got None", hint="pass labelled rows (X, y).")
    return target


def get_feature(outputs: Outputs, name: str, *, role: str, method: str) -> torch.Tensor:
    """The captured feature ``name`` of ``outputs``; a :class:`MethodError` listing the captured ones if absent.

    ``role`` is ``"student"`` or ``"teacher"`` (for the message)."""
    if name not in outputs.features:
        raise MethodError(
            f"method {method!r} needs the {role} feature {name!r}; the {role} outputs hold {sorted(outputs.features)}",
            hint=f"name a module path of the {role} (the engine captures it), e.g. {role}_layer='features'.",
        )
    return outputs.features[name]


def as_target(tensor: torch.Tensor) -> torch.Tensor:
    """A teacher tensor made safe to use as a regression target: detached, and cloned out of inference mode (a
    tensor made under ``torch.inference_mode()`` cannot be saved for backward)."""
    tensor = tensor.detach()
    return tensor.clone() if tensor.is_inference() else tensor


def flatten_rows(tensor: torch.Tensor) -> torch.Tensor:
    """(batch, *shape) -> (batch, prod(shape))."""
    return tensor.reshape(len(tensor), -1)


def layer_pairs(
    student_layers: str | Sequence[str], teacher_layers: str | Sequence[str], method: str
) -> list[tuple[str, str]]:
    """Pair student and teacher layer names one to one; a single string names one layer."""
    students = [student_layers] if isinstance(student_layers, str) else list(student_layers)
    teachers = [teacher_layers] if isinstance(teacher_layers, str) else list(teacher_layers)
    if not students or len(students) != len(teachers):
        raise MethodError(
            f"method {method!r} pairs student and teacher layers one to one; got {students} and {teachers}",
            hint="pass as many teacher layers as student layers (at least one).",
        )
    return list(zip(students, teachers, strict=True))


def check_positive(name: str, value: float) -> float:
    """``value`` if > 0, else a :class:`MethodError` naming the hyper-parameter."""
    if not value > 0:
        raise MethodError(f"{name} must be > 0, got {value}", hint=f"pass a positive {name}.")
    return float(value)


def check_non_negative(name: str, value: float) -> float:
    """``value`` if >= 0, else a :class:`MethodError` naming the hyper-parameter."""
    if not value >= 0:
        raise MethodError(f"{name} must be >= 0, got {value}", hint=f"pass {name} >= 0 (0 turns the term off).")
    return float(value)


def with_cross_entropy(
    terms: dict[str, torch.Tensor],
    distill_total: torch.Tensor,
    student_logits: torch.Tensor,
    target: torch.Tensor | None,
    ce_weight: float,
) -> dict[str, torch.Tensor]:
    """Add the hard-label term: ``loss = ce_weight · CE(student, y) + distill_total``.

    ``"ce"`` is reported only when it counts (labels given and ``ce_weight > 0``), so a composition of methods whose
    later members use ``ce_weight=0`` reports the cross-entropy once."""
    if target is None or ce_weight == 0:
        return {"loss": distill_total, **terms}
    hard = F.cross_entropy(student_logits, target)
    return {"loss": ce_weight * hard + distill_total, "ce": hard, **terms}


class LayerPairLoss:
    r"""Base of the methods that compare student and teacher features layer by layer (AT, SP):

    :math:`\mathcal{L} = c\,\mathrm{CE} + \mathrm{scale}\cdot w\sum_l \mathrm{pair\_loss}(F^s_l, F^t_l)`.

    A subclass sets ``name``, ``pair_loss`` and ``scale``, and keeps its own ``__init__`` only to state its paper's
    default ``weight``. Returns ``{"loss", "ce", name}``, the named term being the sum over pairs before scaling."""

    needs_teacher = True
    at_equal = "zero"
    batch_order_invariant = True
    name: ClassVar[str]
    scale: ClassVar[float] = 1.0
    pair_loss: ClassVar[Callable[..., torch.Tensor]]  # (student feature, teacher feature) -> scalar

    def __init__(
        self, student_layers: str | Sequence[str], teacher_layers: str | Sequence[str], weight: float, ce_weight: float
    ) -> None:
        self.pairs = layer_pairs(student_layers, teacher_layers, self.name)
        self.student_features = tuple(s for s, _ in self.pairs)
        self.teacher_features = tuple(t for _, t in self.pairs)
        self.weight = check_non_negative("weight", weight)
        self.ce_weight = check_non_negative("ce_weight", ce_weight)

    def __call__(
        self, student: Outputs, teacher: Outputs | None, target: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        teacher = require_teacher(teacher, self.name)
        term = sum(
            (
                type(self).pair_loss(
                    get_feature(student, s, role="student", method=self.name),
                    get_feature(teacher, t, role="teacher", method=self.name),
                )
                for s, t in self.pairs
            ),
            start=student.logits.new_zeros(()),
        )
        total = self.scale * self.weight * term
        return with_cross_entropy({self.name: term}, total, student.logits, target, self.ce_weight)
