"""Relational knowledge distillation: match the geometry of a batch (distances and angles), not single outputs.

Park, Kim, Lu & Cho, "Relational Knowledge Distillation", CVPR 2019, https://arxiv.org/abs/1904.05068; reference
code: the authors' (github.com/lenscloth/RKD, ``metric/loss.py``), RepDistiller's ``RKDLoss`` and mdistiller's ``RKD``,
which agree: ``smooth_l1_loss`` averaged over all B² distance and B³ angle entries, weights 25 and 50.
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

__all__ = ["RKDLoss", "rkd_angle_loss", "rkd_distance_loss"]

_EPS = 1e-12
Reduction = Literal["mean", "distinct"]
_REDUCTIONS = ("mean", "distinct")


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise MethodError(
            f"reduction must be one of {_REDUCTIONS}, got {reduction!r}",
            hint="'mean' averages over all B² (distance) and B³ (angle) entries, as the reference code does.",
        )


def _gram_and_distances(embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, d) -> the Gram matrix of the centred rows and their pairwise Euclidean distances, both (batch, batch).

    Both come from one (batch x batch) product, so the cost does not grow with d; centring first (distances and
    angles do not change under translation) keeps the subtraction in the distance formula well conditioned."""
    centred = embeddings - embeddings.mean(dim=0, keepdim=True)
    gram = centred @ centred.T
    squared_norms = gram.diagonal()
    squared = squared_norms[:, None] + squared_norms[None, :] - 2 * gram
    return gram, squared.clamp_min(_EPS).sqrt()


def _normalised_distances(embeddings: torch.Tensor) -> torch.Tensor:
    """ψ_D: (batch, d) -> (batch, batch) Euclidean distances divided by their mean over distinct pairs (the
    diagonal is set to 0)."""
    rows = len(embeddings)
    distances = _gram_and_distances(embeddings)[1] * (1 - torch.eye(rows, device=embeddings.device))
    mean = distances.sum() / max(rows * (rows - 1), 1)
    return distances / mean.clamp_min(_EPS)


def _huber(difference: torch.Tensor) -> torch.Tensor:
    """Elementwise Huber loss with δ = 1 (smooth L1): 0.5·x² for |x| < 1, |x| - 0.5 beyond; written with a clamp
    rather than a branch, which is several times faster on the (batch³) angle tensors."""
    size = difference.abs()
    inner = size.clamp(max=1.0)
    return 0.5 * inner.pow(2) + (size - inner)


def rkd_distance_loss(
    student_embeddings: torch.Tensor, teacher_embeddings: torch.Tensor, *, reduction: Reduction = "mean"
) -> torch.Tensor:
    r"""Distance-wise RKD:
    :math:`\frac{1}{N}\sum_{i \ne j} \ell_1^{smooth}\big(\psi_D(s_i, s_j) - \psi_D(t_i, t_j)\big)`
    with :math:`\psi_D(x_i, x_j) = \|x_i - x_j\|_2 / \mu` and µ the mean distance over the batch's distinct pairs.

    ``reduction="mean"`` (the reference code's): N = B², the mean over every entry of the (B x B) matrix, whose
    diagonal is 0 in both. ``"distinct"`` (kdistill 0.1): N = B(B − 1), the mean over distinct pairs, which is the
    reference times B / (B − 1) (+1.6% at B = 64).
    (batch, d_s), (batch, d_t) -> scalar; d_s and d_t may differ. ``smooth`` is the Huber loss with δ = 1.
    """
    _check_reduction(reduction)
    rows = len(student_embeddings)
    student = _normalised_distances(student_embeddings)
    teacher = _normalised_distances(as_target(teacher_embeddings))
    count = rows * rows if reduction == "mean" else max(rows * (rows - 1), 1)
    return _huber(student - teacher).sum() / count  # the diagonals are 0 in both


