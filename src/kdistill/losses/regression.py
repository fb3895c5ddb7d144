"""Regression distillation: the student's (batch, outputs) predictions pulled toward the teacher's and the labels.

The mix of Hinton et al. (2015) carried over to real-valued outputs: a weighted sum of a distance to the teacher's
predictions and the squared error to the labels. Chen et al., "Learning Efficient Object Detection Models with
Knowledge Distillation" (NeurIPS 2017) and Saputra et al., "Distilling Knowledge From a Deep Pose Regressor Network"
(ICCV 2019) use the teacher as a *bound* instead (a penalty only where the student is further from the label than the
teacher); that variant is not implemented here. With ``s`` the student's, ``t`` the teacher's and ``y`` the labels,
all (batch, outputs) in the task's standardised units (:mod:`kdistill.regression`),

    loss = soft_weight * D(s, t) + (1 - soft_weight) * MSE_observed(s, y)

- ``D`` is ``"mse"``: ``mean_{i,j} (s_ij - t_ij)^2``; or ``"huber"`` (Huber 1964, ``torch.nn.functional.huber_loss``):
  ``mean_{i,j} h(s_ij - t_ij)``, ``h(r) = r^2 / 2`` for ``|r| <= delta`` else ``delta * (|r| - delta / 2)``, which
  caps the pull of rows where the teacher is far off (a tree ensemble's step). Note ``h`` is half the squared error
  near zero, as in torch and scikit-learn's ``HuberRegressor``; ``2 * huber`` equals ``mse`` for ``|r| <= delta``.
- ``MSE_observed`` sums the squared errors of the label entries that are present and divides by **every** entry
  of the batch (rows x outputs): a NaN label (a row without targets, or one missing output) counts 0 in it and
  every present one weighs 1 / (B x outputs), as in a fully labelled batch (which gives the plain MSE exactly).
  Unlabeled rows (``label_mask`` False: the engine fills their targets with NaN) learn from the teacher only. This
  is the rule of :func:`kdistill.losses.common.labelled_cross_entropy`, for the same reason: the mean over the
  present labels alone would weigh each of a batch's few labelled rows B / L times a row of a labelled batch when
  many unlabeled rows sit beside them (docs/scarce_labels.md).

Both terms are means over every number (rows x outputs), so the weights do not depend on the number of outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdistill.errors import MethodError, ShapeMismatchError
from kdistill.losses.base import BaseLoss, register_loss
from kdistill.losses.common import as_target, check_row_outputs, require_teacher
from kdistill.teachers.base import Outputs

__all__ = ["LabelMSE", "RegressionKD", "label_mse", "observed_labels", "regression_kd_loss", "teacher_distance"]

TEACHER_LOSSES = ("mse", "huber")


def observed_labels(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The bool (batch, outputs) entries of ``target`` that hold a label (finite), after checking its shape: the
    student's (batch, outputs), or (batch,) for one output."""
    if target.ndim == 1 and student.shape[1] == 1:
        target = target[:, None]
    if tuple(target.shape) != tuple(student.shape):
        raise ShapeMismatchError(
            f"regression targets {tuple(target.shape)} do not fit the student's predictions {tuple(student.shape)}",
            hint="targets are (batch, outputs) real values, one column per output (task 'regression').",
        )
    if not target.is_floating_point():
        raise ShapeMismatchError(
            f"regression targets must be real numbers, got {target.dtype}",
            hint="for class labels use task 'classification'; for regression pass float targets.",
        )
    return torch.isfinite(target)


