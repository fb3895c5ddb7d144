"""The training loop: mini-batches drawn by indexing in-memory tensors, AdamW (or SGD) with warm-up and cosine decay,
validation every epoch, callbacks around it. Everything optional lives in callbacks (checkpoints included); the loop
itself knows how to resume from a checkpoint, stop on a NaN/inf loss, autocast, and run under torchrun (DDP)."""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kdistill import defaults
from kdistill.engine.callbacks import Callback
from kdistill.engine.live import Augment, live_batches
from kdistill.errors import ConfigError, KdistillError, NonFiniteLossError
from kdistill.features import capture_features
from kdistill.losses.base import Loss
from kdistill.losses.prepare import StaticTargets, TeacherBank, prepare_loss
from kdistill.teachers.base import Outputs, Teacher

if TYPE_CHECKING:
    from kdistill.engine.checkpoint import Checkpoint

__all__ = ["TrainConfig", "TrainState", "TransferSet", "auto_threads", "fit", "num_threads", "predict_logits"]


@dataclass(frozen=True)
class TrainConfig:
    """How to train. ``num_threads="auto"`` picks 1 thread for small students (on 2 busy cores one thread was
    4-9x faster per step for tiny models than two) and up to 4 otherwise; the caller's setting is restored after.

    ``optimizer``: ``"adamw"`` or ``"sgd"`` (with ``momentum``). ``schedule``: ``"warmup_cosine"`` (linear warm-up over
    ``warmup_fraction`` of the steps, then cosine decay to 0) or ``"constant"``. ``precision``: ``"fp32"``, or
    ``"bf16"``/``"fp16"`` autocast for the forward pass and the loss (fp16 on CUDA uses a gradient scaler).
    ``batch_size`` is the global batch: under torchrun each of the N ranks takes 1/N of every batch. The optimizer
    defaults are :mod:`kdistill.defaults` (a strongly regularised AdamW, measured there)."""

    epochs: int = defaults.EPOCHS
    batch_size: int = defaults.BATCH_SIZE
    lr: float = defaults.LR
    weight_decay: float = defaults.WEIGHT_DECAY
    warmup_fraction: float = 0.05
    patience: int | None = defaults.PATIENCE
    seed: int = 0
    num_threads: int | str = "auto"
    device: str = "cpu"
    verbose: bool = True
    optimizer: str = "adamw"
    momentum: float = 0.9
    schedule: str = "warmup_cosine"
    precision: str = "fp32"


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
    """What callbacks see: the model, the epoch (0-based), every epoch's metrics so far, and a stop flag; and what a
    checkpoint saves (optimizer, scheduler, shuffling generator, gradient scaler, loss, callbacks). ``model`` is the
    plain module, never the DistributedDataParallel wrapper. ``last_checkpoint`` is set by the checkpoint callback."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    max_epochs: int
    epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    stop: bool = False
    best_epoch: int | None = None
    scheduler: Any = None
    generator: torch.Generator | None = None
    scaler: Any = None
    loss_fn: Any = None
    callbacks: Sequence[Callback] = ()
    global_step: int = 0
    rank: int = 0
    world_size: int = 1
    last_checkpoint: str | None = None


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


def _lr_lambda(total_steps: int, warmup_fraction: float, schedule: str = "warmup_cosine") -> Callable[[int], float]:
    if schedule == "constant":
        return lambda step: 1.0
    warmup = max(1, int(total_steps * warmup_fraction))

    def warmup_cosine(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return warmup_cosine


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
    resume: Checkpoint | None = None,
    augment: Augment | None = None,
    prefetch_teacher: bool = False,
) -> TrainState:
    """Train ``model`` in place on ``train`` with ``loss_fn`` and return the final state (its history included).

    Each step draws a shuffled batch of row indices and indexes ``x``, ``y`` and the precomputed teacher logits with
    the same indices, so targets can never drift from the rows they supervise. The live ``teacher`` is only called
    when the loss asks for teacher features. Seeded: the same seed gives bit-identical weights on the CPU.

    ``resume``: a checkpoint of this same run (see :mod:`kdistill.engine.checkpoint`); training continues after its
    epoch and ends with the same weights as a run that was never interrupted. A NaN or inf loss raises
    :class:`~kdistill.errors.NonFiniteLossError` naming the step, before any callback (so no checkpoint) sees it.
    Under an initialised ``torch.distributed`` process group, the model is wrapped in DistributedDataParallel and
    each rank trains on its share of every batch.

    With ``augment(x, generator)``, each batch is augmented (drawing from a generator seeded from ``seed`` and the
    epoch, so a resumed run replays the same augmentations) and the live ``teacher`` labels the augmented batch
    (precomputed teacher logits are not used); ``prefetch_teacher=True`` prepares the next batch in a background
    thread (:mod:`kdistill.engine.live`).
    """
    device = torch.device(config.device)
    threads = auto_threads(model, config.batch_size) if config.num_threads == "auto" else int(config.num_threads)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), num_threads(threads):
        torch.manual_seed(config.seed)
        return _fit(
            model.to(device), loss_fn, train, val, config, callbacks, teacher, device, resume, augment, prefetch_teacher
        )


def _optimizer(model: nn.Module, loss_fn: Loss, config: TrainConfig) -> torch.optim.Optimizer:
    params = list(model.parameters())
    if isinstance(loss_fn, nn.Module):  # methods with trainable parts (projectors) learn with the student
        params += [p for p in loss_fn.parameters() if p.requires_grad]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, weight_decay=config.weight_decay, momentum=config.momentum)
    raise ConfigError(f"unknown optimizer {config.optimizer!r}", hint="use 'adamw' or 'sgd'.")


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=device.type, dtype=dtype)


def _world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _step_indices(order: torch.Tensor, batch_size: int, rank: int, world_size: int) -> list[torch.Tensor]:
    """The row positions each step of this rank trains on, as the loop in :func:`_fit` draws them."""
    indices = []
    for start in range(0, len(order), batch_size):
        batch_index = order[start : start + batch_size]
        index = batch_index.tensor_split(world_size)[rank]
        indices.append(index if len(index) else batch_index[:1])
    return indices


def _fit(
    model: nn.Module,
    loss_fn: Loss,
    train: TransferSet,
    val: tuple[torch.Tensor, torch.Tensor] | None,
    config: TrainConfig,
    callbacks: Sequence[Callback],
    teacher: Teacher | None,
    device: torch.device,
    resume: Checkpoint | None,
    augment: Augment | None = None,
    prefetch_teacher: bool = False,
) -> TrainState:
    x, y, targets = (t.to(device) if t is not None else None for t in (train.x, train.y, train.teacher_logits))
    assert x is not None
    rows = len(x)
    steps_per_epoch = math.ceil(rows / config.batch_size)
    if isinstance(loss_fn, nn.Module):
        loss_fn.to(device)
    # losses with lazily built parts (projectors, embeddings) build them on a dry batch, before the optimizer
    prepare_loss(loss_fn, model, x, targets, teacher, batch_size=config.batch_size)
    optimizer = _optimizer(model, loss_fn, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(steps_per_epoch * config.epochs, config.warmup_fraction, config.schedule)
    )
    rank, world_size = _world()
    state = TrainState(
        model=model,
        optimizer=optimizer,
        max_epochs=config.epochs,
        scheduler=scheduler,
        generator=torch.Generator().manual_seed(config.seed),
        scaler=torch.amp.GradScaler("cuda") if config.precision == "fp16" and device.type == "cuda" else None,
        loss_fn=loss_fn,
        callbacks=callbacks,
        rank=rank,
        world_size=world_size,
    )
    first_epoch = 0
    if resume is not None:
        from kdistill.engine.checkpoint import restore_state

        first_epoch = restore_state(resume, state)
    forward: nn.Module = model
    if world_size > 1:  # the same global batch as one process: rank r takes the r-th slice of every batch
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    student_features = tuple(loss_fn.student_features)
    teacher_features = tuple(loss_fn.teacher_features)
    live_teacher = teacher if loss_fn.needs_teacher else None
    if augment is not None and live_teacher is None and loss_fn.needs_teacher:
        raise KdistillError("augmentation needs the live teacher", hint="pass teacher= to fit().")
    # teacher features computed once when they fit (not with augmentation: the rows change every batch)
    bank = None if augment is not None else TeacherBank.build(teacher, x, teacher_features, logits=targets)
    # teacher logits that never change, with the loss's per-row work done once beside them (kd packs its targets);
    # methods that read teacher features get theirs from the bank or the live teacher instead
    static = None
    if targets is not None and augment is None and not teacher_features:
        static = StaticTargets.build(loss_fn, targets, y)
    for callback in callbacks:
        callback.on_train_begin(state)

    start_epoch = getattr(loss_fn, "start_epoch", None)  # optional hook: warm-ups and schedules inside a loss
    for epoch in range(first_epoch, config.epochs):
        if state.stop:  # resumed from the checkpoint of the epoch that stopped early
            break
        state.epoch = epoch
        if start_epoch is not None:
            start_epoch(epoch, config.epochs)
        started = time.perf_counter()
        model.train()
        step_terms: list[dict[str, torch.Tensor]] = []
        order = torch.randperm(rows, generator=state.generator).to(device)
        augmented = None
        if augment is not None:
            augmented = live_batches(
                x,
                _step_indices(order, config.batch_size, rank, world_size),
                augment,
                torch.Generator().manual_seed(config.seed * 1_000_003 + epoch + 1),
                live_teacher,
                teacher_features,
                prefetch=prefetch_teacher,
            )
        for start in range(0, rows, config.batch_size):
            batch_index = order[start : start + config.batch_size]
            index = batch_index.tensor_split(world_size)[rank]
            # each rank's loss is a mean over its slice; scaled so that DDP's average of gradients is the
            # gradient of the mean over the whole batch, even when the slices differ in size by one row
            share = len(index) * world_size / len(batch_index)
            if len(index) == 0:  # a last batch smaller than the number of ranks: take part with zero weight
                index = batch_index[:1]
            xb = x.index_select(0, index)
            yb = None if y is None else y.index_select(0, index)
            if augmented is not None:
                xb, teacher_out, live_index = next(augmented)  # augmented rows, and the teacher's outputs on them
                assert torch.equal(live_index, index), "the live-teacher batches drifted from the loop's"
            else:
                teacher_out = _teacher_outputs(index, xb, bank, teacher, teacher_features, static)
            with _autocast(device, config.precision):
                if student_features:
                    with capture_features(model, student_features) as captured:
                        student_out = Outputs(forward(xb), captured)
                else:
                    student_out = Outputs(forward(xb))
                terms = loss_fn(student_out, teacher_out, yb)
            if world_size > 1:  # weighted by share, so that the ranks' average is the whole batch's mean
                terms = {name: value * share for name, value in terms.items()}
            _step(terms["loss"], optimizer, state.scaler)
            scheduler.step()
            state.global_step += 1
            step_terms.append({name: value.detach() for name, value in terms.items()})

        means = {name: torch.stack([terms[name] for terms in step_terms]).float().mean() for name in step_terms[0]}
        if world_size > 1:  # every rank sees the same epoch metrics, and the same NaN
            for mean in means.values():
                dist.all_reduce(mean)
                mean /= world_size
        _check_finite(means["loss"], [terms["loss"] for terms in step_terms], state, epoch, steps_per_epoch)
        metrics: dict[str, float] = {"epoch": float(epoch), "lr": optimizer.param_groups[0]["lr"]}
        metrics |= {f"train_{name}": float(mean) for name, mean in means.items()}
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


def _teacher_outputs(
    index: torch.Tensor,
    xb: torch.Tensor,
    bank: TeacherBank | None,
    teacher: Teacher | None,
    teacher_features: tuple[str, ...],
    static: StaticTargets | None,
) -> Outputs | None:
    """The teacher's outputs for the batch's rows ``index``: from the bank of precomputed features, from the live
    teacher when a method needs features that are not banked, else the precomputed logits (None without a teacher)."""
    if bank is not None:
        return bank.select(index)
    if teacher_features:
        assert teacher is not None, "this method needs the live teacher for its features"
        live = teacher(xb, features=teacher_features)
        return Outputs(live.logits, live.features, index)
    return None if static is None else static.select(index)


def _step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    """Back-propagate ``loss`` and step the optimizer, through the fp16 gradient scaler when there is one."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        optimizer.step()
        return
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def _check_finite(
    total: torch.Tensor, step_losses: list[torch.Tensor], state: TrainState, epoch: int, steps_per_epoch: int
) -> None:
    """One check per epoch on the mean loss (a NaN or inf in any step makes the mean non-finite); only when it
    fails are the epoch's step losses searched for the first bad one. Raises before any callback runs, so no
    checkpoint is ever written from a diverged model."""
    if bool(torch.isfinite(total)):
        return
    local = torch.stack(step_losses)
    bad = (~torch.isfinite(local)).nonzero().flatten()
    if len(bad):
        batch = int(bad[0])
        where = f"{float(local[batch])} at step {epoch * steps_per_epoch + batch} (epoch {epoch}, batch {batch})"
    else:  # under DDP: another rank's
        where = f"{float(total)} in epoch {epoch} on another rank"
    last_good = state.last_checkpoint or "none (no epoch finished before it)"
    raise NonFiniteLossError(
        f"the training loss became {where}; last good checkpoint: {last_good}",
        hint="the checkpoint is untouched: lower the learning rate, check the inputs' scale and the teacher's "
        "outputs for inf, then start again (a resume would repeat the same steps).",
    )


def _validate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    logits = predict_logits(model, x)
    return {
        "val_accuracy": float((logits.argmax(1) == y).float().mean()),
        "val_nll": float(F.cross_entropy(logits, y)),
    }