def _angles(embeddings: torch.Tensor) -> torch.Tensor:
    """(batch, d) -> (batch, batch, batch): cos ∠(x_i, x_j, x_k) = <x_i - x_j, x_k - x_j> / (‖x_i - x_j‖ ‖x_k - x_j‖),
    indexed [j, i, k] (j is the vertex), from the Gram matrix G: the numerator is G_ik - G_ij - G_jk + G_jj."""
    gram, distances = _gram_and_distances(embeddings)
    dots = gram[None, :, :] - gram[:, :, None] - gram[:, None, :] + gram.diagonal()[:, None, None]
    return dots / (distances[:, :, None] * distances[:, None, :]).clamp_min(_EPS)


def rkd_angle_loss(
    student_embeddings: torch.Tensor, teacher_embeddings: torch.Tensor, *, reduction: Reduction = "mean"
) -> torch.Tensor:
    r"""Angle-wise RKD: :math:`\frac{1}{N}\sum_{i \ne j,\,k \ne j}\ \ell_1^{smooth}\big(\cos\angle s_i s_j s_k
    - \cos\angle t_i t_j t_k\big)`, the angle at vertex j. (batch, d_s), (batch, d_t) -> scalar.

    ``reduction="mean"`` (the reference code's): N = B³, every entry of the (B x B x B) tensor, those with a repeated
    vertex being 0 in both. ``"distinct"`` (kdistill 0.1): N = B(B − 1)², the valid triplets only, which is the
    reference times B² / (B − 1)² (+3.2% at B = 64)."""
    _check_reduction(reduction)
    rows = len(student_embeddings)
    off = 1 - torch.eye(rows, dtype=student_embeddings.dtype, device=student_embeddings.device)
    valid = off[:, :, None] * off[:, None, :]  # [j, i, k]: 1 where i != j and k != j
    difference = _angles(student_embeddings) - _angles(as_target(teacher_embeddings))
    count = valid.new_tensor(float(rows**3)) if reduction == "mean" else valid.sum().clamp_min(1)
    return (_huber(difference) * valid).sum() / count


@register_loss("rkd", "Park 2019: CE + λ_D·distance-wise + λ_A·angle-wise relational loss on embeddings")
class RKDLoss(BaseLoss):
    r""":math:`\mathcal{L} = c\,\mathrm{CE} + \lambda_D\,\mathrm{RKD_D} + \lambda_A\,\mathrm{RKD_A}` on one layer's
    outputs, flattened to (batch, d) (default layer ``"features"``; λ_D = 25, λ_A = 50 as in the paper and the
    reference code). ``reduction``: ``"mean"`` (the reference's, over all entries) or ``"distinct"`` (kdistill 0.1's,
    over distinct pairs and valid triplets; see :func:`rkd_distance_loss` for the conversion).
    Returns ``{"loss", "ce", "distance", "angle"}``."""

    at_equal = "zero"
    batch_order_invariant = True

    def __init__(
        self,
        student_layer: str = "features",
        teacher_layer: str = "features",
        distance_weight: float = 25.0,
        angle_weight: float = 50.0,
        ce_weight: float = 1.0,
        reduction: Reduction = "mean",
    ) -> None:
        _check_reduction(reduction)
        self.reduction: Reduction = reduction
        self.student_features = (student_layer,)
        self.teacher_features = (teacher_layer,)
        self.distance_weight = check_non_negative("distance_weight", distance_weight)
        self.angle_weight = check_non_negative("angle_weight", angle_weight)
        self.ce_weight = check_non_negative("ce_weight", ce_weight)

    def __call__(
        self, student: Outputs, teacher: Outputs | None, target: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        check_row_outputs(student, teacher, "rkd")
        teacher = require_teacher(teacher, "rkd")
        s = flatten_rows(get_feature(student, self.student_features[0], role="student", method="rkd"))
        t = flatten_rows(get_feature(teacher, self.teacher_features[0], role="teacher", method="rkd"))
        distance = rkd_distance_loss(s, t, reduction=self.reduction)
        angle = rkd_angle_loss(s, t, reduction=self.reduction)
        total = self.distance_weight * distance + self.angle_weight * angle
        return with_cross_entropy({"distance": distance, "angle": angle}, total, student.logits, target, self.ce_weight)
