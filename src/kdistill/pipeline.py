"""One path for every run: a :class:`RunSpec` goes through :func:`prepare`, :func:`train` and :func:`report`.

``kdistill.distill``, ``DistilledClassifier``, ``kdistill run``, ``kdistill demo`` and ``kdistill export`` only build
a :class:`RunSpec` and call :func:`execute`; nothing else assembles a teacher, its outputs, a student, a loss or a
report. The spec holds *what* a run is (the teacher, the student, the data, and :class:`~kdistill.config.Settings`,
the typed sections a YAML file has); this module is *how* it runs:

    prepare   splits (labels in the teacher's order) -> teacher outputs on the training rows, through
              kdistill.cache when a cache folder is set -> the composed loss -> the student, checked on 2 rows
    train     the engine, once for the student and once for the no-teacher baseline; callbacks for early stopping,
              progress, logs and checkpoints; a run folder resumes from its last checkpoint
    report    teacher vs student vs baseline on the test (else validation) rows

With a run folder (``out``), everything is written there, atomically (see :mod:`kdistill.run` for the layout), and
``resume=True`` continues it. Under ``torchrun --nproc_per_node=N`` every rank runs this same code: rank 0 builds the
teacher and fills the cache, the other ranks read it, each rank trains on 1/N of every batch, and only rank 0 writes.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from kdistill.config import MethodTerm, Settings
from kdistill.data import (
    Split,
    check_stream_classes,
    concat_rows,
    encode_labels,
    fingerprint_arrays,
    input_keys,
    rows_in,
    run_trimmed,
    stream_split,
    take_rows,
    trim_padding,
)
from kdistill.engine import EarlyStopping, ProgressBar, StreamingSource, TrainConfig, TransferSet, fit
from kdistill.engine.callbacks import Callback, TimeBudget
from kdistill.engine.checkpoint import Checkpointer, load_checkpoint
from kdistill.engine.live import Augment
from kdistill.engine.loggers import ConsoleLog, JsonlLogger, TensorBoardLogger
from kdistill.engine.loop import effective_weight_decay
from kdistill.engine.on_policy import OnPolicy
from kdistill.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    KdistillError,
    LabelError,
    ShapeMismatchError,
    StudentError,
    TeacherError,
)
from kdistill.io import atomic_write_json
from kdistill.losses import Loss, compose_methods, get_loss
from kdistill.losses.token import TokenDivergenceLoss, check_tail_reader
from kdistill.profile import count_parameters, model_size_bytes, time_inference
from kdistill.report import Report
from kdistill.result import DistillResult, _jsonable
from kdistill.students import build_student
from kdistill.tasks import Task, get_task
from kdistill.teachers import SklearnTeacher, Teacher, TopK, probs_to_logits, teacher_logits
from kdistill.transfer import ExtraRows, LiveTransfer, Transfer, as_transfer, extra_rows, read_unlabeled, row_summary
from kdistill.verdict import judge

__all__ = [
    "CONFIG_FILE",
    "ModelEntry",
    "Prepared",
    "RunSpec",
    "build_loss",
    "build_report",
    "execute",
    "measure_models",
    "model_entry",
    "prepare",
    "report",
    "teacher_entry",
    "train",
]

CONFIG_FILE = "config.json"
_RUN_MARKERS = (CONFIG_FILE, "student.safetensors", "checkpoint-student.safetensors")

StudentFactory = Callable[[], nn.Module]
TeacherFactory = Callable[[Split], Teacher]


@dataclass
class RunSpec:
    """What a run is.

    ``settings``: the validated sections (method, train, cache, report, device, logging, ...), the same model a YAML
    config is read into. ``train``/``val``/``test``: ``(X, y)`` pairs, Datasets or :class:`~kdistill.data.Split`\\ s.
    ``teacher``: the adapter; or ``teacher_factory(train_split) -> Teacher`` for teachers that a run builds itself
    (a YAML teacher kind fits a forest on the training rows: labels are then mapped to its classes afterwards).
    ``student``: a registered name (``student_params`` go to its builder), an ``nn.Module``, or a factory.
    ``soft_targets``/``oof_folds``: :class:`~kdistill.config.SoftTargets`. ``loss``: a Loss object used instead of
    ``settings.method``. ``augment(x_batch, generator) -> x_batch``: applied to every training batch, the teacher
    then runs live (``prefetch_teacher``: one batch ahead, in a thread). ``out``: the run folder (None: nothing is
    written); ``resume``: continue the run there. ``stream``: read ``train`` (a Dataset) batch by batch instead of
    holding it in memory (:func:`kdistill.data.stream_split`; an ``IterableDataset`` always streams, ``stream_rows``
    items per epoch when it has no ``len()``); the teacher then runs live on each batch.
    ``identity``: what a resumed run must match besides the settings (the YAML data/teacher/student sections, or
    the API's teacher and data fingerprints). ``report_settings``: extra entries for the report's settings.
    ``unlabeled``: rows without targets (rows, *features), or a token mapping with the training rows' keys,
    labelled by the teacher and appended to the student's training rows (token rows padded to the longer sequence);
    ``transfer``: a generated transfer set (:func:`kdistill.transfer.as_transfer`: a Transfer, a generator, a name
    or a mapping; None: ``settings.transfer``). Both only feed the student, never the baseline;
    see :mod:`kdistill.transfer.plan` for the per-batch mix.
    """

    settings: Settings
    train: Any
    val: Any = None
    test: Any = None
    teacher: Teacher | None = None
    teacher_factory: TeacherFactory | None = None
    student: str | nn.Module | StudentFactory = "mlp"
    student_params: dict[str, Any] = field(default_factory=dict)
    soft_targets: str = "predict"
    oof_folds: int = 5
    loss: Loss | None = None
    augment: Augment | None = None
    prefetch_teacher: bool = False
    out: Path | None = None
    resume: bool = False
    stream: bool = False
    stream_rows: int | None = None
    verbose: bool = True
    identity: dict[str, Any] = field(default_factory=dict)
    report_settings: dict[str, Any] = field(default_factory=dict)
    unlabeled: Any = None
    transfer: Any = None

    def __post_init__(self) -> None:
        if (self.teacher is None) == (self.teacher_factory is None):
            raise TeacherError("a run needs exactly one of teacher and teacher_factory")


@dataclass
class Prepared:
    """Everything :func:`prepare` built, before any training."""

    splits: dict[str, Split | None]
    teacher: Teacher | None
    targets: torch.Tensor | None
    classes: list[Any] | None
    num_classes: int
    loss: Loss
    student: nn.Module
    student_spec: dict[str, Any] | None
    baseline: nn.Module | None
    data_fingerprint: str
    task: Task = field(default_factory=lambda: get_task("classification"))
    extra: ExtraRows | None = None
    teacher_map: Callable[[torch.Tensor], torch.Tensor] | None = None
    """The teacher's outputs as the student's loss and validation read them: a narrower embedding student's own
    space (``student.project_teacher_outputs``, see :func:`_teacher_map`); None: as they are."""


# ---------------------------------------------------------------------------------------------------- distributed


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def device_name(settings: Settings) -> str:
    """The torch device a run trains on: ``auto`` resolves to CUDA when there is one; under torchrun with CUDA each
    rank takes ``cuda:LOCAL_RANK``."""
    kind = settings.device.type
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda" and _world_size() > 1:
        kind = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return kind


def _init_distributed(settings: Settings) -> bool:
    """Join the torchrun process group (gloo on the CPU, NCCL on CUDA); False when not under torchrun."""
    if _world_size() <= 1 or dist.is_initialized():
        return False
    device = device_name(settings)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return True


def _broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (small Python objects only: a cache key, the class labels)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------------------------------------------- prepare


TOPK_METHODS = ("kd", "kd_topk", "forward_kl", "reverse_kl", "gjsd", "skew_kl", "skew_reverse_kl", "tvd",
                "token_divergence")  # fmt: skip
"""The methods that read a top-k cache entry exactly: ``kd`` (as ``kd_topk``) and every token divergence, each over
the K + 1 buckets of the stored form (the teacher's K tokens and one "rest" bucket; see
:func:`kdistill.losses.token.token_log_probs`)."""


_TAIL_PROBE = TopK(torch.zeros(1, 1), torch.zeros(1, 1, dtype=torch.long), torch.zeros(1),
                   torch.zeros(1, 1, dtype=torch.long), torch.zeros(1))  # fmt: skip
"""A one-token top-k with a sampled tail: :func:`check_tail_reader` asks of it whether a loss can read a tail."""


def build_loss(terms: list[MethodTerm], *, storage: str = "fp32") -> Loss:
    """The loss of ``settings.method``: one term of weight 1 is that method itself; several (or a weight other than
    1) are a :class:`~kdistill.losses.Compose`, whose later methods drop their own hard-label term so that the
    cross-entropy is counted once. With top-k cache storage, one method of :data:`TOPK_METHODS` reads the stored
    form exactly (``kd`` as ``kd_topk``; the token divergences take the cache's table as ``Outputs.topk``)."""
    if storage.startswith("topk"):
        from kdistill.cache import tail_samples

        names = [term.name for term in terms]
        if len(names) != 1 or names[0] not in TOPK_METHODS:
            raise ConfigError(
                f"cache storage {storage!r} keeps only each row's (or token's) top-k teacher outputs, which one method "
                f"of {', '.join(TOPK_METHODS)} can read exactly; got {names}",
                hint="use one of those methods, or cache storage 'fp32' or 'fp16' with other methods.",
            )
        if names[0] in ("kd", "kd_topk"):
            terms = [term.model_copy(update={"name": "kd_topk"}) for term in terms]
        else:
            loss = get_loss(terms[0].name, **terms[0].params)
            assert isinstance(loss, TokenDivergenceLoss)
            loss.reads_topk = True  # the engine serves the cache's table to it as Outputs.topk
            loss.topk_samples = tail_samples(storage)  # the table's sampled tail, if any
            if loss.topk_samples:
                check_tail_reader(_TAIL_PROBE, loss.divergence, loss.temperature, loss.beta, loss.skew)
            return loss
        if tail_samples(storage):
            raise ConfigError(
                f"cache storage {storage!r} samples a tail per token for the token divergences; kd reads a top-k "
                "with a rest bucket",
                hint=f"use storage {storage.split('+')[0]!r} with kd, or method forward_kl with this storage.",
            )
    if len(terms) == 1 and terms[0].weight == 1.0:
        return get_loss(terms[0].name, **terms[0].params)
    return compose_methods({term.name: term.weight for term in terms}, {term.name: dict(term.params) for term in terms})


def _splits(spec: RunSpec, classes: np.ndarray | None, task: Task) -> dict[str, Split | None]:
    """The run's data as checked splits, as its task reads them: labelled rows for classification, rows of features
    (labels unused) for embeddings, rows of token ids (next-token targets derived from them) for ``token_lm``."""
    raw = {"train": spec.train, "val": spec.val, "test": spec.test}
    streams = _streams(spec)
    splits = {
        name: None if value is None or (streams and name == "train") else _split(value, name, classes, task)
        for name, value in raw.items()
    }
    if streams:
        _check_streamable(spec, task)
        splits["train"] = stream_split(spec.train, name="train", classes=classes, rows=spec.stream_rows)
    train = splits["train"]
    assert train is not None
    for name in ("val", "test"):
        split = splits[name]
        if split is None or input_keys(split.x) == input_keys(train.x):
            continue
        if isinstance(train.x, torch.Tensor) and isinstance(split.x, torch.Tensor):
            raise DataError(
                f"{name} X has rows of shape {tuple(split.x.shape[1:])} but train X has {tuple(train.x.shape[1:])}",
                hint=f"{name} must have the same features, in the same order, as the training rows.",
            )
        raise DataError(
            f"{name} X has inputs {list(input_keys(split.x))} but train X has {list(input_keys(train.x))}",
            hint=f"give {name} the same kind of inputs as the training rows (the same mapping keys, or one array).",
        )
    return splits


def _streams(spec: RunSpec) -> bool:
    """Whether the training rows are read batch by batch: ``stream=True``, or an iterable that cannot be indexed."""
    from torch.utils.data import IterableDataset

    return spec.stream or isinstance(spec.train, IterableDataset)


def _check_streamable(spec: RunSpec, task: Task) -> None:
    """What a streamed training set cannot do, refused before anything runs."""
    problem = None
    if task.name not in ("classification", "embedding"):  # token_lm derives targets, regression scales them
        problem = f"task {task.name!r} prepares its targets from every row in memory"
    elif spec.soft_targets == "oof":
        problem = "out-of-fold soft targets refit the teacher on the training rows"
    elif spec.unlabeled is not None or _transfer(spec) is not None:
        problem = "unlabeled and generated rows are added to the rows in memory"
    if problem is not None:
        raise ConfigError(
            f"the training rows cannot be streamed: {problem}",
            hint="load them in memory (stream=False), or use a ready teacher with soft_targets='predict'.",
        )


def _split(value: Any, name: str, classes: np.ndarray | None, task: Task) -> Split:
    return value if isinstance(value, Split) else task.read_split(value, name, classes)


def _relabel(split: Split | None, classes: list[Any] | None) -> Split | None:
    """Labels as the teacher's column positions (for a teacher built by the run, with its own ``classes_``)."""
    if split is None or split.y is None or classes is None:
        return split
    if split.stream is not None:  # labels are used as they come: they must already be the teacher's positions
        check_stream_classes(np.asarray(classes), "train")
        return split
    return Split(x=split.x, y=encode_labels(split.y.numpy(), np.asarray(classes), name="y"), raw_x=split.raw_x)


def _oof_logits(teacher: Teacher, train: Split, folds: int, seed: int) -> torch.Tensor:
    """Out-of-fold soft targets: each row labelled by a clone of the teacher fitted on the other folds."""
    from sklearn.base import clone
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    from kdistill.regression import StandardizedTeacher, out_of_fold_predictions

    if isinstance(teacher, StandardizedTeacher):  # task regression: KFold, predict
        return out_of_fold_predictions(teacher, train, folds, seed)
    if not isinstance(teacher, SklearnTeacher):
        raise TeacherError(
            "soft_targets='oof' refits clones of the teacher, so it needs a scikit-learn teacher",
            hint="use soft_targets='predict' for this teacher.",
        )
    assert train.y is not None
    method = "predict_proba" if teacher.output == "probs" else "decision_function"
    folds_split = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    x = np.asarray(train.x.reshape(len(train.x), -1).numpy())
    scores = cross_val_predict(clone(teacher.estimator), x, train.y.numpy(), cv=folds_split, method=method)
    out = torch.as_tensor(np.asarray(scores), dtype=torch.float32)
    if method == "predict_proba":
        return probs_to_logits(out)
    return torch.stack([torch.zeros_like(out), out], dim=1) if out.ndim == 1 else out


def _check_classes(declared: int | None, width: int, splits: Mapping[str, Split | None]) -> int:
    if declared is not None and declared != width:
        raise ShapeMismatchError(f"the teacher says it has {declared} classes but outputs {width}")
    for split in splits.values():
        if split is not None and split.y is not None and int(split.y.max()) >= width:
            raise LabelError(
                f"labels go up to {int(split.y.max())} but the teacher outputs {width} classes",
                hint="labels must be 0..classes-1 in the teacher's output order, and the teacher must cover them all.",
            )
    return width


def _check_student(student: nn.Module, x: Any, row_shape: tuple[int, ...], task: Task, any_width: bool = False) -> None:
    """The student runs on two rows and gives outputs of the teacher's shape per row (a mapping of inputs goes in
    as keywords; an output object's ``.logits`` counts); ``any_width``: (rows, any width) embeddings, for a method
    that compares in-batch similarities."""
    was_training = student.training
    student.eval()
    rows = take_rows(x, slice(0, 2))
    try:
        with torch.no_grad():
            out = _student_logits(student, rows)
    except Exception as exc:
        raise StudentError(
            f"the student failed on a batch of {_describe(rows)}: {exc}",
            hint="check the student's expected input shape against the data.",
        ) from exc
    finally:
        student.train(was_training)
    expected = (len(rows) if isinstance(rows, torch.Tensor) else len(next(iter(rows.values()))), *row_shape)
    if any_width and isinstance(out, torch.Tensor) and out.ndim == 2 and len(out) == expected[0]:
        return
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        if task.name == "classification":
            classes = row_shape[-1]
            raise ShapeMismatchError(
                f"the student outputs {shape} for 2 rows, but the teacher has {classes} classes: expected {expected}",
                hint=f"make the student's last layer output {classes} logits.",
            )
        hint = "make the student's outputs the teacher's shape per row."
        if task.name == "embedding":
            hint = "give the student the teacher's embedding size, or train it with method 'contrastive' (width-free)."
        raise ShapeMismatchError(
            f"the student outputs {shape} for 2 rows, but the teacher outputs {expected} (task {task.name!r})",
            hint=hint,
        )


def _student_logits(model: nn.Module, x: Any) -> Any:
    """``model(x)``, or ``model(**x)`` for a mapping; an output object with ``.logits`` (transformers) gives those."""
    out = model(**x) if isinstance(x, Mapping) else model(x)
    return out if isinstance(out, torch.Tensor) else getattr(out, "logits", out)


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"shape {tuple(x.shape)}"
    return "inputs " + ", ".join(f"{name} {tuple(value.shape)}" for name, value in x.items())


def _build_student(
    spec: RunSpec, train: Split, row_shape: tuple[int, ...], task: Task
) -> tuple[nn.Module, dict[str, Any] | None]:
    classes = row_shape[-1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.settings.seed)
        if isinstance(spec.student, nn.Module):
            student, student_spec = spec.student, None
        elif callable(spec.student):
            student, student_spec = spec.student(), None
            if not isinstance(student, nn.Module):
                raise StudentError(
                    f"the student factory returned a {type(student).__name__}, not a torch.nn.Module",
                    hint="return an nn.Module mapping a batch to (batch, classes) logits.",
                )
        else:
            params = dict(spec.student_params)
            if not isinstance(train.x, torch.Tensor) and spec.student == "transformer":  # takes the token mapping
                params.setdefault("in_shape", list(next(iter(train.x.values())).shape[1:]))
            elif not isinstance(train.x, torch.Tensor):
                raise StudentError(
                    f"student {spec.student!r} reads rows of features, but the inputs are a mapping "
                    f"({', '.join(train.x)})",
                    hint="pass your own nn.Module, called as module(**batch) (a transformers model, say).",
                )
            if not task.builtin_students:
                raise StudentError(
                    f"task {task.name!r} needs your own student module, got {spec.student!r}: the registered students "
                    "map rows of features to one output row",
                    hint="pass an nn.Module whose outputs have the teacher's shape (token_lm: (batch, seq) ids to "
                    "(batch, seq, vocab) logits).",
                )
            try:
                student, student_spec = build_student(spec.student, train.x, classes, **params)
            except KdistillError:
                raise
            except (ValueError, TypeError, RuntimeError) as exc:
                raise StudentError(
                    f"student {spec.student!r} with params {spec.student_params} cannot be built: {exc}",
                    hint="check the student's params: hidden and channels are lists of positive widths.",
                ) from exc
    width_free = task.name == "embedding" and spec.loss is None
    width_free = width_free and {term.name for term in spec.settings.method} <= _WIDTH_FREE_METHODS
    _check_student(student, train.x, _student_row_shape(student, row_shape, task), task, any_width=width_free)
    return student, student_spec


_WIDTH_FREE_METHODS = frozenset({"contrastive"})
"""Embedding methods that compare in-batch similarities, so the student's width may differ from the teacher's."""


def _student_row_shape(student: nn.Module, row_shape: tuple[int, ...], task: Task) -> tuple[int, ...]:
    """The student's outputs' shape per row: the teacher's, or, for an embedding student that maps the teacher's
    embeddings into its own narrower space (``project_teacher_outputs``), that space's width."""
    project = getattr(student, "project_teacher_outputs", None)
    if task.name != "embedding" or not callable(project):
        return row_shape
    return tuple(project(torch.zeros((1, *row_shape))).shape[1:])


def _teacher_map(spec: RunSpec, student: nn.Module, row_shape: tuple[int, ...], task: Task) -> Any:
    """``student.project_teacher_outputs`` when the run trains on the teacher's embeddings in the student's space: an
    embedding student narrower than the teacher (a static student after PCA), with a method that compares the two
    embeddings directly (``cosine``, ``mse``). A width-free method (``contrastive``) reads them as they are."""
    if _student_row_shape(student, row_shape, task) == row_shape:
        return None
    names = {term.name for term in spec.settings.method}
    if spec.loss is None and names <= _WIDTH_FREE_METHODS:
        return None
    return student.project_teacher_outputs


def _cache_root(spec: RunSpec) -> Path | None:
    """``cache.dir``; else a run folder's ``cache/``; else None (the teacher's outputs are computed in memory)."""
    if spec.settings.cache.dir is not None:
        return Path(spec.settings.cache.dir)
    return None if spec.out is None else spec.out / "cache"


def _teacher_targets(spec: RunSpec, teacher: Teacher | None, train: Split) -> torch.Tensor | None:
    """Soft targets for the training rows (None when the teacher runs live on augmented batches): the teacher's
    outputs, or out-of-fold ones, through :mod:`kdistill.cache` when there is a cache folder. Under torchrun every
    rank calls the cache together: rank 0 fills the entry, the others (which may have no teacher) open it."""
    if spec.augment is not None or train.stream is not None or _live_transfer(spec):  # the teacher runs live
        return None
    root = _cache_root(spec)
    seed, folds = spec.settings.seed, spec.oof_folds
    if root is None:
        assert teacher is not None
        if spec.soft_targets == "oof":
            return _oof_logits(teacher, train, folds, seed)
        return teacher_logits(teacher, train.x)
    from kdistill.cache import cached_teacher_outputs

    common: dict[str, Any] = {"cache_dir": root, "reuse": spec.settings.cache.reuse, "collective": True}
    if spec.soft_targets == "oof":
        entry = cached_teacher_outputs(
            teacher,
            train.x,
            kind=f"oof:folds={folds}:seed={seed}",
            compute=lambda _: _oof_logits(_required(teacher), train, folds, seed),
            labels=train.y,
            **common,
        )
    else:
        entry = cached_teacher_outputs(teacher, train.x, storage=spec.settings.cache.storage, **common)
    return entry.teacher_targets()


def _transfer(spec: RunSpec) -> Transfer | None:
    """The run's transfer set: ``spec.transfer``, else the settings' ``transfer`` section."""
    return as_transfer(spec.transfer if spec.transfer is not None else spec.settings.transfer)


def _live_transfer(spec: RunSpec) -> bool:
    transfer = _transfer(spec)
    return transfer is not None and transfer.mode == "live"


def _label_rows(spec: RunSpec, teacher: Teacher | None, x: torch.Tensor) -> torch.Tensor:
    """The teacher's outputs on rows ``x`` (unlabeled or generated), through the cache when the run has one."""
    root = _cache_root(spec)
    if root is None:
        return teacher_logits(_required(teacher), x)
    from kdistill.cache import cached_teacher_outputs

    entry = cached_teacher_outputs(
        teacher,
        x,
        cache_dir=root,
        storage=spec.settings.cache.storage,
        reuse=spec.settings.cache.reuse,
        collective=True,
    )
    return entry.teacher_targets()


def _extra(spec: RunSpec, teacher: Teacher | None, train: Split) -> ExtraRows | None:
    """The unlabeled rows and the generated transfer set, with the teacher's outputs (none in live mode)."""
    if spec.unlabeled is None and _transfer(spec) is None:
        return None
    if spec.augment is not None:
        raise ConfigError(
            "augment= and unlabeled/transfer rows cannot be combined: augment relabels every batch live",
            hint="use transfer=Transfer(generator, mode='live') for generated rows per batch, or drop augment.",
        )
    unlabeled = read_unlabeled(spec.unlabeled, train.x)
    label = None if _live_transfer(spec) else (lambda x: _label_rows(spec, teacher, x))
    return extra_rows(_transfer(spec), unlabeled, train, seed=spec.settings.seed, label=label)


def _required(teacher: Teacher | None) -> Teacher:
    assert teacher is not None, "only rank 0 computes out-of-fold targets, and it has the teacher"
    return teacher


def prepare(spec: RunSpec) -> Prepared:
    """Build everything a run trains, checking it all before anything is written (the teacher's outputs go to the
    cache last) or trained."""
    rank = _rank()
    task = get_task(spec.settings.task)
    loss = spec.loss if spec.loss is not None else build_loss(spec.settings.method, storage=_storage(spec))
    _check_method(spec, task)
    teacher = spec.teacher
    if teacher is not None:
        splits = _splits(spec, teacher.classes, task)
    else:  # the run builds the teacher from the training rows: labels are mapped to its classes after
        splits = _splits(spec, None, task)
        train = splits["train"]
        assert train is not None and spec.teacher_factory is not None
        needs_live = bool(tuple(loss.teacher_features)) or spec.augment is not None or task.scored_against_teacher
        needs_live = needs_live or _live_transfer(spec) or spec.settings.on_policy is not None
        needs_live = needs_live or (spec.soft_targets == "oof" and _cache_root(spec) is None)
        if rank == 0 or needs_live:
            teacher = spec.teacher_factory(train)
    train = splits["train"]
    assert train is not None
    # the teacher's classes and outputs' shape per row, from a few rows (rank 0's, on ranks that have no teacher)
    probe = (
        None if teacher is None else (_jsonable(teacher.classes), teacher.num_classes, _row_shape(spec, teacher, train))
    )
    classes, declared, row_shape = _broadcast(probe)
    if spec.teacher is None:
        splits = {name: _relabel(split, classes) for name, split in splits.items()}
        train = splits["train"]
        assert train is not None
    splits, teacher = task.prepare_targets(splits, teacher)  # regression: standardised targets and teacher
    train = splits["train"]
    assert train is not None
    if task.name == "classification":
        _check_classes(declared, row_shape[-1], splits)
    student, student_spec = _build_student(spec, train, tuple(row_shape), task)
    baseline = None
    if spec.settings.report.baseline and task.trains_baseline:  # embeddings have no labels to learn alone
        baseline = copy.deepcopy(student)
    extra = _extra(spec, teacher, train)
    data_fingerprint = fingerprint_arrays(train.x, train.y, extra=[f"rows={len(train)}"] if train.stream else ())
    if extra is not None:  # the unlabeled and pooled rows change the weights too
        described = json.dumps(extra.transfer, sort_keys=True, default=str)
        data_fingerprint = fingerprint_arrays(train.x, train.y, extra.inputs(), extra=(described,))
    teacher_map = _teacher_map(spec, student, tuple(row_shape), task)
    targets = _teacher_targets(spec, teacher, train)
    if teacher_map is not None and targets is not None:
        targets = teacher_map(torch.as_tensor(np.asarray(targets)).float())
    return Prepared(
        splits=splits,
        teacher=teacher,
        targets=targets,
        classes=classes,
        num_classes=int(row_shape[-1]),
        loss=loss,
        student=student,
        student_spec=student_spec,
        baseline=baseline,
        data_fingerprint=data_fingerprint,
        task=task,
        extra=extra,
        teacher_map=teacher_map,
    )


def _check_method(spec: RunSpec, task: Task) -> None:
    """Methods whose numbers mean nothing for the task are refused before anything runs (``kd``'s softmax over an
    embedding's dimensions would train without an error)."""
    if spec.settings.on_policy is not None and task.name != "token_lm":
        raise ConfigError(
            f"on_policy generates token continuations, which task {task.name!r} does not have",
            hint="use task 'token_lm' (rows of token ids), or drop on_policy.",
        )
    if task.methods is None or spec.loss is not None:
        return
    wrong = [term.name for term in spec.settings.method if term.name not in task.methods]
    if wrong:
        raise ConfigError(
            f"method {wrong[0]!r} does not fit task {task.name!r} ({task.description})",
            hint=f"use {' or '.join(repr(name) for name in task.methods)} (several at once: a weighted list).",
        )


def _row_shape(spec: RunSpec, teacher: Teacher, train: Split) -> tuple[int, ...]:
    """The teacher's outputs' shape per row ((classes,), (seq, vocab), (dim,)): from its cache entry when one is
    complete (the teacher need not run), else from its outputs on a few rows."""
    root = _cache_root(spec)
    if root is not None and spec.settings.cache.reuse and spec.augment is None and spec.soft_targets == "predict":
        from kdistill.cache import cache_key, open_entry
        from kdistill.errors import CacheError

        key = cache_key(teacher, train.x, storage=spec.settings.cache.storage)
        try:
            entry = open_entry(root, key, verify=False)
        except CacheError:  # filling it recomputes the entry, and says so
            entry = None
        if entry is not None:
            return tuple(entry.shape)
    return tuple(teacher_logits(teacher, take_rows(train.x, slice(0, 8))).shape[1:])


def _storage(spec: RunSpec) -> str:
    """The cache storage in force: top-k only matters when the teacher's outputs go through the cache."""
    uses_cache = _cache_root(spec) is not None and spec.augment is None and spec.soft_targets != "oof"
    uses_cache = uses_cache and not _live_transfer(spec)
    return spec.settings.cache.storage if uses_cache else "fp32"


# ---------------------------------------------------------------------------------------------------- train


def train_config(settings: Settings, verbose: bool) -> TrainConfig:
    """The engine's settings from the run's."""
    return TrainConfig(
        epochs=settings.train.epochs,
        batch_size=settings.train.batch_size,
        lr=settings.train.optimizer.lr,
        weight_decay=settings.train.optimizer.weight_decay,
        scale_weight_decay=settings.train.optimizer.scale_weight_decay,
        warmup_fraction=settings.train.schedule.warmup_fraction,
        patience=settings.train.patience,
        seed=settings.seed,
        num_threads=settings.device.num_threads,
        device=device_name(settings),
        verbose=verbose,
        optimizer=settings.train.optimizer.name,
        momentum=settings.train.optimizer.momentum,
        schedule=settings.train.schedule.name,
        precision=settings.device.precision,
        grad_accumulation=settings.train.grad_accumulation,
        clip_grad_norm=settings.train.clip_grad_norm,
        max_steps=settings.train.max_steps,
        warmup_steps=settings.train.schedule.warmup_steps,
        eval_every_steps=settings.train.eval_every_steps,
        parallel=settings.device.parallel,
    )


def _callbacks(
    spec: RunSpec, task: Task, phase: str, has_val: bool, checkpoint: Path | None, run_info: dict[str, Any]
) -> list[Callback]:
    logging, train = spec.settings.logging, spec.settings.train
    callbacks: list[Callback] = []
    if has_val:  # the task's monitor: val_accuracy (ties: lower val_nll), val_loss for token_lm, val_cosine
        mode = "max" if task.higher_is_better else "min"
        callbacks.append(EarlyStopping(monitor=task.monitor, patience=train.patience, mode=mode))
    if train.max_minutes is not None:
        callbacks.append(TimeBudget(train.max_minutes * 60, schedule=train.schedule.to_budget))
    if spec.verbose and logging.progress:
        callbacks.append(ProgressBar(phase))
    if spec.verbose and logging.console:
        callbacks.append(ConsoleLog(phase))
    if spec.out is not None and logging.jsonl:
        callbacks.append(JsonlLogger(spec.out / "metrics.jsonl", phase=phase))
    if spec.out is not None and logging.tensorboard:
        callbacks.append(TensorBoardLogger(spec.out / "tensorboard", phase=phase))
    if checkpoint is not None:  # last: it saves the others' state
        callbacks.append(Checkpointer(checkpoint, run=run_info, every_steps=train.checkpoint_every_steps))
    return callbacks


def _phase(
    spec: RunSpec,
    prepared: Prepared,
    phase: str,
    module: nn.Module,
    loss: Loss,
    transfer: TransferSet | StreamingSource,
    run_info: dict[str, Any],
    teacher_source: LiveTransfer | None = None,
) -> list[dict[str, float]]:
    """Train one phase (the distilled student, or the no-teacher baseline), resumed from its checkpoint if any.
    ``teacher_source``: a live transfer set's source (the student phase), else chosen by the engine."""
    checkpoint_path = None if spec.out is None else spec.out / f"checkpoint-{phase}.safetensors"
    checkpoint = load_checkpoint(checkpoint_path) if checkpoint_path is not None and checkpoint_path.is_file() else None
    if checkpoint is not None and checkpoint.completed:
        module.load_state_dict(checkpoint.model)
        return checkpoint.history
    val = _val_batches(prepared)
    label = {"student": "distilling", "baseline": "baseline (no teacher)"}[phase] if spec.out is None else phase
    state = fit(
        module,
        loss,
        transfer,
        val=val,
        validate=prepared.task.validate,
        config=train_config(spec.settings, spec.verbose),
        callbacks=_callbacks(spec, prepared.task, label, val is not None, checkpoint_path, run_info),
        teacher=prepared.teacher,
        resume=checkpoint,
        augment=spec.augment,
        prefetch_teacher=spec.prefetch_teacher,
        teacher_source=teacher_source,
        on_policy=_on_policy(spec) if phase == "student" else None,
    )
    return state.history


def _on_policy(spec: RunSpec) -> OnPolicy | None:
    """The engine's on-policy settings from the run's ``on_policy`` section (its seed defaulting to the run's)."""
    section = spec.settings.on_policy
    if section is None:
        return None
    seed = spec.settings.seed if section.seed is None else section.seed
    return OnPolicy(section.student_share, section.prompt_length, temperature=section.temperature, seed=seed)


def _val_batches(prepared: Prepared, rows: int = 1024) -> list[Any] | None:
    """The validation rows as the task validates them, in batches of ``rows``: ``(x, labels)`` for classification,
    ``(x, the teacher's embeddings)`` for embeddings; for token_lm :class:`~kdistill.tasks.TokenValBatch` batches
    (ids, next-token targets and the teacher's top-1 token at every position, for ``val_agreement``; without a
    teacher on this rank, ``(ids, targets)``), in batches of at most 2^23 logits (32 MB in float32)."""
    val = prepared.splits["val"]
    if val is None:
        return None
    teacher = prepared.teacher
    target = prepared.task.validation_target(val, lambda: teacher_logits(_required(teacher), val.x))
    if target is None:
        return None
    if prepared.teacher_map is not None:
        target = prepared.teacher_map(target.float())
    per_position = prepared.task.name == "token_lm"  # embeddings and regression: one target row per input row
    if per_position:
        rows = max(1, min(rows, 2**23 // max(1, target.shape[1] * prepared.num_classes)))
    starts = range(0, len(val), rows)
    batches = [_val_batch(val.x, target, slice(start, start + rows), per_position) for start in starts]
    if not per_position or teacher is None:
        return batches
    from kdistill.tasks import TokenValBatch

    return [TokenValBatch(x, y, teacher_logits(teacher, x).argmax(dim=-1)) for x, y in batches]


def _val_batch(x: Any, target: torch.Tensor, rows: slice, per_position: bool = True) -> tuple[Any, torch.Tensor]:
    """One validation batch; a mapping is cut to its longest row, and per-position targets with it."""
    inputs, batch_target = take_rows(x, rows), target[rows]
    trimmed = trim_padding(inputs)
    if isinstance(trimmed, Mapping) and trimmed is not inputs and batch_target.ndim >= 2 and per_position:
        batch_target = batch_target[:, : trimmed["attention_mask"].shape[1]]
    return trimmed, batch_target


def train(spec: RunSpec, prepared: Prepared, run_info: dict[str, Any] | None = None) -> tuple[list, list | None]:
    """Train the student with the run's loss, then (``report.baseline``) the baseline with cross-entropy alone, on
    the same rows, seed and settings. Returns both histories (the baseline's is None without one)."""
    run_info = run_info or {}
    train_split = prepared.splits["train"]
    assert train_split is not None
    transfer: TransferSet | StreamingSource
    if train_split.stream is not None:
        transfer, source = StreamingSource(train_split.stream, rows=len(train_split)), None
    else:
        transfer, source = _student_rows(spec, prepared, train_split)
    history = _phase(spec, prepared, "student", prepared.student, prepared.loss, transfer, run_info, source)
    baseline_history = None
    if prepared.baseline is not None:
        plain = transfer if train_split.stream is not None else TransferSet(train_split.x, train_split.y, None)
        no_teacher = get_loss(prepared.task.baseline_method)  # "ce"; "label_mse" for regression
        baseline_history = _phase(spec, prepared, "baseline", prepared.baseline, no_teacher, plain, run_info)
    return history, baseline_history


def _student_rows(spec: RunSpec, prepared: Prepared, train: Split) -> tuple[TransferSet, LiveTransfer | None]:
    """The student's training rows: the labelled split, then any unlabeled and pooled rows (``label_mask`` False,
    their targets the teacher's outputs); and a live transfer set's teacher source (None otherwise)."""
    extra = prepared.extra
    if extra is None:
        return TransferSet(train.x, train.y, prepared.targets), None
    source = None
    if extra.live is not None:
        features = tuple(prepared.loss.teacher_features)
        assert prepared.teacher is not None, "a live transfer set runs the teacher on every rank"
        source = LiveTransfer(extra.live, prepared.teacher, features, seed=spec.settings.seed)
    pad_token_id = _pad_token_id(prepared)
    rows = extra.inputs(pad_token_id=pad_token_id)
    if rows is None:
        return TransferSet(train.x, train.y, prepared.targets), source
    x = concat_rows([train.x, rows], pad_token_id=pad_token_id)  # token rows: padded to the longer sequence
    count = rows_in(rows)
    targets = extra.targets()
    logits = (
        None
        if prepared.targets is None or targets is None
        else torch.cat([prepared.targets, targets.to(prepared.targets.dtype)])
    )
    if train.y is None:
        return TransferSet(x, None, logits), source
    filler = torch.zeros((count, *train.y.shape[1:]), dtype=train.y.dtype)
    mask = torch.cat([torch.ones(len(train), dtype=torch.bool), torch.zeros(count, dtype=torch.bool)])
    return TransferSet(x, torch.cat([train.y, filler]), logits, label_mask=mask), source


def _pad_token_id(prepared: Prepared) -> int:
    """The id that pads token rows joined to a longer sequence: the student's (else the teacher model's) config
    ``pad_token_id``; 0 when neither has one (the attention mask is 0 there either way)."""
    for model in (prepared.student, getattr(prepared.teacher, "module", None)):
        value = getattr(getattr(model, "config", None), "pad_token_id", None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return 0


# ---------------------------------------------------------------------------------------------------- report


@dataclass
class ModelEntry:
    """One model the report measures: how to call it (``predict(x) -> logits or Outputs``), its size on disk, its
    parameter count (None when unknown) and the runtime it ran on."""

    predict: Any
    size_bytes: int | None
    parameters: int | None
    runtime: str


def model_entry(module: nn.Module) -> ModelEntry:
    """The report's entry of a torch module: its logits in eval mode, its safetensors size, its parameters."""
    return ModelEntry(_eval_predict(module), model_size_bytes(module), count_parameters(module), "torch")


def teacher_entry(teacher: Teacher) -> ModelEntry:
    """The report's entry of a teacher adapter, which knows its own size and parameter count (None when it cannot
    tell: a black box behind an API)."""
    wrapped = getattr(teacher, "estimator", getattr(teacher, "module", teacher))
    return ModelEntry(teacher, teacher.size_bytes(), teacher.parameter_count(), type(wrapped).__name__)


def measure_models(
    entries: Mapping[str, ModelEntry],
    split: Split,
    reference: torch.Tensor | None,
    *,
    profile: bool,
    threads: int = 1,
    batch_size: int = 256,
    latency_budget_s: float | None = None,
    memory: bool = False,
    task: Task | None = None,
) -> tuple[dict[str, dict[str, float]], dict[str, torch.Tensor]]:
    """The report's numbers for each entry on ``split``: accuracy, NLL, ECE, agreement with ``reference`` (the
    teacher's logits; the entry named ``teacher`` agrees with itself), parameters and size, retention (accuracy over
    the teacher's), ``accuracy_delta`` of an ``X_int8`` entry against ``X_onnx``, and with ``profile`` latency and
    throughput (:func:`~kdistill.profile.time_inference`). Returns
    the metrics and each entry's logits. Every report, ``distill``'s and ``compress``'s, is measured here. ``task``
    (default: classification) chooses the metrics and the retention: ``token_lm`` reports perplexity and token
    accuracy, ``embedding`` the cosine similarity and MSE to the teacher's embeddings."""
    task = task if task is not None else get_task("classification")
    models: dict[str, dict[str, float]] = {}
    all_logits: dict[str, torch.Tensor] = {}
    for name, entry in entries.items():
        logits_of = _logits_function(entry.predict)
        with torch.inference_mode():
            parts = [run_trimmed(logits_of, take_rows(split.x, slice(i, i + 1024))) for i in range(0, len(split), 1024)]
        logits = torch.cat(parts).float().cpu()
        all_logits[name] = logits
        against_teacher = name != "teacher" or task.scored_against_teacher
        metrics = task.metrics(logits, split.y, reference if against_teacher else None)
        if name == "teacher" and not task.scored_against_teacher:
            metrics["agreement"] = 1.0
        if entry.parameters is not None:
            metrics["parameters"] = float(entry.parameters)
        if entry.size_bytes is not None:
            metrics["size_bytes"] = float(entry.size_bytes)
        if profile:
            metrics |= time_inference(
                entry.predict,
                split.x,
                batch_size=batch_size,
                threads=threads,
                latency_budget_s=latency_budget_s,
                memory=memory,
            )
        models[name] = metrics
    headline = task.report_columns[0]  # accuracy; r2 for regression
    for name, metrics in models.items():
        if "teacher" in models:
            metrics |= task.retentions(metrics, models["teacher"])
        source = name.removesuffix("_int8") + "_onnx"  # what INT8 cost against its fp32 ONNX source
        if name.endswith("_int8") and source in models:
            metrics[f"{headline}_delta"] = metrics[headline] - models[source][headline]
    return models, all_logits


def _logits_function(predict: Callable[[Any], Any]) -> Callable[[Any], torch.Tensor]:
    """``predict``'s logits: a teacher's Outputs give their ``.logits``."""
    from kdistill.teachers import Outputs

    def logits_of(rows: Any) -> torch.Tensor:
        part = predict(rows)
        return part.logits if isinstance(part, Outputs) else part

    return logits_of


def _eval_predict(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``model``'s logits in eval mode on its own device, as the report measures them (a mapping of inputs goes in
    as keywords; an output object gives its ``.logits``)."""
    model.eval()
    device = next(model.parameters()).device

    def predict(x: Any) -> torch.Tensor:
        if isinstance(x, Mapping):
            return _student_logits(model, {name: value.to(device) for name, value in x.items()})
        return model(x.to(device))

    return predict


def build_report(
    teacher: Teacher,
    student: nn.Module,
    baseline: nn.Module | None,
    split: Split,
    split_name: str,
    settings: dict[str, Any],
    profile: bool,
    task: Task | None = None,
    *,
    train_split: Split | None = None,
    facts: dict[str, Any] | None = None,
    privacy: bool = True,
    sample_rows: int = 1000,
    seed: int = 0,
    train_teacher_logits: torch.Tensor | None = None,
) -> Report:
    """Teacher vs student vs baseline on ``split``: accuracy, retention, agreement, calibration, size (and with
    ``profile`` latency and throughput), through :func:`measure_models`; then the verdict (student vs baseline,
    McNemar's exact test on the same rows, :mod:`kdistill.verdict`), and, given ``train_split``, the teacher's and
    the student's behaviour on up to ``sample_rows`` training rows (confidence, agreement; with ``privacy`` the
    membership-inference AUCs of :mod:`kdistill.privacy`) and the fired :mod:`kdistill.diagnose` rules.
    ``facts``: what the run knows that the models do not (temperature, soft_weight, lr, soft_targets, soft_terms,
    student_hidden; see :class:`~kdistill.diagnose.RunFacts`). ``train_teacher_logits``: (train rows, classes), the
    teacher's outputs on every training row when the run already has them (then the teacher does not run again).
    ``task`` (default classification) picks the metrics; the verdict and the diagnoses are classification's."""
    entries = {"teacher": teacher_entry(teacher), "student": model_entry(student)}
    if baseline is not None:
        entries["baseline"] = model_entry(baseline)
    reference = teacher_logits(teacher, split.x)
    models, logits = measure_models(entries, split, reference, profile=profile, task=task)
    built = Report(split=split_name, rows=len(split), models=models, settings=settings)
    if task is not None and task.name != "classification":
        if task.name == "token_lm" and "baseline" in logits and split.y is not None:
            from kdistill.verdict import token_verdict

            built.verdict = token_verdict(logits["student"], logits["baseline"], split.y, split=split_name)
        return built
    predictors = {name: entry.predict for name, entry in entries.items()}
    is_sklearn = isinstance(teacher, SklearnTeacher)
    sampled = (train_split, train_teacher_logits, sample_rows, seed)
    judge(
        built,
        predictors,
        logits,
        split,
        sampled,
        facts=(facts or {}) | {"teacher_is_sklearn": is_sklearn},
        privacy=privacy,
    )
    return built


def _epochs_run(history: list[dict[str, float]]) -> int:
    """How many epochs a history covers (rows of evaluations every N steps share their epoch's number)."""
    return len({row.get("epoch", index) for index, row in enumerate(history)})


def _run_facts(spec: RunSpec, prepared: Prepared, history: list[dict[str, float]]) -> dict[str, Any]:
    """What the diagnoses need from the spec and the history: kd's temperature and soft weight, lr, soft targets,
    the built-in student's widths and the per-epoch values of every soft (teacher) term."""
    facts: dict[str, Any] = {"soft_targets": spec.soft_targets, "lr": spec.settings.train.optimizer.lr}
    kd_terms = [term for term in spec.settings.method if term.name in ("kd", "kd_topk")]
    if spec.loss is None and kd_terms:
        facts["temperature"] = float(kd_terms[0].params.get("temperature", 4.0))
        facts["soft_weight"] = float(kd_terms[0].params.get("soft_weight", 0.5))
    if prepared.student_spec and "hidden" in prepared.student_spec:
        facts["student_hidden"] = [int(width) for width in prepared.student_spec["hidden"]]
    hard = {"train_loss", "train_ce"}
    keys = [
        key
        for key in (history[0] if history else {})
        if key.startswith("train_") and key not in hard and not key.endswith("/ce")
    ]
    facts["soft_terms"] = {key: [float(epoch[key]) for epoch in history if key in epoch] for key in keys}
    return facts


def _method_label(spec: RunSpec) -> Any:
    if spec.loss is not None:
        return type(spec.loss).__name__
    terms = spec.settings.method
    if len(terms) == 1 and terms[0].weight == 1.0:
        return terms[0].name
    return "+".join(f"{term.weight:g}*{term.name}" for term in terms)


def report(
    spec: RunSpec,
    prepared: Prepared,
    history: list[dict[str, float]],
    baseline_history: list[dict[str, float]] | None,
    *,
    started: float,
) -> Report | None:
    """The side-by-side report on the test rows (else the validation rows); None without either or when off."""
    splits = prepared.splits
    eval_split, eval_name = (splits["test"], "test") if splits["test"] is not None else (splits["val"], "val")
    if not spec.settings.report.enabled or eval_split is None or prepared.teacher is None:
        return None
    settings = spec.settings
    train_split = splits["train"]
    assert train_split is not None
    teacher = prepared.teacher
    described = {
        "method": _method_label(spec),
        "soft_targets": spec.soft_targets,
        "teacher": type(getattr(teacher, "estimator", getattr(teacher, "module", teacher))).__name__,
        "student": prepared.student_spec["kind"] if prepared.student_spec else type(prepared.student).__name__,
        "epochs_run": _epochs_run(history),
        "baseline_epochs_run": None if baseline_history is None else _epochs_run(baseline_history),
        "max_epochs": settings.train.epochs,
        "batch_size": settings.train.batch_size,
        "lr": settings.train.optimizer.lr,
        "seed": settings.seed,
        "train_rows": len(train_split),
        "device": device_name(settings),
        "precision": settings.device.precision,
        "world_size": _world_size(),
        "resumed": spec.resume,
        "loss_terms": {key[6:]: value for key, value in history[-1].items() if key.startswith("train_")},
        "wall_time_s": round(time.perf_counter() - started, 1),
    }
    if prepared.extra is not None:
        described |= _transfer_report(spec, prepared, train_split)
    built = build_report(
        teacher,
        prepared.student,
        prepared.baseline,
        eval_split,
        eval_name,
        described | spec.report_settings | {"task": prepared.task.name},
        settings.report.profile,
        prepared.task,
        train_split=train_split,
        facts=_run_facts(spec, prepared, history),
        privacy=settings.report.privacy,
        seed=settings.seed,
        train_teacher_logits=_train_teacher_logits(spec, prepared),
    )
    if prepared.task.name == "embedding" and settings.report.profile:
        _sentence_speeds(built, {"teacher": teacher, "student": prepared.student}, eval_split.raw_x)
    return built


def _sentence_speeds(built: Report, models: Mapping[str, Any], sentences: Any) -> None:
    """Sentences/s at batch 1 and 64 on one thread, tokenisation included, of every model that encodes text
    (``encode(sentences)``: sentence teachers and students), when the report's rows are sentences; added to each
    model's entry with ``speedup_batch_64`` over the teacher's (:func:`kdistill.embedding_eval.sentence_speeds`)."""
    from kdistill.embedding_eval import sentence_speeds
    from kdistill.sentences import is_sentences

    encoders = {name: model.encode for name, model in models.items() if callable(getattr(model, "encode", None))}
    if not is_sentences(sentences) or "teacher" not in encoders:
        return
    for name, speeds in sentence_speeds(encoders, list(sentences)).items():
        built.models[name] |= speeds


def _transfer_report(spec: RunSpec, prepared: Prepared, train: Split) -> dict[str, Any]:
    """``transfer_rows``: labelled / unlabeled / generated rows, and on each the student's agreement with the
    teacher (and the teacher's accuracy on the labels); ``transfer``: the generator; ``transfer_seconds``: what it
    cost (fit, generate, label)."""
    extra = prepared.extra
    assert extra is not None and prepared.teacher is not None
    groups: dict[str, tuple[Any, torch.Tensor | None, torch.Tensor | None]] = {
        "labelled": (train.x, _train_teacher_logits(spec, prepared), train.y)  # not out-of-fold targets
    }
    if extra.unlabeled is not None:
        groups["unlabeled"] = (extra.unlabeled, extra.unlabeled_targets, None)
    if extra.generated is not None:
        groups["generated"] = (extra.generated, extra.generated_targets, None)
    elif extra.live is not None:  # a fresh draw, as the last epoch saw them
        sample = extra.live.generator.transform(train.x[:2000], torch.Generator().manual_seed(0))
        groups["generated"] = (sample, None, None)
    summary = row_summary(_eval_predict(prepared.student), prepared.teacher, groups)
    if extra.live is not None:  # live rows are new every epoch: rows per epoch, agreement on a fresh draw
        per_epoch = math.ceil(
            extra.live.ratio * (len(train) + (0 if extra.unlabeled is None else rows_in(extra.unlabeled)))
        )
        summary["generated"] |= {"rows": per_epoch, "mode": "live, rows per epoch; agreement on a fresh draw"}
    rows = len(train) + sum(rows_in(group[0]) for name, group in groups.items() if name != "labelled")
    if extra.live is not None:  # live rows ride along in each batch: they add no steps, the decay is as given
        rows -= rows_in(groups["generated"][0])
    decay = effective_weight_decay(train_config(spec.settings, False), len(train), rows)
    return {
        "transfer_rows": summary,
        "transfer": extra.transfer,
        "transfer_seconds": dict(extra.seconds),
        "weight_decay": decay,  # what the student's optimizer used (scale_weight_decay)
    }


def _train_teacher_logits(spec: RunSpec, prepared: Prepared) -> torch.Tensor | None:
    """The teacher's logits on every training row when the soft targets are exactly those (not out-of-fold, not
    augmented, not a top-k cache form): the report then reads them instead of running the teacher again."""
    train_split, targets = prepared.splits["train"], prepared.targets
    if spec.soft_targets != "predict" or targets is None or train_split is None:
        return None
    if _storage(spec).startswith("topk") or tuple(targets.shape) != (len(train_split), prepared.num_classes):
        return None
    return targets


# ---------------------------------------------------------------------------------------------------- run folder


def run_fingerprint(spec: RunSpec) -> dict[str, Any]:
    """What a resumed run must share with the run it continues (what changes the weights): the front end's identity
    (data, teacher, student) and the settings' seed, task, method, training and precision."""
    dumped = spec.settings.model_dump(mode="json")
    fingerprint = (
        dict(spec.identity)
        | {key: dumped[key] for key in ("seed", "task", "method", "train")}
        | {"precision": spec.settings.device.precision}
    )
    transfer = _transfer(spec)
    if transfer is not None:
        fingerprint["transfer"] = json.loads(json.dumps(transfer.describe(), default=str))
    return fingerprint


def _check_folder(folder: Path, fingerprint: dict[str, Any], resume: bool) -> dict[str, Any] | None:
    """The saved config.json of the run to resume (None for a new run); refuses a clash either way."""
    saved_file = folder / CONFIG_FILE
    if not resume:
        present = [name for name in _RUN_MARKERS if (folder / name).exists()]
        if present:
            raise ConfigError(
                f"the run folder {folder} already holds a run ({', '.join(present)})",
                hint="pass --resume (resume=True) to continue it, or choose another folder (--set out=PATH, out=).",
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
    changes = _differences(before, fingerprint)
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


def _compress(spec: RunSpec, student: nn.Module, train_split: Split, folder: Path) -> None:
    """Run the settings' compression steps in order on the trained student; their results go to compression.json."""
    from kdistill.config_recipes import COMPRESSION_STEPS

    done: dict[str, Any] = {}
    context = {"folder": folder, "train_x": train_split.x, "done": done}
    for step in spec.settings.compression:
        done[step.name] = COMPRESSION_STEPS[step.name].apply(copy.deepcopy(student).cpu().eval(), step.params, context)
    atomic_write_json(folder / "compression.json", done)


def execute(spec: RunSpec, *, config_dump: dict[str, Any] | None = None) -> DistillResult:
    """Run ``spec`` end to end: prepare, train, report, and with a run folder save everything there. Returns the
    result; under torchrun every rank gets the trained student (the same weights), and only rank 0 a report and
    the run folder's files. ``config_dump``: what config.json records as the run's config."""
    started = time.perf_counter()
    fingerprint = run_fingerprint(spec)
    saved = None if spec.out is None else _check_folder(spec.out, fingerprint, spec.resume)
    created_group = _init_distributed(spec.settings)
    try:
        result = _execute(spec, config_dump, fingerprint, saved, started)
        if created_group:  # every rank done (rank 0 has written) before the group is torn down
            dist.barrier()
        return result
    finally:
        if created_group:
            dist.destroy_process_group()


def _execute(
    spec: RunSpec,
    config_dump: dict[str, Any] | None,
    fingerprint: dict[str, Any],
    saved: dict[str, Any] | None,
    started: float,
) -> DistillResult:
    """:func:`execute`'s work, inside the process group it manages."""
    prepared = prepare(spec)
    if saved is not None and saved.get("data_fingerprint") != prepared.data_fingerprint:
        raise CheckpointError(
            f"cannot resume {spec.out}: the training data changed since the run started",
            hint="resume with the same data, or start a new run in another folder.",
        )
    run_info = {"fingerprint": fingerprint, "data_fingerprint": prepared.data_fingerprint}
    if spec.out is not None and saved is None and _rank() == 0:
        config = config_dump if config_dump is not None else spec.settings.model_dump(mode="json")
        atomic_write_json(spec.out / CONFIG_FILE, {"config": config, **run_info})
    history, baseline_history = train(spec, prepared, run_info)
    lead = _rank() == 0  # under torchrun every rank holds the same trained weights; rank 0 reports and writes
    built = report(spec, prepared, history, baseline_history, started=started) if lead else None
    builtin = prepared.student_spec is not None  # regression: the models the user gets predict in the user's units
    student = prepared.task.finish_model(prepared.student, builtin=builtin)
    baseline = None if prepared.baseline is None else prepared.task.finish_model(prepared.baseline, builtin=builtin)
    result = DistillResult(
        student=student.eval(),
        history=history,
        report=built,
        baseline=baseline,
        spec=prepared.student_spec,
        classes=prepared.classes,
        baseline_history=baseline_history,
        task=prepared.task.name,
    )
    if spec.out is not None and lead:
        result.save(spec.out)
        if spec.settings.compression:
            train_split = prepared.splits["train"]
            assert train_split is not None
            _compress(spec, student, train_split, spec.out)
    return result
