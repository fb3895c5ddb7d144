"""Attention transfer: match where the networks' activations concentrate, not the activations themselves.

Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the Performance of Convolutional Neural
Networks via Attention Transfer", ICLR 2017, https://arxiv.org/abs/1612.03928
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kdistill.losses.base import register_loss
from kdistill.losses.common import (
    LayerPairLoss,
    as_target,
)
from kdistill.losses.projector import resize_map

__all__ = ["ATLoss", "at_loss", "attention_map"]


def attention_map(feature: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
    r"""Spatial attention :math:`Q = \mathrm{vec}\big(\frac{1}{C}\sum_c F_c^2\big) / \|\cdot\|_2`.

    ``feature``: (batch, channels, *spatial) for maps, (batch, d) for vectors (read as 1 channel over d positions).
    ``size``: the spatial size to resize the map to before normalising (the teacher's, when they differ).
    Returns (batch, positions), each row of unit L2 norm.
    """
    if feature.ndim == 2:
        feature = feature[:, None, :]
    energy = feature.pow(2).mean(dim=1, keepdim=True)
    if size is not None and feature.ndim in (3, 4):
        energy = resize_map(energy, size)
    return F.normalize(energy.flatten(1), dim=1)


def at_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    r"""One layer pair's term: :math:`\frac{1}{B\,N}\sum_{b,j}(Q^s_{bj} - Q^t_{bj})^2`, N positions.

    The channel counts may differ (attention averages them out); a student map of another spatial size is resized to
    the teacher's first. (batch, c_s, *spatial_s), (batch, c_t, *spatial_t) -> scalar.
    """
    teacher_feature = as_target(teacher_feature)
    size = teacher_feature.shape[2:] if teacher_feature.ndim > 2 else teacher_feature.shape[1:]
    return (attention_map(student_feature, size) - attention_map(teacher_feature)).pow(2).mean()


@register_loss("at", "Zagoruyko 2017: CE + β/2·Σ_l mean((Q_s - Q_t)²), Q = normalised channel-mean of F²")
class ATLoss(LayerPairLoss):
    r""":math:`\mathcal{L} = c\,\mathrm{CE} + \frac{\beta}{2}\sum_l \mathrm{at\_loss}(F^s_l, F^t_l)`, β = 1000 as in
    the paper. Layers are module paths paired one to one (default ``"features"``). Returns ``{"loss", "ce", "at"}``,
    ``"at"`` being the sum over pairs before β/2."""

    name = "at"
    scale = 0.5
    pair_loss = staticmethod(at_loss)

    def __init__(
        self,
        student_layers: str | Sequence[str] = "features",
        teacher_layers: str | Sequence[str] = "features",
        weight: float = 1000.0,
        ce_weight: float = 1.0,
    ) -> None:
        super().__init__(student_layers, teacher_layers, weight, ce_weight)
