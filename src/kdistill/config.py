"""The run configuration: a YAML file, typed and validated up front with pydantic, before any training.

A wrong key, type or value fails with a :class:`~kdistill.errors.ConfigError` that names the field path
(``train.optimizer.lr``), the value seen, and for names the closest valid one (``did you mean 'kd'?``). YAML is read
with ``yaml.safe_load`` semantics: no tag can construct an object or run code, and a key written twice in one mapping
is an error. The only code a config can run is the user's own ``module:attribute`` (``teacher.factory``,
``student.factory``), imported like running their script.

>>> config = load_config("examples/digits_rf_mlp.yaml", overrides=["train.epochs=3"])
>>> config.train.epochs
3
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from kdistill import defaults
from kdistill.errors import ConfigError
from kdistill.registry import Registry

__all__ = [
    "AugmentConfig",
    "BudgetConfig",
    "CacheConfig",
    "CompressionStep",
    "DataConfig",
    "DeviceConfig",
    "FileSplit",
    "LoggingConfig",
    "MethodTerm",
    "OptimizerConfig",
    "ReportConfig",
    "RunConfig",
    "ScheduleConfig",
    "SearchConfig",
    "SearchSections",
    "Settings",
    "SoftTargets",
    "StudentConfig",
    "TeacherConfig",
    "TrainSection",
    "TransferConfig",
    "apply_overrides",
    "check_references",
    "load_config",
    "validate_search",
    "validate_settings",
    "validate_soft_targets",
]


def _closest(value: object, valid: list[str]) -> str:
    close = difflib.get_close_matches(str(value), valid, n=1, cutoff=0.5)
    return f"did you mean {close[0]!r}? " if close else ""


def _unknown(kind: str, value: object, valid: list[str]) -> ValueError:
    return ValueError(f"unknown {kind} {value!r}; {_closest(value, valid)}valid: {', '.join(sorted(valid))}")


def _check_names(kind: str, params: dict[str, Any], valid: list[str]) -> None:
    for name in params:
        if name not in valid:
            raise _unknown(kind, name, valid)


def _check_reference(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*", value):
        raise ValueError(f"{value!r} is not a module:attribute reference (e.g. my_models:build_teacher)")
    return value


def _check_registered(registry: Registry[Any], kind: str, params: dict[str, Any], role: str) -> None:
    """``params`` checked against the registered ``kind``'s signature; a ValueError (what pydantic reports) naming
    the closest valid parameter."""
    valid = registry.params(kind)
    if valid is not None:
        _check_names(f"param for {role} {kind!r}:", params, valid)


class _Section(BaseModel):
    """Every section: unknown keys are errors, values are checked as assigned."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class FileSplit(_Section):
    """One split read from files: ``path`` (a .npz with arrays ``x`` and ``y``, or a .csv with a header whose
    ``label_column`` holds integer class indices), or ``x`` and ``y`` (two .npy files); or ``factory``,
    ``module:attribute`` of your code returning a torch ``Dataset`` or an ``(X, y)`` pair. Relative paths are
    relative to the config file's folder. ``stream: true`` (train only) reads a Dataset batch by batch instead of
    loading it (``rows``: its items per epoch, for an iterable without ``len()``)."""

    path: str | None = None
    x: str | None = None
    y: str | None = None
    label_column: str = "label"
    factory: str | None = None
    stream: bool = False
    rows: Annotated[int, Field(gt=0)] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> FileSplit:
        if sum(value is not None for value in (self.path, self.x, self.factory)) != 1:
            raise ValueError(
                "give one of path (a .npz or .csv file), x (and y: .npy files) or factory (module:attribute "
                "returning a Dataset)"
            )
        if self.stream and self.factory is None:
            raise ValueError("stream: true reads a Dataset from factory: module:attribute; files are loaded whole")
        if self.path is not None and Path(self.path).suffix.lower() not in (".npz", ".csv"):
            raise ValueError(f"path must end in .npz or .csv, got {self.path!r}; for .npy files use x: and y:")
        if self.x is not None and self.y is None:
            raise ValueError("x is given without y; add y: labels.npy")
        return self


class SentenceData(_Section):
    """Text for a sentence-encoder run (task ``embedding``, teacher kind ``sentence``): ``source`` is
    ``docstrings`` (:func:`kdistill.corpus.docstring_sentences`: its train / val / test splits by module) or a
    text file with one sentence a line (relative to the config file's folder; blank lines dropped; a seeded shuffle
    holds out a tenth, at least 3, for test). ``train``/``val``/``test``: how many sentences of each split to use
    (None: all of train and test; ``val`` 0: no validation set), the same ones for a given ``seed``."""

    source: str = "docstrings"
    train: Annotated[int, Field(ge=2)] | None = None
    val: Annotated[int, Field(ge=0)] = 0
    test: Annotated[int, Field(ge=3)] | None = None
    seed: int = 0


