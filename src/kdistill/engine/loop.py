"""The training loop, short enough to read in one sitting.

*What* is trained is given to :func:`fit`: the student, the loss, a data source (:mod:`kdistill.engine.batches`),
a teacher-output source chosen once before the loop (:mod:`kdistill.engine.sources`), a validation callable, and
callbacks for everything optional (early stopping, checkpoints, logs). *How* is :class:`TrainConfig`: optimizer,
schedule, precision, gradient accumulation and clipping. The loop itself knows how to resume (at an epoch's start or
in the middle of one), stop on a NaN/inf loss, autocast, and run under torchrun (DDP).

One optimizer step, as :func:`_train_step` does it::

    zero the gradients
    for each micro-batch (its teacher outputs beside it):        # grad_accumulation of them, else one
        terms = loss(student(inputs), teacher_outputs, target)   # a dict: "loss" and the method's parts
        backward(terms["loss"] * batch.weight)                   # under DDP, gradients sync on the last one only
    clip the gradient norm (after unscaling fp16), step the optimizer
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, overload

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kdistill import defaults
from kdistill.engine.batches import Batch, DataSource, InMemorySource, Inputs, micro_batches, rows_of
from kdistill.engine.callbacks import Callback
from kdistill.engine.live import Augment
from kdistill.engine.on_policy import OnPolicy, OnPolicySource
from kdistill.engine.sources import Step, TeacherSource, choose_teacher_source
from kdistill.errors import ConfigError, DataError, KdistillError, NonFiniteLossError
from kdistill.features import capture_features
from kdistill.losses.base import Loss, defines_hook
from kdistill.losses.prepare import prepare_loss
from kdistill.teachers.base import Outputs, Teacher

if TYPE_CHECKING:
    from kdistill.engine.checkpoint import Checkpoint

__all__ = [
    "TrainConfig",
    "TrainState",
    "TransferSet",
    "Validate",
    "auto_threads",
    "effective_weight_decay",
    "fit",
    "num_threads",
    "predict_logits",
    "validate_classification",
]

SCHEDULES = ("warmup_cosine", "warmup_linear", "constant")
"""The learning-rate schedules :class:`TrainConfig` accepts (each a multiplier of ``lr`` by optimizer step)."""

Validate = Callable[[nn.Module, Any], Mapping[str, float]]
"""``validate(model, val) -> {"val_...": value}``: the epoch's validation metrics (model in eval mode is the
callable's business; :func:`validate_classification` is the default)."""


