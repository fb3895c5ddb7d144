"""Your own teacher and student, referenced from custom_models.yaml as ``my_models:make_teacher`` and
``my_models:TinyNet``. kdistill imports this file (from the config's folder) exactly as running it would."""

from __future__ import annotations

import torch
from sklearn.ensemble import ExtraTreesClassifier
from torch import nn


def make_teacher(n_estimators: int = 100, seed: int = 0) -> ExtraTreesClassifier:
    """An unfitted scikit-learn classifier: kdistill fits it on the training split."""
    return ExtraTreesClassifier(n_estimators=n_estimators, random_state=seed, n_jobs=1)


class TinyNet(nn.Module):
    """(batch, in_features) -> (batch, classes) logits, inputs scaled by a fixed factor (digits are 0..16)."""

    def __init__(self, in_features: int = 64, classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(in_features, width), nn.GELU(), nn.Linear(width, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x / 16.0)
