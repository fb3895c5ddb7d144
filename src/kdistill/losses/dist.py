"""DIST: distillation from a stronger teacher by matching correlations, not exact probabilities.

Huang, You, Wang, Qian & Xu, "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022,
https://arxiv.org/abs/2205.10536; reference code: the authors' (github.com/hunto/DIST_KD and
image_classification_sota's ``DIST``): the same Pearson terms, ε = 1e-8, τ² factor, β = γ = 1 and τ = 1 on
ImageNet; their CIFAR-100 runs use τ = 4 and β = γ = 2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdistill.losses.base import BaseLoss, register_loss
from kdistill.losses.common import (
    as_target,
    check_non_negative,
    check_positive,
    check_row_outputs,
    require_teacher,
    with_cross_entropy,
)
from kdistill.losses.kd import check_logits
from kdistill.teachers.base import Outputs

__all__ = ["DISTLoss", "dist_loss", "pearson_rows"]

_EPS = 1e-8


def pearson_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b``: (n, m), (n, m) -> (n,).

    .. math:: \\rho(u, v) = \\frac{(u - \\bar u)\\cdot(v - \\bar v)}{\\|u - \\bar u\\|\\,\\|v - \\bar v\\| + \\epsilon}
    """
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + _EPS)


def dist_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor | None,
    *,
    temperature: float = 1.0,
    inter_weight: float = 1.0,
    intra_weight: float = 1.0,
    ce_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    r"""DIST: keep the teacher's ranking of classes (inter) and of samples within each class (intra).

    With :math:`P = \mathrm{softmax}(z/T)` row-wise, (batch, classes), and :math:`\rho` the Pearson correlation:

    .. math::
        \mathrm{inter} = T^2\,\Big(1 - \frac{1}{B}\sum_i \rho(P^s_{i,:}, P^t_{i,:})\Big), \qquad
        \mathrm{intra} = T^2\,\Big(1 - \frac{1}{C}\sum_c \rho(P^s_{:,c}, P^t_{:,c})\Big)

        \mathcal{L} = c\,\mathrm{CE}(z_s, y) + \beta\,\mathrm{inter} + \gamma\,\mathrm{intra}

    Both terms are 0 when the student's probabilities are any positive affine map of the teacher's: DIST asks for
    the same relations, not the same values, which is why it tolerates a much stronger teacher.

    Args:
        student_logits, teacher_logits: (batch, classes).
        target: (batch,) class indices or None (no CE term).
        temperature: T (paper: 1 on ImageNet, 4 on CIFAR). inter_weight: β. intra_weight: γ (paper: 1 and 1).
        ce_weight: the hard-label term's weight.

    Returns:
        ``{"loss", "ce", "inter", "intra"}`` (``"ce"`` only with labels and ``ce_weight > 0``).
    """
    check_positive("temperature", temperature)
    check_logits(student_logits, teacher_logits)
    student_probs = F.softmax(student_logits / temperature, dim=1)
    teacher_probs = F.softmax(as_target(teacher_logits) / temperature, dim=1)
    inter = (1.0 - pearson_rows(student_probs, teacher_probs).mean()) * temperature**2
    intra = (1.0 - pearson_rows(student_probs.T, teacher_probs.T).mean()) * temperature**2
    total = inter_weight * inter + intra_weight * intra
    return with_cross_entropy({"inter": inter, "intra": intra}, total, student_logits, target, ce_weight)


@register_loss("dist", "Huang 2022: CE + β·(1 - Pearson per sample) + γ·(1 - Pearson per class)")
class DISTLoss(BaseLoss):
    """Class form of :func:`dist_loss`."""

    at_equal = "zero"
    batch_order_invariant = True

    def __init__(
        self, temperature: float = 1.0, inter_weight: float = 1.0, intra_weight: float = 1.0, ce_weight: float = 1.0
    ) -> None:
        self.temperature = check_positive("temperature", temperature)
        self.inter_weight = check_non_negative("inter_weight", inter_weight)
        self.intra_weight = check_non_negative("intra_weight", intra_weight)
        self.ce_weight = check_non_negative("ce_weight", ce_weight)

    def __call__(
        self, student: Outputs, teacher: Outputs | None, target: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        check_row_outputs(student, teacher, "dist")
        teacher = require_teacher(teacher, "dist")
        return dist_loss(
            student.logits,
            teacher.logits,
            target,
            temperature=self.temperature,
            inter_weight=self.inter_weight,
            intra_weight=self.intra_weight,
            ce_weight=self.ce_weight,
        )
