"""``kdistill run``: execute a validated config, checkpointing every epoch, resumable after a kill, under torchrun too.

Order of work, so that every bad input fails before anything is written or trained: validate the config (schema,
files, the user's ``module:attribute`` references), check the run folder (an existing run needs ``--resume``; a
resumed run must have the same config where it matters), load and check the data, build the teacher and its outputs
on the training rows, build and check the student and the loss. Only then is the run folder written:

    <out>/config.json                   the validated config, its resume fingerprint and the data's fingerprint
    <out>/teacher-<key>.safetensors     teacher outputs on the training rows (the cache; ``cache.dir`` moves it)
    <out>/checkpoint-student.safetensors, checkpoint-baseline.safetensors   every epoch, atomically
    <out>/metrics.jsonl                 one line per epoch and phase; tensorboard/ when asked for
    <out>/student.safetensors, history.json, report.json    at the end (``kdistill.load(out)`` reads the student)
    <out>/student.onnx, student.int8.onnx, compression.json   with compression steps

Under ``torchrun --nproc_per_node=N`` each rank runs this same code: rank 0 builds the teacher and writes its outputs,
the other ranks read them (read-only), every rank trains on 1/N of each batch (DistributedDataParallel; gloo on the
CPU, NCCL on GPUs), and only rank 0 writes checkpoints, logs and the report.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save as safetensors_save
from torch import nn

from kdistill.api import DistillResult, _build_report, _check_classes, _check_student, _jsonable, _oof_logits
from kdistill.config import RunConfig, check_references, load_config, resume_fingerprint
from kdistill.config_recipes import TEACHER_RECIPES, import_reference
from kdistill.data import Split, as_split, encode_labels, fingerprint_arrays
from kdistill.engine import EarlyStopping, ProgressBar, TrainConfig, TransferSet, fit
from kdistill.engine.callbacks import Callback
from kdistill.engine.checkpoint import Checkpointer, load_checkpoint
from kdistill.engine.loggers import ConsoleLog, JsonlLogger, TensorBoardLogger
from kdistill.errors import CheckpointError, ConfigError, DataError, KdistillError, StudentError, TeacherError
from kdistill.io import atomic_write_bytes, atomic_write_json
from kdistill.losses import Loss, get_loss
from kdistill.students import build_student
from kdistill.teachers import Outputs, Teacher, TeacherBase, as_teacher, teacher_logits

__all__ = ["RunResult", "run", "validate"]

CONFIG_FILE = "config.json"
_RUN_MARKERS = (CONFIG_FILE, "student.safetensors", "checkpoint-student.safetensors")


@dataclass
class RunResult:
    """What :func:`run` returns: the run folder, the result (None on ranks other than 0), and whether it resumed."""

    folder: Path
    result: DistillResult | None
    resumed: bool
    config: RunConfig


def validate(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> RunConfig:
    """Validate a config file fully (schema, data files, ``module:attribute`` references) without running it."""
    config = load_config(path, tuple(overrides))
    check_references(config)
    return config


def run(
    config: RunConfig | str | os.PathLike[str],
    *,
    overrides: Sequence[str] = (),
    resume: bool = False,
    verbose: bool = True,
) -> RunResult:
    """Run a distillation from a config (a :class:`RunConfig` or a YAML path); see the module docstring.

    ``resume=True`` continues the run in the config's folder from its last checkpoint, and refuses a config that
    differs from the original in what changes the weights (seed, data, teacher, student, method, train, precision).
    """
    if not isinstance(config, RunConfig):
        config = load_config(config, tuple(overrides))
    check_references(config)
    folder = config.run_folder
    saved = _check_folder(folder, config, resume)
    started = time.perf_counter()
    created_group = _init_distributed(config)
    try:
        return _run(config, folder, saved, verbose, started)
    finally:
        if created_group:
            dist.destroy_process_group()


def _check_folder(folder: Path, config: RunConfig, resume: bool) -> dict[str, Any] | None:
    """The saved config.json of the run to resume (None for a new run); refuses a clash either way."""
    saved_file = folder / CONFIG_FILE
    if not resume:
        present = [name for name in _RUN_MARKERS if (folder / name).exists()]
        if present:
            raise ConfigError(
                f"the run folder {folder} already holds a run ({', '.join(present)})",
                hint="pass --resume to continue it, or choose another folder with --set out=PATH.",
            )
        return None
    if not saved_file.is_file():
        raise CheckpointError(
            f"nothing to resume in {folder}: no {CONFIG_FILE}",
            hint="run without --resume to start it, or point out: at the folder of the run to continue.",
        )
    try:
        saved: dict[str, Any] = json.loads(saved_file.read_text())
        before = saved["fingerprint"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"{saved_file} is unreadable ({exc})", hint="start the run again in a new folder."
        ) from exc
    changes = _differences(before, resume_fingerprint(config))
    if changes:
        raise CheckpointError(
            f"cannot resume {folder}: the config changed in what decides the weights: " + "; ".join(changes[:10]),
            hint="resume with the original config (saved in config.json there), or start a new run in another folder.",
        )
    return saved


def _differences(before: Any, after: Any, path: str = "") -> list[str]:
    if isinstance(before, dict) and isinstance(after, dict):
        found: list[str] = []
        for key in sorted(set(before) | set(after), key=str):
            found += _differences(before.get(key), after.get(key), f"{path}.{key}" if path else str(key))
        return found
    return [] if before == after else [f"{path}: {before!r} -> {after!r}"]


def _device(config: RunConfig) -> str:
    kind = config.device.type
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda" and _world_size() > 1:
        kind = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return kind


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _init_distributed(config: RunConfig) -> bool:
    """Join the torchrun process group (gloo on the CPU, NCCL on CUDA); False when not under torchrun."""
    if _world_size() <= 1 or dist.is_initialized():
        return False
    device = _device(config)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return True


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


# ---------------------------------------------------------------------------------------------------- data


def _read_csv(path: Path, label_column: str) -> tuple[np.ndarray, np.ndarray]:
    import csv

    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    if len(rows) < 2:
        raise DataError(f"{path} has no data rows", hint="the first line is the header, then one row per example.")
    header = [name.strip() for name in rows[0]]
    if label_column not in header:
        import difflib

        close = difflib.get_close_matches(label_column, header, n=1)
        raise DataError(
            f"{path} has no column {label_column!r}",
            hint=(f"did you mean {close[0]!r}? " if close else "")
            + f"set label_column: to one of {header[:20]} (the class index column).",
        )
    label_at = header.index(label_column)
    values = np.empty((len(rows) - 1, len(header)), dtype=np.float64)
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise DataError(
                f"{path} line {line} has {len(row)} fields, the header has {len(header)}",
                hint="every row needs one value per header column (no missing or extra commas).",
            )
        for column, text in enumerate(row):
            try:
                values[line - 2, column] = float(text)
            except ValueError:
                raise DataError(
                    f"{path} line {line}, column {header[column]!r}: {text!r} is not a number",
                    hint="encode text or categorical columns as numbers first.",
                ) from None
    return np.delete(values, label_at, axis=1), values[:, label_at]


def _read_npy(path: Path, what: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as exc:  # object arrays need pickle, which is refused
        raise DataError(
            f"{path} cannot be read as {what} without unpickling ({exc})",
            hint="save plain numeric arrays: np.save(path, x.astype(np.float32)).",
        ) from exc


def _read_split(config: RunConfig, name: str) -> tuple[np.ndarray, np.ndarray] | None:
    split = getattr(config.data, name)
    if split is None:
        return None
    if split.x is not None:
        return _read_npy(config.resolve(split.x), "x"), _read_npy(config.resolve(split.y), "y")
    path = config.resolve(split.path)
    if path.suffix.lower() == ".csv":
        return _read_csv(path, split.label_column)
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [key for key in ("x", "y") if key not in archive.files]
            if missing:
                raise DataError(
                    f"{path} has no array {missing[0]!r} (it holds {archive.files})",
                    hint="save it with np.savez(path, x=features, y=labels).",
                )
            return archive["x"], archive["y"]
    except (ValueError, OSError) as exc:
        raise DataError(
            f"{path} is not a readable .npz of plain arrays ({exc})",
            hint="save it with np.savez(path, x=features, y=labels), numeric arrays only.",
        ) from exc


def _load_data(config: RunConfig) -> dict[str, Split | None]:
    if config.data.dataset is not None:
        from kdistill.datasets import load_dataset

        dataset = load_dataset(config.data.dataset, config.seed)
        raw: dict[str, Any] = {"train": dataset.train, "val": dataset.val, "test": dataset.test}
    else:
        raw = {name: _read_split(config, name) for name in ("train", "val", "test")}
    return {name: None if pair is None else as_split(pair, name=name) for name, pair in raw.items()}


# ---------------------------------------------------------------------------------------------------- teacher


def _build_teacher(config: RunConfig, train: Split, verbose: bool) -> Teacher:
    recipe = TEACHER_RECIPES[config.teacher.kind]
    context = {
        "seed": config.seed,
        "factory": None
        if config.teacher.factory is None
        else import_reference(config.teacher.factory, base=config.base, field="teacher.factory"),
        "path": None if config.teacher.path is None else config.resolve(config.teacher.path),
        "output": config.teacher.output,
        "verbose": verbose,
    }
    try:
        built = recipe.build(dict(config.teacher.params), train, context)
    except KdistillError:
        raise
    except (ValueError, TypeError, RuntimeError) as exc:
        raise TeacherError(
            f"teacher kind {config.teacher.kind!r} with params {config.teacher.params} failed to build: {exc}",
            hint="check teacher.params (their names and values); `kdistill list teachers` says what each kind takes.",
        ) from exc
    return as_teacher(built)


def _cache_key(teacher: Teacher, train: Split, config: RunConfig) -> str:
    settings = f"{config.teacher.soft_targets}:{config.teacher.oof_folds}:{config.seed}"
    return hashlib.blake2b(
        f"{teacher.fingerprint()}:{fingerprint_arrays(train.x, train.y)}:{settings}".encode(), digest_size=12
    ).hexdigest()


def _compute_targets(teacher: Teacher, train: Split, config: RunConfig) -> torch.Tensor:
    if config.teacher.soft_targets == "oof":
        return _oof_logits(teacher, train, config.teacher.oof_folds, config.seed)
    return teacher_logits(teacher, train.x)


def _cache_path(config: RunConfig, teacher: Teacher, train: Split, folder: Path) -> Path:
    cache_dir = Path(config.cache.dir) if config.cache.dir is not None else folder
    return cache_dir / f"teacher-{_cache_key(teacher, train, config)}.safetensors"


def _read_cache(path: Path, rows: int) -> tuple[torch.Tensor, list[Any] | None]:
    """Teacher logits and classes from a cache file: safetensors and JSON only, never a pickle."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            logits = handle.get_tensor("logits")
            classes = json.loads((handle.metadata() or {}).get("classes", "null"))
    except Exception as exc:
        raise CheckpointError(
            f"the teacher cache {path} is unreadable ({exc})", hint="delete it; it is recomputed."
        ) from exc
    if len(logits) != rows:
        raise CheckpointError(
            f"the teacher cache {path} has {len(logits)} rows, the training data {rows}",
            hint="delete it; it is recomputed.",
        )
    return logits, classes


