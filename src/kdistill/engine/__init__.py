"""The training engine: a short loop plus callbacks."""

from __future__ import annotations

from kdistill.engine.callbacks import Callback, EarlyStopping, ProgressBar
from kdistill.engine.checkpoint import Checkpoint, Checkpointer, load_checkpoint, save_checkpoint
from kdistill.engine.loggers import ConsoleLog, JsonlLogger, TensorBoardLogger
from kdistill.engine.loop import TrainConfig, TrainState, TransferSet, auto_threads, fit, num_threads, predict_logits

__all__ = [
    "Callback",
    "Checkpoint",
    "Checkpointer",
    "ConsoleLog",
    "EarlyStopping",
    "JsonlLogger",
    "ProgressBar",
    "TensorBoardLogger",
    "TrainConfig",
    "TrainState",
    "TransferSet",
    "auto_threads",
    "fit",
    "load_checkpoint",
    "num_threads",
    "predict_logits",
    "save_checkpoint",
]
