"""Attention transfer: match where the networks' activations concentrate, not the activations themselves.

Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the Performance of Convolutional Neural
Networks via Attention Transfer", ICLR 2017, https://arxiv.org/abs/1612.03928; reference code: the authors'
(github.com/szagoruyko/attention-transfer, ``utils.at_loss`` and β/2 in ``cifar.py``), and for maps of different
spatial sizes RepDistiller's ``Attention`` and mdistiller's ``AT``, which average-pool the larger raw feature map.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from kdistill.errors import MethodError
from kdistill.losses.base import register_loss
from kdistill.losses.common import (
    LayerPairLoss,
    as_target,
    check_row_outputs,
    get_feature,
    require_teacher,
    with_cross_entropy,
)
from kdistill.losses.projector import resize_map
from kdistill.teachers.base import Outputs

__all__ = ["ATLoss", "at_loss", "attention_map"]

SizeMismatch = Literal["pool", "resize_energy"]
_SIZE_MISMATCH = ("pool", "resize_energy")


def attention_map(feature: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
    r"""Spatial attention :math:`Q = \mathrm{vec}\big(\frac{1}{C}\sum_c F_c^2\big) / \|\cdot\|_2`.

    ``feature``: (batch, channels, *spatial) for maps, (batch, d) for vectors (read as 1 channel over d positions).
    ``size``: the spatial size to resize the energy map to before normalising (``size_mismatch="resize_energy"``).
    Returns (batch, positions), each row of unit L2 norm.
    """
    if feature.ndim == 2:
        feature = feature[:, None, :]
    energy = feature.pow(2).mean(dim=1, keepdim=True)
    if size is not None and feature.ndim in (3, 4):
        energy = resize_map(energy, size)
    return F.normalize(energy.flatten(1), dim=1)


def _as_map(feature: torch.Tensor) -> torch.Tensor:
    """(batch, d) -> (batch, 1, d); maps unchanged."""
    return feature[:, None, :] if feature.ndim == 2 else feature


def _pool_to(feature: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Adaptive average pooling of a raw (batch, channels, *spatial) map to ``size`` (no-op when already there)."""
    if tuple(feature.shape[2:]) == size:
        return feature
    if feature.ndim == 3:
        return F.adaptive_avg_pool1d(feature, size)
    if feature.ndim == 4:
        height, width = size
        return F.adaptive_avg_pool2d(feature, (height, width))
    raise MethodError(
        f"at compares 1-D or 2-D maps (3 or 4 dims) of different sizes, got shape {tuple(feature.shape)}",
        hint="name layers whose outputs are (batch, channels, length) or (batch, channels, height, width).",
    )


def at_loss(
    student_feature: torch.Tensor, teacher_feature: torch.Tensor, *, size_mismatch: SizeMismatch = "pool"
) -> torch.Tensor:
    r"""One layer pair's term: :math:`\frac{1}{B\,N}\sum_{b,j}(Q^s_{bj} - Q^t_{bj})^2`, N positions.

    The channel counts may differ (attention averages them out). When the spatial sizes differ:

    * ``size_mismatch="pool"`` (default, the reference code's): the larger *raw* feature map, student's or
      teacher's, is average-pooled to the smaller one's size before squaring (RepDistiller / mdistiller pool a square
      map to (H, H); here each spatial dimension goes to the smaller of the two, the same for square maps);
    * ``"resize_energy"`` (kdistill 0.1): the student's squared, channel-averaged map is resized to the teacher's
      size (pooled to shrink, interpolated to grow). Pooling before or after squaring differs (the mean of squares
      is not the square of means), so the two options give different losses whenever the sizes differ.

    (batch, c_s, *spatial_s), (batch, c_t, *spatial_t) -> scalar.
    """
    if size_mismatch not in _SIZE_MISMATCH:
        raise MethodError(
            f"size_mismatch must be one of {_SIZE_MISMATCH}, got {size_mismatch!r}",
            hint="'pool' average-pools the larger raw map, as the reference code does.",
        )
    teacher_feature = as_target(teacher_feature)
    if size_mismatch == "resize_energy":
        size = teacher_feature.shape[2:] if teacher_feature.ndim > 2 else teacher_feature.shape[1:]
        return (attention_map(student_feature, size) - attention_map(teacher_feature)).pow(2).mean()
    student_map, teacher_map = _as_map(student_feature), _as_map(teacher_feature)
    if student_map.shape[2:] != teacher_map.shape[2:]:
        if student_map.ndim != teacher_map.ndim:
            raise MethodError(
                f"at cannot pair a student map {tuple(student_feature.shape)} with a teacher map "
                f"{tuple(teacher_feature.shape)}: the spatial ranks differ",
                hint="pair layers with the same number of spatial dimensions.",
            )
        common = tuple(min(s, t) for s, t in zip(student_map.shape[2:], teacher_map.shape[2:], strict=True))
        student_map, teacher_map = _pool_to(student_map, common), _pool_to(teacher_map, common)
    return (attention_map(student_map) - attention_map(teacher_map)).pow(2).mean()


@register_loss("at", "Zagoruyko 2017: CE + β/2·Σ_l mean((Q_s - Q_t)²), Q = normalised channel-mean of F²")
class ATLoss(LayerPairLoss):
    r""":math:`\mathcal{L} = c\,\mathrm{CE} + \frac{\beta}{2}\sum_l \mathrm{at\_loss}(F^s_l, F^t_l)`, β = 1000 as in
    the paper and the authors' code (``beta / 2 * sum(loss_groups)``; RepDistiller and mdistiller write the same
    loss as β' = 1000 without the 1/2, i.e. β = 2000 here). Layers are module paths paired one to one (default
    ``"features"``). ``size_mismatch``: see :func:`at_loss`. Returns ``{"loss", "ce", "at"}``, ``"at"`` being the
    sum over pairs before β/2."""

    name = "at"
    scale = 0.5
    pair_loss = staticmethod(at_loss)

    def __init__(
        self,
        student_layers: str | Sequence[str] = "features",
        teacher_layers: str | Sequence[str] = "features",
        weight: float = 1000.0,
        ce_weight: float = 1.0,
        size_mismatch: SizeMismatch = "pool",
    ) -> None:
        super().__init__(student_layers, teacher_layers, weight, ce_weight)
        if size_mismatch not in _SIZE_MISMATCH:
            raise MethodError(
                f"size_mismatch must be one of {_SIZE_MISMATCH}, got {size_mismatch!r}",
                hint="'pool' average-pools the larger raw map, as the reference code does.",
            )
        self.size_mismatch: SizeMismatch = size_mismatch

    def __call__(
        self, student: Outputs, teacher: Outputs | None, target: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        # LayerPairLoss's loop, with the size option passed to each pair
        check_row_outputs(student, teacher, self.name)
        teacher = require_teacher(teacher, self.name)
        term = sum(
            (
                at_loss(
                    get_feature(student, s, role="student", method=self.name),
                    get_feature(teacher, t, role="teacher", method=self.name),
                    size_mismatch=self.size_mismatch,
                )
                for s, t in self.pairs
            ),
            start=student.logits.new_zeros(()),
        )
        total = self.scale * self.weight * term
        return with_cross_entropy({self.name: term}, total, student.logits, target, self.ce_weight)