class DataConfig(_Section):
    """A built-in data set (``kdistill list datasets``), or files for ``train`` and optionally ``val``/``test``.

    ``val`` drives early stopping and keeps the best epoch; the report is measured on ``test``, else ``val``."""

    dataset: str | None = None
    train: FileSplit | None = None
    val: FileSplit | None = None
    test: FileSplit | None = None
    sentences: SentenceData | None = None
    """Text for a sentence encoder (:class:`SentenceData`), instead of ``dataset`` or files."""
    unlabeled: str | None = None
    """Rows without labels for the teacher to label: a .npy file of (rows, *features), or a .npz with array ``x``
    (relative to the config file's folder); the student learns from them, the baseline does not."""

    @field_validator("unlabeled")
    @classmethod
    def _unlabeled_file(cls, value: str | None) -> str | None:
        if value is not None and Path(value).suffix.lower() not in (".npy", ".npz"):
            raise ValueError(f"unlabeled must be a .npy or .npz file, got {value!r}")
        return value

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, value: str | None) -> str | None:
        from kdistill.datasets import DATASETS

        if value is not None and value not in DATASETS:
            raise _unknown("dataset", value, list(DATASETS))
        return value

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        sources = [name for name in ("dataset", "train", "sentences") if getattr(self, name) is not None]
        if len(sources) != 1:
            raise ValueError(
                "give one of dataset (a built-in name), train (files) or sentences (text for a sentence encoder), "
                f"not {' and '.join(sources) if sources else 'none'}"
            )
        for name in ("val", "test"):
            split = getattr(self, name)
            if split is not None and split.stream:
                raise ValueError(f"only the training split streams; {name} is read whole (drop {name}.stream)")
        return self


