"""How a run grows its training set beyond the labelled rows: unlabeled rows, and a transfer set generated once
(a pool) or every epoch (live).

The pipeline asks this module for three things:

- :func:`read_unlabeled`: the user's unlabeled rows, checked against the training rows (same per-row shape, finite);
- :func:`extra_rows`: those rows and a generated pool, with the teacher's outputs on them (through the cache when
  the run has one); the pipeline appends them to the training split with ``label_mask`` False;
- :class:`LiveTransfer`: the teacher-output source of live mode, which appends freshly generated rows to every
  batch and labels the whole batch with the live teacher.

The per-batch mix. The labelled, unlabeled and pooled rows are one transfer set, shuffled together each epoch (the
engine's one permutation), so a batch of B rows holds B·L/N labelled rows in expectation (L labelled of N rows).
Every row of a batch of B rows weighs 1/B in both terms: the soft (teacher) term is averaged over
every row; the hard term sums the labelled rows (their targets are real labels, the others
:data:`~kdistill.engine.batches.UNLABELLED`, which count 0) and divides by B, so a labelled row weighs what it
weighs in a fully labelled batch however many unlabeled rows share it
(:func:`~kdistill.losses.common.labelled_cross_entropy`); a batch without a labelled row has a hard term of 0. For
``kd``: ``loss = (1 - w)·(1/B)·Σ_{labelled} CE + w·T²·mean_{all} KL``. In live mode each batch of B training rows gets
``ceil(ratio·B)`` generated rows appended (unlabeled), and the teacher labels all of them. With unlabeled or pooled
rows the engine decays the weights by ``weight_decay·sqrt(L/N)`` (``TrainConfig.scale_weight_decay``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

import torch

from kdistill.data import Inputs, as_inputs, concat_rows, rows_in, take_rows
from kdistill.engine.batches import UNLABELLED, Batch
from kdistill.engine.live import AugmentedTeacher
from kdistill.errors import ConfigError, DataError
from kdistill.registry import Registry
from kdistill.teachers import teacher_logits
from kdistill.teachers.base import Outputs, Teacher
from kdistill.transfer.generators import ClassGaussian, Jitter, Mixup, Munge, TransferGenerator

if TYPE_CHECKING:
    from kdistill.data import Split

__all__ = [
    "GENERATORS",
    "ExtraRows",
    "LiveTransfer",
    "Transfer",
    "as_transfer",
    "extra_rows",
    "read_unlabeled",
    "row_summary",
    "rows_line",
]

GENERATORS: Registry[Any] = Registry("transfer generator")
GENERATORS.add("munge", Munge, "Bucila et al. 2006: nearest-neighbour swaps (prob p), noise |a-b|/s; tabular")
GENERATORS.add("mixup", Mixup, "convex combinations of two rows, lambda ~ Beta(alpha, alpha); any row shape")
GENERATORS.add("jitter", Jitter, "Gaussian noise, amplitude scaling and circular shifts; vectors and series")
GENERATORS.add("class_gaussian", ClassGaussian, "a Gaussian (or Gaussian mixture) per class of the labelled rows")

DEFAULT_POOL_FACTOR = 10
"""A pool without a stated size holds this many times the rows its generator was fitted on."""


@dataclass(frozen=True)
class Transfer:
    """A transfer set to generate: ``generator`` (fitted on the training rows, labelled and unlabeled), ``mode``
    ``"pool"`` (``rows`` rows drawn once and labelled once by the teacher, through the cache; None: 10× the rows
    it is fitted on) or ``"live"`` (``ceil(ratio·B)`` new rows appended to every batch of B rows, the teacher run
    live), seeded by ``seed`` (None: the run's seed)."""

    generator: TransferGenerator
    mode: Literal["pool", "live"] = "pool"
    rows: int | None = None
    ratio: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.generator, TransferGenerator):
            raise ConfigError(
                f"a transfer generator is a TransferGenerator, got {type(self.generator).__name__}",
                hint=f"use one of {', '.join(GENERATORS.names())}, e.g. kdistill.transfer.Munge(p=0.5).",
            )
        if self.mode not in ("pool", "live"):
            raise ConfigError(f"transfer mode must be 'pool' or 'live', got {self.mode!r}", hint="pool: labelled once.")
        if self.rows is not None and (isinstance(self.rows, bool) or not isinstance(self.rows, int) or self.rows < 1):
            raise ConfigError(f"transfer rows must be a whole number >= 1, got {self.rows!r}", hint="e.g. 50000.")
        if not (self.ratio > 0 and math.isfinite(self.ratio)):
            raise ConfigError(f"transfer ratio must be > 0, got {self.ratio!r}", hint="1.0: as many new rows as rows.")

    def describe(self) -> dict[str, Any]:
        """What the report and the run's fingerprint record."""
        return {
            "kind": self.generator.name,
            "params": self.generator.params(),
            "mode": self.mode,
            "rows": self.rows,
            "ratio": self.ratio,
            "seed": self.seed,
        }