@dataclass(frozen=True)
class TrainConfig:
    """How to train. ``num_threads="auto"`` picks 1 thread for small students (on 2 busy cores one thread was
    4-9x faster per step for tiny models than two) and up to 4 otherwise; the caller's setting is restored after.

    ``optimizer``: ``"adamw"`` or ``"sgd"`` (with ``momentum``). ``schedule``: ``"warmup_cosine"`` (linear warm-up over
    ``warmup_fraction`` of the steps, or ``warmup_steps`` steps when set, then cosine decay to 0), ``"warmup_linear"``
    (the same warm-up, then linear decay to 0) or ``"constant"``. ``max_steps``: train exactly that many optimizer
    steps, taking as many passes over the data as needed (the last one stops mid-pass; ``epochs`` is then ignored),
    and the schedule runs over those steps. ``eval_every_steps``: also validate every N optimizer steps (counted
    over the run), each evaluation a row of the history with its ``step``, besides the row of each epoch's end.
    ``parallel``: under torchrun, ``"ddp"`` (DistributedDataParallel: every rank holds the whole student) or
    ``"fsdp"`` (``torch.distributed.fsdp.fully_shard``: the student's parameters, gradients and optimizer state
    are sharded over the ranks, for a student that does not fit one device; see :func:`_sharded_copy`).
    ``precision``: ``"fp32"``, or ``"bf16"``/``"fp16"`` autocast for the forward pass and the loss (fp16 on CUDA
    uses a gradient scaler).
    ``batch_size`` is the global batch of one optimizer step: under torchrun each of the N ranks takes 1/N of every
    batch. ``grad_accumulation``: each rank's share of a batch is cut into that many micro-batches, back-propagated
    one after the other (each loss weighted by its share of the rows; for token-level batches, of the real tokens)
    before one optimizer step, so the step's
    gradient is the whole batch's mean gradient with a fraction of the activations' memory; the schedule counts
    optimizer steps, as without it. ``clip_grad_norm``: the largest total gradient norm (over the student and the
    loss's learned parts, after unscaling fp16) before each step, None for no clipping. The optimizer defaults are
    :mod:`kdistill.defaults` (a strongly regularised AdamW, measured there).

    ``scale_weight_decay``: ``weight_decay`` is the decay for the labelled rows. A partly labelled transfer set (a
    ``label_mask``: unlabeled or generated rows that the teacher labels) of N rows, L of them labelled, has N/L times
    the optimizer steps per epoch, and AdamW's decoupled decay acts on every step; the engine then decays by
    ``weight_decay * sqrt(L / N)`` (:func:`effective_weight_decay`), Loshchilov & Hutter's normalised weight decay
    (ICLR 2019, ``lambda = lambda_norm * sqrt(b / (B * T))``) with the labelled rows as the reference. On MNIST-1D
    with 50k unlabeled rows beside 3.6k labelled ones it lifted the MLP student from 87.9% to 93.3% at 20 epochs
    (docs/scarce_labels.md). False: ``weight_decay`` as given."""

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
    grad_accumulation: int = 1
    clip_grad_norm: float | None = None
    max_steps: int | None = None
    warmup_steps: int | None = None
    eval_every_steps: int | None = None
    parallel: str = "ddp"
    scale_weight_decay: bool = True

    def __post_init__(self) -> None:
        for name in ("max_steps", "warmup_steps", "eval_every_steps"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be a whole number >= 1 or None, got {value!r}", hint="e.g. 1000.")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r}", hint=f"use one of {', '.join(SCHEDULES)}.")
        if self.parallel not in ("ddp", "fsdp"):
            raise ConfigError(f"unknown parallel mode {self.parallel!r}", hint="use 'ddp' or 'fsdp'.")
        if isinstance(self.grad_accumulation, bool) or not isinstance(self.grad_accumulation, int):
            raise ConfigError(
                f"grad_accumulation must be a whole number, got {self.grad_accumulation!r}", hint="use 1 for none."
            )
        if self.grad_accumulation < 1:
            raise ConfigError(f"grad_accumulation must be >= 1, got {self.grad_accumulation}", hint="use 1 for none.")
        if self.clip_grad_norm is not None and not (self.clip_grad_norm > 0 and math.isfinite(self.clip_grad_norm)):
            raise ConfigError(
                f"clip_grad_norm must be a positive number or None, got {self.clip_grad_norm!r}",
                hint="1.0 is a common choice; None turns clipping off.",
            )


@dataclass(frozen=True)
class TransferSet:
    """The rows the student learns from, in memory. ``x``: (rows, *features) or a mapping of (rows, ...) tensors;
    ``teacher_logits``: (rows, classes), aligned with ``x`` row for row, computed once before training. ``y`` is None
    for unlabeled rows; ``label_mask`` (rows,) bool marks the labelled ones of a partly labelled set."""

    x: Inputs
    y: torch.Tensor | None
    teacher_logits: torch.Tensor | None
    label_mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        rows = rows_of(self.x)
        for name in ("y", "teacher_logits", "label_mask"):
            value = getattr(self, name)
            if value is not None and len(value) != rows:
                raise KdistillError(f"transfer set {name} has {len(value)} rows, x has {rows}")


