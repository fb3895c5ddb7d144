"""Checkpoints: everything needed to continue a run bit for bit, in ONE safetensors file, written atomically.

A checkpoint holds the student's weights, the optimizer's and the scheduler's state, the random number generators
(torch's global one and the loop's shuffling generator), the epoch, the history, the callbacks' state (early stopping's
best weights) and the loss's state when it has one. A mid-epoch checkpoint (``Checkpointer(..., every_steps=N)``) also
holds its position in the epoch, the shuffling generator's state at the epoch's start (the epoch's order is drawn again
on resume), the loss terms of the epoch's finished steps (so the epoch's logged means come out the same) and the
teacher-output source's state (the augmentation generator), each rank's own under DDP. Tensors are stored as safetensors
tensors; everything else (nested dicts, lists, numbers) as a JSON "skeleton" in the file's metadata whose leaves point
at the tensors. Nothing is ever unpickled: a file that is not a valid safetensors file is refused with
:class:`CheckpointError`.

One file means one atomic rename: a crash (or SIGKILL) while saving leaves the previous checkpoint in place, whole.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_save

from kdistill.engine.callbacks import Callback
from kdistill.errors import CheckpointError
from kdistill.io import atomic_write_bytes

if TYPE_CHECKING:
    from kdistill.engine.loop import TrainState

__all__ = [
    "FORMAT_VERSION",
    "MID_EPOCH_FORMAT_VERSION",
    "Checkpoint",
    "Checkpointer",
    "full_model_state",
    "load_checkpoint",
    "load_full_model_state",
    "restore_state",
    "save_checkpoint",
]

FORMAT_VERSION = 1
MID_EPOCH_FORMAT_VERSION = 2
"""Mid-epoch checkpoints carry a format of their own, so that a kdistill that cannot resume inside an epoch refuses
them instead of silently replaying the cut epoch with another order. Epoch-end checkpoints keep format 1."""
_READABLE = (FORMAT_VERSION, MID_EPOCH_FORMAT_VERSION)
_META_KEY = "kdistill_checkpoint"


@dataclass
class Checkpoint:
    """A loaded checkpoint.

    ``epoch``: the last finished epoch (0-based); training resumes at ``epoch + 1``, after its first
    ``step_in_epoch`` optimizer steps (0 for a checkpoint written at an epoch's end). ``completed``: the run finished
    (``model`` then holds the final weights, after early stopping restored the best ones). ``trainer``: the loop's
    state (optimizer, scheduler, RNGs, callbacks, loss). ``run``: what the caller stored (config, fingerprints).
    """

    path: Path
    epoch: int
    completed: bool
    history: list[dict[str, float]]
    model: dict[str, torch.Tensor]
    trainer: dict[str, Any] = field(default_factory=dict)
    run: dict[str, Any] = field(default_factory=dict)
    step_in_epoch: int = 0


def _pack(obj: Any, tensors: dict[str, torch.Tensor], key: str) -> Any:
    """Replace every tensor in ``obj`` by ``{"__tensor__": name}`` (the tensor goes to ``tensors[name]``)."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().clone().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__items__": [[k, _pack(v, tensors, f"{key}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_pack(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_pack(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise CheckpointError(
        f"cannot store a {type(obj).__name__} at {key!r} in a checkpoint",
        hint="state_dict() must hold only tensors, numbers, strings, lists, tuples and dicts.",
    )


def _unpack(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_unpack(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(_unpack(v, tensors) for v in obj["__tuple__"])
        return {k: _unpack(v, tensors) for k, v in obj["__items__"]}
    return obj


def _rng_by_rank(state: TrainState) -> list[torch.Tensor]:
    """Every rank's torch RNG state (dropout draws differ between ranks). A collective: all ranks must call it."""
    local = torch.get_rng_state()
    if state.world_size == 1:
        return [local]
    import torch.distributed as dist

    gathered = [torch.empty_like(local) for _ in range(state.world_size)]
    dist.all_gather(gathered, local)
    return gathered


def _rank_local(state: TrainState) -> dict[str, torch.Tensor]:
    """What differs between ranks in the middle of an epoch: the epoch's step terms so far (name -> (steps,)) and the
    teacher-output source's tensors (the augmentation generator's state)."""
    local = {f"terms.{name}": torch.stack([terms[name] for terms in state.epoch_terms]) for name in _term_names(state)}
    source_state = state.teacher_source.state_dict() if state.teacher_source is not None else {}
    local |= {f"source.{key}": value for key, value in source_state.items() if isinstance(value, torch.Tensor)}
    return local


def _term_names(state: TrainState) -> list[str]:
    return list(state.epoch_terms[0]) if state.epoch_terms else []


def _gather_by_rank(state: TrainState, local: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Every rank's ``local`` tensors (same names and shapes on every rank). A collective: all ranks must call it."""
    if state.world_size == 1:
        return [local]
    import torch.distributed as dist

    by_rank: list[dict[str, torch.Tensor]] = [{} for _ in range(state.world_size)]
    for name, value in local.items():
        gathered = [torch.empty_like(value) for _ in range(state.world_size)]
        dist.all_gather(gathered, value.contiguous())
        for rank, tensor in enumerate(gathered):
            by_rank[rank][name] = tensor
    return by_rank


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model``'s parameters are FSDP2 shards (DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(parameter, DTensor) for parameter in model.parameters())


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()``; for a model sharded by FSDP2, its whole tensors gathered on every rank (a
    collective: all ranks must call it)."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {name: value.detach().cpu() for name, value in full.items() if isinstance(value, torch.Tensor)}


def load_full_model_state(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """``model.load_state_dict(weights)``; for a model sharded by FSDP2, each rank keeps its shards of the whole
    ``weights`` (a collective)."""
    if not is_sharded(model):
        model.load_state_dict(weights)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, dict(weights.items()), options=StateDictOptions(full_state_dict=True))


def _sharded_states(state: TrainState) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """For an FSDP2 student, its whole weights and its optimizer's whole state (keyed by parameter name, as
    ``torch.distributed.checkpoint.state_dict`` writes it), gathered on every rank: a collective, so the
    checkpointer calls it on all ranks before rank 0 writes. None for an ordinary student."""
    if not is_sharded(state.model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    optimizer = get_optimizer_state_dict(state.model, state.optimizer, options=options)
    return full_model_state(state.model), optimizer


def _trainer_state(
    state: TrainState, rng_by_rank: list[torch.Tensor] | None, optimizer_state: dict[str, Any] | None = None
) -> dict[str, Any]:
    trainer: dict[str, Any] = {
        "optimizer": state.optimizer.state_dict() if optimizer_state is None else optimizer_state,
        "sharded": optimizer_state is not None,
        "torch_rng": torch.get_rng_state(),
        "torch_rng_by_rank": rng_by_rank or [torch.get_rng_state()],
        "stop": state.stop,
        "global_step": state.global_step,
        "callbacks": [callback.state_dict() for callback in state.callbacks],
    }
    if state.scheduler is not None:
        trainer["scheduler"] = state.scheduler.state_dict()
    if state.generator is not None:
        trainer["generator"] = state.generator.get_state()
    if state.scaler is not None:
        trainer["scaler"] = state.scaler.state_dict()
    if torch.cuda.is_available() and next(state.model.parameters()).is_cuda:
        trainer["cuda_rng"] = torch.cuda.get_rng_state()
    loss_state = getattr(state.loss_fn, "state_dict", None)
    if callable(loss_state):
        trainer["loss"] = loss_state()
    if state.teacher_source is not None:
        trainer["teacher_source"] = state.teacher_source.state_dict()
    return trainer


def save_checkpoint(
    path: str | os.PathLike[str],
    state: TrainState,
    *,
    completed: bool = False,
    run: dict[str, Any] | None = None,
    rng_by_rank: list[torch.Tensor] | None = None,
    mid_epoch: bool = False,
    rank_local: list[dict[str, torch.Tensor]] | None = None,
    sharded: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None,
) -> Path:
    """Write ``state`` to ``path`` as one safetensors file, atomically (temporary file, fsync, rename).
    ``rng_by_rank``: under DDP, every rank's RNG state (from a gather), so each rank resumes its own dropout draws.
    ``mid_epoch``: a checkpoint after ``state.step_in_epoch`` steps of epoch ``state.epoch`` (resumed there);
    ``rank_local``: every rank's mid-epoch tensors (from a gather; this process's own when None). ``sharded``: an
    FSDP2 student's gathered weights and optimizer state (:func:`_sharded_states`), saved instead of the shards."""
    tensors: dict[str, torch.Tensor] = {}
    weights = state.model.state_dict() if sharded is None else sharded[0]
    model = {name: t.detach().cpu().clone().contiguous() for name, t in weights.items()}
    tensors |= {f"model/{name}": t for name, t in model.items()}
    trainer = _trainer_state(state, rng_by_rank, None if sharded is None else sharded[1])
    if mid_epoch:
        assert state.epoch_generator is not None, "the loop records the generator's state at each epoch's start"
        trainer["epoch_generator"] = state.epoch_generator
        trainer["rank_local"] = rank_local or [_rank_local(state)]
    skeleton = {
        "format": MID_EPOCH_FORMAT_VERSION if mid_epoch else FORMAT_VERSION,
        "epoch": state.epoch - 1 if mid_epoch else state.epoch,
        "step_in_epoch": state.step_in_epoch if mid_epoch else 0,
        "completed": completed,
        "history": state.history,
        "model": sorted(model),
        "trainer": _pack(trainer, tensors, "trainer"),
        "run": run or {},
    }
    metadata = {_META_KEY: json.dumps(skeleton)}
    return atomic_write_bytes(path, safetensors_save(tensors, metadata=metadata))


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`. Only safetensors and JSON are parsed, never a pickle."""
    source = Path(path)
    if not source.is_file():
        raise CheckpointError(f"no checkpoint at {source}", hint="start the run without --resume.")
    try:
        with safe_open(str(source), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not a dict)
        skeleton = json.loads(metadata[_META_KEY])
    except (SafetensorError, OSError, ValueError, KeyError) as exc:
        raise CheckpointError(
            f"{source} is not a readable kdistill checkpoint ({type(exc).__name__}: {exc})",
            hint="the file is corrupt, truncated or not a checkpoint; delete the run folder and start again.",
        ) from exc
    if skeleton.get("format") not in _READABLE:
        raise CheckpointError(
            f"{source} has checkpoint format {skeleton.get('format')!r}; this kdistill reads {list(_READABLE)}",
            hint="resume with the kdistill version that wrote it, or start the run again.",
        )
    return Checkpoint(
        path=source,
        epoch=int(skeleton["epoch"]),
        completed=bool(skeleton["completed"]),
        history=skeleton["history"],
        model={name: tensors[f"model/{name}"] for name in skeleton["model"]},
        trainer=_unpack(skeleton["trainer"], tensors),
        run=skeleton["run"],
        step_in_epoch=int(skeleton.get("step_in_epoch", 0)),
    )


def restore_state(checkpoint: Checkpoint, state: TrainState) -> tuple[int, int]:
    """Load ``checkpoint`` into a freshly built ``state`` (same model, optimizer, scheduler, callbacks, loss and
    teacher-output source); returns the epoch to start from and the number of its steps already done."""
    trainer = checkpoint.trainer
    try:
        if is_sharded(state.model):  # whole tensors in the file: each rank keeps its shards of them
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            if not trainer.get("sharded"):
                raise ValueError("it was written by an unsharded (DDP or single-process) run")
            set_state_dict(
                state.model,
                state.optimizer,
                model_state_dict=dict(checkpoint.model.items()),
                optim_state_dict=trainer["optimizer"],
                options=StateDictOptions(full_state_dict=True),
            )
        else:
            state.model.load_state_dict(checkpoint.model)
            state.optimizer.load_state_dict(trainer["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(
            f"the checkpoint {checkpoint.path} does not fit this model or optimizer: {exc}",
            hint="resume with the configuration that wrote it.",
        ) from exc
    if state.scheduler is not None and "scheduler" in trainer:
        state.scheduler.load_state_dict(trainer["scheduler"])
    if state.generator is not None and "generator" in trainer:
        state.generator.set_state(trainer["generator"])
    if state.scaler is not None and "scaler" in trainer:
        state.scaler.load_state_dict(trainer["scaler"])
    if "cuda_rng" in trainer and torch.cuda.is_available():
        torch.cuda.set_rng_state(trainer["cuda_rng"])
    loss_load = getattr(state.loss_fn, "load_state_dict", None)
    if callable(loss_load) and "loss" in trainer:
        loss_load(trainer["loss"])
    for callback, saved in zip(state.callbacks, trainer["callbacks"], strict=False):
        callback.load_state_dict(saved)
    by_rank = trainer.get("torch_rng_by_rank") or []
    same_world = len(by_rank) == state.world_size
    torch.set_rng_state(by_rank[state.rank] if same_world else trainer["torch_rng"])
    state.history = list(checkpoint.history)
    state.epoch = checkpoint.epoch
    state.stop = bool(trainer["stop"])
    state.global_step = int(trainer["global_step"])
    state.last_checkpoint = f"{checkpoint.path} (epoch {checkpoint.epoch})"
    source_state = dict(trainer.get("teacher_source") or {})
    if checkpoint.step_in_epoch:
        _restore_mid_epoch(checkpoint, state, source_state)
    if state.teacher_source is not None:
        state.teacher_source.load_state_dict(source_state)
    return checkpoint.epoch + 1, checkpoint.step_in_epoch


def _restore_mid_epoch(checkpoint: Checkpoint, state: TrainState, source_state: dict[str, Any]) -> None:
    """The epoch's order comes back from its start; this rank's step terms and teacher-source tensors from its own
    share of the gathered ones (rank 0's when the number of ranks changed)."""
    trainer = checkpoint.trainer
    if state.generator is not None:
        state.generator.set_state(trainer["epoch_generator"])
    by_rank = trainer["rank_local"]
    local = by_rank[state.rank] if len(by_rank) == state.world_size else by_rank[0]
    steps = checkpoint.step_in_epoch
    terms = {name.removeprefix("terms."): value for name, value in local.items() if name.startswith("terms.")}
    state.epoch_terms = [{name: value[step] for name, value in terms.items()} for step in range(steps)]
    source_state |= {name.removeprefix("source."): v for name, v in local.items() if name.startswith("source.")}
    state.step_in_epoch = steps
    state.last_checkpoint = f"{checkpoint.path} (epoch {checkpoint.epoch + 1}, step {steps})"


class Checkpointer(Callback):
    """Saves a checkpoint to ``path`` after every epoch, and a final one (``completed``) at the end of training;
    with ``every_steps=N`` also after every N-th optimizer step (counted over the whole run) inside an epoch, from
    which a resumed run continues at the next step (bit for bit on the CPU).

    Put it LAST in the callbacks, so that it records the other callbacks' state after their own hooks. Only rank 0
    writes under distributed training. ``run`` is stored as is (the config and data fingerprints that a resume
    compares against). Before a mid-epoch save the epoch's losses so far are checked: a NaN or inf raises
    :class:`~kdistill.errors.NonFiniteLossError` and the previous checkpoint stays.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, run: dict[str, Any] | None = None, every_steps: int | None = None
    ) -> None:
        if every_steps is not None and (
            isinstance(every_steps, bool) or int(every_steps) != every_steps or every_steps < 1
        ):
            raise CheckpointError(f"every_steps must be a whole number >= 1, got {every_steps!r}", hint="or None.")
        self.path = Path(path)
        self.run = run or {}
        self.every_steps = every_steps

    def on_batch_end(self, state: TrainState, terms: dict[str, torch.Tensor]) -> None:
        if self.every_steps is None or state.global_step % self.every_steps:
            return
        if state.step_in_epoch >= state.steps_per_epoch:  # the epoch's end: on_epoch_end saves after validation
            return
        state.raise_if_diverged()
        rng_by_rank = _rng_by_rank(state)
        rank_local = _gather_by_rank(state, _rank_local(state))
        sharded = _sharded_states(state)
        if state.rank == 0:
            save_checkpoint(
                self.path,
                state,
                run=self.run,
                rng_by_rank=rng_by_rank,
                mid_epoch=True,
                rank_local=rank_local,
                sharded=sharded,
            )
        state.last_checkpoint = f"{self.path} (epoch {state.epoch}, step {state.step_in_epoch})"

    def on_epoch_end(self, state: TrainState) -> None:
        rng_by_rank = _rng_by_rank(state)
        sharded = _sharded_states(state)
        if state.rank == 0:
            save_checkpoint(self.path, state, run=self.run, rng_by_rank=rng_by_rank, sharded=sharded)
        state.last_checkpoint = f"{self.path} (epoch {state.epoch})"

    def on_train_end(self, state: TrainState) -> None:
        rng_by_rank = _rng_by_rank(state)
        sharded = _sharded_states(state)
        if state.rank == 0:
            save_checkpoint(self.path, state, completed=True, run=self.run, rng_by_rank=rng_by_rank, sharded=sharded)
