"""Checkpoints: everything needed to continue a run bit for bit, in ONE safetensors file, written atomically.

A checkpoint holds the student's weights, the optimizer's and the scheduler's state, the random number generators
(torch's global one and the loop's shuffling generator), the epoch, the history, the callbacks' state (early
stopping's best weights) and the loss's state when it has one. Tensors are stored as safetensors tensors; everything
else (nested dicts, lists, numbers) as a JSON "skeleton" in the file's metadata whose leaves point at the tensors.
Nothing is ever unpickled: a file that is not a valid safetensors file is refused with :class:`CheckpointError`.

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

__all__ = ["FORMAT_VERSION", "Checkpoint", "Checkpointer", "load_checkpoint", "restore_state", "save_checkpoint"]

FORMAT_VERSION = 1
_META_KEY = "kdistill_checkpoint"


@dataclass
class Checkpoint:
    """A loaded checkpoint.

    ``epoch``: the last finished epoch (0-based); training resumes at ``epoch + 1``. ``completed``: the run finished
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


def _trainer_state(state: TrainState, rng_by_rank: list[torch.Tensor] | None) -> dict[str, Any]:
    trainer: dict[str, Any] = {
        "optimizer": state.optimizer.state_dict(),
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
    return trainer


def save_checkpoint(
    path: str | os.PathLike[str],
    state: TrainState,
    *,
    completed: bool = False,
    run: dict[str, Any] | None = None,
    rng_by_rank: list[torch.Tensor] | None = None,
) -> Path:
    """Write ``state`` to ``path`` as one safetensors file, atomically (temporary file, fsync, rename).
    ``rng_by_rank``: under DDP, every rank's RNG state (from a gather), so each rank resumes its own dropout draws."""
    tensors: dict[str, torch.Tensor] = {}
    model = {name: t.detach().cpu().clone().contiguous() for name, t in state.model.state_dict().items()}
    tensors |= {f"model/{name}": t for name, t in model.items()}
    skeleton = {
        "format": FORMAT_VERSION,
        "epoch": state.epoch,
        "completed": completed,
        "history": state.history,
        "model": sorted(model),
        "trainer": _pack(_trainer_state(state, rng_by_rank), tensors, "trainer"),
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
    if skeleton.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"{source} has checkpoint format {skeleton.get('format')!r}; this kdistill reads {FORMAT_VERSION}",
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
    )


def restore_state(checkpoint: Checkpoint, state: TrainState) -> int:
    """Load ``checkpoint`` into a freshly built ``state`` (same model, optimizer, scheduler, callbacks and loss);
    returns the epoch to start from."""
    trainer = checkpoint.trainer
    try:
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
    return checkpoint.epoch + 1


class Checkpointer(Callback):
    """Saves a checkpoint to ``path`` after every epoch, and a final one (``completed``) at the end of training.

    Put it LAST in the callbacks, so that it records the other callbacks' state after their own ``on_epoch_end``.
    Only rank 0 writes under distributed training. ``run`` is stored as is (the config and data fingerprints that a
    resume compares against).
    """

    def __init__(self, path: str | os.PathLike[str], *, run: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.run = run or {}

    def on_epoch_end(self, state: TrainState) -> None:
        rng_by_rank = _rng_by_rank(state)
        if state.rank == 0:
            save_checkpoint(self.path, state, run=self.run, rng_by_rank=rng_by_rank)
        state.last_checkpoint = f"{self.path} (epoch {state.epoch})"

    def on_train_end(self, state: TrainState) -> None:
        rng_by_rank = _rng_by_rank(state)
        if state.rank == 0:
            save_checkpoint(self.path, state, completed=True, run=self.run, rng_by_rank=rng_by_rank)
