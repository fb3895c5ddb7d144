"""Decoupled knowledge distillation.

Zhao, Cui, Song, Qiu & Liang, "Decoupled Knowledge Distillation", CVPR 2022, https://arxiv.org/abs/2203.08679;
reference code: mdistiller (github.com/megvii-research/mdistiller), ``mdistiller/distillers/DKD.py`` and its CIFAR-100
config (CE 1, α = 1, β = 8, T = 4, 20 warm-up epochs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdistill.losses.base import BaseLoss, register_loss
from kdistill.losses.common import (
    IGNORE_INDEX,
    as_target,
    check_non_negative,
    check_positive,
    check_row_outputs,
    require_teacher,
    with_cross_entropy,
)
from kdistill.losses.kd import check_logits
from kdistill.teachers.base import Outputs

__all__ = ["DKDLoss", "dkd_loss"]


def _target_and_rest_log_probs(scaled_logits: torch.Tensor, target_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(log b, log p̂): the binary target/non-target log-probabilities (batch, 2) and the log-softmax over the
    non-target classes only (batch, classes - 1), both computed from logits without forming 1 - p (stable)."""
    rows, classes = scaled_logits.shape
    log_normaliser = torch.logsumexp(scaled_logits, dim=1)
    target_logit = scaled_logits[target_mask]
    rest = scaled_logits[~target_mask].reshape(rows, classes - 1)
    rest_normaliser = torch.logsumexp(rest, dim=1)
    binary = torch.stack([target_logit - log_normaliser, rest_normaliser - log_normaliser], dim=1)
    return binary, rest - rest_normaliser[:, None]


def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor | None,
    *,
    temperature: float = 4.0,
    target_weight: float = 1.0,
    nontarget_weight: float = 8.0,
    ce_weight: float = 1.0,
    warmup_factor: float = 1.0,
) -> dict[str, torch.Tensor]:
    r"""DKD: KD split into a target-class term (TCKD) and a non-target-class term (NCKD), weighted separately.

    With :math:`p = \mathrm{softmax}(z/T)`, :math:`b = [p_y,\ 1 - p_y]` the binary target/non-target distribution
    and :math:`\hat p = \mathrm{softmax}(z_{\setminus y}/T)` the distribution among the non-target classes:

    .. math::
        \mathrm{TCKD} = T^2\,\mathrm{KL}(b^t \,\|\, b^s), \qquad
        \mathrm{NCKD} = T^2\,\mathrm{KL}(\hat p^t \,\|\, \hat p^s)

        \mathcal{L} = c\,\mathrm{CE}(z_s, y) + \lambda_{warm}\,(\alpha\,\mathrm{TCKD} + \beta\,\mathrm{NCKD})

    KL divergences are summed over classes and averaged over the batch. Classic KD equals
    :math:`\mathrm{TCKD} + (1 - p^t_y)\,\mathrm{NCKD}`: NCKD is suppressed exactly where the teacher is confident,
    which DKD undoes with :math:`\beta > \alpha`.

    Args:
        student_logits, teacher_logits: (batch, classes), classes >= 2.
        target: (batch,) class indices; None uses the teacher's argmax as the target class and drops the CE term;
            so does a row whose target is -100 (unlabeled, in a partly labelled batch), for that row.
        temperature: T > 0. target_weight: α (paper 1.0). nontarget_weight: β (paper 8.0 on CIFAR-100).
        ce_weight: c, the weight of the hard-label term (0 for composing with another method that has one).
        warmup_factor: λ_warm in [0, 1], the DKD terms' weight during the warm-up (the class sets it per epoch).

    Returns:
        ``{"loss", "ce", "tckd", "nckd"}`` (``"ce"`` only with labels and ``ce_weight > 0``; the terms are
        reported with their T² factor, before α, β and the warm-up).
    """
    check_positive("temperature", temperature)
    check_logits(student_logits, teacher_logits)
    teacher_logits = as_target(teacher_logits)
    classes = student_logits.shape[1]
    teacher_class = teacher_logits.argmax(dim=1)
    target_class = teacher_class if target is None else torch.where(target == IGNORE_INDEX, teacher_class, target)
    target_mask = F.one_hot(target_class, classes).bool()
    student_binary, student_rest = _target_and_rest_log_probs(student_logits / temperature, target_mask)
    teacher_binary, teacher_rest = _target_and_rest_log_probs(teacher_logits / temperature, target_mask)
    tckd = F.kl_div(student_binary, teacher_binary, reduction="batchmean", log_target=True) * temperature**2
    nckd = F.kl_div(student_rest, teacher_rest, reduction="batchmean", log_target=True) * temperature**2
    total = warmup_factor * (target_weight * tckd + nontarget_weight * nckd)
    return with_cross_entropy({"tckd": tckd, "nckd": nckd}, total, student_logits, target, ce_weight)


@register_loss("dkd", "Zhao 2022: CE + α·TCKD + β·NCKD (target / non-target KD), with a linear warm-up")
class DKDLoss(BaseLoss):
    """Class form of :func:`dkd_loss`. ``warmup_epochs``: the DKD terms ramp linearly to full weight over the first
    epochs (the engine calls :meth:`start_epoch`); called outside the engine, they count in full. The default 20 is
    mdistiller's (``min(epoch / 20, 1)`` with 1-based epochs, the same ramp); kdistill 0.1 used 5. On a short run
    (tens of epochs) 20 keeps the DKD terms below full weight for a large part of training: that is the reference
    behaviour, and ``docs/results.md`` measures both."""

    at_equal = "zero"
    batch_order_invariant = True

    def __init__(
        self,
        temperature: float = 4.0,
        target_weight: float = 1.0,
        nontarget_weight: float = 8.0,
        ce_weight: float = 1.0,
        warmup_epochs: int = 20,
    ) -> None:
        self.temperature = check_positive("temperature", temperature)
        self.target_weight = check_non_negative("target_weight", target_weight)
        self.nontarget_weight = check_non_negative("nontarget_weight", nontarget_weight)
        self.ce_weight = check_non_negative("ce_weight", ce_weight)
        self.warmup_epochs = int(check_non_negative("warmup_epochs", warmup_epochs))
        self.warmup_factor = 1.0

    def start_epoch(self, epoch: int, total_epochs: int) -> None:
        """Epoch ``epoch`` (0-based) gets weight ``min(1, (epoch + 1) / warmup_epochs)``."""
        self.warmup_factor = 1.0 if self.warmup_epochs == 0 else min(1.0, (epoch + 1) / self.warmup_epochs)

    def __call__(
        self, student: Outputs, teacher: Outputs | None, target: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        check_row_outputs(student, teacher, "dkd")
        teacher = require_teacher(teacher, "dkd")
        return dkd_loss(
            student.logits,
            teacher.logits,
            target,
            temperature=self.temperature,
            target_weight=self.target_weight,
            nontarget_weight=self.nontarget_weight,
            ce_weight=self.ce_weight,
            warmup_factor=self.warmup_factor,
        )
