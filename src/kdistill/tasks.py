"""Tasks: what a run assumes about its outputs, targets, validation and report, by kind of problem.

A task owns what used to be hard-coded for classification: checking that the student's and the teacher's outputs fit
together, encoding targets, the validation metrics with the early-stopping monitor and its direction, and the
report's columns with the metric function that fills them per model. Four are registered by name:

- ``"classification"``: (batch, classes) logits, integer labels; validation accuracy and NLL (kdistill 0.1's).
- ``"token_lm"``: (batch, seq, vocab) logits and a (batch, seq) padding mask; next-token targets; validation loss and
  perplexity over real tokens, token accuracy.
- ``"embedding"``: (batch, dim) embeddings; no labels; validation by cosine similarity to the teacher's embeddings
  and MSE.
- ``"regression"``: (batch, outputs) predictions, real targets standardised inside the run and restored on output;
  validation RMSE (standardised) and R²; the report's R², RMSE, MAE and correlation with the teacher.

Validation reads ``batches``: an iterable of ``(inputs, target)`` pairs (or objects with ``.inputs`` and
``.target``, as the engine's batches), where ``inputs`` is a tensor (``model(inputs)``) or a mapping of tensors
(``model(**inputs)``, e.g. ``input_ids`` and ``attention_mask``; its ``"attention_mask"`` is the padding mask). The
model may return a tensor, or an object or mapping with ``logits`` (Hugging Face). Each task says what ``target``
is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeVar, cast, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kdistill import evaluate
from kdistill.data import Split, as_split, encode_labels
from kdistill.errors import DataError, LabelError, ShapeMismatchError
from kdistill.registry import unknown_name
from kdistill.teachers.base import Outputs

__all__ = [
    "TASKS",
    "Classification",
    "Embedding",
    "Task",
    "TaskBase",
    "TokenLM",
    "get_task",
    "list_tasks",
    "model_logits",
    "register_task",
    "split_batch",
]

Inputs = torch.Tensor | Mapping[str, torch.Tensor]


@runtime_checkable
class Task(Protocol):
    """What the pipeline asks of a task (see the module docstring for ``batches``)."""

    name: str
    description: str
    monitor: str
    higher_is_better: bool
    report_columns: tuple[str, ...]
    methods: tuple[str, ...] | None
    trains_baseline: bool
    builtin_students: bool
    scored_against_teacher: bool

    def read_split(self, data: Any, name: str, classes: Any = None) -> Split: ...

    def validation_target(self, split: Split, teacher_outputs: Callable[[], torch.Tensor]) -> torch.Tensor | None: ...

    def check_outputs(self, student: Outputs, teacher: Outputs) -> None: ...

    def encode_targets(self, y: Any, classes: Any = None) -> torch.Tensor | None: ...

    def validate(self, model: nn.Module, batches: Iterable[Any]) -> dict[str, float]: ...

    def score(self, metrics: Mapping[str, float]) -> tuple[float, float]: ...

    def metrics(
        self,
        outputs: torch.Tensor,
        target: torch.Tensor | None,
        teacher_outputs: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> dict[str, float]: ...

    def retention(self, student: Mapping[str, float], teacher: Mapping[str, float]) -> float: ...

    baseline_method: str

    def prepare_targets(
        self, splits: Mapping[str, Split | None], teacher: Any
    ) -> tuple[dict[str, Split | None], Any]: ...

    def finish_model(self, module: nn.Module, *, builtin: bool) -> nn.Module: ...

    def retentions(self, student: Mapping[str, float], teacher: Mapping[str, float]) -> dict[str, float]: ...


# ---- shared helpers ------------------------------------------------------------------------------------------------


def split_batch(batch: Any) -> tuple[Inputs, torch.Tensor | None, torch.Tensor | None]:
    """``(inputs, target, mask)`` of a validation batch: an ``(inputs, target)`` pair or an object with ``.inputs``
    and ``.target`` (and optionally ``.mask``). The mask is the batch's own, else ``inputs["attention_mask"]``."""
    if hasattr(batch, "inputs"):
        inputs, target, mask = batch.inputs, getattr(batch, "target", None), getattr(batch, "mask", None)
    elif isinstance(batch, (tuple, list)) and len(batch) == 2:
        (inputs, target), mask = batch, None
    else:
        raise DataError(
            f"a validation batch is an (inputs, target) pair or has .inputs/.target; got {type(batch).__name__}",
            hint="yield (x, y) pairs, with x a tensor or a mapping such as {'input_ids': ..., 'attention_mask': ...}.",
        )
    if mask is None and isinstance(inputs, Mapping):
        mask = inputs.get("attention_mask")
    return inputs, target, mask