@dataclass
class TrainState:
    """What callbacks see: the model, the epoch (0-based), every epoch's metrics so far, and a stop flag; and what a
    checkpoint saves (optimizer, scheduler, shuffling generator, gradient scaler, loss, callbacks, teacher-output
    source). ``model`` is the plain module, never the DistributedDataParallel wrapper. ``last_checkpoint`` is set by
    the checkpoint callback. ``global_step`` counts optimizer steps over the run (the schedule plans ``total_steps``),
    ``step_in_epoch`` within the epoch (of ``steps_per_epoch``); ``epoch_terms`` holds the epoch's step terms so far
    (detached), ``epoch_generator`` the shuffling generator's state at the epoch's start (what a mid-epoch checkpoint
    resumes from)."""

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
    steps_per_epoch: int = 0
    total_steps: int = 0
    step_in_epoch: int = 0
    epoch_terms: list[dict[str, torch.Tensor]] = field(default_factory=list)
    epoch_generator: torch.Tensor | None = None
    teacher_source: TeacherSource | None = None

    def raise_if_diverged(self) -> None:
        """Raise :class:`~kdistill.errors.NonFiniteLossError` when a loss of this epoch so far is NaN or inf (one
        check on their sum; a collective under DDP). Checkpointers call it before saving mid-epoch."""
        if not self.epoch_terms:
            return
        total = torch.stack([terms["loss"] for terms in self.epoch_terms]).float().sum()
        if self.world_size > 1:
            dist.all_reduce(total)
        _check_finite(total, [terms["loss"] for terms in self.epoch_terms], self, self.epoch, self.steps_per_epoch)


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


