"""Probabilistic knowledge transfer: match the distribution of cosine similarities within a batch.

Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer", ECCV 2018,
https://arxiv.org/abs/1803.10837
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdistill.losses.base import BaseLoss, register_loss
from kdistill.losses.common import (
    as_target,
    check_non_negative,
    check_row_outputs,
    flatten_rows,
    get_feature,
    require_teacher,
    with_cross_entropy,
)
from kdistill.teachers.base import Outputs

__all__ = ["PKTLoss", "pkt_loss", "similarity_probabilities"]

_EPS = 1e-7


def similarity_probabilities(embeddings: torch.Tensor) -> torch.Tensor:
    r"""(batch, d) -> (batch, batch) conditional probabilities from the cosine kernel:
    :math:`K_{ij} = (\cos(x_i, x_j) + 1)/2`, :math:`P_{j|i} = K_{ij} / \sum_k K_{ik}`."""
    unit = F.normalize(embeddings, dim=1, eps=_EPS)
    kernel = (unit @ unit.T + 1.0) / 2.0
    return kernel / kernel.sum(dim=1, keepdim=True)


def pkt_loss(student_embeddings: torch.Tensor, teacher_embeddings: torch.Tensor) -> torch.Tensor:
    r""":math:`\frac{1}{B}\sum_i \sum_j P^t_{j|i}\,\log\frac{P^t_{j|i} + \epsilon}{P^s_{j|i} + \epsilon}`: the
    teacher-to-student KL divergence of each row's similarity distribution, averaged over rows.
    (batch, d_s), (batch, d_t) -> scalar; the dimensions may differ."""
    student = similarity_probabilities(student_embeddings)
    teacher = similarity_probabilities(as_target(teacher_embeddings))
    return (teacher * torch.log((teacher + _EPS) / (student + _EPS))).sum(dim=1).mean()


@register_loss("pkt", "Passalis 2018: CE + w·KL between the batch's cosine-similarity distributions")
class PKTLoss(BaseLoss):
    r""":math:`\mathcal{L} = c\,\mathrm{CE} + w\,\mathrm{PKT}(F_s, F_t)` on one layer's outputs flattened to
    (batch, d) (default layer ``"features"``). w = 500 matches the common CIFAR setting (30000 on a mean over the
    B² entries at B = 64). Returns ``{"loss", "ce", "pkt"}``."""

    at_equal = "zero"
    batch_order_invariant = True

    def __init__(
        self,
        student_layer: str = "features",
        teacher_layer: str = "features",
        weight: float = 500.0,
        ce_weight: float = 1.0,
    ) -> None:
        self.student_features = (student_layer,)
        self.teacher_features = (teacher_layer,)
        self.weight = check_non_negative("weight", weight)
        self.ce_weight = check_non_negative("ce_weight", ce_weight)

    def __call__(
        self, student: Outputs, teacher: Outputs | None, target: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        check_row_outputs(student, teacher, "pkt")
        teacher = require_teacher(teacher, "pkt")
        s = flatten_rows(get_feature(student, self.student_features[0], role="student", method="pkt"))
        t = flatten_rows(get_feature(teacher, self.teacher_features[0], role="teacher", method="pkt"))
        term = pkt_loss(s, t)
        return with_cross_entropy({"pkt": term}, self.weight * term, student.logits, target, self.ce_weight)