class TeacherConfig(_Section):
    """``kind``: a registered teacher (``kdistill list teachers``). ``factory``: ``module:attribute`` of your own
    code for kinds ``sklearn``/``torch``; ``path``: a file or folder for kinds that load one. ``params`` go to the
    recipe or to your factory. ``soft_targets``: ``predict`` or ``oof`` (out-of-fold, scikit-learn teachers)."""

    kind: str = "random_forest"
    params: dict[str, Any] = Field(default_factory=dict)
    factory: str | None = None
    path: str | None = None
    output: Literal["auto", "logits", "probs"] = "auto"
    soft_targets: Literal["predict", "oof"] = "predict"
    oof_folds: Annotated[int, Field(ge=2)] = 5

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, value: str) -> str:
        from kdistill.config_recipes import TEACHER_RECIPES

        if value not in TEACHER_RECIPES:
            raise _unknown("teacher kind", value, list(TEACHER_RECIPES))
        return value

    @field_validator("factory")
    @classmethod
    def _reference(cls, value: str | None) -> str | None:
        return None if value is None else _check_reference(value)

    @field_validator("params")
    @classmethod
    def _known_params(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        from kdistill.config_recipes import TEACHER_RECIPES

        kind = info.data.get("kind")
        if isinstance(kind, str) and kind in TEACHER_RECIPES:
            _check_registered(TEACHER_RECIPES, kind, value, "teacher kind")
        return value

    @model_validator(mode="after")
    def _recipe_needs(self) -> TeacherConfig:
        from kdistill.config_recipes import TEACHER_RECIPES

        recipe = TEACHER_RECIPES[self.kind]
        for needed in recipe.needs:
            if getattr(self, needed) is None:
                raise ValueError(f"teacher kind {self.kind!r} needs {needed}: ({recipe.description})")
        return self


class StudentConfig(_Section):
    """``kind``: a registered student (``mlp``, ``cnn``, ...: built and sized from the data; ``params`` as in
    ``kdistill list students``, checked against its builder's signature), or ``custom`` with
    ``factory: module:attribute`` returning your ``nn.Module`` (called with ``params``)."""

    kind: str = "mlp"
    params: dict[str, Any] = Field(default_factory=dict)
    factory: str | None = None

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, value: str) -> str:
        from kdistill.students import STUDENTS

        if value != "custom" and value not in STUDENTS:
            raise _unknown("student kind", value, [*STUDENTS.names(), "custom"])
        return value

    @field_validator("params")
    @classmethod
    def _known_params(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        from kdistill.students import STUDENTS

        kind = info.data.get("kind")
        if isinstance(kind, str) and kind in STUDENTS:
            _check_registered(STUDENTS, kind, value, "student")
        return value

    @model_validator(mode="after")
    def _factory(self) -> StudentConfig:
        if self.kind == "custom" and self.factory is None:
            raise ValueError("student kind 'custom' needs factory: module:attribute returning an nn.Module")
        if self.kind != "custom" and self.factory is not None:
            raise ValueError(f"factory is only for kind 'custom', not {self.kind!r}")
        return self


class MethodTerm(_Section):
    """One distillation method (``kdistill list methods``) with its ``params`` and, in a list, its ``weight``."""

    name: str
    weight: Annotated[float, Field(gt=0)] = 1.0
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, value: str) -> str:
        from kdistill.losses import LOSSES

        if value not in LOSSES:
            raise _unknown("method", value, list(LOSSES))
        return value

    @field_validator("params")
    @classmethod
    def _buildable(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        """Builds the loss once, so a bad parameter value fails now, not after the teacher has run."""
        from kdistill.config_recipes import signature_params
        from kdistill.losses import LOSSES

        name = info.data.get("name")
        if not isinstance(name, str) or name not in LOSSES:
            return value
        factory = LOSSES[name].factory
        valid = signature_params(factory)
        if valid is not None:
            _check_names(f"param for method {name!r}:", value, valid)
        try:
            factory(**value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"method {name!r} rejects these params: {exc}") from exc
        return value


class OptimizerConfig(_Section):
    """``scale_weight_decay``: with unlabeled or generated rows (L labelled of N training rows), decay by
    ``weight_decay * sqrt(L / N)`` (the engine's ``TrainConfig.scale_weight_decay``; false: as given)."""

    name: Literal["adamw", "sgd"] = "adamw"
    lr: Annotated[float, Field(gt=0)] = defaults.LR
    weight_decay: Annotated[float, Field(ge=0)] = defaults.WEIGHT_DECAY
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    scale_weight_decay: bool = True


class ScheduleConfig(_Section):
    """The learning rate by optimizer step: ``warmup_cosine`` (linear warm-up, then cosine decay to 0),
    ``warmup_linear`` (the same warm-up, then linear decay to 0) or ``constant``. The warm-up lasts ``warmup_steps``
    steps when set, else ``warmup_fraction`` of all the steps. ``to_budget: true`` (with ``train.max_minutes``) runs
    the schedule on the clock as well: its progress at each step is the larger of the steps' share and the time
    budget's share spent, so a budget that stops training before the planned epochs still ends at a learning rate
    of 0 instead of being cut at a high one (off by default: a budget longer than the schedule changes nothing)."""

    name: Literal["warmup_cosine", "warmup_linear", "constant"] = "warmup_cosine"
    warmup_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.05
    warmup_steps: Annotated[int, Field(gt=0)] | None = None
    to_budget: bool = False


class TrainSection(_Section):
    """``batch_size`` is the global batch of one optimizer step (split across ranks under torchrun, and into
    ``grad_accumulation`` micro-batches, whose accumulated gradient is the whole batch's mean). ``patience``: epochs
    without a better validation score (the task's monitor: accuracy, or loss for ``token_lm``) before stopping (null:
    never stop early, still keep the best epoch's weights). ``clip_grad_norm``: clip the total gradient norm before
    each step (null: off). ``checkpoint_every_steps``: also checkpoint inside epochs, every N steps (a run folder's
    checkpoints are written every epoch anyway); a run killed mid-epoch then resumes at the next step.
    ``max_steps``: train exactly that many optimizer steps (as many passes over the data as that takes, the last one
    cut short; ``epochs`` is then ignored; the schedule runs over these steps). ``eval_every_steps``: also validate
    every N steps, each evaluation a row of the history with its ``step`` (early stopping still looks at epochs)."""

    epochs: Annotated[int, Field(gt=0)] = defaults.EPOCHS
    batch_size: Annotated[int, Field(gt=0)] = defaults.BATCH_SIZE
    patience: Annotated[int, Field(gt=0)] | None = defaults.PATIENCE
    grad_accumulation: Annotated[int, Field(ge=1)] = 1
    clip_grad_norm: Annotated[float, Field(gt=0)] | None = None
    checkpoint_every_steps: Annotated[int, Field(gt=0)] | None = None
    max_steps: Annotated[int, Field(gt=0)] | None = None
    eval_every_steps: Annotated[int, Field(gt=0)] | None = None
    max_minutes: Annotated[float, Field(gt=0)] | None = None
    """A wall-time budget: training stops at the first step past it (null: none)."""
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()

    @model_validator(mode="after")
    def _budget_for_the_schedule(self) -> TrainSection:
        if self.schedule.to_budget and self.max_minutes is None:
            raise ValueError(
                "schedule.to_budget: true runs the schedule to the time budget's end, but train.max_minutes is not "
                "set; set max_minutes (e.g. 15) or drop to_budget"
            )
        return self


class CacheConfig(_Section):
    """Teacher outputs on the training rows go through :mod:`kdistill.cache`, stored under ``dir`` (a YAML run's
    default: ``<run folder>/cache``; the Python API's: no cache, computed in memory), keyed by the teacher's and the
    data's fingerprints; a resumed run and every torchrun rank read them instead of running the teacher.
    ``reuse: false`` recomputes them even when a matching entry exists. ``storage``: ``fp32``, ``fp16``,
    ``topk:K`` (then the ``kd`` method reads that form exactly, as ``kd_topk``), ``topk16:K`` (per token, read by
    every token divergence) or ``topk16:K+S`` (with S tail ids sampled per token, read by ``forward_kl``)."""

    dir: str | None = None
    reuse: bool = True
    storage: str = "fp32"

    @field_validator("storage")
    @classmethod
    def _known_storage(cls, value: str) -> str:
        from kdistill.cache import parse_storage
        from kdistill.errors import CacheError

        try:
            parse_storage(value)
        except CacheError as exc:
            raise ValueError(f"{exc.message}; {exc.hint}") from None
        return value


class CompressionStep(_Section):
    """A compression step run in order on the trained student: ``onnx`` (export, checked against PyTorch), then
    ``quantize`` (INT8 with ONNX Runtime); see ``kdistill.config_recipes.COMPRESSION_STEPS``."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class AugmentConfig(_Section):
    """Augment every training batch with your own ``function: module:attribute``, called as ``function(x_batch,
    generator) -> x_batch`` (draw randomness from ``generator`` only: a resumed run replays it). The teacher then
    labels each augmented batch live; ``prefetch_teacher`` runs it one batch ahead in a background thread."""

    function: str
    prefetch_teacher: bool = False

    @field_validator("function")
    @classmethod
    def _reference(cls, value: str) -> str:
        return _check_reference(value)


class TransferConfig(_Section):
    """A generated transfer set (:mod:`kdistill.transfer`): ``kind`` (``munge``, ``mixup``, ``jitter``,
    ``class_gaussian``) with its ``params``; ``mode`` ``pool`` (``rows`` rows drawn once, labelled once by the
    teacher through the cache; null: 10x the training rows) or ``live`` (``ratio`` x the batch's rows appended to
    every batch, the teacher run live); ``seed`` (null: the run's seed)."""

    kind: str
    mode: Literal["pool", "live"] = "pool"
    rows: Annotated[int, Field(ge=1)] | None = None
    ratio: Annotated[float, Field(gt=0)] = 1.0
    seed: int | None = None
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, value: str) -> str:
        from kdistill.transfer import GENERATORS

        if value not in GENERATORS:
            raise _unknown("transfer kind", value, GENERATORS.names())
        return value

    @field_validator("params")
    @classmethod
    def _known_params(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        from kdistill.transfer import GENERATORS

        kind = info.data.get("kind")
        if kind is not None:
            _check_registered(GENERATORS, kind, value, "transfer kind")
        return value


class OnPolicyConfig(_Section):
    """GKD's on-policy data (task ``token_lm``): with probability ``student_share`` (λ) a step's batch is replaced by
    the student's own continuations of its first ``prompt_length`` tokens, sampled at ``temperature``, and the live
    teacher labels them; only the generated positions count in the loss (the prompt is masked). ``seed`` (null: the
    run's seed) seeds the coins and the samples; a resumed run continues the same sequence."""

    student_share: Annotated[float, Field(ge=0, le=1)]
    prompt_length: Annotated[int, Field(ge=1)]
    temperature: Annotated[float, Field(gt=0)] = 1.0
    seed: int | None = None


class ReportConfig(_Section):
    """``baseline``: also train the student on hard labels only, for the report. ``profile``: time latency and
    throughput (the slowest part of the report). ``privacy``: estimate membership inference (the AUC of loss- and
    confidence-threshold attacks separating training rows from held-out rows) for teacher and student."""

    enabled: bool = True
    baseline: bool = True
    profile: bool = False
    privacy: bool = True


class DeviceConfig(_Section):
    """``type``: ``auto`` (a GPU when there is one, else the CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
    ``precision``: ``fp32``, or ``bf16``/``fp16`` autocast (fp16 only on CUDA). ``num_threads``: ``auto`` or a count.
    ``parallel``: under torchrun, ``ddp`` (every rank holds the whole student) or ``fsdp`` (the student's parameters,
    gradients and optimizer state sharded over the ranks with ``torch.distributed.fsdp.fully_shard``)."""

    type: str = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    num_threads: int | Literal["auto"] = "auto"
    parallel: Literal["ddp", "fsdp"] = "ddp"

    @field_validator("type")
    @classmethod
    def _known(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
            raise _unknown("device", value, ["auto", "cpu", "cuda", "cuda:0", "mps"])
        return value

    @model_validator(mode="after")
    def _precision(self) -> DeviceConfig:
        if self.precision == "fp16" and self.type in ("cpu", "mps"):
            raise ValueError(f"precision fp16 needs CUDA, but device is {self.type!r}; use bf16 on the CPU")
        return self


class LoggingConfig(_Section):
    """``jsonl``: metrics.jsonl in the run folder (one line per epoch). ``tensorboard``: event files under
    ``tensorboard/`` (needs the tensorboard package). ``console``: one line per epoch; ``progress``: a progress bar."""

    jsonl: bool = True
    tensorboard: bool = False
    console: bool = True
    progress: bool = False


class BudgetConfig(_Section):
    """What the searched student may cost (``kdistill search``, ``distill(teacher, "auto", budget=...)``); every
    limit is optional. ``max_params``: parameters (weights and biases); ``max_bytes``: its safetensors file;
    ``max_latency_ms``: the median batch-1 latency, measured with ``threads`` torch threads (the target's count)."""

    max_params: Annotated[int, Field(gt=0)] | None = None
    max_bytes: Annotated[int, Field(gt=0)] | None = None
    max_latency_ms: Annotated[float, Field(gt=0)] | None = None
    threads: Annotated[int, Field(ge=1)] = 1


class SearchConfig(_Section):
    """How the student search runs (:mod:`kdistill.search`, docs/search.md). ``trials``: short KD runs to train
    (candidates over the budget are refused before training and not counted); ``timeout_s``: stop drawing new trials
    after this long (per process); ``max_epochs``: stop once the study's short runs total this many epochs (a compute
    budget; pruned runs count what they ran). ``epochs``/``patience``: each short run's length (``epochs`` left out:
    ``max_epochs // 6`` clipped to 4-30 with a compute budget, else 30). ``families``: the registered candidate
    spaces to draw from (default: every one that fits the data); ``fixed``: builder params held fixed per family
    (``{cnn: {in_shape: [1, 8, 8]}}``). ``temperature``, ``soft_weight``, ``lr``: the ranges tuned in the same study.
    ``pruner``: ``median``, ``hyperband`` or ``none``, on the validation accuracy after each epoch.
    ``storage``: a journal file path (several processes on one machine share it) or an RDB URL
    (``postgresql://...``); default: ``<run folder>/search/study.journal``, in memory without a run folder.
    ``seed``: the sampler's (default: the run's seed). ``warm_start``: a new study first tries, at the run's own
    temperature, soft weight and lr, each family's widest usual-shaped candidate of each depth inside the budget (an
    MLP tapering by half, a CNN of equal blocks), the largest first."""

    trials: Annotated[int, Field(gt=0)] = 20
    timeout_s: Annotated[float, Field(gt=0)] | None = None
    max_epochs: Annotated[int, Field(gt=0)] | None = None
    epochs: Annotated[int, Field(gt=0)] | None = None
    patience: Annotated[int, Field(gt=0)] | None = 10
    families: list[str] | None = None
    fixed: dict[str, dict[str, Any]] = Field(default_factory=dict)
    temperature: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]] = (1.0, 8.0)
    soft_weight: tuple[Annotated[float, Field(ge=0, le=1)], Annotated[float, Field(ge=0, le=1)]] = (0.1, 0.95)
    lr: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]] = (1e-3, 1e-1)
    pruner: Literal["median", "hyperband", "none"] = "median"
    seed: int | None = None
    storage: str | None = None
    study_name: Annotated[str, Field(min_length=1)] = "kdistill-search"
    warm_start: bool = True

    @field_validator("families")
    @classmethod
    def _known_families(cls, value: list[str] | None) -> list[str] | None:
        from kdistill.search.space import SEARCH_SPACES

        for name in value or []:
            if name not in SEARCH_SPACES:
                raise _unknown("search family", name, list(SEARCH_SPACES))
        if value is not None and not value:
            raise ValueError("families is empty; leave it out to search every registered family")
        return value

    @field_validator("fixed")
    @classmethod
    def _known_fixed(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        from kdistill.search.space import SEARCH_SPACES
        from kdistill.students import STUDENTS

        for family, params in value.items():
            if family not in SEARCH_SPACES:
                raise _unknown("search family", family, list(SEARCH_SPACES))
            if family in STUDENTS:
                _check_registered(STUDENTS, family, params, "student")
        return value

    @field_validator("temperature", "soft_weight", "lr")
    @classmethod
    def _ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        if value[0] > value[1]:
            raise ValueError(f"a range is [low, high] with low <= high, got {list(value)}")
        return value


class SearchSections(_Section):
    """The two sections a student search adds to a run: ``budget`` and ``search``."""

    budget: BudgetConfig = BudgetConfig()
    search: SearchConfig = SearchConfig()


class Settings(_Section):
    """How a run trains, caches, reports and logs: every section of a config except what it distils (data, teacher,
    student). ``task``: ``classification`` (the default), ``token_lm``, ``embedding`` or ``regression``
    (:mod:`kdistill.tasks`). The Python API validates its arguments through this same model, so a bad value gets the
    same error from ``kdistill.distill`` as from YAML. ``method``: a name, a mapping ``{name, params}``, or a list of
    weighted terms (each name once). ``transfer``: generated rows the teacher labels (:class:`TransferConfig`).
    ``on_policy``: GKD's student-generated batches for ``token_lm`` (:class:`OnPolicyConfig`)."""

    seed: int = 0
    task: str = "classification"
    method: list[MethodTerm] = Field(default_factory=lambda: [MethodTerm(name="kd")], min_length=1)
    train: TrainSection = TrainSection()
    cache: CacheConfig = CacheConfig()
    augment: AugmentConfig | None = None
    transfer: TransferConfig | None = None
    on_policy: OnPolicyConfig | None = None
    compression: list[CompressionStep] = Field(default_factory=list)
    report: ReportConfig = ReportConfig()
    device: DeviceConfig = DeviceConfig()
    logging: LoggingConfig = LoggingConfig()

    @field_validator("method", mode="before")
    @classmethod
    def _method_forms(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [{"name": value}]
        if isinstance(value, dict):
            return [value]
        return value

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        from kdistill.tasks import TASKS

        if value not in TASKS:
            raise _unknown("task", value, list(TASKS))
        return value

    @field_validator("method")
    @classmethod
    def _each_once(cls, value: list[MethodTerm]) -> list[MethodTerm]:
        names = [term.name for term in value]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(
                f"{twice[0]!r} is listed {names.count(twice[0])} times; list each method once "
                "(its terms are logged under its name) and set its weight instead"
            )
        return value


class RunConfig(Settings):
    """A whole run. ``out``: the run folder, relative to the current directory (default ``runs/<name>``); every
    output goes there. ``budget`` and ``search`` are read by ``kdistill search`` (docs/search.md), which chooses the
    student itself: it does not read the ``student`` section."""

    name: Annotated[str, Field(pattern=r"^[\w.-]+$")] = "run"
    out: str | None = None
    data: DataConfig
    teacher: TeacherConfig = TeacherConfig()
    student: StudentConfig = StudentConfig()
    budget: BudgetConfig | None = None
    search: SearchConfig | None = None

    _base: Path = PrivateAttr(default_factory=Path.cwd)

    @property
    def base(self) -> Path:
        """The config file's folder: relative data paths and user modules are found from here."""
        return self._base

    @property
    def run_folder(self) -> Path:
        return Path(self.out) if self.out is not None else Path("runs") / self.name

    def resolve(self, path: str) -> Path:
        """A path from the config, relative to the config file's folder."""
        candidate = Path(os.path.expanduser(path))
        return candidate if candidate.is_absolute() else self._base / candidate


# ---------------------------------------------------------------------------------------------------- reading YAML


class _StrictLoader(yaml.SafeLoader):
    """safe_load, plus: a key written twice in one mapping is an error (YAML would silently keep the last)."""


def _no_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} appears twice in one mapping (first on line {seen[key]})", key_node.start_mark
            )
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"no config file at {path}", hint="check the path; `kdistill validate FILE` checks one.")
    try:
        raw = yaml.load(path.read_text(), Loader=_StrictLoader)  # a SafeLoader subclass: plain data only
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(
            f"{path} is not valid YAML{where}: {problem}",
            hint="configs are plain data: no !tags (nothing in a config runs code), no repeated keys.",
        ) from exc
    if raw is None:
        raise ConfigError(f"{path} is empty", hint="start from a file in examples/ (kdistill validate checks it).")
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path} must hold a mapping of sections at the top, got a {type(raw).__name__}",
            hint="write `data:`, `teacher:`, `student:`, ... at the top level.",
        )
    return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``dotted.key=value`` set; the value is parsed as YAML (``3``, ``1e-3``,
    ``[64, 32]``, ``true``). List items are addressed by position (``method.1.weight=0.5``); a list of one item
    also by the item's keys (``method.params.temperature=2``)."""
    result = copy.deepcopy(raw)
    if isinstance(result.get("method"), (str, dict)):  # the short forms of method, as the list they stand for
        method = result["method"]
        result["method"] = [{"name": method} if isinstance(method, str) else method]
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {override!r} is not key=value", hint="write e.g. --set train.epochs=5")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(
                f"--set {override!r}: the value is not valid YAML ({exc})",
                hint="quote strings with special characters.",
            ) from exc
        _set(result, key.strip().split("."), value, key)
    return result


