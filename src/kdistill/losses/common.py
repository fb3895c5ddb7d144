"""Helpers shared by the methods: checked access to outputs and features, the shape checks, hyper-parameter checks,
the CE term, and the masked per-token reduction of the token-level losses.

Not a method itself (nothing here is registered).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F

from kdistill.errors import MethodError, ShapeMismatchError
from kdistill.losses.base import BaseLoss
from kdistill.teachers.base import Outputs

__all__ = [
    "IGNORE_INDEX",
    "LayerPairLoss",
    "as_target",
    "check_non_negative",
    "check_positive",
    "check_row_outputs",
    "check_token_shapes",
    "counted_positions",
    "flatten_rows",
    "get_feature",
    "labelled_cross_entropy",
    "layer_pairs",
    "output_mask",
    "require_target",
    "require_teacher",
    "token_count",
    "token_cross_entropy",
    "with_cross_entropy",
]

IGNORE_INDEX = -100
"""A target that counts for no term (PyTorch's ``ignore_index`` default, and Hugging Face's label convention)."""

_TOKEN_METHODS = "'kd', 'kd_topk' or 'ce' (they average over real tokens under Outputs.mask)"


def require_teacher(teacher: Outputs | None, method: str) -> Outputs:
    """``teacher``, or a :class:`MethodError` saying that ``method`` needs the teacher's outputs."""
    if teacher is None:
        raise MethodError(
            f"method {method!r} needs the teacher's outputs, got None",
            hint="pass a teacher (distill(teacher, ...)); 'ce' and 'byot' are the methods that need none.",
        )
    return teacher


def _shape_error(method: str, role: str, shape: torch.Size, *, masked: bool = False) -> ShapeMismatchError:
    if masked:
        problem = f"method {method!r} compares (batch, classes) rows; the {role} outputs carry a sequence mask"
    else:
        problem = f"method {method!r} supports (batch, classes) outputs; got {role} logits of shape {tuple(shape)}"
    if masked or len(shape) == 3:
        hint = f"for token-level (batch, seq, vocab) outputs use {_TOKEN_METHODS}."
    else:
        hint = "reshape or pool the outputs to (batch, classes), one row per example."
    return ShapeMismatchError(problem, hint=hint)


def check_row_outputs(student: Outputs, teacher: Outputs | None, method: str) -> None:
    """Raise :class:`ShapeMismatchError` unless the outputs are one row per example: (batch, classes) logits and no
    sequence mask. Every method that does not reduce over a sequence calls it first, so that (batch, seq, vocab)
    logits fail with the names of the methods that support them instead of giving a silently different number.
    A teacher given only as top-k is not inspected here (the method reading its logits raises)."""
    if student.logits.ndim != 2:
        raise _shape_error(method, "student", student.logits.shape)
    if student.mask is not None:
        raise _shape_error(method, "student", student.logits.shape, masked=True)
    if teacher is None:
        return
    if teacher.has_logits and teacher.logits.ndim != 2:
        raise _shape_error(method, "teacher", teacher.logits.shape)
    if teacher.mask is not None:
        raise _shape_error(method, "teacher", student.logits.shape, masked=True)


def output_mask(student: Outputs, teacher: Outputs | None) -> torch.Tensor | None:
    """The positions that are real tokens: the student's ``mask``, else the teacher's (the engine sets it on
    either); a :class:`ShapeMismatchError` when both are set and differ."""
    mask = student.mask
    other = None if teacher is None else teacher.mask
    if mask is None:
        return other
    if other is not None and other is not mask and not torch.equal(other, mask):
        raise ShapeMismatchError(
            f"the student's and the teacher's masks differ ({int(mask.sum())} and {int(other.sum())} real tokens)",
            hint="set the batch's attention mask once (the engine puts it on the student's outputs).",
        )
    return mask


