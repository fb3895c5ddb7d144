"""Hinton knowledge distillation and plain cross-entropy, per row or per token.

Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network" (2015), https://arxiv.org/abs/1503.02531

Both reduce over the last axis: (batch, classes) logits as in the paper, or (batch, seq, vocab) logits per token
under a padding mask (TRL's GKD and DistillKit's token-level KL: summed over the vocabulary, averaged over the real
tokens). Under gradient accumulation a per-token mean of each micro-batch is not the mean over the whole batch when
micro-batches hold different numbers of real tokens: pass ``normalizer`` (the whole batch's count of
:func:`~kdistill.losses.common.counted_positions`, DistillKit's ``num_items_in_batch``) to the functional forms and
sum the micro-batch losses. The class forms use each batch's own count (a per-micro-batch mean).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import torch
import torch.nn.functional as F

from kdistill.errors import ShapeMismatchError
from kdistill.losses.base import BaseLoss, register_loss
from kdistill.losses.common import (
    IGNORE_INDEX,
    check_token_shapes,
    counted_positions,
    labelled_cross_entropy,
    output_mask,
    require_teacher,
    token_count,
    token_cross_entropy,
)
from kdistill.teachers.base import Outputs, probs_to_logits

__all__ = [
    "CrossEntropy",
    "KDLoss",
    "check_logits",
    "cross_entropy",
    "kd_loss",
    "kd_loss_packed",
    "mix_soft_and_hard",
    "mix_soft_and_hard_per_position",
    "pack_kd_targets",
]

PACK_MAX_NUMBERS = 50_000_000
"""Largest packed target table (numbers) :meth:`KDLoss.precompute` builds (200 MB in fp32); beyond it, the textbook
form runs on the memory-mapped cache instead, so that data larger than RAM still works."""


def check_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    """Raise :class:`ShapeMismatchError` unless student and teacher logits have the same shape ((batch, classes) or
    (batch, seq, vocab))."""
    if student_logits.shape != teacher_logits.shape:
        raise ShapeMismatchError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ",
            hint="the student's last layer must output as many classes (vocabulary entries) as the teacher, for "
            "the same batch (and sequence length).",
        )


def mix_soft_and_hard(
    student_log_probs: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    student_logits: torch.Tensor,
    target: torch.Tensor | None,
    *,
    temperature: float,
    soft_weight: float,
) -> dict[str, torch.Tensor]:
    """``(1 - w)·CE(student_logits, y) + w·T²·KL(teacher || student)`` from log-probabilities already taken at
    temperature T (over classes, or over kd_topk's buckets); without targets, the soft term alone at full weight."""
    soft = F.kl_div(student_log_probs, teacher_log_probs, reduction="batchmean", log_target=True) * temperature**2
    if target is None:
        return {"loss": soft, "kd": soft}
    hard = labelled_cross_entropy(student_logits, target)  # unlabeled rows (target -100) count 0 in it, not 1/L
    return {"loss": (1.0 - soft_weight) * hard + soft_weight * soft, "ce": hard, "kd": soft}


def mix_soft_and_hard_per_position(
    student_log_probs: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    student_logits: torch.Tensor,
    target: torch.Tensor | None,
    *,
    temperature: float,
    soft_weight: float,
    count: torch.Tensor | float,
) -> dict[str, torch.Tensor]:
    r""":func:`mix_soft_and_hard` over the positions that count, already selected (N, ...): the KL is summed over
    the last axis (classes, vocabulary or kd_topk's buckets) and over the positions, and both terms are divided by
    ``count`` (:func:`~kdistill.losses.common.token_count`):

    .. math::
        \mathcal{L} = \frac{1}{N}\sum_{i \in C}\Big[(1 - w)\,\mathrm{CE}(z_{s,i}, y_i)
                      + w\,T^2\,\mathrm{KL}(p_{t,i}^T \,\|\, q_{s,i}^T)\Big],\qquad N = |C|

    ``*_log_probs``: (N, buckets) at temperature T; ``student_logits``: (N, classes) for the CE; ``target``: (N,) or
    None."""
    kl = F.kl_div(student_log_probs, teacher_log_probs, reduction="sum", log_target=True)
    soft = kl / count * temperature**2
    if target is None:
        return {"loss": soft, "kd": soft}
    hard = F.cross_entropy(student_logits, target, reduction="sum") / count
    return {"loss": (1.0 - soft_weight) * hard + soft_weight * soft, "ce": hard, "kd": soft}


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor | None,
    *,
    temperature: float = 4.0,
    soft_weight: float = 0.5,
    teacher_probs: bool = False,
    mask: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    r"""Hinton KD: hard-label cross-entropy mixed with the temperature-scaled KL divergence to the teacher.

    .. math::
        \mathcal{L} = (1 - w)\,\mathrm{CE}(z_s, y)
                      + w\,T^2\,\mathrm{KL}\big(\mathrm{softmax}(z_t/T)\,\|\,\mathrm{softmax}(z_s/T)\big)

    with ``w = soft_weight`` and ``T = temperature``, the softmax over the last axis. The KL divergence is summed
    over classes and averaged over the batch. The :math:`T^2` factor keeps the soft term's gradient, which scales as
    :math:`1/T^2`, comparable to the hard term's whatever the temperature:
    :math:`\partial(T^2\,\mathrm{KL})/\partial z_s = T\,(q_s^T - p_t^T)/B`.

    Token-level (batch, seq, vocab) logits get the same formula per token: the KL is summed over the vocabulary, and
    both terms are averaged over the positions that count (``mask`` True and target not -100, see
    :func:`~kdistill.losses.common.counted_positions`), as TRL's GKD (at T = 1, β = 0, where it has no T²) and
    DistillKit (``T²·Σ KL / num_items``) do. Targets are aligned with the logits: ``target[b, t]`` is the token that
    ``logits[b, t]`` predicts (next-token targets already shifted, see
    :meth:`kdistill.tasks.TokenLM.encode_targets`).

    Args:
        student_logits: (batch, classes) or (batch, seq, vocab).
        teacher_logits: the same shape, logits or probabilities with ``teacher_probs=True`` (exact zeros are
            floored, see :data:`~kdistill.teachers.PROB_FLOOR`, so they never give inf or NaN).
        target: (batch,) / (batch, seq) class indices (-100: ignored), or None for unlabeled rows (then only the
            soft term is used, at full weight).
        temperature: T > 0; higher spreads the teacher's distribution and transfers more of its "dark knowledge".
        soft_weight: w in [0, 1], the weight of the soft (teacher) term; 0 is plain cross-entropy.
        mask: (batch,) / (batch, seq) bool, True for the positions that count (real tokens); None: all of them.
        normalizer: the divisor of both terms instead of this batch's count of positions (gradient accumulation:
            the whole batch's count, so that the micro-batch losses sum to the whole batch's mean).

    Returns:
        ``{"loss": total, "ce": CE, "kd": T² KL}`` (``"ce"`` absent without targets).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= soft_weight <= 1.0:
        raise ValueError(f"soft_weight must be in [0, 1], got {soft_weight}")
    if teacher_probs:
        teacher_logits = probs_to_logits(teacher_logits)
    check_logits(student_logits, teacher_logits)
    if student_logits.ndim == 2 and mask is None and normalizer is None:  # per row: kdistill 0.1's exact floats
        student_log_probs = F.log_softmax(student_logits / temperature, dim=1)
        teacher_log_probs = F.log_softmax(teacher_logits / temperature, dim=1)
        return mix_soft_and_hard(
            student_log_probs,
            teacher_log_probs,
            student_logits,
            target,
            temperature=temperature,
            soft_weight=soft_weight,
        )
    check_token_shapes(student_logits, mask, target, method="kd")
    counted = counted_positions(student_logits.shape[:-1], mask, target, student_logits.device)
    student_rows = student_logits[counted]  # (N, classes): only real positions are computed, padding never leaks
    return mix_soft_and_hard_per_position(
        F.log_softmax(student_rows / temperature, dim=-1),
        F.log_softmax(teacher_logits[counted] / temperature, dim=-1),
        student_rows,
        None if target is None else target[counted],
        temperature=temperature,
        soft_weight=soft_weight,
        count=token_count(counted, normalizer),
    )


def pack_kd_targets(
    teacher_logits: torch.Tensor, target: torch.Tensor, *, temperature: float, soft_weight: float
) -> torch.Tensor:
    r"""Everything the Hinton loss needs from a row's teacher and label, computed once.

    A (rows, 2·classes + 1) float32 table: ``-2·classes·[(1 - w)·one-hot(y) | w·T²·p_t]`` and a last column
    ``w·T²·Σ_c p_t log p_t``, with
    :math:`p_t = \mathrm{softmax}(z_t / T)`. An unlabeled row (target -100) gets a one-hot of zeros, so its hard part
    is 0, the rule of :func:`~kdistill.losses.common.labelled_cross_entropy`. For a teacher whose outputs never
    change (a cache, precomputed or out-of-fold targets, no augmentation) the engine packs the transfer set once
    (:meth:`KDLoss.precompute`) and :func:`kd_loss_packed` reads each batch's rows. Needs ``0 < soft_weight < 1``."""
    if not 0.0 < soft_weight < 1.0:
        raise ValueError(f"packed KD targets need 0 < soft_weight < 1, got {soft_weight}")
    classes = teacher_logits.shape[1]
    teacher_log_probs = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    teacher_probs = teacher_log_probs.exp()
    labelled = (target != IGNORE_INDEX).unsqueeze(1)
    one_hot = F.one_hot(target.long().clamp_min(0), classes).float() * labelled  # unlabeled rows: no hard part
    soft_scale = soft_weight * temperature**2
    neg_entropy = (teacher_probs * teacher_log_probs).sum(dim=1, keepdim=True)
    weights = torch.cat([(1.0 - soft_weight) * one_hot, soft_scale * teacher_probs], dim=1) * (-2.0 * classes)
    return torch.cat([weights, soft_scale * neg_entropy], dim=1)


@lru_cache(maxsize=16)
def _packed_constants(
    temperature: float, soft_weight: float, rows: int, classes: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two terms' logit scales (2, 1, 1), and the factors that turn their weighted log-probability sums back
    into CE and T²·H(p_t, q_s)."""
    scales = torch.tensor([1.0, 1.0 / temperature], device=device, dtype=dtype).view(2, 1, 1)
    unmix = torch.tensor([0.5 / (1.0 - soft_weight), 0.5 / soft_weight], device=device) / (rows * classes)
    return scales, unmix


def kd_loss_packed(
    student_logits: torch.Tensor, packed: torch.Tensor, *, temperature: float, soft_weight: float
) -> dict[str, torch.Tensor]:
    r""":func:`kd_loss` from the rows of :func:`pack_kd_targets`: the same value and gradient from 5 autograd nodes
    instead of 13, so the tiny students whose steps are dominated by the loss's small ops train faster.

    Both terms are cross-entropies, so one log-softmax of :math:`[z_s;\,z_s/T]` serves them: the packed weights
    turn its mean into :math:`(1-w)\,\mathrm{CE} + w\,T^2 H(p_t, q_s)`, and :math:`T^2\,\mathrm{KL} = T^2 H(p_t,
    q_s) + T^2\sum_c p_t\log p_t`, whose last part is the packed constant. The terms are split for the history
    without gradients. Returns ``{"loss", "ce", "kd"}`` as :func:`kd_loss` does. ``packed`` may be a strided view.
    """
    rows, classes = student_logits.shape
    if packed.shape != (rows, 2 * classes + 1):
        raise ShapeMismatchError(
            f"packed KD targets {tuple(packed.shape)} do not fit student logits {tuple(student_logits.shape)}",
            hint="the student's last layer must output as many classes as the teacher.",
        )
    scales, unmix = _packed_constants(
        temperature, soft_weight, rows, classes, student_logits.device, student_logits.dtype
    )
    # (2, classes, rows): the log-softmax runs over dim 1 with the rows contiguous, ~10x faster on CPU than over the
    # last dim when classes are few (PyTorch's kernel then vectorises across rows)
    weights = packed[:, : 2 * classes].view(rows, 2, classes).permute(1, 2, 0)
    constant = packed[:, -1].mean()
    products = F.log_softmax(scales * student_logits.t(), dim=1) * weights
    hard, cross = products.detach().sum(2).sum(1).mul_(unmix).unbind()
    return {"loss": products.mean() + constant, "ce": hard, "kd": torch.add(cross, constant, alpha=1.0 / soft_weight)}


@register_loss("kd", "Hinton 2015: (1-w)·CE + w·T²·KL(teacher/T || student/T), per row or per token")
class KDLoss(BaseLoss):
    """Class form of :func:`kd_loss`, holding its hyper-parameters. Token-level outputs: the mask is the student's
    ``Outputs.mask`` (else the teacher's)."""

    # the function behind the class; a subclass with another form of the same loss swaps only this (kd_topk)
    loss_function: Callable[..., dict[str, torch.Tensor]] = staticmethod(kd_loss)
    _packed_for: tuple[float, float] | None = None  # (temperature, soft_weight) precompute() packed the targets at

    def __init__(self, temperature: float = 4.0, soft_weight: float = 0.5) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0.0 <= soft_weight <= 1.0:
            raise ValueError(f"soft_weight must be in [0, 1], got {soft_weight}")
        self.temperature = temperature
        self.soft_weight = soft_weight

    def precompute(self, teacher_logits: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor | None:
        """Optional engine hook for a teacher whose outputs never change: the rows of :func:`pack_kd_targets`, which
        the engine indexes per batch into ``Outputs.precomputed``. None (the textbook form runs) without labels,
        with ``soft_weight`` 0 or 1, for another loss function (``kd_topk``), for token-level (rows, seq, vocab)
        logits, or when the table would exceed :data:`PACK_MAX_NUMBERS`. Partly labelled rows (target -100) are
        packed too: the packed CE sums the labelled rows over all the batch's rows, as the textbook form does
        (:func:`~kdistill.losses.common.labelled_cross_entropy`). Changing ``temperature`` or
        ``soft_weight`` afterwards falls back to the textbook form."""
        if teacher_logits.ndim != 2:
            return None
        rows, classes = teacher_logits.shape
        too_large = rows * (2 * classes + 1) > PACK_MAX_NUMBERS
        if target is None or self.loss_function is not kd_loss or not 0.0 < self.soft_weight < 1.0 or too_large:
            return None
        self._packed_for = (self.temperature, self.soft_weight)
        return pack_kd_targets(teacher_logits, target, temperature=self.temperature, soft_weight=self.soft_weight)

    def __call__(
        self, student: Outputs, teacher: Outputs | None, target: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        teacher = require_teacher(teacher, type(self).__name__)
        packed = teacher.precomputed
        mask = output_mask(student, teacher)
        if (
            packed is not None
            and target is not None
            and mask is None
            and self._packed_for == (self.temperature, self.soft_weight)
        ):
            return kd_loss_packed(student.logits, packed, temperature=self.temperature, soft_weight=self.soft_weight)
        extra = {} if mask is None else {"mask": mask}  # a custom loss_function of 2-D logits may take no mask
        return self.loss_function(
            student.logits, teacher.logits, target, temperature=self.temperature, soft_weight=self.soft_weight, **extra
        )


def cross_entropy(
    student_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy over the last axis: ``F.cross_entropy`` for (batch, classes) without a mask (exactly), else
    averaged over the positions that count (``mask`` True, target not -100) of (batch, seq, vocab) logits."""
    if student_logits.ndim == 2 and mask is None and normalizer is None:
        return F.cross_entropy(student_logits, target)
    check_token_shapes(student_logits, mask, target, method="ce")
    counted = counted_positions(student_logits.shape[:-1], mask, target, student_logits.device)
    return token_cross_entropy(student_logits, target, counted, normalizer)


@register_loss("ce", "cross-entropy on the hard labels only: the no-teacher baseline (per row or per token)")
class CrossEntropy(BaseLoss):
    """Plain cross-entropy, ``{"loss": CE, "ce": CE}``; the baseline every method is compared with. Token-level
    outputs: averaged over real tokens (:func:`cross_entropy`)."""

    needs_teacher = False

    def __call__(
        self, student: Outputs, teacher: Outputs | None, target: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        if target is None:
            raise ValueError("cross-entropy needs labels")
        hard = cross_entropy(student.logits, target, mask=output_mask(student, teacher))
        return {"loss": hard, "ce": hard}