def _set(node: Any, parts: list[str], value: Any, key: str) -> None:
    for depth, part in enumerate(parts):
        if isinstance(node, list) and not part.isdigit() and len(node) == 1:
            node = node[0]  # method.params.x for a single method
        last = depth == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(
                    f"--set {key}: {part!r} is not a position in a list of {len(node)}",
                    hint=f"use a position 0..{len(node) - 1}, e.g. method.0.weight=0.5",
                )
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            where = ".".join(parts[:depth])
            raise ConfigError(
                f"--set {key}: {where} holds {node!r}, which has no keys to set",
                hint=f"set {where} itself, e.g. --set {where}=VALUE",
            )


# ---------------------------------------------------------------------------------------------------- error messages


def _model_at(model: type[BaseModel] | None, loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The section model found by following ``loc`` from ``model``, or None."""
    for part in loc:
        if model is None:
            return None
        if isinstance(part, int):
            continue
        if part not in model.model_fields:
            return None
        model = _find_model(model.model_fields[part].annotation)
    return model


def _find_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in get_args(annotation):
        found = _find_model(argument)
        if found is not None:
            return found
    return None


def _path(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _describe(error: Any, root: type[BaseModel] = BaseModel) -> str:
    loc = tuple(error["loc"])
    path, value, kind = _path(loc), error.get("input"), error["type"]
    if kind == "extra_forbidden":
        section = _model_at(root, loc[:-1])
        valid = sorted(section.model_fields) if section is not None else []
        return f"{path}: unknown key; {_closest(loc[-1], valid)}valid keys here: {', '.join(valid)}"
    if kind == "literal_error":
        valid = re.findall(r"'([^']*)'", error["ctx"]["expected"])
        return f"{path}: {value!r} is not allowed; {_closest(value, valid)}valid: {', '.join(valid)}"
    if kind == "missing":
        return f"{path}: required, but missing"
    message = str(error["msg"]).removeprefix("Value error, ")
    shown = (
        "" if isinstance(value, dict) or (isinstance(value, str) and repr(value) in message) else f" (got {value!r})"
    )
    return f"{path}: {message}{shown}"


_Model = TypeVar("_Model", bound=BaseModel)


def _validate(raw: dict[str, Any], source: str, model: type[_Model]) -> _Model:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        problems = [_describe(error, model) for error in exc.errors()]
        count = f"{len(problems)} error" + ("s" if len(problems) > 1 else "")
        raise ConfigError(
            f"{source}: {count}:\n    " + "\n    ".join(problems),
            hint="fix the fields named above; `kdistill list methods|teachers|students|datasets` shows valid names.",
        ) from None


def load_config(path: str | os.PathLike[str], overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read, override and validate a run config. Raises :class:`ConfigError` naming every bad field at once."""
    source = Path(path)
    raw = apply_overrides(_read_yaml(source), overrides)
    config = _validate(raw, str(source), RunConfig)
    config._base = source.resolve().parent
    return config


class SoftTargets(_Section):
    """What the student learns from on the training rows: the teacher's own outputs (``predict``) or out-of-fold
    outputs of clones of a scikit-learn teacher (``oof``, with ``oof_folds`` folds), for teachers that memorised
    their rows. In a config these are ``teacher.soft_targets`` and ``teacher.oof_folds``."""

    soft_targets: Literal["predict", "oof"] = "predict"
    oof_folds: Annotated[int, Field(ge=2)] = 5


def validate_soft_targets(soft_targets: str, oof_folds: int, source: str = "distill()") -> SoftTargets:
    """Validate the soft-target arguments of the Python API with the rule a config's teacher section follows."""
    return _validate({"soft_targets": soft_targets, "oof_folds": oof_folds}, source, SoftTargets)


def validate_search(
    budget: dict[str, Any] | None, search: dict[str, Any] | None, source: str = "distill()"
) -> SearchSections:
    """Validate a student search's ``budget`` and ``search`` mappings (the Python API's arguments) with the rules of
    a config's sections: an unknown key names the closest valid one (``budget.max_param: unknown key; did you mean
    'max_params'?``)."""
    return _validate({"budget": dict(budget or {}), "search": dict(search or {})}, source, SearchSections)


def validate_settings(raw: dict[str, Any], source: str = "distill()") -> Settings:
    """Validate run settings given as the sections of a config (``{"train": {"epochs": 5}, ...}``); the error is the
    one a YAML file with those sections gets, with ``source`` naming where they came from."""
    return _validate(raw, source, Settings)


# ---------------------------------------------------------------------------------------------------- references


def check_references(config: RunConfig) -> None:
    """What the schema cannot check alone: data files exist, ``module:attribute`` references import, a CUDA device
    exists when asked for, compression steps are registered. Imports the user's modules (their own code)."""
    from kdistill.config_recipes import TEACHER_RECIPES, import_reference, signature_params

    sentences = config.data.sentences
    if sentences is not None and sentences.source != "docstrings" and not config.resolve(sentences.source).is_file():
        raise ConfigError(
            f"data.sentences.source: {sentences.source!r} is neither 'docstrings' nor a file (looked at "
            f"{config.resolve(sentences.source)})",
            hint="a text file with one sentence a line, relative to the config file's folder.",
        )
    for split_name in ("train", "val", "test"):
        split: FileSplit | None = getattr(config.data, split_name)
        if split is None:
            continue
        for field_name in ("path", "x", "y"):
            value = getattr(split, field_name)
            if value is not None and not config.resolve(value).is_file():
                raise ConfigError(
                    f"data.{split_name}.{field_name}: no file at {config.resolve(value)} (from {value!r})",
                    hint="relative paths are read from the config file's folder.",
                )
    if config.teacher.factory is not None:
        factory = import_reference(config.teacher.factory, base=config.base, field="teacher.factory")
        _check_factory_params("teacher", factory, config.teacher.params, signature_params)
    if config.teacher.path is not None and not config.resolve(config.teacher.path).exists():
        raise ConfigError(
            f"teacher.path: nothing at {config.resolve(config.teacher.path)} (from {config.teacher.path!r})",
            hint=f"teacher kind {config.teacher.kind!r}: {TEACHER_RECIPES[config.teacher.kind].description}",
        )
    if config.student.factory is not None:
        factory = import_reference(config.student.factory, base=config.base, field="student.factory")
        _check_factory_params("student", factory, config.student.params, signature_params)
    if config.augment is not None:
        function = import_reference(config.augment.function, base=config.base, field="augment.function")
        if not callable(function):
            raise ConfigError(
                f"augment.function is a {type(function).__name__}, not something to call",
                hint="point it at a function (x_batch, generator) -> x_batch.",
            )
    if config.device.type.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                f"device.type: {config.device.type!r} but no CUDA GPU is available",
                hint="use device.type: auto (falls back to the CPU) or cpu.",
            )
    _check_compression(config)