def as_transfer(value: Any) -> Transfer | None:
    """``transfer=`` as a :class:`Transfer`: one already, a generator (a pool of the default size), a registered
    name, or a mapping ``{"kind": "munge", "mode": "pool", "rows": 50000, "params": {"p": 0.5}}`` (the YAML
    ``transfer:`` section); None stays None."""
    if value is None or isinstance(value, Transfer):
        return value
    if isinstance(value, TransferGenerator):
        return Transfer(value)
    if isinstance(value, str):
        return Transfer(GENERATORS.build(value))
    if isinstance(value, Mapping) or hasattr(value, "model_dump"):
        spec = dict(value.model_dump() if hasattr(value, "model_dump") else value)
        kind = spec.pop("kind", None)
        if kind is None:
            raise ConfigError("a transfer mapping needs a kind", hint=f"kind: one of {', '.join(GENERATORS.names())}")
        generator = GENERATORS.build(kind, **dict(spec.pop("params", None) or {}))
        unknown = sorted(set(spec) - {"mode", "rows", "ratio", "seed"})
        if unknown:
            raise ConfigError(
                f"unknown transfer key {unknown[0]!r}", hint="keys: kind, mode, rows, ratio, seed, params."
            )
        return Transfer(generator, **spec)
    raise ConfigError(
        f"transfer= takes a Transfer, a generator, a name or a mapping, got {type(value).__name__}",
        hint="e.g. transfer=kdistill.transfer.Transfer(Munge(p=0.5), rows=50_000).",
    )


def read_unlabeled(value: Any, train_x: Inputs) -> Inputs | None:
    """The unlabeled rows checked against the training rows ``train_x``, None staying None.

    Rows of features: a float tensor (rows, *features) with the training rows' per-row shape, no NaN or inf
    (:func:`kdistill.data.as_inputs`'s checks and messages). Token mappings (when the training rows are one, as for a
    transformer teacher): the same keys as the training rows (``input_ids``, ``attention_mask``, ...), each with the
    training entry's dtype and shape past (rows, seq); the sequence length may differ (:func:`kdistill.data.
    concat_rows` pads the shorter one when the rows are joined)."""
    if value is None:
        return None
    if isinstance(value, tuple):
        raise DataError(
            "unlabeled= takes the rows alone (X_unlabeled), got a tuple",
            hint="pass the array itself: unlabeled=X_u, without labels.",
        )
    rows = as_inputs(value, name="unlabeled")
    if isinstance(train_x, Mapping):
        return _unlabeled_mapping(rows, train_x)
    if not isinstance(rows, torch.Tensor):
        raise DataError(
            "unlabeled rows must be one array of features, got a mapping",
            hint="pass a (rows, *features) array with the training rows' columns.",
        )
    if tuple(rows.shape[1:]) != tuple(train_x.shape[1:]):
        raise DataError(
            f"the unlabeled rows have shape {tuple(rows.shape[1:])} per row but the training rows have "
            f"{tuple(train_x.shape[1:])}",
            hint="unlabeled rows need the training rows' features, in the same order.",
        )
    return rows.to(train_x.dtype)


