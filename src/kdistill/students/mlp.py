"""A multilayer perceptron student, registered as ``"mlp"``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from kdistill.students.base import register_student
from kdistill.students.layers import Standardize

__all__ = ["MLP", "default_hidden", "mlp"]


def default_hidden(in_features: int, num_classes: int) -> tuple[int, ...]:
    """Two hidden layers sized from the data: the next power of two above ``in_features + num_classes`` (clipped to
    32..512), then half of it. Digits (64 features, 10 classes) gets (128, 64): about 17k parameters."""
    width = 2 ** math.ceil(math.log2(max(in_features + num_classes, 2)))
    width = min(max(width, 32), 512)
    return (width, width // 2)


class MLP(nn.Module):
    """``standardize -> [Linear -> ReLU -> Dropout] * len(hidden) -> Linear``; inputs are flattened first."""

    def __init__(
        self, in_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (64, 32), dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.in_shape = tuple(in_shape)
        in_features = math.prod(self.in_shape)
        self.standardize = Standardize((in_features,))
        layers: list[nn.Module] = []
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = size
        layers.append(nn.Linear(width, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.standardize(x.flatten(1)))


def _sized(in_shape: Sequence[int], num_classes: int, params: dict[str, Any]) -> dict[str, Any]:
    """Fill ``hidden`` from the data (:func:`default_hidden`) when it is not given, so the spec records the widths."""
    hidden = params.get("hidden") or default_hidden(math.prod(in_shape), num_classes)
    return params | {"hidden": [int(width) for width in hidden]}


@register_student("mlp", "multilayer perceptron sized from the data (hidden=(w1, w2, ...) to choose)", resolve=_sized)
def mlp(in_shape: Sequence[int], num_classes: int, *, hidden: Sequence[int] | None = None, dropout: float = 0.0) -> MLP:
    """An :class:`MLP`; ``hidden=None`` sizes it from the data (:func:`default_hidden`)."""
    widths = hidden or default_hidden(math.prod(in_shape), num_classes)
    return MLP(in_shape, num_classes, hidden=widths, dropout=dropout)