def _device_of(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return torch.device("cpu") if parameter is None else parameter.device


def model_logits(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    """``model``'s outputs for ``inputs`` as one float32 CPU tensor: ``model(x)`` for a tensor, ``model(**inputs)``
    for a mapping (moved to the model's device); a returned object or mapping gives its ``logits``. Call it under
    ``torch.no_grad()`` in eval mode (as :meth:`TaskBase.validate` does)."""
    device = _device_of(model)
    if isinstance(inputs, Mapping):
        result = model(**{name: value.to(device) for name, value in inputs.items()})
    else:
        result = model(inputs.to(device))
    if isinstance(result, Mapping):
        result = result["logits"]
    elif not isinstance(result, torch.Tensor):
        result = result.logits
    return result.float().cpu()


def _check_same(what: str, student: int, teacher: int, hint: str) -> None:
    if student != teacher:
        raise ShapeMismatchError(f"the student outputs {student} {what}, the teacher {teacher}", hint=hint)


def check_row_outputs(
    student: Outputs,
    teacher: Outputs,
    *,
    needs: str,
    columns: str,
    shape_hint: str,
    width_hint: str,
    noun: str = "outputs",
) -> None:
    """Both outputs one row per example, (batch, width), with the same batch and width: ``needs`` opens the shape
    error (``"embedding needs (batch, dim)"``, then the role and ``noun``), ``columns`` names the width in the
    mismatch error."""
    for role, outputs in (("student", student), ("teacher", teacher)):
        if outputs.logits.ndim != 2:
            shape = tuple(outputs.logits.shape)
            raise ShapeMismatchError(f"{needs} {role} {noun}, got {shape}", hint=shape_hint)
    _check_same("rows", student.logits.shape[0], teacher.logits.shape[0], "give both the same batch.")
    _check_same(columns, student.logits.shape[1], teacher.logits.shape[1], width_hint)


def _check_topk_fits(teacher: Outputs, positions: tuple[int, ...], classes: int, what: str) -> None:
    assert teacher.topk is not None
    topk = teacher.topk
    if tuple(topk.rest.shape) != positions:
        raise ShapeMismatchError(
            f"the teacher's top-k covers positions {tuple(topk.rest.shape)}, the student's outputs {positions}",
            hint="serve the teacher's top-k for the same rows (and sequence length) as the student's batch.",
        )
    largest = int(topk.indices.max()) if topk.indices.numel() else 0
    if largest >= classes:
        raise ShapeMismatchError(
            f"the teacher's top-k names {what} id {largest}, the student outputs only {classes} {what}",
            hint=f"the student's last layer must output every {what[:-1]} the teacher can name.",
        )


class TaskBase:
    """Shared behaviour of the built-in tasks: the monitor's score for early stopping, and a validation loop that
    runs the model in eval mode without gradients and restores its mode."""

    name: ClassVar[str]
    description: ClassVar[str]
    monitor: ClassVar[str]
    higher_is_better: ClassVar[bool]
    tie_breaker: ClassVar[str | None] = None
    """A lower-is-better metric that breaks ties on ``monitor`` (classification: ``val_nll``), or None."""
    report_columns: ClassVar[tuple[str, ...]]
    methods: ClassVar[tuple[str, ...] | None] = None
    """The methods whose numbers mean something for this task (None: any); the pipeline refuses the others before
    anything runs."""
    trains_baseline: ClassVar[bool] = True
    """Whether the same student can learn the task without a teacher (from labels), for the report's baseline."""
    builtin_students: ClassVar[bool] = True
    """Whether kdistill's registered students (built from rows of features) fit this task's outputs."""
    scored_against_teacher: ClassVar[bool] = False
    """Whether the report scores every model, the teacher too, against the teacher's outputs (embeddings)."""

    def read_split(self, data: Any, name: str, classes: Any = None) -> Split:
        """The user's data for split ``name`` as a checked :class:`~kdistill.data.Split` (default: labelled rows of
        features, labels mapped to the teacher's ``classes``)."""
        return as_split(data, name=name, classes=None if classes is None else np.asarray(classes))

    def validation_target(self, split: Split, teacher_outputs: Callable[[], torch.Tensor]) -> torch.Tensor | None:
        """What the validation batches carry as targets (default: the split's labels; ``teacher_outputs()`` gives
        the teacher's outputs on the split's rows, for tasks scored against them)."""
        return split.y

    baseline_method: ClassVar[str] = "ce"
    """The method the no-teacher baseline trains with (regression: ``label_mse``)."""

    def prepare_targets(self, splits: Mapping[str, Split | None], teacher: Any) -> tuple[dict[str, Split | None], Any]:
        """The splits and the teacher as the run trains on them, once all splits are read (default: as they are;
        regression standardises the targets and the teacher's predictions)."""
        return dict(splits), teacher

    def finish_model(self, module: nn.Module, *, builtin: bool) -> nn.Module:
        """A trained model as the user gets it (default: itself; regression restores the targets' units).
        ``builtin``: whether it is a registered student (rebuilt from its spec)."""
        return module

    def retentions(self, student: Mapping[str, float], teacher: Mapping[str, float]) -> dict[str, float]:
        """The report's retention entries of a model (default: ``retention`` alone)."""
        return {"retention": cast(Task, self).retention(student, teacher)}

    def score(self, metrics: Mapping[str, float]) -> tuple[float, float]:
        """A key where larger is better: ``(±monitor, -tie_breaker)``; an epoch improves on the best when its score is
        greater (the early-stopping rule kdistill 0.1 applied to ``val_accuracy`` and ``val_nll``)."""
        value = float(metrics[self.monitor])
        tie = -float(metrics.get(self.tie_breaker, 0.0)) if self.tie_breaker else 0.0
        return (value, tie) if self.higher_is_better else (-value, tie)

    def validate(self, model: nn.Module, batches: Iterable[Any]) -> dict[str, float]:
        """Validation metrics of ``model`` over ``batches`` (keys start with ``val_``; ``monitor`` is one)."""
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return self._validate(model, batches)
        finally:
            model.train(was_training)

    def _validate(self, model: nn.Module, batches: Iterable[Any]) -> dict[str, float]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(monitor={self.monitor!r}, higher_is_better={self.higher_is_better})"


# ---- classification ------------------------------------------------------------------------------------------------


class Classification(TaskBase):
    """(batch, classes) logits and integer class labels: kdistill 0.1's behaviour, number for number.

    ``validate`` batches: ``(x, y)`` with ``y`` (batch,) class indices. It gives ``val_accuracy`` and ``val_nll``
    computed as the engine did (logits of every batch concatenated, then one mean), so the same batches of 1024 rows
    that ``predict_logits`` used give the same floats and the same early stopping.
    """

    name = "classification"
    description = "(batch, classes) logits, class labels; accuracy, NLL, ECE, agreement"
    monitor = "val_accuracy"
    higher_is_better = True
    tie_breaker = "val_nll"
    report_columns = ("accuracy", "retention", "agreement", "nll", "ece")

    def check_outputs(self, student: Outputs, teacher: Outputs) -> None:
        """Both one row per example with as many classes (a top-k teacher: ids below the student's classes)."""
        logits = student.logits
        if logits.ndim != 2:
            raise ShapeMismatchError(
                f"classification needs (batch, classes) student logits, got {tuple(logits.shape)}",
                hint="for (batch, seq, vocab) outputs use task 'token_lm'; flatten or pool other outputs.",
            )
        rows, classes = logits.shape
        if teacher.has_logits:
            if teacher.logits.ndim != 2:
                raise ShapeMismatchError(
                    f"classification needs (batch, classes) teacher logits, got {tuple(teacher.logits.shape)}",
                    hint="the teacher must output one row of class scores per example.",
                )
            _check_same("rows", rows, teacher.logits.shape[0], "give student and teacher the same batch.")
            _check_same(
                "classes",
                classes,
                teacher.logits.shape[1],
                f"make the student's last layer output {teacher.logits.shape[1]} logits, one per teacher class.",
            )
        elif teacher.topk is not None:
            _check_topk_fits(teacher, (rows,), classes, "classes")

    def encode_targets(self, y: Any, classes: Any = None) -> torch.Tensor:
        """Labels (any 1-D array-like) -> (rows,) int64 class indices: their positions in ``classes`` (the teacher's
        ``classes_``), or already indices >= 0 without (:func:`kdistill.data.encode_labels`)."""
        return encode_labels(y, None if classes is None else np.asarray(classes))

    def _validate(self, model: nn.Module, batches: Iterable[Any]) -> dict[str, float]:
        parts, targets = [], []
        for batch in batches:
            inputs, target, _ = split_batch(batch)
            if target is None:
                raise DataError("classification validation needs labels", hint="pass (x, y) batches with labels.")
            parts.append(model_logits(model, inputs))
            targets.append(target.cpu())
        if not parts:
            raise DataError("no validation batches", hint="pass at least one (x, y) batch, or no validation set.")
        logits, y = torch.cat(parts), torch.cat(targets)
        return {
            "val_accuracy": float((logits.argmax(1) == y).float().mean()),
            "val_nll": float(F.cross_entropy(logits, y)),
        }

    def metrics(
        self,
        outputs: torch.Tensor,
        target: torch.Tensor | None,
        teacher_outputs: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """One model's report entry: :func:`kdistill.evaluate.classification_metrics` (accuracy, nll, ece, and
        agreement with the teacher's logits when given)."""
        if target is None:
            raise DataError("classification metrics need labels", hint="report on a labelled split.")
        return evaluate.classification_metrics(outputs, target, teacher_outputs)

    def retention(self, student: Mapping[str, float], teacher: Mapping[str, float]) -> float:
        """Student accuracy / teacher accuracy."""
        return student["accuracy"] / teacher["accuracy"]


# ---- token-level language modelling --------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenValBatch:
    """A token_lm validation batch: ``inputs`` (ids, or a mapping with ``input_ids``/``attention_mask``), ``target``
    (batch, seq) next-token targets and ``teacher_top1`` (batch, seq) the teacher's arg-max token at each position
    (what ``val_agreement`` compares the model's with; int64, a fraction of the teacher's logits' size)."""

    inputs: Inputs
    target: torch.Tensor
    teacher_top1: torch.Tensor


class TokenLM(TaskBase):
    """Next-token prediction: (batch, seq, vocab) logits, a (batch, seq) padding mask, per-token losses.

    Targets are aligned with the logits, never the logits with the targets: ``target[b, t]`` is the token that
    ``logits[b, t]`` predicts, i.e. ``input_ids[b, t + 1]`` (:meth:`encode_targets` shifts them once). Hugging Face
    models shift inside their loss (``logits[:, :-1]`` against ``labels[:, 1:]``); shifting the targets instead keeps
    student logits, teacher logits, mask and targets the same (batch, seq) grid, so the losses and the cache index
    them alike. The last position and every position whose next token is padding get -100 (counted by no term).

    ``validate`` batches: ``(inputs, target)`` with ``inputs`` a mapping holding ``input_ids`` (and
    ``attention_mask``) or a tensor of ids, and ``target`` the (batch, seq) next-token targets, or None to derive
    them from ``inputs`` with :meth:`encode_targets`; or a :class:`TokenValBatch`, which also carries the teacher's
    top-1 token at every position. Gives ``val_loss`` (nats per real token), ``val_perplexity``
    (``exp(val_loss)``), ``val_token_accuracy`` and, when every batch carries the teacher's top-1 tokens,
    ``val_agreement`` (the share of real tokens where the model's arg-max is the teacher's), micro-averaged over all
    the real tokens of all batches.
    """

    name = "token_lm"
    description = "(batch, seq, vocab) logits under a padding mask; next-token targets; perplexity, token accuracy"
    monitor = "val_loss"
    higher_is_better = False
    report_columns = ("perplexity", "retention", "token_accuracy", "agreement", "nll")
    methods = (
        "kd",
        "kd_topk",
        "ce",
        "forward_kl",
        "reverse_kl",
        "gjsd",
        "skew_kl",
        "skew_reverse_kl",
        "tvd",
        "token_divergence",
    )
    builtin_students = False

    def read_split(self, data: Any, name: str, classes: Any = None) -> Split:
        """(rows, seq) integer token ids (an array, a tensor, or the first item of a pair), kept int64, with the
        next-token targets of :meth:`encode_targets`."""
        ids_raw = data[0] if isinstance(data, (tuple, list)) else data
        array = ids_raw.detach().cpu() if isinstance(ids_raw, torch.Tensor) else np.asarray(ids_raw)
        ids = torch.as_tensor(array)
        if ids.ndim != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.numel() == 0:
            raise DataError(
                f"{name}: task 'token_lm' reads (rows, seq) integer token ids, got {tuple(ids.shape)} {ids.dtype}",
                hint="pass the tokenised rows as one int64 array of ids (pad them to one length).",
            )
        ids = ids.long()
        return Split(x=ids, y=self.encode_targets(ids), raw_x=ids_raw)

    def check_outputs(self, student: Outputs, teacher: Outputs) -> None:
        """Both (batch, seq, vocab) over one vocabulary (a top-k teacher: (batch, seq) positions, ids below the
        student's vocabulary); the mask, when set, is (batch, seq)."""
        logits = student.logits
        if logits.ndim != 3:
            raise ShapeMismatchError(
                f"token_lm needs (batch, seq, vocab) student logits, got {tuple(logits.shape)}",
                hint="return the language-model head's logits for every position (not only the last).",
            )
        positions, vocab = tuple(logits.shape[:2]), logits.shape[2]
        for role, outputs in (("student", student), ("teacher", teacher)):
            if outputs.mask is not None and tuple(outputs.mask.shape) != positions:
                raise ShapeMismatchError(
                    f"the {role}'s mask {tuple(outputs.mask.shape)} does not fit logits {tuple(logits.shape)}",
                    hint="the mask is the batch's (batch, seq) attention mask.",
                )
        if teacher.has_logits:
            if teacher.logits.ndim != 3 or tuple(teacher.logits.shape[:2]) != positions:
                raise ShapeMismatchError(
                    f"token_lm teacher logits {tuple(teacher.logits.shape)} do not fit student logits "
                    f"{tuple(logits.shape)}",
                    hint="run student and teacher on the same (batch, seq) input_ids.",
                )
            _check_same(
                "vocabulary entries",
                vocab,
                teacher.logits.shape[2],
                "student and teacher must share a tokenizer; "
                "when one pads its vocabulary (e.g. 50257 -> 50304), slice both logits to the shared ids.",
            )
        elif teacher.topk is not None:
            _check_topk_fits(teacher, positions, vocab, "tokens")

    def encode_targets(self, y: Any, classes: Any = None) -> torch.Tensor:
        """Next-token targets (batch, seq) int64 from ``y``: a (batch, seq) tensor of ``input_ids``, or a mapping
        with ``input_ids``, optionally ``attention_mask`` (1 for real tokens) and ``labels`` (Hugging Face's
        unshifted labels, -100 where no loss is wanted, e.g. the prompt; shifted like the ids).

        ``target[:, t] = source[:, t + 1]``; ``target[:, -1] = -100``; -100 wherever position t or t + 1 is padding.
        ``classes``: the vocabulary size, to check every id is below it (None: unchecked)."""
        mask = None
        if isinstance(y, Mapping):
            if "input_ids" not in y and "labels" not in y:
                raise DataError(
                    f"token_lm targets come from input_ids (or labels); the mapping holds {sorted(y)}",
                    hint="pass {'input_ids': ..., 'attention_mask': ...}.",
                )
            source = y["labels"] if "labels" in y else y["input_ids"]
            mask = y.get("attention_mask")
        else:
            source = y
        source = torch.as_tensor(source)
        if source.ndim != 2 or source.is_floating_point():
            raise DataError(
                f"token_lm targets come from (batch, seq) integer token ids, got {tuple(source.shape)} {source.dtype}",
                hint="pass the tokenizer's input_ids (batch, seq).",
            )
        if classes is not None:
            real = source[source != evaluate.IGNORE_INDEX]
            if real.numel() and (int(real.max()) >= int(classes) or int(real.min()) < 0):
                raise LabelError(
                    f"token ids {int(real.min())}..{int(real.max())} fall outside the vocabulary of {int(classes)}",
                    hint="student, teacher and tokenizer must share one vocabulary.",
                )
        target = torch.full_like(source, evaluate.IGNORE_INDEX, dtype=torch.int64)
        target[:, :-1] = source[:, 1:]
        if mask is not None:
            real = torch.as_tensor(mask).bool()
            if real.shape != source.shape:
                raise DataError(f"attention_mask {tuple(real.shape)} does not fit input_ids {tuple(source.shape)}")
            next_real = torch.zeros_like(real)
            next_real[:, :-1] = real[:, 1:]
            target[~(real & next_real)] = evaluate.IGNORE_INDEX
        return target

    def _validate(self, model: nn.Module, batches: Iterable[Any]) -> dict[str, float]:
        totals = {"nll_sum": 0.0, "correct": 0.0, "tokens": 0.0}
        agreed: float | None = 0.0
        for batch in batches:
            inputs, target, mask = split_batch(batch)
            if target is None:
                target = self.encode_targets(inputs)
            logits = model_logits(model, inputs)
            target, mask = target.cpu(), None if mask is None else mask.cpu()
            sums = evaluate.token_sums(logits, target, mask)
            totals = {name: totals[name] + sums[name] for name in totals}
            teacher_top1 = getattr(batch, "teacher_top1", None)
            if teacher_top1 is None or agreed is None:
                agreed = None
            else:
                counted = target != evaluate.IGNORE_INDEX
                if mask is not None:
                    counted &= mask.bool()
                agreed += float((logits.argmax(dim=-1) == teacher_top1.cpu())[counted].sum())
        if not totals["tokens"]:
            raise DataError("the validation batches hold no real token with a next token", hint="check the masks.")
        loss = totals["nll_sum"] / totals["tokens"]
        metrics = {
            "val_loss": loss,
            "val_perplexity": math.exp(loss),
            "val_token_accuracy": totals["correct"] / totals["tokens"],
        }
        if agreed is not None:
            metrics["val_agreement"] = agreed / totals["tokens"]
        return metrics

    def metrics(
        self,
        outputs: torch.Tensor,
        target: torch.Tensor | None,
        teacher_outputs: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """One model's report entry: :func:`kdistill.evaluate.token_metrics` (perplexity, nll, token_accuracy, and
        agreement with the teacher's logits when given) over real tokens."""
        if target is None:
            raise DataError("token_lm metrics need next-token targets", hint="build them with encode_targets.")
        return evaluate.token_metrics(outputs, target, teacher_outputs, mask)

    def retention(self, student: Mapping[str, float], teacher: Mapping[str, float]) -> float:
        """Teacher perplexity / student perplexity (1.0: as good as the teacher; lower is worse)."""
        return teacher["perplexity"] / student["perplexity"]


# ---- embeddings ----------------------------------------------------------------------------------------------------


class Embedding(TaskBase):
    """(batch, dim) embeddings matched to the teacher's; no labels.

    ``validate`` batches: ``(inputs, teacher_embeddings)``, the target being the teacher's (batch, dim) embeddings
    of the same rows (computed once, or from the cache). Gives ``val_cosine`` (mean cosine similarity, higher is
    better) and ``val_mse`` (mean over every number, the tie-breaker).
    """

    name = "embedding"
    description = "(batch, dim) embeddings, no labels; cosine similarity to the teacher's, MSE"
    monitor = "val_cosine"
    higher_is_better = True
    tie_breaker = "val_mse"
    report_columns = ("cosine", "retention", "mse", "spearman", "recall_at_10")
    methods = ("cosine", "mse", "contrastive")
    trains_baseline = False
    scored_against_teacher = True

    def check_outputs(self, student: Outputs, teacher: Outputs) -> None:
        """Both (batch, dim) with the same dim."""
        check_row_outputs(
            student,
            teacher,
            needs="embedding needs (batch, dim)",
            columns="dimensions",
            shape_hint="pool token embeddings to one vector per example (mean over real tokens, or [CLS]).",
            width_hint="end the student with a linear layer to the teacher's embedding size.",
        )

    def encode_targets(self, y: Any, classes: Any = None) -> None:
        """None: embedding distillation has no labels (the teacher's embeddings are the targets)."""
        return None

    def read_split(self, data: Any, name: str, classes: Any = None) -> Split:
        """Rows of features; labels, when given, are not used."""
        return as_split(data, name=name, labeled=False)

    def validation_target(self, split: Split, teacher_outputs: Callable[[], torch.Tensor]) -> torch.Tensor | None:
        """The teacher's embeddings of the validation rows."""
        return teacher_outputs()

    def _validate(self, model: nn.Module, batches: Iterable[Any]) -> dict[str, float]:
        totals = {"cosine_sum": 0.0, "squared_error": 0.0, "rows": 0.0, "numbers": 0.0}
        for batch in batches:
            inputs, target, _ = split_batch(batch)
            if target is None:
                raise DataError(
                    "embedding validation needs the teacher's embeddings as each batch's target",
                    hint="pass (inputs, teacher_embeddings) batches.",
                )
            sums = evaluate.embedding_sums(model_logits(model, inputs), target.float().cpu())
            totals = {name: totals[name] + sums[name] for name in totals}
        if not totals["rows"]:
            raise DataError("no validation batches", hint="pass at least one batch, or no validation set.")
        return {
            "val_cosine": totals["cosine_sum"] / totals["rows"],
            "val_mse": totals["squared_error"] / totals["numbers"],
        }

    def metrics(
        self,
        outputs: torch.Tensor,
        target: torch.Tensor | None,
        teacher_outputs: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """One model's report entry: :func:`kdistill.evaluate.embedding_metrics` against the teacher's embeddings
        (``teacher_outputs``, or ``target`` when that holds them), and how much of their similarity structure the
        outputs keep (:func:`kdistill.embedding_eval.similarity_report`: ``spearman`` of pairwise cosines on random
        pairs, ``spearman_hard`` on each row's nearest teacher neighbours, ``recall_at_10``; NaN below 3 rows).
        A student narrower than the teacher (a static student after PCA) has no cosine or MSE to the teacher's
        embeddings (NaN); the similarity metrics compare each model's own cosines, so they hold for any width."""
        reference = teacher_outputs if teacher_outputs is not None else target
        if reference is None:
            raise DataError("embedding metrics need the teacher's embeddings", hint="pass teacher_outputs.")
        same_rows = outputs.ndim == 2 and reference.ndim == 2 and outputs.shape[0] == reference.shape[0]
        if same_rows and outputs.shape[1] != reference.shape[1]:
            return {"cosine": math.nan, "mse": math.nan} | _similarity_metrics(outputs, reference)
        return evaluate.embedding_metrics(outputs, reference) | _similarity_metrics(outputs, reference)

    def retention(self, student: Mapping[str, float], teacher: Mapping[str, float]) -> float:
        """Student cosine / teacher cosine (the teacher's own is 1)."""
        return student["cosine"] / teacher["cosine"]


def _similarity_metrics(outputs: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    if len(outputs) < 3:
        return {"spearman": math.nan, "spearman_hard": math.nan, "recall_at_10": math.nan}
    from kdistill.embedding_eval import similarity_report

    report = similarity_report(reference, outputs)
    return {
        "spearman": report["spearman_random"],
        "spearman_hard": report["spearman_hard"],
        "recall_at_10": report["recall_at_10"],
    }


# ---- registry ------------------------------------------------------------------------------------------------------

TASKS: dict[str, type[TaskBase]] = {}
_T = TypeVar("_T", bound=type[TaskBase])


def register_task(task: _T) -> _T:
    """Class decorator adding a task to :data:`TASKS` under its ``name``."""
    if task.name in TASKS:
        raise ValueError(f"task {task.name!r} is registered twice")
    TASKS[task.name] = task
    return task


for _task in (Classification, TokenLM, Embedding):
    register_task(_task)


import kdistill.regression  # noqa: E402, F401 - registers task "regression" (a task is one file plus this import)


def get_task(name: str) -> Task:
    """The registered task ``name`` (``"classification"``, ``"token_lm"``, ``"embedding"``, ``"regression"``)."""
    if name not in TASKS:
        raise unknown_name("task", name, list(TASKS))
    return cast(Task, TASKS[name]())


def list_tasks() -> list[tuple[str, str]]:
    """``(name, description)`` of every registered task, by name."""
    return [(name, TASKS[name].description) for name in sorted(TASKS)]
