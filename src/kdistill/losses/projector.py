"""Automatic projectors: map a student feature onto the shape of the teacher feature it is compared with.

* same shape: identity (no parameters);
* vectors (batch, d_s) -> (batch, d_t): a linear layer;
* maps (batch, c_s, *spatial_s) -> (batch, c_t, *spatial_t), 1-D or 2-D: a 1x1 convolution (when the channels
  differ), then a resize to the teacher's spatial size (average pooling when shrinking, linear interpolation when
  growing);
* anything else (a map against a vector, 3-D maps): flattened, then a linear layer.

Projectors are built lazily from the first batch's shapes; the engine makes one dry pass through the loss before it
builds the optimizer (:func:`kdistill.losses.prepare.prepare_loss`), so they are trained with the student.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Projector", "resize_map"]


def resize_map(tensor: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize (batch, channels, *spatial) to (batch, channels, *size), 1-D or 2-D: average pooling where every
    spatial size shrinks or stays, linear (bilinear) interpolation otherwise."""
    size = tuple(int(s) for s in size)
    if tuple(tensor.shape[2:]) == size:
        return tensor
    shrink = all(have >= want for have, want in zip(tensor.shape[2:], size, strict=True))
    if tensor.ndim == 3:
        return F.adaptive_avg_pool1d(tensor, size) if shrink else F.interpolate(tensor, size=size, mode="linear")
    if tensor.ndim == 4:
        height, width = size
        pooled = F.adaptive_avg_pool2d(tensor, (height, width)) if shrink else None
        return pooled if pooled is not None else F.interpolate(tensor, size=(height, width), mode="bilinear")
    raise ValueError(f"resize_map takes 1-D or 2-D maps (3 or 4 dims), got shape {tuple(tensor.shape)}")


class Projector(nn.Module):
    """Maps one student row shape onto one teacher row shape (shapes exclude the batch dimension).

    ``forward``: (batch, *student_shape) -> (batch, *teacher_shape).
    """

    def __init__(self, student_shape: Sequence[int], teacher_shape: Sequence[int]) -> None:
        super().__init__()
        self.student_shape = tuple(int(s) for s in student_shape)
        self.teacher_shape = tuple(int(s) for s in teacher_shape)
        self.mode: str
        self.layer: nn.Module
        same_rank_map = len(self.student_shape) == len(self.teacher_shape) and len(self.student_shape) in (2, 3)
        if self.student_shape == self.teacher_shape:
            self.mode, self.layer = "identity", nn.Identity()
        elif len(self.student_shape) == 1 and len(self.teacher_shape) == 1:
            self.mode, self.layer = "linear", nn.Linear(self.student_shape[0], self.teacher_shape[0])
        elif same_rank_map:
            conv = nn.Conv1d if len(self.student_shape) == 2 else nn.Conv2d
            channels_in, channels_out = self.student_shape[0], self.teacher_shape[0]
            self.mode = "conv"
            self.layer = nn.Identity() if channels_in == channels_out else conv(channels_in, channels_out, 1)
        else:
            self.mode = "flatten"
            self.layer = nn.Linear(math.prod(self.student_shape), math.prod(self.teacher_shape))

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        if self.mode in ("identity", "linear"):
            return self.layer(feature)
        if self.mode == "conv":
            return resize_map(self.layer(feature), self.teacher_shape[1:])
        return self.layer(feature.reshape(len(feature), -1)).reshape(len(feature), *self.teacher_shape)

    def extra_repr(self) -> str:
        return f"{self.student_shape} -> {self.teacher_shape}, {self.mode}"
