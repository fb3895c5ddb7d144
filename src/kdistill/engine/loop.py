"""The training loop: mini-batches drawn by indexing in-memory tensors, AdamW with warm-up and cosine decay,
validation every epoch, callbacks around it. Everything optional lives in callbacks."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdistill.engine.callbacks import Callback
from kdistill.errors import KdistillError
from kdistill.features import capture_features
from kdistill.losses.base import Loss
from kdistill.teachers.base import Outputs, Teacher

__all__ = ["TrainConfig", "TrainState", "TransferSet", "auto_threads", "fit", "num_threads", "predict_logits"]


@dataclass(frozen=True)
class TrainConfig:
    """How to train. ``num_threads="auto"`` picks 1 thread for small students (on 2 busy cores one thread was
    4-9x faster per step for tiny models than two) and up to 4 otherwise; the caller's setting is restored after."""

    epochs: int = 100
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-2
    warmup_fraction: float = 0.05
    patience: int | None = 15
    seed: int = 0
    num_threads: int | str = "auto"
    device: str = "cpu"
    verbose: bool = True


@dataclass(frozen=True)
class TransferSet:
    """The rows the student learns from. ``teacher_logits``: (rows, classes), aligned with ``x`` row for row,
    computed once before training. ``y`` is None for unlabeled rows."""

    x: torch.Tensor
    y: torch.Tensor | None
    teacher_logits: torch.Tensor | None

    def __post_init__(self) -> None:
        for name in ("y", "teacher_logits"):
            value = getattr(self, name)
            if value is not None and len(value) != len(self.x):
                raise KdistillError(f"transfer set {name} has {len(value)} rows, x has {len(self.x)}")


@dataclass
class TrainState:
    """What callbacks see: the model, the epoch (0-based), every epoch's metrics so far, and a stop flag."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    max_epochs: int
    epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    stop: bool = False
    best_epoch: int | None = None


def auto_threads(model: nn.Module, batch_size: int) -> int:
    """1 thread when a step is too small to split (under ~20M multiply-adds), else up to 4 of the machine's cores."""
    work = sum(p.numel() for p in model.parameters()) * batch_size
    cores = os.cpu_count() or 1
    return 1 if work < 20_000_000 else max(1, min(4, cores))


@contextmanager
def num_threads(count: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(count)``, restoring the previous count after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _lr_lambda(total_steps: int, warmup_fraction: float) -> Callable[[int], float]:
    warmup = max(1, int(total_steps * warmup_fraction))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return schedule


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, *, batch_size: int = 1024) -> torch.Tensor:
    """The model's logits for ``x`` in eval mode, batched: (rows, classes) float32 on the CPU."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    parts = [model(x[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)]
    model.train(was_training)
    return torch.cat(parts)


def fit(
    model: nn.Module,
    loss_fn: Loss,
    train: TransferSet,
    *,
    val: tuple[torch.Tensor, torch.Tensor] | None = None,
    config: TrainConfig = TrainConfig(),
    callbacks: Sequence[Callback] = (),
    teacher: Teacher | None = None,
) -> TrainState:
    """Train ``model`` in place on ``train`` with ``loss_fn`` and return the final state (its history included).

    Each step draws a shuffled batch of row indices and indexes ``x``, ``y`` and the precomputed teacher logits with
    the same indices, so targets can never drift from the rows they supervise. The live ``teacher`` is only called
    when the loss asks for teacher features. Seeded: the same seed gives bit-identical weights on the CPU.
    """
    device = torch.device(config.device)
    threads = auto_threads(model, config.batch_size) if config.num_threads == "auto" else int(config.num_threads)
    with torch.random.fork_rng(devices=[]), num_threads(threads):
        torch.manual_seed(config.seed)
        return _fit(model.to(device), loss_fn, train, val, config, callbacks, teacher, device)


def _fit(
    model: nn.Module,
    loss_fn: Loss,
    train: TransferSet,
    val: tuple[torch.Tensor, torch.Tensor] | None,
    config: TrainConfig,
    callbacks: Sequence[Callback],
    teacher: Teacher | None,
    device: torch.device,
) -> TrainState:
    x, y, targets = (t.to(device) if t is not None else None for t in (train.x, train.y, train.teacher_logits))
    assert x is not None
    rows = len(x)
    steps_per_epoch = math.ceil(rows / config.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(steps_per_epoch * config.epochs, config.warmup_fraction)
    )
    generator = torch.Generator().manual_seed(config.seed)
    state = TrainState(model=model, optimizer=optimizer, max_epochs=config.epochs)
    student_features = tuple(loss_fn.student_features)
    teacher_features = tuple(loss_fn.teacher_features)
    for callback in callbacks:
        callback.on_train_begin(state)

    start_epoch = getattr(loss_fn, "start_epoch", None)  # optional hook: warm-ups and schedules inside a loss
    for epoch in range(config.epochs):
        state.epoch = epoch
        if start_epoch is not None:
            start_epoch(epoch, config.epochs)
        started = time.perf_counter()
        model.train()
        step_terms: list[dict[str, torch.Tensor]] = []
        order = torch.randperm(rows, generator=generator).to(device)
        for start in range(0, rows, config.batch_size):
            index = order[start : start + config.batch_size]
            xb = x[index]
            yb = None if y is None else y[index]
            if teacher_features:
                assert teacher is not None, "this method needs the live teacher for its features"
                live = teacher(xb, features=teacher_features)
                teacher_out: Outputs | None = Outputs(live.logits, live.features, index)
            else:
                teacher_out = None if targets is None else Outputs(targets[index], index=index)
            if student_features:
                with capture_features(model, student_features) as captured:
                    student_out = Outputs(model(xb), captured)
            else:
                student_out = Outputs(model(xb))
            terms = loss_fn(student_out, teacher_out, yb)
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            optimizer.step()
            scheduler.step()
            step_terms.append({name: value.detach() for name, value in terms.items()})

        metrics: dict[str, float] = {"epoch": float(epoch), "lr": optimizer.param_groups[0]["lr"]}
        for name in step_terms[0]:
            metrics[f"train_{name}"] = float(torch.stack([terms[name] for terms in step_terms]).mean())
        if not math.isfinite(metrics["train_loss"]):
            raise KdistillError(
                f"the training loss became {metrics['train_loss']} in epoch {epoch}",
                hint="lower lr, check the inputs' scale, or the teacher's outputs for inf.",
            )
        if val is not None:
            metrics |= _validate(model, *val)
        metrics["time_s"] = time.perf_counter() - started
        state.history.append(metrics)
        for callback in callbacks:
            callback.on_epoch_end(state)
        if state.stop:
            break

    for callback in callbacks:
        callback.on_train_end(state)
    model.eval()
    return state


def _validate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    logits = predict_logits(model, x)
    return {
        "val_accuracy": float((logits.argmax(1) == y).float().mean()),
        "val_nll": float(F.cross_entropy(logits, y)),
    }