def _lr_lambda(
    total_steps: int, warmup_fraction: float, schedule: str = "warmup_cosine", warmup_steps: int | None = None
) -> Callable[[int], float]:
    """The multiplier of ``lr`` at optimizer step ``step`` (0-based): ``(step + 1) / warmup`` during the warm-up
    (``warmup_steps``, else ``warmup_fraction`` of ``total_steps``, at least 1), then over the remaining steps
    ``½(1 + cos(π·progress))`` (cosine) or ``1 - progress`` (linear), ``progress`` going from 0 to 1."""
    if schedule == "constant":
        return lambda step: 1.0
    warmup = warmup_steps if warmup_steps is not None else max(1, int(total_steps * warmup_fraction))

    def warmup_decay(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 1.0 - progress if schedule == "warmup_linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return warmup_decay


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, *, batch_size: int = 1024) -> torch.Tensor:
    """The model's logits for ``x`` in eval mode, batched: (rows, classes) float32 on the CPU."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    parts = [model(x[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)]
    model.train(was_training)
    return torch.cat(parts)


@overload
def fit(
    model: nn.Module,
    loss_fn: Loss,
    train: TransferSet | DataSource,
    *,
    val: tuple[torch.Tensor, torch.Tensor] | None = None,
    config: TrainConfig = TrainConfig(),
    callbacks: Sequence[Callback] = (),
    teacher: Teacher | None = None,
    resume: Checkpoint | None = None,
    augment: Augment | None = None,
    prefetch_teacher: bool = False,
    teacher_source: TeacherSource | None = None,
    validate: None = None,
    on_policy: OnPolicy | None = None,
) -> TrainState: ...


@overload
def fit(
    model: nn.Module,
    loss_fn: Loss,
    train: TransferSet | DataSource,
    *,
    val: Any,
    config: TrainConfig = TrainConfig(),
    callbacks: Sequence[Callback] = (),
    teacher: Teacher | None = None,
    resume: Checkpoint | None = None,
    augment: Augment | None = None,
    prefetch_teacher: bool = False,
    teacher_source: TeacherSource | None = None,
    validate: Validate,
    on_policy: OnPolicy | None = None,
) -> TrainState: ...


def fit(
    model: nn.Module,
    loss_fn: Loss,
    train: TransferSet | DataSource,
    *,
    val: Any = None,
    config: TrainConfig = TrainConfig(),
    callbacks: Sequence[Callback] = (),
    teacher: Teacher | None = None,
    resume: Checkpoint | None = None,
    augment: Augment | None = None,
    prefetch_teacher: bool = False,
    teacher_source: TeacherSource | None = None,
    validate: Validate | None = None,
    on_policy: OnPolicy | None = None,
) -> TrainState:
    """Train ``model`` in place on ``train`` with ``loss_fn`` and return the final state (its history included).

    ``train``: a :class:`TransferSet` (in memory, with precomputed ``teacher_logits`` or not) or any data source
    (:class:`~kdistill.engine.batches.InMemorySource`, :class:`~kdistill.engine.batches.StreamingSource`). Each step
    takes a shuffled batch of rows and the teacher's outputs for exactly those rows (``Batch.index``), so targets can
    never drift from the rows they supervise. The teacher-output source is ``teacher_source`` when given, else
    chosen from ``teacher``, the transfer set's logits and ``augment`` by
    :func:`~kdistill.engine.sources.choose_teacher_source`. Seeded: the same seed gives bit-identical weights on the
    CPU.

    ``val`` is handed to ``validate(model, val)`` after each epoch (default :func:`validate_classification`, which
    takes ``(x, y)`` and returns ``val_accuracy`` and ``val_nll``; with another ``validate``, ``val`` is whatever it
    reads). ``resume``: a checkpoint of this same run (see
    :mod:`kdistill.engine.checkpoint`); training continues after its epoch, or at the step after a mid-epoch one, and
    ends with the same weights as a run that was never interrupted. A NaN or inf loss raises
    :class:`~kdistill.errors.NonFiniteLossError` naming the step, before any epoch callback (so no checkpoint) sees
    it. Under an initialised ``torch.distributed`` process group, the model is wrapped in DistributedDataParallel and
    each rank trains on its share of every batch.

    With ``augment(x, generator)``, each batch is augmented (drawing from a generator seeded from ``seed`` and the
    epoch, so a resumed run replays the same augmentations) and the live ``teacher`` labels the augmented batch
    (precomputed teacher logits are not used); ``prefetch_teacher=True`` prepares the next batch in a background
    thread (:mod:`kdistill.engine.live`).

    ``on_policy``: GKD's on-policy data (:class:`~kdistill.engine.on_policy.OnPolicy`): the teacher-output source is
    wrapped so that with probability λ a step's batch is the student's own continuations, labelled by the live
    ``teacher`` (:class:`~kdistill.engine.on_policy.OnPolicySource`).
    """
    device = torch.device(config.device)
    threads = auto_threads(model, config.batch_size) if config.num_threads == "auto" else int(config.num_threads)
    data, logits = _as_source(train, device)
    plain, sharded = model, config.parallel == "fsdp" and _world()[1] > 1
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), num_threads(threads):
        torch.manual_seed(config.seed)
        model = _sharded_copy(plain, device) if sharded else plain.to(device)
        if isinstance(loss_fn, nn.Module):
            loss_fn.to(device)
        # losses with lazily built parts (projectors, embeddings) build them on a dry batch, before the optimizer
        _prepare_loss(loss_fn, model, data, logits, teacher, config.batch_size)
        if teacher_source is None:
            teacher_source = choose_teacher_source(
                loss_fn,
                data,
                teacher=teacher,
                logits=logits,
                augment=augment,
                seed=config.seed,
                prefetch=prefetch_teacher,
            )
        if on_policy is not None:
            from kdistill.losses.kd_topk import KDTopKLoss

            if teacher is None:
                raise ConfigError("on-policy data needs the live teacher to label the student's continuations",
                                  hint="pass teacher= to fit().")  # fmt: skip
            if isinstance(loss_fn, KDTopKLoss):
                raise ConfigError(
                    "on-policy batches are labelled by the live teacher with dense logits, which kd_topk cannot read",
                    hint="use a token divergence (forward_kl, gjsd, ...): each reads a top-k cache and dense logits.",
                )
            teacher_source = OnPolicySource(teacher_source, teacher, model, on_policy, rank=_world()[0])
        state = _fit(
            model, loss_fn, data, teacher_source, val, validate or validate_classification, config, callbacks, resume
        )
    if sharded:  # every rank ends with the whole trained student in the caller's module, as under DDP
        from kdistill.engine.checkpoint import full_model_state

        plain.load_state_dict(full_model_state(model))
        state.model = plain.eval()
    return state


def _as_source(train: TransferSet | DataSource, device: torch.device) -> tuple[DataSource, torch.Tensor | None]:
    """The data source on ``device``, and the transfer set's precomputed teacher logits (None for other sources)."""
    if isinstance(train, TransferSet):
        logits = None if train.teacher_logits is None else train.teacher_logits.to(device)
        return InMemorySource(train.x, train.y, label_mask=train.label_mask).to(device), logits
    if isinstance(train, DataSource):
        return train.to(device), None
    raise ConfigError(
        f"fit() trains on a TransferSet or a data source, got {type(train).__name__}",
        hint="wrap tensors as TransferSet(x, y, teacher_logits), or a Dataset as StreamingSource(dataset).",
    )


