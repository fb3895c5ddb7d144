"""Hinton KD against a teacher stored as its top-k logits plus the log-sum-exp of the rest (the cache's
``"topk:K"`` storage), computed exactly from that form.

The packed form (one tensor, so the engine can index it by row like dense logits): (rows, 2k + 1) float32 =
``[k largest logits | their class indices | log-sum-exp of the other classes' logits]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdistill.errors import ShapeMismatchError
from kdistill.losses.base import register_loss
from kdistill.losses.kd import KDLoss, mix_soft_and_hard

__all__ = ["KDTopKLoss", "encode_topk", "kd_topk_loss", "pack_topk", "unpack_topk"]

_EMPTY_BUCKET = -1e30
"""Finite stand-in for log(0): the "rest" bucket when k covers every class (exp() of it is exactly 0)."""


def encode_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-k form of ``logits`` (rows, classes): values (rows, k) and indices (rows, k), largest first, and
    ``rest`` (rows,) = log Σ_{j not in top-k} exp(z_j) (``-1e30`` when k == classes)."""
    if not 1 <= k <= logits.shape[1]:
        raise ShapeMismatchError(f"top-k needs 1 <= k <= classes, got k={k} for {logits.shape[1]} classes")
    values, indices = torch.topk(logits.float(), k, dim=1)
    rest = logits.float().scatter(1, indices, _EMPTY_BUCKET).logsumexp(dim=1)
    if k == logits.shape[1]:
        rest = torch.full_like(rest, _EMPTY_BUCKET)
    return values, indices, rest


def pack_topk(values: torch.Tensor, indices: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    """One (rows, 2k + 1) float32 tensor: ``[values | indices | rest]`` (indices are exact in float32 below 2^24)."""
    return torch.cat([values.float(), indices.float(), rest.float().reshape(-1, 1)], dim=1)


def unpack_topk(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_topk`: values (rows, k), indices (rows, k) int64, rest (rows,)."""
    width = packed.shape[-1]
    if packed.ndim != 2 or width % 2 != 1 or width < 3:
        raise ShapeMismatchError(
            f"a packed top-k tensor has shape (rows, 2k + 1); got {tuple(packed.shape)}",
            hint="kd_topk reads teacher outputs from the cache's 'topk:K' storage; use 'kd' with dense logits.",
        )
    k = (width - 1) // 2
    return packed[:, :k].float(), packed[:, k : 2 * k].long(), packed[:, 2 * k].float()


def kd_topk_loss(
    student_logits: torch.Tensor,
    teacher_packed: torch.Tensor,
    target: torch.Tensor | None,
    *,
    temperature: float = 4.0,
    soft_weight: float = 0.5,
) -> dict[str, torch.Tensor]:
    r"""Hinton KD over k + 1 buckets: the teacher's k top classes, and one bucket for all the others.

    For each row, with :math:`K` the teacher's top-k classes, the teacher's and the student's bucket logits are

    .. math::
        a_t = [\,z_{t,K},\ \mathrm{LSE}(z_{t,\bar K})\,], \qquad a_s = [\,z_{s,K},\ \mathrm{LSE}(z_{s,\bar K})\,]

    (LSE = log-sum-exp; merging classes into one bucket whose logit is the LSE of theirs keeps its probability at
    T = 1), and the loss is

    .. math::
        \mathcal{L} = (1 - w)\,\mathrm{CE}(z_s, y)
                      + w\,T^2\,\mathrm{KL}\big(\mathrm{softmax}(a_t/T)\,\|\,\mathrm{softmax}(a_s/T)\big)

    averaged over the batch. This is computed exactly from the stored form (no dense logits are rebuilt). With
    k = classes - 1 or k = classes the bucket holds at most one class and the loss equals :func:`~kdistill.kd_loss`
    on the full logits. For smaller k it differs from full KD in two ways: the student is not told how to share the
    rest bucket's mass among its classes, and at T != 1 the bucket is tempered as one class
    (:math:`e^{\mathrm{LSE}/T}` instead of :math:`\sum_j e^{z_j/T}`).

    Args:
        student_logits: (batch, classes).
        teacher_packed: (batch, 2k + 1), :func:`pack_topk` of the teacher's top-k form.
        target: (batch,) class indices or None (then only the soft term, at full weight).

    Returns:
        ``{"loss": total, "ce": CE, "kd": T² KL}`` (``"ce"`` absent without targets).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= soft_weight <= 1.0:
        raise ValueError(f"soft_weight must be in [0, 1], got {soft_weight}")
    values, indices, rest = unpack_topk(teacher_packed)
    if len(values) != len(student_logits) or int(indices.max()) >= student_logits.shape[1]:
        raise ShapeMismatchError(
            f"teacher top-k for {len(values)} rows with class indices up to {int(indices.max())} does not fit "
            f"student logits {tuple(student_logits.shape)}",
            hint="the student's last layer must output as many classes as the teacher.",
        )
    student_top = student_logits.gather(1, indices)
    student_rest = student_logits.scatter(1, indices, _EMPTY_BUCKET).logsumexp(dim=1, keepdim=True)
    teacher_buckets = torch.cat([values, rest.clamp_min(_EMPTY_BUCKET).unsqueeze(1)], dim=1) / temperature
    student_buckets = torch.cat([student_top, student_rest], dim=1) / temperature
    teacher_log_probs = F.log_softmax(teacher_buckets, dim=1)
    student_log_probs = F.log_softmax(student_buckets, dim=1)
    return mix_soft_and_hard(
        student_log_probs, teacher_log_probs, student_logits, target, temperature=temperature, soft_weight=soft_weight
    )


@register_loss("kd_topk", "Hinton KD from top-k cached teacher outputs: KL over the k top classes + one 'rest' bucket")
class KDTopKLoss(KDLoss):
    """Class form of :func:`kd_topk_loss`; its teacher ``Outputs.logits`` are the packed top-k form (rows, 2k + 1),
    which is what ``kdistill.distill(..., cache_dir=..., cache_storage="topk:K")`` gives it."""

    loss_function = staticmethod(kd_topk_loss)

    @staticmethod
    def encode_teacher_logits(logits: torch.Tensor) -> torch.Tensor:
        """Dense teacher logits (batch, classes) in the packed form this loss reads, keeping the top half of the
        classes (the generic contract tests feed the loss through this)."""
        return pack_topk(*encode_topk(logits, max(1, logits.shape[1] // 2)))