def label_mse(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``sum over observed entries of (s - y)^2``, divided by all the batch's entries (rows x outputs): 0 when none
    is observed, the plain MSE when all are. ``student``: (batch, outputs); ``target``: the same shape (or (batch,)
    for one output), NaN where there is no label."""
    observed = observed_labels(student, target)
    target = target.reshape(student.shape)
    squared = torch.where(observed, student - torch.where(observed, target, 0.0), 0.0).pow(2)
    return squared.sum() / max(1, student.numel())  # still on the graph for a batch of unlabeled rows


def teacher_distance(
    student: torch.Tensor, teacher: torch.Tensor, *, kind: str = "mse", delta: float = 1.0
) -> torch.Tensor:
    """``D(s, t)`` of the module docstring: mean squared error, or mean Huber loss with threshold ``delta``.
    ``student``, ``teacher``: (batch, outputs)."""
    if tuple(student.shape) != tuple(teacher.shape):
        raise ShapeMismatchError(
            f"the student predicts {tuple(student.shape)}, the teacher {tuple(teacher.shape)}",
            hint="the student's last layer must output one value per teacher output.",
        )
    if kind == "mse":
        return F.mse_loss(student, teacher)
    return F.huber_loss(student, teacher, delta=delta)


def regression_kd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor | None,
    *,
    soft_weight: float = 0.5,
    teacher_loss: str = "mse",
    delta: float = 1.0,
) -> dict[str, torch.Tensor]:
    """``{"loss", "teacher", "labels"}`` of the module docstring's formula; ``target`` None: every row unlabeled (the
    teacher term alone, at weight ``soft_weight``)."""
    soft = teacher_distance(student, teacher, kind=teacher_loss, delta=delta)
    hard = student.sum() * 0.0 if target is None else label_mse(student, target)
    return {"loss": soft_weight * soft + (1.0 - soft_weight) * hard, "teacher": soft, "labels": hard}


def _check_options(soft_weight: float, teacher_loss: str, delta: float) -> None:
    if not 0.0 <= soft_weight <= 1.0:
        raise MethodError(f"soft_weight must be in [0, 1], got {soft_weight}", hint="0.5 weighs both terms equally.")
    if teacher_loss not in TEACHER_LOSSES:
        raise MethodError(
            f"teacher_loss must be one of {TEACHER_LOSSES}, got {teacher_loss!r}",
            hint="'mse' (the default) or 'huber' (caps the pull of rows where the teacher is far off).",
        )
    if not delta > 0:
        raise MethodError(f"delta must be positive, got {delta}", hint="1.0 is one standard deviation of the target.")


@register_loss("regression_kd", "w·MSE (or Huber) to the teacher's predictions + (1-w)·MSE to the labels (regression)")
class RegressionKD(BaseLoss):
    """:func:`regression_kd_loss` with its options: ``soft_weight`` (the teacher term's weight, ``1 - soft_weight``
    the labels'), ``teacher_loss`` (``"mse"`` or ``"huber"``) and ``delta`` (Huber's threshold, in standardised
    units: 1.0 is one standard deviation of the training targets)."""

    regression_targets = True
    """The targets are (batch, outputs) real values (the contract tests fabricate those)."""

    def __init__(self, soft_weight: float = 0.5, teacher_loss: str = "mse", delta: float = 1.0) -> None:
        _check_options(soft_weight, teacher_loss, delta)
        self.soft_weight = float(soft_weight)
        self.teacher_loss = teacher_loss
        self.delta = float(delta)

    def __call__(
        self, student: Outputs, teacher: Outputs | None, target: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        teacher = require_teacher(teacher, "regression_kd")
        check_row_outputs(student, teacher, "regression_kd")
        return regression_kd_loss(
            student.logits,
            as_target(teacher.logits),
            target,
            soft_weight=self.soft_weight,
            teacher_loss=self.teacher_loss,
            delta=self.delta,
        )


@register_loss("label_mse", "MSE to the labels only: the no-teacher regression baseline (NaN labels skipped)")
class LabelMSE(BaseLoss):
    """``{"loss": MSE, "labels": MSE}`` over the observed labels (:func:`label_mse`); what the regression baseline
    trains with."""

    needs_teacher = False
    regression_targets = True

    def __call__(
        self, student: Outputs, teacher: Outputs | None, target: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        check_row_outputs(student, None, "label_mse")
        if target is None:
            raise MethodError("label_mse needs labels", hint="pass (X, y) with real-valued targets.")
        hard = label_mse(student.logits, target)
        return {"loss": hard, "labels": hard}