def _prepare_loss(
    loss_fn: Loss,
    model: nn.Module,
    data: DataSource,
    logits: torch.Tensor | None,
    teacher: Teacher | None,
    batch_size: int,
) -> None:
    if isinstance(data, InMemorySource):  # tensor or mapping inputs
        prepare_loss(loss_fn, model, data.inputs, logits, teacher, batch_size=batch_size)
    elif defines_hook(loss_fn, "prepare"):
        raise ConfigError(
            f"the loss {type(loss_fn).__name__} builds its parts from a dry batch of the whole transfer set, which "
            f"needs the rows in memory as one tensor; got a {type(data).__name__}",
            hint="train it on a TransferSet or InMemorySource with tensor inputs, or use a method without learned "
            "parts (kd, dkd, ...).",
        )


def effective_weight_decay(config: TrainConfig, labelled: int, rows: int) -> float:
    """The decay the optimizer uses for a transfer set of ``rows`` rows, ``labelled`` of them with labels:
    ``config.weight_decay * sqrt(labelled / rows)`` when ``config.scale_weight_decay`` (see :class:`TrainConfig`),
    else ``config.weight_decay``. No labelled row (a teacher-only set) or no row: unchanged."""
    if not config.scale_weight_decay or labelled <= 0 or rows <= 0:
        return config.weight_decay
    return config.weight_decay * math.sqrt(min(labelled, rows) / rows)


def _labelled_rows(data: DataSource) -> tuple[int, int]:
    """(labelled rows, rows) of a source: its ``label_mask``'s count, else every row (streamed sources too)."""
    mask = getattr(data, "label_mask", None)
    rows = len(data)
    return (rows, rows) if mask is None else (int(mask.sum()), rows)


def _optimizer(model: nn.Module, loss_fn: Loss, config: TrainConfig, decay: float) -> torch.optim.Optimizer:
    """The run's optimizer over the student and the loss's trainable parts, with weight decay ``decay``
    (:func:`effective_weight_decay`)."""
    params = list(model.parameters())
    if isinstance(loss_fn, nn.Module):  # methods with trainable parts (projectors) learn with the student
        params += [p for p in loss_fn.parameters() if p.requires_grad]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, weight_decay=decay, momentum=config.momentum)
    raise ConfigError(f"unknown optimizer {config.optimizer!r}", hint="use 'adamw' or 'sgd'.")


