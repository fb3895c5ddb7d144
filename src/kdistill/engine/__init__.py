"""The training engine: a short loop plus callbacks."""

from __future__ import annotations

from kdistill.engine.callbacks import Callback, EarlyStopping, ProgressBar
from kdistill.engine.loop import TrainConfig, TrainState, TransferSet, auto_threads, fit, num_threads, predict_logits

__all__ = [
    "Callback",
    "EarlyStopping",
    "ProgressBar",
    "TrainConfig",
    "TrainState",
    "TransferSet",
    "auto_threads",
    "fit",
    "num_threads",
    "predict_logits",
]
