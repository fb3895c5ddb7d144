"""Logit standardization: compare z-scored logits, so the student need not match the teacher's logit scale.

Sun, Ren, Li, Wang & Cao, "Logit Standardization in Knowledge Distillation", CVPR 2024,
https://arxiv.org/abs/2403.01427
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdistill.errors import MethodError
from kdistill.losses.base import BaseLoss, register_loss
from kdistill.losses.common import as_target, check_row_outputs, require_teacher
from kdistill.losses.dkd import DKDLoss, dkd_loss
from kdistill.losses.kd import KDLoss, check_logits, kd_loss
from kdistill.teachers.base import Outputs

__all__ = ["LogitStandardized", "standardize_logits"]

_EPS = 1e-7


def standardize_logits(logits: torch.Tensor) -> torch.Tensor:
    r"""Z-score each row: :math:`\mathcal{Z}(z) = (z - \bar z) / (\sigma(z) + \epsilon)`, (batch, classes).

    :math:`\bar z` and :math:`\sigma` (population standard deviation) are taken over the classes of each row, so the
    result has mean 0 and standard deviation 1 whatever the model's logit range; the argmax is unchanged.
    """
    mean = logits.mean(dim=1, keepdim=True)
    std = logits.std(dim=1, keepdim=True, unbiased=False)
    return (logits - mean) / (std + _EPS)


class LogitStandardized(BaseLoss):
    r"""Wrap :class:`~kdistill.losses.KDLoss` or :class:`~kdistill.losses.DKDLoss` so that their soft terms compare
    standardized logits (:func:`standardize_logits`) at the wrapped loss's temperature:

    .. math::
        \mathcal{L}_{KD+LS} = (1 - w)\,\mathrm{CE}(z_s, y)
            + w\,T^2\,\mathrm{KL}\big(\mathrm{softmax}(\mathcal{Z}(z_t)/T)\,\|\,
              \mathrm{softmax}(\mathcal{Z}(z_s)/T)\big)

    and likewise for DKD's TCKD and NCKD. The hard-label cross-entropy stays on the raw student logits (as in the
    paper): standardization only changes what "matching the teacher" means. Terms are those of the wrapped loss.
    """

    at_equal = "zero"
    batch_order_invariant = True

    def __init__(self, inner: KDLoss | DKDLoss) -> None:
        if not isinstance(inner, (KDLoss, DKDLoss)):
            raise MethodError(
                f"logit standardization wraps KDLoss or DKDLoss, got {type(inner).__name__}",
                hint="use LogitStandardized(KDLoss(...)) or LogitStandardized(DKDLoss(...)), or the methods "
                "'kd_ls' and 'dkd_ls'.",
            )
        self.inner = inner

    def start_epoch(self, epoch: int, total_epochs: int) -> None:
        """Forwarded to the wrapped loss (DKD's warm-up)."""
        if isinstance(self.inner, DKDLoss):
            self.inner.start_epoch(epoch, total_epochs)

    def __call__(
        self, student: Outputs, teacher: Outputs | None, target: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        check_row_outputs(student, teacher, "logit standardization")
        teacher = require_teacher(teacher, "logit standardization")
        check_logits(student.logits, teacher.logits)
        student_z = standardize_logits(student.logits)
        teacher_z = standardize_logits(as_target(teacher.logits))
        inner = self.inner
        if isinstance(inner, KDLoss):
            soft = kd_loss(student_z, teacher_z, None, temperature=inner.temperature)["kd"]
            if target is None:
                return {"loss": soft, "kd": soft}
            hard = F.cross_entropy(student.logits, target)
            return {"loss": (1 - inner.soft_weight) * hard + inner.soft_weight * soft, "ce": hard, "kd": soft}
        terms = dkd_loss(
            student_z,
            teacher_z,
            target,
            temperature=inner.temperature,
            target_weight=inner.target_weight,
            nontarget_weight=inner.nontarget_weight,
            ce_weight=0.0,
            warmup_factor=inner.warmup_factor,
        )
        if target is None or inner.ce_weight == 0:
            return terms
        hard = F.cross_entropy(student.logits, target)
        return {**terms, "loss": inner.ce_weight * hard + terms["loss"], "ce": hard}


@register_loss("kd_ls", "Sun 2024: KD on z-scored logits (logit standardization); CE stays on raw logits")
def kd_ls(temperature: float = 2.0, soft_weight: float = 0.9) -> LogitStandardized:
    """KD with logit standardization; T=2 and a heavy soft weight as in the paper's CIFAR settings."""
    return LogitStandardized(KDLoss(temperature=temperature, soft_weight=soft_weight))


@register_loss("dkd_ls", "Sun 2024 + Zhao 2022: DKD on z-scored logits; CE stays on raw logits")
def dkd_ls(
    temperature: float = 2.0,
    target_weight: float = 1.0,
    nontarget_weight: float = 8.0,
    ce_weight: float = 1.0,
    warmup_epochs: int = 5,
) -> LogitStandardized:
    """DKD with logit standardization."""
    return LogitStandardized(
        DKDLoss(
            temperature=temperature,
            target_weight=target_weight,
            nontarget_weight=nontarget_weight,
            ce_weight=ce_weight,
            warmup_epochs=warmup_epochs,
        )
    )