def _unlabeled_mapping(rows: Inputs, train_x: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Unlabeled token rows against a mapping of training rows: the same keys, dtypes and shapes past (rows, seq)."""
    keys = sorted(train_x)
    if not isinstance(rows, Mapping):
        raise DataError(
            f"the training rows are a mapping of inputs {keys}, but the unlabeled rows are one array",
            hint="pass unlabeled texts with tokenizer=, or a mapping with the same keys: "
            "unlabeled={'input_ids': ..., 'attention_mask': ...}.",
        )
    if sorted(rows) != keys:
        raise DataError(
            f"the unlabeled rows have the inputs {sorted(rows)} but the training rows have {keys}",
            hint="tokenize the unlabeled texts with the training rows' tokenizer (or pass them as strings with "
            "tokenizer=), so both hold the same inputs.",
        )
    checked: dict[str, torch.Tensor] = {}
    for key in keys:
        value, train = rows[key], train_x[key]
        if value.ndim != train.ndim or tuple(value.shape[2:]) != tuple(train.shape[2:]):
            raise DataError(
                f"unlabeled[{key!r}] has shape {tuple(value.shape)} but the training rows' has {tuple(train.shape)}",
                hint="each input needs the training rows' shape per row (the sequence length may differ).",
            )
        checked[key] = value.to(train.dtype)
    return checked


@dataclass
class ExtraRows:
    """The rows appended to the training split, with the teacher's outputs on them ((rows, *outputs), None in live
    mode). ``unlabeled``: a tensor of rows, or a token mapping for a transformer teacher. ``live``: the live transfer
    (None for a pool or none)."""

    unlabeled: Inputs | None = None
    unlabeled_targets: torch.Tensor | None = None
    generated: torch.Tensor | None = None
    generated_targets: torch.Tensor | None = None
    live: Transfer | None = None
    transfer: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def inputs(self, *, pad_token_id: int = 0) -> Inputs | None:
        """The unlabeled then generated rows (:func:`kdistill.data.concat_rows`), or None when there are none."""
        parts: list[Inputs] = [part for part in (self.unlabeled, self.generated) if part is not None]
        return concat_rows(parts, pad_token_id=pad_token_id) if parts else None

    def targets(self) -> torch.Tensor | None:
        """The teacher's outputs on :meth:`inputs`, in the same order (None in live mode)."""
        parts = [part for part in (self.unlabeled_targets, self.generated_targets) if part is not None]
        return torch.cat(parts) if parts else None


def _feature_names(split: Split) -> list[str] | None:
    columns = getattr(split.raw_x, "columns", None)
    return None if columns is None else [str(name) for name in columns]


def extra_rows(
    transfer: Transfer | None,
    unlabeled: Inputs | None,
    train: Split,
    *,
    seed: int,
    label: Any,
) -> ExtraRows | None:
    """The unlabeled rows and the generated pool (fitted on the labelled and unlabeled rows; a class sampler on the
    labelled ones), each labelled by ``label(x) -> teacher outputs`` (the pipeline's cached teacher call; None in
    live mode, where the teacher labels every batch as it comes). None when there is neither. In live mode the
    generator is fitted here and the rows come per batch."""
    if transfer is None and unlabeled is None:
        return None
    import time

    extra = ExtraRows(unlabeled=unlabeled)
    if unlabeled is not None and label is not None:
        started = time.perf_counter()
        extra.unlabeled_targets = label(unlabeled)
        extra.seconds["label_unlabeled"] = time.perf_counter() - started
    if transfer is None:
        return extra
    if not isinstance(train.x, torch.Tensor) or not (unlabeled is None or isinstance(unlabeled, torch.Tensor)):
        raise ConfigError(
            f"transfer generator {transfer.generator.name!r} makes rows of features, but the training rows are a "
            "mapping of inputs (token ids)",
            hint="for text, give the teacher unlabeled texts instead: unlabeled=[...] with tokenizer=.",
        )
    extra.transfer = transfer.describe()
    fit_rows = train.x if unlabeled is None else torch.cat([train.x, unlabeled])
    started = time.perf_counter()
    transfer.generator.fit(
        fit_rows if transfer.generator.name != "class_gaussian" else train.x,
        train.y,
        seed=transfer.seed if transfer.seed is not None else seed,
        feature_names=_feature_names(train),
    )
    extra.seconds["fit"] = time.perf_counter() - started
    if transfer.mode == "live":
        extra.live = transfer
        return extra
    rows = transfer.rows if transfer.rows is not None else DEFAULT_POOL_FACTOR * len(fit_rows)
    generator = torch.Generator().manual_seed(transfer.seed if transfer.seed is not None else seed)
    started = time.perf_counter()
    extra.generated = transfer.generator.sample(rows, generator).to(train.x.dtype)
    extra.seconds["generate"] = time.perf_counter() - started
    started = time.perf_counter()
    extra.generated_targets = label(extra.generated)
    extra.seconds["label_generated"] = time.perf_counter() - started
    return extra


class LiveTransfer(AugmentedTeacher):
    """Live mode: every batch of B rows gets ``ceil(ratio·B)`` rows from ``generator.transform`` appended (drawn
    from the batch's rows, unlabeled: target :data:`~kdistill.engine.batches.UNLABELLED`, ``label_mask`` False),
    and the live teacher labels the whole batch. Seeded and resumable as
    :class:`~kdistill.engine.live.AugmentedTeacher` (the generator is seeded from ``seed`` and the epoch)."""

    def __init__(
        self,
        transfer: Transfer,
        teacher: Teacher,
        features: Sequence[str] = (),
        *,
        seed: int = 0,
        prefetch: bool = False,
    ) -> None:
        super().__init__(self._grow, teacher, features, seed=seed, prefetch=prefetch)
        self.transfer = transfer

    def _grow(self, inputs: Any, generator: torch.Generator) -> Any:  # only _label calls it, on tensors
        return inputs

    def _label(self, batch: Batch, generator: torch.Generator) -> tuple[Batch, Outputs | None]:
        if not isinstance(batch.inputs, torch.Tensor):
            raise DataError("live transfer sets need tensor inputs", hint="use a pool, or tensor rows.")
        grown = _append_generated(batch, self.transfer, generator)
        return super()._label(grown, generator)


