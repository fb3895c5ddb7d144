"""Similarity-preserving distillation: inputs that look alike to the teacher should look alike to the student.

Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019, https://arxiv.org/abs/1907.09682; reference
code: RepDistiller's ``Similarity`` and mdistiller's ``SP`` (the same row-normalised Gram matrices, sum of squares over
B², γ = 3000).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kdistill.losses.base import register_loss
from kdistill.losses.common import (
    LayerPairLoss,
    as_target,
    flatten_rows,
)

__all__ = ["SPLoss", "similarity_matrix", "sp_loss"]


def similarity_matrix(feature: torch.Tensor) -> torch.Tensor:
    r"""(batch, *shape) -> (batch, batch): :math:`\tilde G = G / \|G_{i,:}\|_2` row-wise, :math:`G = A A^\top`,
    A the features flattened to (batch, d)."""
    flat = flatten_rows(feature)
    return F.normalize(flat @ flat.T, dim=1)


def sp_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    r""":math:`\frac{1}{B^2}\,\|\tilde G_t - \tilde G_s\|_F^2` for one layer pair; any shapes with the same batch."""
    rows = len(student_feature)
    difference = similarity_matrix(as_target(teacher_feature)) - similarity_matrix(student_feature)
    return difference.pow(2).sum() / rows**2


@register_loss("sp", "Tung 2019: CE + γ·Σ_l ‖G̃_t - G̃_s‖²_F / B², G̃ the row-normalised batch similarity")
class SPLoss(LayerPairLoss):
    r""":math:`\mathcal{L} = c\,\mathrm{CE} + \gamma\sum_l \mathrm{SP}(F^s_l, F^t_l)`, γ = 3000 as in the paper.
    Layers are module paths paired one to one (default ``"features"``). Returns ``{"loss", "ce", "sp"}``."""

    name = "sp"
    scale = 1.0
    pair_loss = staticmethod(sp_loss)

    def __init__(
        self,
        student_layers: str | Sequence[str] = "features",
        teacher_layers: str | Sequence[str] = "features",
        weight: float = 3000.0,
        ce_weight: float = 1.0,
    ) -> None:
        super().__init__(student_layers, teacher_layers, weight, ce_weight)
