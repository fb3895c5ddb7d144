"""Hinton KD against a teacher stored as its top-k logits plus the log-sum-exp of the rest (the cache's
``"topk:K"`` storage), computed exactly from that form, per row or per token.

The teacher side is a :class:`~kdistill.teachers.TopK` (``Outputs.topk``): values (..., k), int64 indices (..., k)
and rest (...). kdistill 0.1 packed it into one (rows, 2k + 1) float32 table ``[values | indices | rest]`` passed as
the teacher's logits; :meth:`TopK.from_packed <kdistill.teachers.TopK.from_packed>` reads that table, and the loss
still accepts it in ``Outputs.logits`` when ``Outputs.topk`` is None.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdistill.errors import ShapeMismatchError
from kdistill.losses.base import register_loss
from kdistill.losses.common import check_token_shapes, counted_positions, output_mask, require_teacher, token_count
from kdistill.losses.kd import KDLoss, mix_soft_and_hard, mix_soft_and_hard_per_position
from kdistill.teachers.base import TOPK_EMPTY_REST, Outputs, TopK

__all__ = ["KDTopKLoss", "encode_topk", "kd_topk_loss", "pack_topk", "unpack_topk"]

_EMPTY_BUCKET = TOPK_EMPTY_REST
"""Finite stand-in for log(0): the "rest" bucket when k covers every class (exp() of it is exactly 0)."""


def encode_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-k form of ``logits`` (rows, classes) as a tuple: values (rows, k) and indices (rows, k), largest
    first, and ``rest`` (rows,) = log Σ_{j not in top-k} exp(z_j) (``-1e30`` when k == classes). The fields of
    :meth:`TopK.from_logits <kdistill.teachers.TopK.from_logits>`."""
    topk = TopK.from_logits(logits, k)
    return topk.values, topk.indices, topk.rest


