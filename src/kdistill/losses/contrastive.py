"""In-batch contrastive distillation on the teacher's similarities: each sentence's softmax over its similarities to
the rest of the batch, the student's pulled toward the teacher's.

Abbasi Koohpayegani, Tejankar & Pirsiavash, "CompRess: Self-Supervised Learning by Compressing Representations",
NeurIPS 2020, https://arxiv.org/abs/2010.14713; the authors' code (github.com/UMBCvision/CompRess,
``nn/compress_loss.py``, ``CompReSS``: the "2q" form, each model against its own bank): L2-normalise both models'
embeddings, take each one's dot products with its own bank divided by T = 0.04, and
``F.kl_div(log_softmax(student), softmax(teacher), reduction="batchmean")``. Here the bank is the rest of the batch
(no memory queue: each row's neighbours are the other rows, the row itself masked out), which is what "in-batch"
means; the teacher's embeddings may come from the cache, and the two widths may differ (a 256-d static student
against a 384-d teacher).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdistill.errors import MethodError, ShapeMismatchError
from kdistill.losses.base import BaseLoss, register_loss
from kdistill.losses.common import as_target, output_mask, require_teacher
from kdistill.teachers.base import Outputs

__all__ = ["SimilarityContrastiveLoss", "in_batch_similarities", "similarity_contrastive_loss"]

TEMPERATURE = 0.04
"""CompRess's T, for the teacher and the student alike."""


def in_batch_similarities(embeddings: torch.Tensor, temperature: float, *, include_self: bool = False) -> torch.Tensor:
    r"""(batch, d) -> logits :math:`z_{ij} = \hat x_i \cdot \hat x_j / T`,
    :math:`\hat x = x / \max(\|x\|_2, 10^{-12})`: (batch, batch) with ``include_self``, else (batch, batch - 1),
    row i holding every :math:`j \ne i` in order."""
    unit = F.normalize(embeddings, dim=1, eps=1e-12)
    logits = unit @ unit.T / temperature
    if include_self:
        return logits
    rows = len(logits)
    off_diagonal = ~torch.eye(rows, dtype=torch.bool, device=logits.device)
    return logits[off_diagonal].reshape(rows, rows - 1)


def similarity_contrastive_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    temperature: float = TEMPERATURE,
    teacher_temperature: float | None = None,
    include_self: bool = False,
) -> torch.Tensor:
    r""":math:`\frac{1}{B}\sum_i \mathrm{KL}\big(p^t_i \,\|\, p^s_i\big)`, with
    :math:`p^s_{ij} = \mathrm{softmax}_{j \ne i}(\hat s_i \cdot \hat s_j / T)` and
    :math:`p^t_{ij} = \mathrm{softmax}_{j \ne i}(\hat t_i \cdot \hat t_j / T_t)` (``T_t`` = ``teacher_temperature``,
    default T as in CompRess). ``student``: (batch, d_s), ``teacher``: (batch, d_t), d_s and d_t may differ; B >= 2
    (>= 1 with ``include_self``). ``include_self=True`` keeps :math:`j = i` in both softmaxes (CompRess's memory bank
    never holds the anchor itself, so the default leaves it out)."""
    for role, value in (("student", student), ("teacher", teacher)):
        if value.ndim != 2:
            raise ShapeMismatchError(
                f"the contrastive loss compares (batch, dim) embeddings; got {role} outputs {tuple(value.shape)}",
                hint="pool token states to one vector per sentence first.",
            )
    if len(student) != len(teacher):
        raise ShapeMismatchError(f"student batch {len(student)} and teacher batch {len(teacher)} differ")
    if not include_self and len(student) < 2:
        raise ShapeMismatchError(
            f"an in-batch contrastive loss needs at least 2 rows per batch, got {len(student)}",
            hint="raise batch_size (64 or more gives each row enough neighbours).",
        )
    if temperature <= 0 or (teacher_temperature is not None and teacher_temperature <= 0):
        raise MethodError(f"temperatures must be > 0, got {temperature} and {teacher_temperature}")
    student_logits = in_batch_similarities(student, temperature, include_self=include_self)
    teacher_logits = in_batch_similarities(
        as_target(teacher), teacher_temperature or temperature, include_self=include_self
    )
    teacher_log_probs = teacher_logits.log_softmax(dim=1)
    entries = teacher_log_probs.exp() * (teacher_log_probs - student_logits.log_softmax(dim=1))
    return entries.sum() / len(student)


@register_loss("contrastive", "embeddings: in-batch KL between teacher and student similarity softmaxes (CompRess)")
class SimilarityContrastiveLoss(BaseLoss):
    """Class form of :func:`similarity_contrastive_loss`: ``{"loss", "contrastive"}``; ``Outputs.logits`` are the
    (batch, dim) embeddings of both models (their widths may differ). ``weight`` scales the loss term."""

    at_equal = "zero"
    batch_order_invariant = True

    def __init__(
        self,
        temperature: float = TEMPERATURE,
        teacher_temperature: float | None = None,
        include_self: bool = False,
        weight: float = 1.0,
    ) -> None:
        if temperature <= 0 or (teacher_temperature is not None and teacher_temperature <= 0):
            raise MethodError(
                f"temperatures must be > 0, got {temperature} and {teacher_temperature}",
                hint="CompRess uses 0.04 for both.",
            )
        self.temperature = temperature
        self.teacher_temperature = teacher_temperature
        self.include_self = include_self
        self.weight = weight

    def __call__(
        self, student: Outputs, teacher: Outputs | None, target: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        teacher = require_teacher(teacher, "contrastive")
        if output_mask(student, teacher) is not None:
            raise ShapeMismatchError(
                "method 'contrastive' compares one embedding per sentence; the outputs carry a sequence mask",
                hint="pool token embeddings to (batch, dim) under the mask first.",
            )
        term = similarity_contrastive_loss(
            student.logits,
            teacher.logits,
            temperature=self.temperature,
            teacher_temperature=self.teacher_temperature,
            include_self=self.include_self,
        )
        return {"loss": self.weight * term, "contrastive": term}