def _append_generated(batch: Batch, transfer: Transfer, generator: torch.Generator) -> Batch:
    """``batch`` with ``ceil(ratio·B)`` generated, unlabeled rows appended (drawn from its own rows, cycled)."""
    inputs = batch.inputs
    assert isinstance(inputs, torch.Tensor)
    count = math.ceil(transfer.ratio * len(batch))
    source = inputs[torch.arange(count, device=inputs.device) % len(batch)]
    generated = transfer.generator.transform(source, generator).to(inputs.device, inputs.dtype)
    index = torch.cat([batch.index, batch.index[torch.arange(count, device=batch.index.device) % len(batch)]])
    if batch.target is None:
        return replace(batch, inputs=torch.cat([inputs, generated]), index=index)
    filler = torch.full((count, *batch.target.shape[1:]), UNLABELLED, dtype=batch.target.dtype, device=index.device)
    labelled = batch.label_mask if batch.label_mask is not None else torch.ones(len(batch), dtype=torch.bool)
    mask = torch.cat([labelled.to(index.device), torch.zeros(count, dtype=torch.bool, device=index.device)])
    return replace(
        batch,
        inputs=torch.cat([inputs, generated]),
        target=torch.cat([batch.target, filler]),
        index=index,
        label_mask=mask,
    )


def _agreement(student: torch.Tensor, teacher: torch.Tensor) -> float | None:
    """Share of rows where the student's and the teacher's top class agree; None for outputs without classes."""
    if student.ndim != 2 or teacher.shape != student.shape or student.shape[1] < 2:
        return None
    return float((student.argmax(1) == teacher.argmax(1)).float().mean())


def row_summary(
    predict: Any,
    teacher: Any,
    groups: Mapping[str, tuple[Inputs, torch.Tensor | None, torch.Tensor | None]],
    *,
    sample_rows: int = 2000,
) -> dict[str, dict[str, Any]]:
    """Per group of training rows (``labelled``, ``unlabeled``, ``generated``): how many rows, and on up to
    ``sample_rows`` of them (the first ones) the student's agreement with the teacher (top class) and, for labelled
    rows, the teacher's accuracy on their labels. ``groups``: name -> (rows, teacher outputs or None, labels or
    None); the teacher runs when its outputs are None or not of the student's shape (a top-k cache form).
    ``predict(x)`` gives the student's outputs."""
    summary: dict[str, dict[str, Any]] = {}
    for name, (rows, outputs, labels) in groups.items():
        entry: dict[str, Any] = {"rows": rows_in(rows)}
        x = take_rows(rows, slice(0, sample_rows))
        measured = rows_in(x)
        with torch.inference_mode():
            student = (
                torch.cat([predict(take_rows(x, slice(i, i + 1024))) for i in range(0, measured, 1024)]).float().cpu()
            )
            stored = None if outputs is None else outputs[:sample_rows].float().cpu()
            if stored is not None and stored.shape == student.shape:
                reference = stored
            else:  # none stored, or a top-k cache form
                reference = teacher_logits(teacher, x).float().cpu()
        agreement = _agreement(student, reference)
        if agreement is not None:
            entry["student_teacher_agreement"] = agreement
            if labels is not None and not labels.is_floating_point():
                entry["teacher_accuracy"] = float((reference.argmax(1) == labels[:sample_rows].cpu()).float().mean())
        entry["measured_rows"] = measured
        summary[name] = entry
    return summary


def rows_line(summary: Mapping[str, Mapping[str, Any]]) -> str:
    """The report's line for :func:`row_summary`: ``training rows: labelled 150 (student-teacher agreement 99.3%,
    teacher accuracy 100.0%), unlabeled 850 (94.1%), generated 2000 (94.5%)``."""
    parts = []
    for name, entry in summary.items():
        details = []
        if "student_teacher_agreement" in entry:
            details.append(f"student-teacher agreement {entry['student_teacher_agreement']:.1%}")
        if "teacher_accuracy" in entry:
            details.append(f"teacher accuracy {entry['teacher_accuracy']:.1%}")
        if "mode" in entry:
            details.append(str(entry["mode"]))
        parts.append(f"{name} {entry['rows']}" + (f" ({', '.join(details)})" if details else ""))
    return "training rows: " + ", ".join(parts)
