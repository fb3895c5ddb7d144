"""A small convolutional student, registered as ``"cnn"``, for signals (rows, length) / (rows, channels, length)
and images (rows, height, width) / (rows, channels, height, width)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kdistill.errors import StudentError
from kdistill.students.base import register_student
from kdistill.students.layers import Standardize

__all__ = ["CNN", "cnn"]


class CNN(nn.Module):
    """``standardize -> [Conv(k=3 or 5) -> BatchNorm -> ReLU -> stride-2] * len(channels) -> global average -> Linear``.

    ``in_shape`` is one row's shape: (length,) or (channels, length) gives 1-D convolutions, (height, width) or
    (channels, height, width) 2-D ones. Pass ``in_shape`` explicitly to treat flat rows as images (digits: (1, 8, 8)).
    """

    def __init__(
        self, in_shape: Sequence[int], num_classes: int, channels: Sequence[int] = (32, 32, 32), kernel_size: int = 5
    ) -> None:
        super().__init__()
        shape = tuple(in_shape)
        if len(shape) == 1:
            shape = (1, shape[0])
        elif len(shape) == 2 and shape[0] > 4:  # (height, width) image, not (channels, length)
            shape = (1, *shape)
        if len(shape) not in (2, 3):
            raise StudentError(
                f"the cnn student takes rows of shape (length,), (channels, length), (height, width) or "
                f"(channels, height, width); got {tuple(in_shape)}",
                hint="pass in_shape=... to say how to read each row, or use student='mlp'.",
            )
        self.in_shape = tuple(in_shape)
        self.shape = shape
        conv: type[nn.Conv1d] | type[nn.Conv2d] = nn.Conv1d if len(shape) == 2 else nn.Conv2d
        norm: type[nn.BatchNorm1d] | type[nn.BatchNorm2d] = nn.BatchNorm1d if len(shape) == 2 else nn.BatchNorm2d
        self.standardize = Standardize(shape)
        blocks: list[nn.Module] = []
        width = shape[0]
        for size in channels:
            blocks += [conv(width, size, kernel_size, padding=kernel_size // 2, stride=2), norm(size), nn.ReLU()]
            width = size
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x.shape[0], not len(x): a traced ONNX export then keeps the batch axis dynamic
        x = self.standardize(x.reshape(x.shape[0], *self.shape))
        x = self.features(x)
        return self.head(x.flatten(2).mean(dim=2))


@register_student("cnn", "small 1-D/2-D convolutional net for signals and images (channels=(c1, ...), in_shape=...)")
def cnn(
    in_shape: Sequence[int], num_classes: int, *, channels: Sequence[int] = (32, 32, 32), kernel_size: int = 5
) -> CNN:
    """A :class:`CNN`; pass ``in_shape`` to read flat rows as images (digits: ``in_shape=(1, 8, 8)``)."""
    return CNN(in_shape, num_classes, channels=channels, kernel_size=kernel_size)
