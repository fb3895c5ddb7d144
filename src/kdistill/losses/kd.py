"""Hinton knowledge distillation and plain cross-entropy.

Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network" (2015), https://arxiv.org/abs/1503.02531
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from kdistill.errors import ShapeMismatchError
from kdistill.losses.base import register_loss
from kdistill.losses.common import require_teacher
from kdistill.teachers.base import Outputs, probs_to_logits

__all__ = ["CrossEntropy", "KDLoss", "check_logits", "kd_loss", "mix_soft_and_hard"]


def check_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    """Raise :class:`ShapeMismatchError` unless student and teacher logits have the same (batch, classes) shape."""
    if student_logits.shape != teacher_logits.shape:
        raise ShapeMismatchError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ",
            hint="the student's last layer must output as many classes as the teacher.",
        )


def mix_soft_and_hard(
    student_log_probs: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    student_logits: torch.Tensor,
    target: torch.Tensor | None,
    *,
    temperature: float,
    soft_weight: float,
) -> dict[str, torch.Tensor]:
    """``(1 - w)·CE(student_logits, y) + w·T²·KL(teacher || student)`` from log-probabilities already taken at
    temperature T (over classes, or over kd_topk's buckets); without targets, the soft term alone at full weight."""
    soft = F.kl_div(student_log_probs, teacher_log_probs, reduction="batchmean", log_target=True) * temperature**2
    if target is None:
        return {"loss": soft, "kd": soft}
    hard = F.cross_entropy(student_logits, target)
    return {"loss": (1.0 - soft_weight) * hard + soft_weight * soft, "ce": hard, "kd": soft}


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor | None,
    *,
    temperature: float = 4.0,
    soft_weight: float = 0.5,
    teacher_probs: bool = False,
) -> dict[str, torch.Tensor]:
    r"""Hinton KD: hard-label cross-entropy mixed with the temperature-scaled KL divergence to the teacher.

    .. math::
        \mathcal{L} = (1 - w)\,\mathrm{CE}(z_s, y)
                      + w\,T^2\,\mathrm{KL}\big(\mathrm{softmax}(z_t/T)\,\|\,\mathrm{softmax}(z_s/T)\big)

    with ``w = soft_weight`` and ``T = temperature``. The KL divergence is summed over classes and averaged over the
    batch. The :math:`T^2` factor keeps the soft term's gradient, which scales as :math:`1/T^2`, comparable to the
    hard term's whatever the temperature: :math:`\partial(T^2\,\mathrm{KL})/\partial z_s = T\,(q_s^T - p_t^T)/B`.

    Args:
        student_logits: (batch, classes).
        teacher_logits: (batch, classes) logits, or probabilities with ``teacher_probs=True`` (exact zeros are
            floored, see :data:`~kdistill.teachers.PROB_FLOOR`, so they never give inf or NaN).
        target: (batch,) class indices, or None for unlabeled rows (then only the soft term is used, at full weight).
        temperature: T > 0; higher spreads the teacher's distribution and transfers more of its "dark knowledge".
        soft_weight: w in [0, 1], the weight of the soft (teacher) term; 0 is plain cross-entropy.

    Returns:
        ``{"loss": total, "ce": CE, "kd": T² KL}`` (``"ce"`` absent without targets).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= soft_weight <= 1.0:
        raise ValueError(f"soft_weight must be in [0, 1], got {soft_weight}")
    if teacher_probs:
        teacher_logits = probs_to_logits(teacher_logits)
    check_logits(student_logits, teacher_logits)
    student_log_probs = F.log_softmax(student_logits / temperature, dim=1)
    teacher_log_probs = F.log_softmax(teacher_logits / temperature, dim=1)
    return mix_soft_and_hard(
        student_log_probs, teacher_log_probs, student_logits, target, temperature=temperature, soft_weight=soft_weight
    )


@register_loss("kd", "Hinton 2015: (1-w)·CE + w·T²·KL(teacher/T || student/T)")
class KDLoss:
    """Class form of :func:`kd_loss`, holding its hyper-parameters."""

    needs_teacher = True
    student_features: Sequence[str] = ()
    teacher_features: Sequence[str] = ()

    # the function behind the class; a subclass with another form of the same loss swaps only this (kd_topk)
    loss_function: Callable[..., dict[str, torch.Tensor]] = staticmethod(kd_loss)

    def __init__(self, temperature: float = 4.0, soft_weight: float = 0.5) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0.0 <= soft_weight <= 1.0:
            raise ValueError(f"soft_weight must be in [0, 1], got {soft_weight}")
        self.temperature = temperature
        self.soft_weight = soft_weight

    def __call__(
        self, student: Outputs, teacher: Outputs | None, target: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        teacher = require_teacher(teacher, type(self).__name__)
        return self.loss_function(
            student.logits, teacher.logits, target, temperature=self.temperature, soft_weight=self.soft_weight
        )


@register_loss("ce", "cross-entropy on the hard labels only: the no-teacher baseline")
class CrossEntropy:
    """Plain cross-entropy, ``{"loss": CE, "ce": CE}``; the baseline every method is compared with."""

    needs_teacher = False
    student_features: Sequence[str] = ()
    teacher_features: Sequence[str] = ()

    def __call__(
        self, student: Outputs, teacher: Outputs | None, target: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        if target is None:
            raise ValueError("cross-entropy needs labels")
        hard = F.cross_entropy(student.logits, target)
        return {"loss": hard, "ce": hard}