def _autocast(device: str, precision: str) -> contextlib.AbstractContextManager[Any]:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def _world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _fit(
    model: nn.Module,
    loss_fn: Loss,
    data: DataSource,
    teacher_source: TeacherSource,
    val: Any,
    validate: Validate,
    config: TrainConfig,
    callbacks: Sequence[Callback],
    resume: Checkpoint | None,
) -> TrainState:
    device = torch.device(config.device)
    steps_per_epoch = math.ceil(len(data) / config.batch_size)
    epochs = config.epochs if config.max_steps is None else math.ceil(config.max_steps / steps_per_epoch)
    total_steps = steps_per_epoch * epochs if config.max_steps is None else config.max_steps
    rank, world_size = _world()
    sharded = world_size > 1 and config.parallel == "fsdp"
    optimizer = _optimizer(model, loss_fn, config, effective_weight_decay(config, *_labelled_rows(data)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(total_steps, config.warmup_fraction, config.schedule, config.warmup_steps)
    )
    state = TrainState(
        model=model,
        optimizer=optimizer,
        max_epochs=epochs,
        scheduler=scheduler,
        generator=torch.Generator().manual_seed(config.seed),
        scaler=torch.amp.GradScaler("cuda") if config.precision == "fp16" and device.type == "cuda" else None,
        loss_fn=loss_fn,
        callbacks=callbacks,
        rank=rank,
        world_size=world_size,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        teacher_source=teacher_source,
    )
    first_epoch, first_step = 0, 0
    if resume is not None:
        from kdistill.engine.checkpoint import restore_state

        first_epoch, first_step = restore_state(resume, state)
    forward: nn.Module = model
    if world_size > 1 and not sharded:  # the same global batch as one process: rank r takes the r-th slice
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    features = tuple(loss_fn.student_features)
    step_hooks = [callback for callback in callbacks if type(callback).on_batch_end is not Callback.on_batch_end]
    for callback in callbacks:
        callback.on_train_begin(state)

    start_epoch = getattr(loss_fn, "start_epoch", None)  # optional hook: warm-ups and schedules inside a loss
    for epoch in range(first_epoch, epochs):
        if state.stop:  # resumed from the checkpoint of the epoch that stopped early
            break
        state.epoch = epoch
        if start_epoch is not None:
            start_epoch(epoch, epochs)
        started = time.perf_counter()
        model.train()
        if first_step == 0:  # else resumed mid-epoch: the checkpoint brought the epoch's steps so far back
            state.step_in_epoch, state.epoch_terms = 0, []
        assert state.generator is not None
        state.epoch_generator = state.generator.get_state()
        batches = data.batches(
            epoch,
            batch_size=config.batch_size,
            rank=rank,
            world_size=world_size,
            generator=state.generator,
            start=first_step,
        )
        first_step = 0
        for step in teacher_source.stream(_steps(batches, config.grad_accumulation), epoch):
            terms = _train_step(step, model, forward, loss_fn, features, optimizer, state.scaler, config)
            scheduler.step()
            state.global_step += 1
            state.step_in_epoch += 1
            state.epoch_terms.append(terms)
            for callback in step_hooks:
                callback.on_batch_end(state, terms)
            finished = config.max_steps is not None and state.global_step >= config.max_steps
            every = config.eval_every_steps
            # an evaluation row every N steps; at an epoch's end (or the last step) the epoch's row follows instead
            if (
                every
                and val is not None
                and state.global_step % every == 0
                and not finished
                and (state.step_in_epoch < steps_per_epoch)
            ):
                recent = state.epoch_terms[-min(every, len(state.epoch_terms)) :]
                state.history.append(_metrics(state, recent, epoch, world_size) | _validated(validate, model, val))
            if state.stop or finished:
                break

        step_terms = state.epoch_terms
        if not step_terms:
            raise DataError(
                f"the data source ({type(data).__name__}) yielded no batch in epoch {epoch}",
                hint="a streaming iterable must start again on each iter(): pass an IterableDataset or a list, not "
                "a generator (which is used up after one epoch).",
            )
        metrics = _metrics(state, step_terms, epoch, world_size)
        if val is not None:
            metrics |= _validated(validate, model, val)
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


def _metrics(state: TrainState, step_terms: list[dict[str, torch.Tensor]], epoch: int, world_size: int) -> dict:
    """A history row's training part: the epoch, the optimizer step, the learning rate and the mean of each loss
    term over ``step_terms`` (averaged over the ranks: every rank sees the same numbers, and the same NaN, which
    raises :class:`~kdistill.errors.NonFiniteLossError` here)."""
    means = {name: torch.stack([terms[name] for terms in step_terms]).float().mean() for name in step_terms[0]}
    if world_size > 1:
        for mean in means.values():
            dist.all_reduce(mean)
            mean /= world_size
    _check_finite(means["loss"], [terms["loss"] for terms in step_terms], state, epoch, state.steps_per_epoch)
    metrics: dict[str, float] = {
        "epoch": float(epoch),
        "step": float(state.global_step),
        "lr": state.optimizer.param_groups[0]["lr"],
    }
    return metrics | {f"train_{name}": float(mean) for name, mean in means.items()}


def _validated(validate: Validate, model: nn.Module, val: Any) -> dict[str, float]:
    return {name: float(value) for name, value in validate(model, val).items()}


def _sharded_copy(model: nn.Module, device: torch.device) -> nn.Module:
    """A copy of the student on ``device``, sharded by FSDP2 (``fully_shard``) over the process group: first every
    block of its layer lists, innermost first (a transformer's blocks: each all-gathers its parameters for its own
    forward and backward, then frees them), then the whole model (the rest: embeddings, head, norms). Each rank then
    holds 1/N of every parameter, gradient and optimizer state on ``device``; the caller's module is left where it
    is and receives the trained weights at the end."""
    from torch.distributed.fsdp import fully_shard

    sharded = copy.deepcopy(model).to(device)
    for module in reversed(list(sharded.modules())):
        if isinstance(module, nn.ModuleList):
            for block in module:
                fully_shard(block)
    fully_shard(sharded)
    return sharded


def _steps(batches: Iterator[Batch], parts: int) -> Iterator[Step]:
    """Each batch as the micro-batches of one optimizer step."""
    for batch in batches:
        yield micro_batches(batch, parts)


def _train_step(
    step: Sequence[tuple[Batch, Outputs | None]],
    model: nn.Module,
    forward: nn.Module,
    loss_fn: Loss,
    features: tuple[str, ...],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    config: TrainConfig,
) -> dict[str, torch.Tensor]:
    """One optimizer step over its micro-batches; returns the step's terms (detached, summed over the weighted
    micro-batches: the step's mean on one process, this rank's weighted share under DDP). ``features``: the student
    features the loss reads."""
    optimizer.zero_grad(set_to_none=True)
    total: dict[str, torch.Tensor] = {}
    last = len(step) - 1
    step = _token_weighted(step)
    for number, (batch, teacher_out) in enumerate(step):
        with _no_sync(forward) if number < last else contextlib.nullcontext():
            with _autocast(config.device, config.precision):
                terms = loss_fn(_student(forward, model, batch.inputs, features), teacher_out, batch.target)
            if batch.weight != 1.0:  # a rank's or micro-batch's share of the step's mean
                terms = {name: value * batch.weight for name, value in terms.items()}
            if scaler is None:
                terms["loss"].backward()
            else:
                scaler.scale(terms["loss"]).backward()
        detached = {name: value.detach() for name, value in terms.items()}
        total = {name: total[name] + value for name, value in detached.items()} if total else detached
    if config.clip_grad_norm is not None:
        if scaler is not None:
            scaler.unscale_(optimizer)
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(parameters, config.clip_grad_norm)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    return total


def _counted_tokens(batch: Batch) -> torch.Tensor | None:
    """How many positions of a token-level batch count for a per-token loss (attention mask True and target not
    -100), as a float tensor; None for a batch of rows ((batch,) targets)."""
    target = batch.target
    if target is None or target.ndim != 2:
        return None
    counted = target != -100
    mask = batch.inputs.get("attention_mask") if isinstance(batch.inputs, Mapping) else None
    if mask is not None and tuple(mask.shape) == tuple(target.shape):
        counted = counted & mask.bool()
    return counted.sum().double()


def _token_weighted(step: Sequence[tuple[Batch, Outputs | None]]) -> Sequence[tuple[Batch, Outputs | None]]:
    """Token-level micro-batches re-weighted by their share of the step's real tokens instead of its rows.

    A per-token loss is a mean over its micro-batch's real tokens; weighting those means by rows gives a different
    loss and gradient than the whole batch whenever padding is uneven (TRL's gradient-accumulation bug). Weighted by
    ``tokens_i / tokens_step`` the micro-batches sum to the whole step's per-token mean. Under DDP the step's token
    count is summed over ranks (one all-reduce of a scalar), so each rank's share is its tokens' share too. Batches
    of rows ((batch,) targets) are returned unchanged."""
    counts = [_counted_tokens(batch) for batch, _ in step]
    if any(count is None for count in counts):
        return step
    rank_weight = sum(batch.weight for batch, _ in step)
    local = torch.stack([c for c in counts if c is not None]) * float(rank_weight != 0.0)
    total = local.sum()
    _, world_size = _world()
    if world_size > 1:
        total = total.to(next(iter(step))[0].index.device)
        dist.all_reduce(total)
    if float(total) == 0.0:
        return step
    share = local * world_size / total
    return [
        (replace(batch, weight=float(weight)), teacher) for (batch, teacher), weight in zip(step, share, strict=True)
    ]


def _student(forward: nn.Module, model: nn.Module, inputs: Inputs, features: tuple[str, ...]) -> Outputs:
    """The student's outputs: ``forward(inputs)``, or ``forward(**inputs)`` for a mapping; an output object with
    ``.logits`` (transformers) gives its logits. ``features`` are captured on the plain ``model``. For token logits
    (batch, seq, vocab) the batch's ``attention_mask`` becomes ``Outputs.mask``, so per-token losses count only the
    real tokens."""
    if not features:
        logits = _logits(forward(**inputs) if isinstance(inputs, Mapping) else forward(inputs))
        return Outputs(logits, mask=_token_mask(inputs, logits))
    with capture_features(model, features) as captured:
        logits = _logits(forward(**inputs) if isinstance(inputs, Mapping) else forward(inputs))
        return Outputs(logits, captured, mask=_token_mask(inputs, logits))


def _token_mask(inputs: Inputs, logits: torch.Tensor) -> torch.Tensor | None:
    """A mapping's ``attention_mask`` when the logits are per token and it covers their (batch, seq) positions."""
    if not isinstance(inputs, Mapping) or logits.ndim != 3:
        return None
    mask = inputs.get("attention_mask")
    return mask if mask is not None and tuple(mask.shape) == tuple(logits.shape[:2]) else None


def _logits(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits


def _no_sync(forward: nn.Module) -> contextlib.AbstractContextManager[Any]:
    """DDP's ``no_sync`` (FSDP2: ``set_requires_gradient_sync(False)``) for a micro-batch that does not step: its
    gradients accumulate locally, and the last micro-batch's backward reduces the sum."""
    no_sync = getattr(forward, "no_sync", None)
    if no_sync is not None:
        return no_sync()
    if hasattr(forward, "set_requires_gradient_sync"):
        return _fsdp_no_sync(forward)
    return contextlib.nullcontext()


@contextmanager
def _fsdp_no_sync(forward: Any) -> Iterator[None]:
    forward.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        forward.set_requires_gradient_sync(True)


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


def validate_classification(model: nn.Module, val: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    """The default validation: ``val = (x, y)``; ``val_accuracy`` (argmax) and ``val_nll`` (mean cross-entropy)."""
    x, y = val
    logits = predict_logits(model, x)
    return {
        "val_accuracy": float((logits.argmax(1) == y).float().mean()),
        "val_nll": float(F.cross_entropy(logits, y)),
    }
