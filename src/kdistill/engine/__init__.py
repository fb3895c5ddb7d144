"""The training engine: a short loop, the data sources and teacher-output sources that feed it, and callbacks."""

from __future__ import annotations

from kdistill.engine.batches import UNLABELLED, Batch, DataSource, InMemorySource, StreamingSource, micro_batches
from kdistill.engine.callbacks import Callback, EarlyStopping, ProgressBar, TimeBudget
from kdistill.engine.checkpoint import Checkpoint, Checkpointer, load_checkpoint, save_checkpoint
from kdistill.engine.live import AugmentedTeacher, LiveTeacher
from kdistill.engine.loggers import ConsoleLog, JsonlLogger, TensorBoardLogger
from kdistill.engine.loop import (
    TrainConfig,
    TrainState,
    TransferSet,
    Validate,
    auto_threads,
    fit,
    num_threads,
    predict_logits,
    validate_classification,
)
from kdistill.engine.sources import BankSource, NoTeacher, StaticSource, TeacherSource, choose_teacher_source

__all__ = [
    "UNLABELLED",
    "AugmentedTeacher",
    "BankSource",
    "Batch",
    "Callback",
    "Checkpoint",
    "Checkpointer",
    "ConsoleLog",
    "DataSource",
    "EarlyStopping",
    "InMemorySource",
    "JsonlLogger",
    "LiveTeacher",
    "NoTeacher",
    "ProgressBar",
    "StaticSource",
    "StreamingSource",
    "TeacherSource",
    "TensorBoardLogger",
    "TimeBudget",
    "TrainConfig",
    "TrainState",
    "TransferSet",
    "Validate",
    "auto_threads",
    "choose_teacher_source",
    "fit",
    "load_checkpoint",
    "micro_batches",
    "num_threads",
    "predict_logits",
    "save_checkpoint",
    "validate_classification",
]
