"""Small building blocks shared by the built-in students."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Standardize"]


class Standardize(nn.Module):
    """``(x - mean) / std`` with the statistics of the training rows kept as buffers, so a saved student takes raw
    inputs exactly as the teacher did. Features constant in the training rows (digits' blank border) are only
    centred (scale 1, as scikit-learn's StandardScaler does), so an unusual value there cannot explode.
    """

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.zeros(shape))
        self.register_buffer("std", torch.ones(shape))

    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> Standardize:
        """Take the mean and std of rows ``x`` (any shape whose rows hold ``prod(shape)`` numbers)."""
        x = x.reshape(len(x), *self.mean.shape)
        self.mean.copy_(x.mean(dim=0))
        std = x.std(dim=0, unbiased=False)
        self.std.copy_(torch.where(std < 1e-6, torch.ones_like(std), std))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std