def check_token_shapes(
    logits: torch.Tensor, mask: torch.Tensor | None, target: torch.Tensor | None, *, method: str
) -> None:
    """``logits``: (batch, classes) or (batch, seq, vocab); ``mask`` and ``target``: its leading axes ((batch,) or
    (batch, seq)); else a :class:`ShapeMismatchError` naming the shapes."""
    if logits.ndim not in (2, 3):
        raise ShapeMismatchError(
            f"method {method!r} supports (batch, classes) or (batch, seq, vocab) logits; got {tuple(logits.shape)}",
            hint="reshape the outputs: one row per example, or one row per token of each sequence.",
        )
    positions = tuple(logits.shape[:-1])
    for name, value in (("mask", mask), ("target", target)):
        if value is not None and tuple(value.shape) != positions:
            raise ShapeMismatchError(
                f"method {method!r}: {name} {tuple(value.shape)} does not fit logits {tuple(logits.shape)} "
                f"(expected {positions})",
                hint="mask and targets have one entry per row (batch,) or per token (batch, seq); for language "
                "modelling build next-token targets with kdistill.tasks.get_task('token_lm').encode_targets.",
            )


def counted_positions(
    shape: torch.Size | tuple[int, ...], mask: torch.Tensor | None, target: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """The positions that count for every term, bool of ``shape`` ((batch,) or (batch, seq)): the mask's True
    positions (all, without a mask) whose target is not :data:`IGNORE_INDEX` (a -100 target counts for no term, as
    in TRL's GKD, where ``labels == -100`` are left out of the distillation term too)."""
    counted = torch.ones(shape, dtype=torch.bool, device=device) if mask is None else mask.to(device)
    if target is not None:
        counted = counted & (target != IGNORE_INDEX)
    return counted


def token_count(counted: torch.Tensor, normalizer: float | torch.Tensor | None = None) -> torch.Tensor | float:
    """The divisor of a per-position mean: ``normalizer`` when given (the whole batch's count under gradient
    accumulation), else the number of counted positions, at least 1 (an all-padding batch gives 0, not NaN)."""
    return counted.sum().clamp_min(1) if normalizer is None else normalizer


def token_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    counted: torch.Tensor,
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``logits`` (..., classes) against ``target`` (...) summed over the ``counted`` positions and
    divided by :func:`token_count`. Only counted positions are computed at all, so whatever a padded position holds
    (even NaN) reaches neither the value nor the gradient."""
    hard = F.cross_entropy(logits[counted], target[counted], reduction="sum")
    return hard / token_count(counted, normalizer)


def labelled_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    r"""The hard-label term of a batch of rows, some of which may be unlabeled (target :data:`IGNORE_INDEX`):
    the cross-entropy summed over the labelled rows and divided by **all** the batch's rows,

    .. math::
        \mathrm{CE}_{batch} = \frac{1}{B}\sum_{i\,:\,y_i \ne -100} -\log \mathrm{softmax}(z_i)_{y_i}

    so an unlabeled row counts 0 in it and every labelled row weighs 1/B, as in a fully labelled batch. A fully
    labelled batch gives ``F.cross_entropy(logits, target)`` exactly; a batch without a labelled row gives 0 (still
    attached to the graph). Why not the mean over the labelled rows alone: with 50k unlabeled rows beside 3.6k
    labelled ones, a batch of 64 holds ~4 labelled rows, and that mean weighs each of them 16x a row of a labelled
    batch; on MNIST-1D that noisy, over-weighted hard term took the student from 82% to 69% at the same steps
    (docs/scarce_labels.md). Under gradient accumulation the micro-batches' terms, weighted by their share of the
    rows, add up to this term over the whole batch. ``logits``: (batch, classes); ``target``: (batch,)."""
    if target.ndim != 1 or not len(target):
        return F.cross_entropy(logits, target)
    labelled = int((target != IGNORE_INDEX).sum())
    if labelled == len(target):
        return F.cross_entropy(logits, target)
    if labelled == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits, target, reduction="sum") / len(target)


def require_target(target: torch.Tensor | None, method: str) -> torch.Tensor:
    """``target``, or a :class:`MethodError` saying that ``method`` needs hard labels."""
    if target is None:
        raise MethodError(f"method {method!r} needs hard labels, got None", hint="pass labelled rows (X, y).")
    return target


def get_feature(outputs: Outputs, name: str, *, role: str, method: str) -> torch.Tensor:
    """The captured feature ``name`` of ``outputs``; a :class:`MethodError` listing the captured ones if absent.

    ``role`` is ``"student"`` or ``"teacher"`` (for the message)."""
    if name not in outputs.features:
        raise MethodError(
            f"method {method!r} needs the {role} feature {name!r}; the {role} outputs hold {sorted(outputs.features)}",
            hint=f"name a module path of the {role} (the engine captures it), e.g. {role}_layer='features'.",
        )
    return outputs.features[name]


def as_target(tensor: torch.Tensor) -> torch.Tensor:
    """A teacher tensor made safe to use as a regression target: detached, and cloned out of inference mode (a
    tensor made under ``torch.inference_mode()`` cannot be saved for backward)."""
    tensor = tensor.detach()
    return tensor.clone() if tensor.is_inference() else tensor


def flatten_rows(tensor: torch.Tensor) -> torch.Tensor:
    """(batch, *shape) -> (batch, prod(shape))."""
    return tensor.reshape(len(tensor), -1)


def layer_pairs(
    student_layers: str | Sequence[str], teacher_layers: str | Sequence[str], method: str
) -> list[tuple[str, str]]:
    """Pair student and teacher layer names one to one; a single string names one layer."""
    students = [student_layers] if isinstance(student_layers, str) else list(student_layers)
    teachers = [teacher_layers] if isinstance(teacher_layers, str) else list(teacher_layers)
    if not students or len(students) != len(teachers):
        raise MethodError(
            f"method {method!r} pairs student and teacher layers one to one; got {students} and {teachers}",
            hint="pass as many teacher layers as student layers (at least one).",
        )
    return list(zip(students, teachers, strict=True))


def check_positive(name: str, value: float) -> float:
    """``value`` if > 0, else a :class:`MethodError` naming the hyper-parameter."""
    if not value > 0:
        raise MethodError(f"{name} must be > 0, got {value}", hint=f"pass a positive {name}.")
    return float(value)


def check_non_negative(name: str, value: float) -> float:
    """``value`` if >= 0, else a :class:`MethodError` naming the hyper-parameter."""
    if not value >= 0:
        raise MethodError(f"{name} must be >= 0, got {value}", hint=f"pass {name} >= 0 (0 turns the term off).")
    return float(value)


def with_cross_entropy(
    terms: dict[str, torch.Tensor],
    distill_total: torch.Tensor,
    student_logits: torch.Tensor,
    target: torch.Tensor | None,
    ce_weight: float,
) -> dict[str, torch.Tensor]:
    """Add the hard-label term: ``loss = ce_weight · CE(student, y) + distill_total``.

    ``"ce"`` is reported only when it counts (labels given and ``ce_weight > 0``), so a composition of methods whose
    later members use ``ce_weight=0`` reports the cross-entropy once."""
    if target is None or ce_weight == 0:
        return {"loss": distill_total, **terms}
    hard = labelled_cross_entropy(student_logits, target)
    return {"loss": ce_weight * hard + distill_total, "ce": hard, **terms}


class LayerPairLoss(BaseLoss):
    r"""Base of the methods that compare student and teacher features layer by layer (AT, SP):

    :math:`\mathcal{L} = c\,\mathrm{CE} + \mathrm{scale}\cdot w\sum_l \mathrm{pair\_loss}(F^s_l, F^t_l)`.

    A subclass sets ``name``, ``pair_loss`` and ``scale``, and keeps its own ``__init__`` only to state its paper's
    default ``weight``. Returns ``{"loss", "ce", name}``, the named term being the sum over pairs before scaling."""

    at_equal = "zero"
    batch_order_invariant = True
    name: ClassVar[str]
    scale: ClassVar[float] = 1.0
    pair_loss: ClassVar[Callable[..., torch.Tensor]]  # (student feature, teacher feature) -> scalar

    def __init__(
        self, student_layers: str | Sequence[str], teacher_layers: str | Sequence[str], weight: float, ce_weight: float
    ) -> None:
        self.pairs = layer_pairs(student_layers, teacher_layers, self.name)
        self.student_features = tuple(s for s, _ in self.pairs)
        self.teacher_features = tuple(t for _, t in self.pairs)
        self.weight = check_non_negative("weight", weight)
        self.ce_weight = check_non_negative("ce_weight", ce_weight)

    def __call__(
        self, student: Outputs, teacher: Outputs | None, target: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        check_row_outputs(student, teacher, self.name)
        teacher = require_teacher(teacher, self.name)
        term = sum(
            (
                type(self).pair_loss(
                    get_feature(student, s, role="student", method=self.name),
                    get_feature(teacher, t, role="teacher", method=self.name),
                )
                for s, t in self.pairs
            ),
            start=student.logits.new_zeros(()),
        )
        total = self.scale * self.weight * term
        return with_cross_entropy({self.name: term}, total, student.logits, target, self.ce_weight)