def _write_cache(path: Path, logits: torch.Tensor, classes: list[Any] | None, teacher: Teacher) -> None:
    metadata = {"classes": json.dumps(classes), "fingerprint": teacher.fingerprint()}
    atomic_write_bytes(path, safetensors_save({"logits": logits.contiguous()}, metadata=metadata))


def _share_cache_path(path: Path | None) -> Path:
    """Rank 0's cache path, sent to every rank (only the path travels; each rank reads the file itself)."""
    box: list[Any] = [None if path is None else str(path)]
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    return Path(box[0])


# ---------------------------------------------------------------------------------------------------- student, loss


def _build_student(config: RunConfig, train: Split, classes: int) -> tuple[nn.Module, dict[str, Any] | None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        if config.student.kind == "custom":
            assert config.student.factory is not None
            factory = import_reference(config.student.factory, base=config.base, field="student.factory")
            module = factory(**config.student.params)
            if not isinstance(module, nn.Module):
                raise StudentError(
                    f"student.factory returned a {type(module).__name__}, not a torch.nn.Module",
                    hint="return an nn.Module mapping a batch to (batch, classes) logits.",
                )
            student, spec = module, None
        else:
            try:
                student, spec = build_student(config.student.kind, train.x, classes, **config.student.params)
            except KdistillError:
                raise
            except (ValueError, TypeError, RuntimeError) as exc:
                raise StudentError(
                    f"student {config.student.kind!r} with params {config.student.params} cannot be built: {exc}",
                    hint="check student.params: hidden and channels are lists of positive widths.",
                ) from exc
    _check_student(student, train.x, classes)
    return student, spec


class WeightedSum:
    """Several methods at once: ``loss = sum_i weight_i * loss_i``; each part's terms are logged as
    ``<name>_<term>`` (``kd_kd``, ``ce_ce``, ...), and ``"loss"`` is the weighted total."""

    def __init__(self, parts: Sequence[tuple[str, float, Loss]]) -> None:
        self.parts = list(parts)
        self.needs_teacher = any(loss.needs_teacher for _, _, loss in self.parts)
        self.student_features: Sequence[str] = tuple(
            dict.fromkeys(f for _, _, loss in self.parts for f in loss.student_features)
        )
        self.teacher_features: Sequence[str] = tuple(
            dict.fromkeys(f for _, _, loss in self.parts for f in loss.teacher_features)
        )

    def start_epoch(self, epoch: int, total_epochs: int) -> None:
        for _, _, loss in self.parts:
            hook = getattr(loss, "start_epoch", None)
            if hook is not None:
                hook(epoch, total_epochs)

    def __call__(
        self, student: Outputs, teacher: Outputs | None, target: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        total: torch.Tensor | None = None
        terms: dict[str, torch.Tensor] = {}
        for name, weight, loss in self.parts:
            part = loss(student, teacher, target)
            total = weight * part["loss"] if total is None else total + weight * part["loss"]
            terms |= {f"{name}_{key}": value for key, value in part.items()}
        assert total is not None
        return {"loss": total, **terms}


def _build_loss(config: RunConfig) -> Loss:
    if len(config.method) == 1 and config.method[0].weight == 1.0:
        return get_loss(config.method[0].name, **config.method[0].params)
    names = [term.name for term in config.method]
    labels = [name if names.count(name) == 1 else f"{name}{i}" for i, name in enumerate(names)]
    parts = [
        (label, term.weight, get_loss(term.name, **term.params))
        for label, term in zip(labels, config.method, strict=True)
    ]
    return WeightedSum(parts)


# ---------------------------------------------------------------------------------------------------- training


def _train_phase(
    phase: str,
    module: nn.Module,
    loss_fn: Loss,
    transfer: TransferSet,
    val: tuple[torch.Tensor, torch.Tensor] | None,
    config: RunConfig,
    train_config: TrainConfig,
    teacher: Teacher | None,
    folder: Path,
    run_info: dict[str, Any],
    verbose: bool,
) -> list[dict[str, float]]:
    """One phase (the distilled student, or the hard-label baseline), resumed from its checkpoint when one exists."""
    checkpoint_path = folder / f"checkpoint-{phase}.safetensors"
    checkpoint = load_checkpoint(checkpoint_path) if checkpoint_path.is_file() else None
    if checkpoint is not None and checkpoint.completed:
        module.load_state_dict(checkpoint.model)
        return checkpoint.history
    callbacks: list[Callback] = []
    if val is not None:
        callbacks.append(EarlyStopping(patience=config.train.patience))
    if verbose and config.logging.progress:
        callbacks.append(ProgressBar(phase))
    if verbose and config.logging.console:
        callbacks.append(ConsoleLog(phase))
    if config.logging.jsonl:
        callbacks.append(JsonlLogger(folder / "metrics.jsonl", phase=phase))
    if config.logging.tensorboard:
        callbacks.append(TensorBoardLogger(folder / "tensorboard", phase=phase))
    callbacks.append(Checkpointer(checkpoint_path, run=run_info))  # last: it saves the others' state
    state = fit(
        module, loss_fn, transfer, val=val, config=train_config, callbacks=callbacks, teacher=teacher, resume=checkpoint
    )
    return state.history


@dataclass
class _Prepared:
    """Everything built from the data and the teacher's outputs, before anything is written."""

    splits: dict[str, Split | None]
    targets: torch.Tensor
    classes: list[Any] | None
    loss_fn: Loss
    student: nn.Module
    spec: dict[str, Any] | None
    baseline: nn.Module | None


def _prepare(
    config: RunConfig,
    splits: dict[str, Split | None],
    targets: torch.Tensor,
    classes: list[Any] | None,
    teacher: Teacher | None,
) -> _Prepared:
    splits = {name: _relabel(split, classes) for name, split in splits.items()}
    train = splits["train"]
    assert train is not None
    loss_fn = _build_loss(config)
    num_classes = _check_classes(_Columns(targets, teacher), targets, list(splits.values()))
    student, spec = _build_student(config, train, num_classes)
    baseline = copy.deepcopy(student) if config.report.baseline else None
    return _Prepared(splits, targets, classes, loss_fn, student, spec, baseline)


def _train_config(config: RunConfig, verbose: bool) -> TrainConfig:
    return TrainConfig(
        epochs=config.train.epochs,
        batch_size=config.train.batch_size,
        lr=config.train.optimizer.lr,
        weight_decay=config.train.optimizer.weight_decay,
        warmup_fraction=config.train.schedule.warmup_fraction,
        patience=config.train.patience,
        seed=config.seed,
        num_threads=config.device.num_threads,
        device=_device(config),
        verbose=verbose,
        optimizer=config.train.optimizer.name,
        momentum=config.train.optimizer.momentum,
        schedule=config.train.schedule.name,
        precision=config.device.precision,
    )


def _run(config: RunConfig, folder: Path, saved: dict[str, Any] | None, verbose: bool, started: float) -> RunResult:
    rank = _rank()
    splits = _load_data(config)
    train = splits["train"]
    assert train is not None
    assert train.y is not None
    data_fingerprint = fingerprint_arrays(train.x, train.y)
    if saved is not None and saved.get("data_fingerprint") != data_fingerprint:
        raise CheckpointError(
            f"cannot resume {folder}: the training data changed since the run started",
            hint="resume with the same data files, or start a new run in another folder.",
        )
    teacher: Teacher | None = None
    cache_path: Path | None = None
    if rank == 0:  # the teacher, its outputs and every check, before the first write
        teacher = _build_teacher(config, train, verbose)
        cache_path = _cache_path(config, teacher, train, folder)
        cached = config.cache.reuse and cache_path.is_file()
        if cached:
            targets, classes = _read_cache(cache_path, len(train))
        else:
            targets, classes = _compute_targets(teacher, train, config), _jsonable(teacher.classes)
        prepared = _prepare(config, splits, targets, classes, teacher)
        if not cached:
            _write_cache(cache_path, targets, classes, teacher)
        if saved is None:
            atomic_write_json(
                folder / CONFIG_FILE,
                {
                    "config": config.model_dump(mode="json"),
                    "fingerprint": resume_fingerprint(config),
                    "data_fingerprint": data_fingerprint,
                    "teacher_cache": str(cache_path),
                },
            )
    cache_path = _share_cache_path(cache_path)
    if rank != 0:  # the other ranks read the teacher's outputs that rank 0 wrote
        targets, classes = _read_cache(cache_path, len(train))
        if tuple(_build_loss(config).teacher_features):  # methods reading teacher features need it live
            teacher = _build_teacher(config, train, verbose)
        prepared = _prepare(config, splits, targets, classes, teacher)
    splits, student, baseline = prepared.splits, prepared.student, prepared.baseline
    train = splits["train"]
    assert train is not None

    train_config = _train_config(config, verbose)
    val = splits["val"]
    val_tensors = None if val is None or val.y is None else (val.x, val.y)
    run_info = {"fingerprint": resume_fingerprint(config), "data_fingerprint": data_fingerprint}
    transfer = TransferSet(train.x, train.y, prepared.targets)
    phase_args = (val_tensors, config, train_config, teacher, folder, run_info, verbose)
    history = _train_phase("student", student, prepared.loss_fn, transfer, *phase_args)
    baseline_history = None
    if baseline is not None:
        plain = TransferSet(train.x, train.y, None)
        baseline_history = _train_phase("baseline", baseline, get_loss("ce"), plain, *phase_args)
    if rank != 0:
        return RunResult(folder, None, saved is not None, config)

    assert teacher is not None
    report = None
    eval_split, eval_name = (splits["test"], "test") if splits["test"] is not None else (val, "val")
    if config.report.enabled and eval_split is not None:
        settings = {
            "config": config.name,
            "method": "+".join(f"{t.weight:g}*{t.name}" for t in config.method),
            "teacher": config.teacher.kind,
            "student": config.student.kind,
            "epochs_run": len(history),
            "baseline_epochs_run": None if baseline_history is None else len(baseline_history),
            "max_epochs": config.train.epochs,
            "batch_size": config.train.batch_size,
            "lr": config.train.optimizer.lr,
            "seed": config.seed,
            "train_rows": len(train),
            "device": train_config.device,
            "precision": config.device.precision,
            "world_size": _world_size(),
            "resumed": saved is not None,
            "wall_time_s": round(time.perf_counter() - started, 1),
        }
        report = _build_report(teacher, student, baseline, eval_split, eval_name, settings, config.report.profile)
    result = DistillResult(
        student=student.eval(),
        history=history,
        report=report,
        baseline=baseline,
        spec=prepared.spec,
        classes=prepared.classes,
        baseline_history=baseline_history,
    )
    result.save(folder)
    if config.compression:
        _compress(config, student, train, folder)
    return RunResult(folder, result, saved is not None, config)


def _compress(config: RunConfig, student: nn.Module, train: Split, folder: Path) -> None:
    """Run the config's compression steps in order on the trained student; their results go to compression.json."""
    from kdistill.config_recipes import COMPRESSION_STEPS

    done: dict[str, Any] = {}
    context = {"folder": folder, "train_x": train.x, "done": done}
    for step in config.compression:
        done[step.name] = COMPRESSION_STEPS[step.name].apply(copy.deepcopy(student).cpu().eval(), step.params, context)
    atomic_write_json(folder / "compression.json", done)


def _relabel(split: Split | None, classes: list[Any] | None) -> Split | None:
    """Labels as the teacher's column positions (for teachers with their own ``classes_``)."""
    if split is None or split.y is None or classes is None:
        return split
    return Split(x=split.x, y=encode_labels(split.y.numpy(), np.asarray(classes), name="y"), raw_x=split.raw_x)


class _Columns(TeacherBase):
    """The teacher as the class-count check sees it, also on ranks that only read the teacher's outputs."""

    def __init__(self, logits: torch.Tensor, teacher: Teacher | None) -> None:
        self.classes = None if teacher is None else teacher.classes
        self._num_classes = int(logits.shape[1]) if teacher is None else teacher.num_classes

    @property
    def num_classes(self) -> int | None:
        return self._num_classes

    def fingerprint(self) -> str:
        return "columns"

    def __call__(self, x: torch.Tensor, *, features: Sequence[str] = ()) -> Outputs:
        raise TypeError("only stands in for the class-count check")
