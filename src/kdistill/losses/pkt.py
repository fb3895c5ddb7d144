"""Probabilistic knowledge transfer: match the distribution of cosine similarities within a batch.

Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer", ECCV 2018,
https://arxiv.org/abs/1803.10837; reference code: the authors' (github.com/passalis/probabilistic_kt), as
RepDistiller's and mdistiller's ``PKT`` transcribe it (``torch.mean`` over the B² entries, weight 30000).
"""

from __future__ import annotations

from typing import Literal

import torch

from kdistill.errors import MethodError
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
Reduction = Literal["mean", "batchmean"]
_REDUCTIONS = ("mean", "batchmean")


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise MethodError(
            f"reduction must be one of {_REDUCTIONS}, got {reduction!r}",
            hint="'mean' averages over the B² entries, as the reference code does (with weight 30000).",
        )


def similarity_probabilities(embeddings: torch.Tensor) -> torch.Tensor:
    r"""(batch, d) -> (batch, batch) conditional probabilities from the cosine kernel:
    :math:`K_{ij} = (\hat x_i \cdot \hat x_j + 1)/2`, :math:`P_{j|i} = K_{ij} / \sum_k K_{ik}`, with
    :math:`\hat x = x / (\|x\|_2 + \epsilon)` as in the reference code (a zero row stays zero)."""
    unit = embeddings / (embeddings.norm(dim=1, keepdim=True) + _EPS)
    kernel = (unit @ unit.T + 1.0) / 2.0
    return kernel / kernel.sum(dim=1, keepdim=True)


def pkt_loss(
    student_embeddings: torch.Tensor, teacher_embeddings: torch.Tensor, *, reduction: Reduction = "mean"
) -> torch.Tensor:
    r"""The teacher-to-student KL divergence of each row's similarity distribution:

    * ``reduction="mean"`` (the reference code's): :math:`\frac{1}{B^2}\sum_{i,j} P^t_{j|i}\,
      \log\frac{P^t_{j|i} + \epsilon}{P^s_{j|i} + \epsilon}`, the mean over the B² entries;
    * ``"batchmean"`` (kdistill 0.1): the sum over j averaged over rows i, a per-row KL that does not shrink with
      the batch: exactly B times the reference, so weight w here is 30000 / B there (469 at B = 64).

    (batch, d_s), (batch, d_t) -> scalar; the dimensions may differ. ε = 1e-7."""
    _check_reduction(reduction)
    student = similarity_probabilities(student_embeddings)
    teacher = similarity_probabilities(as_target(teacher_embeddings))
    entries = teacher * torch.log((teacher + _EPS) / (student + _EPS))
    return entries.mean() if reduction == "mean" else entries.sum(dim=1).mean()


@register_loss("pkt", "Passalis 2018: CE + w·KL between the batch's cosine-similarity distributions")
class PKTLoss(BaseLoss):
    r""":math:`\mathcal{L} = c\,\mathrm{CE} + w\,\mathrm{PKT}(F_s, F_t)` on one layer's outputs flattened to
    (batch, d) (default layer ``"features"``). Defaults as the reference code: the mean over the B² entries and
    w = 30000. kdistill 0.1 used ``reduction="batchmean"`` with w = 500, the same as w = 500·B here (32000 at
    B = 64; 30000 corresponds to 469 there). Returns ``{"loss", "ce", "pkt"}``."""

    at_equal = "zero"
    batch_order_invariant = True

    def __init__(
        self,
        student_layer: str = "features",
        teacher_layer: str = "features",
        weight: float = 30000.0,
        ce_weight: float = 1.0,
        reduction: Reduction = "mean",
    ) -> None:
        _check_reduction(reduction)
        self.reduction: Reduction = reduction
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
        term = pkt_loss(s, t, reduction=self.reduction)
        return with_cross_entropy({"pkt": term}, self.weight * term, student.logits, target, self.ce_weight)