def _check_compression(config: RunConfig) -> None:
    from kdistill.config_recipes import COMPRESSION_STEPS

    seen: list[str] = []
    for position, step in enumerate(config.compression):
        where = f"compression[{position}]"
        if step.name not in COMPRESSION_STEPS:
            raise ConfigError(
                f"{where}.name: unknown compression step {step.name!r}",
                hint=_closest(step.name, list(COMPRESSION_STEPS)) + f"valid: {', '.join(sorted(COMPRESSION_STEPS))}",
            )
        recipe = COMPRESSION_STEPS[step.name]
        for name in step.params:
            if name not in recipe.params:
                raise ConfigError(
                    f"{where}.params.{name}: step {step.name!r} takes no parameter {name!r}",
                    hint=_closest(name, list(recipe.params)) + f"it takes: {', '.join(recipe.params)}",
                )
        if recipe.after is not None and recipe.after not in seen:
            raise ConfigError(
                f"{where}: step {step.name!r} needs a {recipe.after!r} step before it",
                hint=f"list {{name: {recipe.after}}} first in compression.",
            )
        seen.append(step.name)
    if config.compression:
        from kdistill._deps import require

        require("onnx")
        require("onnxruntime")


def _check_factory_params(role: str, factory: Any, params: dict[str, Any], signature_params: Any) -> None:
    if not callable(factory):
        raise ConfigError(
            f"{role}.factory is a {type(factory).__name__}, not something to call",
            hint="point it at a function or class that returns the model.",
        )
    valid = signature_params(factory)
    if valid is None:
        return
    for name in params:
        if name not in valid:
            raise ConfigError(
                f"{role}.params.{name}: {getattr(factory, '__name__', factory)} takes no parameter {name!r}",
                hint=f"{_closest(name, valid)}it takes: {', '.join(valid) or 'nothing'}",
            )
