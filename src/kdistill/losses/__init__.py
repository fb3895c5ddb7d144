"""Distillation methods, one file each, all behind one registry (``kdistill list methods``)."""

from __future__ import annotations

from kdistill.losses.base import LOSSES, Loss, LossInfo, UnknownNameError, get_loss, list_losses, register_loss
from kdistill.losses.kd import CrossEntropy, KDLoss, kd_loss
from kdistill.losses.kd_topk import KDTopKLoss, kd_topk_loss

__all__ = [
    "LOSSES",
    "CrossEntropy",
    "KDLoss",
    "KDTopKLoss",
    "Loss",
    "LossInfo",
    "UnknownNameError",
    "get_loss",
    "kd_loss",
    "kd_topk_loss",
    "list_losses",
    "register_loss",
]