def pack_topk(values: torch.Tensor, indices: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    """One (rows, 2k + 1) float32 tensor: ``[values | indices | rest]`` (indices are exact in float32 below 2^24)."""
    return TopK(values, indices.long(), rest).packed()


def unpack_topk(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_topk`: values (rows, k), indices (rows, k) int64, rest (rows,)."""
    topk = TopK.from_packed(packed)
    return topk.values, topk.indices, topk.rest


def _bucket_logits(student_logits: torch.Tensor, topk: TopK, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's and the teacher's k + 1 bucket logits over the last axis, divided by T."""
    student_top = student_logits.gather(-1, topk.indices)
    student_rest = student_logits.scatter(-1, topk.indices, _EMPTY_BUCKET).logsumexp(dim=-1, keepdim=True)
    teacher_rest = topk.rest.clamp_min(_EMPTY_BUCKET).unsqueeze(-1)
    teacher_buckets = torch.cat([topk.values, teacher_rest], dim=-1) / temperature
    student_buckets = torch.cat([student_top, student_rest], dim=-1) / temperature
    return student_buckets, teacher_buckets


def kd_topk_loss(
    student_logits: torch.Tensor,
    teacher_topk: TopK | torch.Tensor,
    target: torch.Tensor | None,
    *,
    temperature: float = 4.0,
    soft_weight: float = 0.5,
    mask: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    r"""Hinton KD over k + 1 buckets: the teacher's k top classes, and one bucket for all the others.

    For each row (or token), with :math:`K` the teacher's top-k classes, the teacher's and the student's bucket
    logits are

    .. math::
        a_t = [\,z_{t,K},\ \mathrm{LSE}(z_{t,\bar K})\,], \qquad a_s = [\,z_{s,K},\ \mathrm{LSE}(z_{s,\bar K})\,]

    (LSE = log-sum-exp; merging classes into one bucket whose logit is the LSE of theirs keeps its probability at
    T = 1), and the loss is

    .. math::
        \mathcal{L} = (1 - w)\,\mathrm{CE}(z_s, y)
                      + w\,T^2\,\mathrm{KL}\big(\mathrm{softmax}(a_t/T)\,\|\,\mathrm{softmax}(a_s/T)\big)

    averaged over the batch, or for (batch, seq, vocab) logits over the positions that count (``mask`` True, target
    not -100), exactly as :func:`~kdistill.kd_loss` reduces. This is computed exactly from the stored form (no dense
    logits are rebuilt). With k = classes - 1 or k = classes the bucket holds at most one class and the loss equals
    :func:`~kdistill.kd_loss` on the full logits. For smaller k it differs from full KD in two ways: the student is
    not told how to share the rest bucket's mass among its classes, and at T != 1 the bucket is tempered as one
    class (:math:`e^{\mathrm{LSE}/T}` instead of :math:`\sum_j e^{z_j/T}`).

    Args:
        student_logits: (batch, classes) or (batch, seq, vocab).
        teacher_topk: the teacher's :class:`~kdistill.teachers.TopK` with leading axes (batch,) or (batch, seq), or
            the packed (batch, 2k + 1) table of :func:`pack_topk`.
        target: (batch,) / (batch, seq) class indices or None (then only the soft term, at full weight).
        mask, normalizer: as in :func:`~kdistill.kd_loss`.

    Returns:
        ``{"loss": total, "ce": CE, "kd": T² KL}`` (``"ce"`` absent without targets).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= soft_weight <= 1.0:
        raise ValueError(f"soft_weight must be in [0, 1], got {soft_weight}")
    topk = teacher_topk if isinstance(teacher_topk, TopK) else TopK.from_packed(teacher_topk)
    largest = int(topk.indices.max()) if topk.indices.numel() else 0
    smallest = int(topk.indices.min()) if topk.indices.numel() else 0
    if topk.rest.shape != student_logits.shape[:-1] or largest >= student_logits.shape[-1] or smallest < 0:
        raise ShapeMismatchError(
            f"teacher top-k for positions {tuple(topk.rest.shape)} with class indices {smallest}..{largest} does not "
            f"fit student logits {tuple(student_logits.shape)}",
            hint="the student's last layer must output as many classes (vocabulary entries) as the teacher, for the "
            "same rows (and sequence length).",
        )
    if student_logits.ndim == 2 and mask is None and normalizer is None:  # per row: kdistill 0.1's exact floats
        student_buckets, teacher_buckets = _bucket_logits(student_logits, topk, temperature)
        return mix_soft_and_hard(
            F.log_softmax(student_buckets, dim=-1),
            F.log_softmax(teacher_buckets, dim=-1),
            student_logits,
            target,
            temperature=temperature,
            soft_weight=soft_weight,
        )
    check_token_shapes(student_logits, mask, target, method="kd_topk")
    counted = counted_positions(student_logits.shape[:-1], mask, target, student_logits.device)
    student_rows = student_logits[counted]  # (N, classes): only real positions are computed, padding never leaks
    rows = TopK(topk.values[counted], topk.indices[counted], topk.rest[counted])
    student_buckets, teacher_buckets = _bucket_logits(student_rows, rows, temperature)
    return mix_soft_and_hard_per_position(
        F.log_softmax(student_buckets, dim=-1),
        F.log_softmax(teacher_buckets, dim=-1),
        student_rows,
        None if target is None else target[counted],
        temperature=temperature,
        soft_weight=soft_weight,
        count=token_count(counted, normalizer),
    )


@register_loss("kd_topk", "Hinton KD from top-k cached teacher outputs: KL over the k top classes + one 'rest' bucket")
class KDTopKLoss(KDLoss):
    """Class form of :func:`kd_topk_loss`. It reads the teacher's ``Outputs.topk``, which is what
    ``kdistill.distill(..., cache_dir=..., cache_storage="topk:K")`` gives it; when that is None, the teacher's
    ``Outputs.logits`` must be kdistill 0.1's packed (rows, 2k + 1) table. Token-level outputs: the mask is the
    student's ``Outputs.mask`` (else the teacher's)."""

    loss_function = staticmethod(kd_topk_loss)
    reads_topk = True  # StaticTargets turns a packed table into Outputs.topk for it

    def __call__(
        self, student: Outputs, teacher: Outputs | None, target: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        teacher = require_teacher(teacher, "kd_topk")
        topk = teacher.topk if teacher.topk is not None else teacher.logits
        return kd_topk_loss(
            student.logits,
            topk,
            target,
            temperature=self.temperature,
            soft_weight=self.soft_weight,
            mask=output_mask(student, teacher),
        )

    @staticmethod
    def encode_teacher_topk(logits: torch.Tensor) -> TopK:
        """Dense teacher logits (..., classes) as the top-k this loss reads, keeping the top half of the classes
        (the generic contract tests feed the loss through this)."""
        return TopK.from_logits(logits, max(1, logits.shape[-1] // 2))
