"""Train a sentence-encoder student (static or transformer) on the teacher's cached (rows, D) embeddings.

A thin front end over kdistill's engine (:func:`kdistill.engine.fit`): the student's inputs are the tokenised
sentences (``{"input_ids", "attention_mask"}``), the teacher-output source is the precomputed embeddings, and the
loss is one of the embedding methods (``cosine``, ``mse``, ``contrastive``). ``max_seconds`` stops training after
that much wall time (at a step boundary), which is how the benchmark gives each student the same budget.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from kdistill.engine import Callback, TrainConfig, TrainState, TransferSet, fit
from kdistill.errors import DataError, StudentError
from kdistill.losses import get_loss

__all__ = ["EMBEDDING_LOSSES", "TimeBudget", "fit_embeddings"]

EMBEDDING_LOSSES = ("cosine", "mse", "contrastive")


class TimeBudget(Callback):
    """Stops training once ``seconds`` of wall time have passed since the run began."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._started = 0.0

    def on_train_begin(self, state: TrainState) -> None:
        self._started = time.perf_counter()

    def on_batch_end(self, state: TrainState, terms: Mapping[str, torch.Tensor]) -> None:
        if time.perf_counter() - self._started >= self.seconds:
            state.stop = True


def fit_embeddings(
    student: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    targets: torch.Tensor,
    *,
    loss: str = "cosine",
    epochs: int = 10,
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    warmup_fraction: float = 0.05,
    seed: int = 0,
    num_threads: int | str = 1,
    max_seconds: float | None = None,
    **loss_params: Any,
) -> list[dict[str, float]]:
    """Train ``student`` in place so that ``student(**inputs)`` (rows, d) matches ``targets`` (rows, D) under
    ``loss`` (d must equal D for ``cosine`` and ``mse``). AdamW, warm-up then cosine decay. Returns the per-epoch
    history (``train_loss`` and the loss's terms)."""
    rows = len(inputs["input_ids"]) if "input_ids" in inputs else -1
    if targets.ndim != 2 or len(targets) != rows:
        raise DataError(
            f"targets must be (rows, dim) with one row per sentence; got {tuple(targets.shape)} for {rows} sentences",
            hint="embed the same sentences with the teacher: teacher.encode(sentences).",
        )
    if loss not in EMBEDDING_LOSSES:
        raise StudentError(f"unknown sentence-student loss {loss!r}", hint=f"use one of {EMBEDDING_LOSSES}.")
    config = TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        warmup_fraction=warmup_fraction,
        patience=None,
        seed=seed,
        num_threads=num_threads,
        verbose=False,
    )
    callbacks = [] if max_seconds is None else [TimeBudget(max_seconds)]
    state = fit(
        student,
        get_loss(loss, **loss_params),
        TransferSet(dict(inputs), None, targets.float()),
        config=config,
        callbacks=callbacks,
    )
    return state.history
