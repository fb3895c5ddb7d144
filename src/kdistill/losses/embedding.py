"""Embedding distillation: the student's (batch, dim) embedding pulled toward the teacher's.

Reimers & Gurevych, "Making Monolingual Sentence Embeddings Multilingual using Knowledge Distillation" (2020),
https://arxiv.org/abs/2004.09813 (sentence-transformers' ``MSELoss``); the cosine form is the angular analogue
(``1 - cos``, as in ``torch.nn.CosineEmbeddingLoss`` with target 1). Both read ``Outputs.logits`` as the embedding
and take no labels (``target`` is ignored).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdistill.errors import ShapeMismatchError
from kdistill.losses.base import BaseLoss, register_loss
from kdistill.losses.common import as_target, output_mask, require_teacher
from kdistill.teachers.base import Outputs

__all__ = ["CosineEmbeddingLoss", "MSEEmbeddingLoss", "check_embeddings", "cosine_loss", "mse_embedding_loss"]

NORM_EPS = 1e-12
"""Norms are clamped here before dividing (``F.normalize``'s default, as sentence-transformers' ``cos_sim``)."""


def check_embeddings(student: torch.Tensor, teacher: torch.Tensor, method: str) -> None:
    """Raise :class:`ShapeMismatchError` unless both are (batch, dim) with the same shape."""
    for role, value in (("student", student), ("teacher", teacher)):
        if value.ndim != 2:
            raise ShapeMismatchError(
                f"method {method!r} compares (batch, dim) embeddings; got {role} outputs of shape {tuple(value.shape)}",
                hint="pool token embeddings to one vector per example (mean over real tokens, or the [CLS] token).",
            )
    if student.shape != teacher.shape:
        raise ShapeMismatchError(
            f"student embeddings {tuple(student.shape)} and teacher embeddings {tuple(teacher.shape)} differ",
            hint="the student must output the teacher's embedding size (add a linear projection as its last layer).",
        )


def _embeddings_of(student: Outputs, teacher: Outputs | None, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The (batch, dim) embeddings of both; a :class:`ShapeMismatchError` for sequence outputs (a mask)."""
    teacher = require_teacher(teacher, method)
    if output_mask(student, teacher) is not None:
        raise ShapeMismatchError(
            f"method {method!r} compares one embedding per example; the outputs carry a sequence mask",
            hint="pool token embeddings to (batch, dim) under the mask first (mean over real tokens, or [CLS]).",
        )
    return student.logits, as_target(teacher.logits)


def cosine_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    r""":math:`\frac{1}{B}\sum_i \big(1 - \cos(s_i, t_i)\big)`, with
    :math:`\cos(s, t) = \frac{s}{\max(\|s\|, \epsilon)}\cdot\frac{t}{\max(\|t\|, \epsilon)}`. ``student``,
    ``teacher``: (batch, dim). Blind to the embeddings' norms: only directions are matched."""
    check_embeddings(student, teacher, "cosine")
    similarity = (F.normalize(student, dim=1, eps=NORM_EPS) * F.normalize(teacher, dim=1, eps=NORM_EPS)).sum(dim=1)
    return (1.0 - similarity).mean()


def mse_embedding_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    r""":math:`\frac{1}{B\,d}\sum_{i,j} (s_{ij} - t_{ij})^2`: ``nn.MSELoss()`` (mean over every number) between
    (batch, dim) embeddings, as sentence-transformers' ``MSELoss`` computes it."""
    check_embeddings(student, teacher, "mse")
    return F.mse_loss(student, teacher)


@register_loss("cosine", "embeddings: 1 - cos(student, teacher), mean over rows (directions only)")
class CosineEmbeddingLoss(BaseLoss):
    """Class form of :func:`cosine_loss`: ``{"loss", "cosine"}``; the teacher's ``Outputs.logits`` are its
    (batch, dim) embeddings."""

    at_equal = "zero"
    batch_order_invariant = True

    def __call__(
        self, student: Outputs, teacher: Outputs | None, target: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        term = cosine_loss(*_embeddings_of(student, teacher, "cosine"))
        return {"loss": term, "cosine": term}


@register_loss("mse", "embeddings: MSE to the teacher's embedding (sentence-transformers' MSELoss)")
class MSEEmbeddingLoss(BaseLoss):
    """Class form of :func:`mse_embedding_loss`: ``{"loss", "mse"}``."""

    at_equal = "zero"
    batch_order_invariant = True

    def __call__(
        self, student: Outputs, teacher: Outputs | None, target: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        term = mse_embedding_loss(*_embeddings_of(student, teacher, "mse"))
        return {"loss": term, "mse": term}
