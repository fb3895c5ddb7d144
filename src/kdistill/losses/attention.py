r"""TinyBERT's attention loss: the student's attention scores regress the teacher's, head by head, under a layer
map, over the real (query, key) pairs.

Jiao et al., "TinyBERT: Distilling BERT for Natural Language Understanding", Findings of EMNLP 2020,
https://arxiv.org/abs/1909.10351, eq. 7:

.. math::

    \mathcal{L}_{attn} = \sum_m \frac{1}{h}\sum_{i=1}^{h} \mathrm{MSE}(A^S_{m,i},\; A^T_{g(m),i}),\qquad
    A = \frac{Q K^\top}{\sqrt{d_k}}

where :math:`A` (batch, heads, seq, seq) are the *unnormalised* scores, before the softmax (the paper found them
better than the probabilities), and :math:`g` the uniform layer map (:func:`~kdistill.losses.hidden.uniform_map`).

What transformers exposes: ``output_attentions=True`` returns the post-softmax probabilities, never the scores. So
this loss captures each layer's query and key projections (``<layer>.attention.self.query`` / ``.key``, forward
hooks: (batch, seq, width)) and computes :math:`QK^\top/\sqrt{d_k}` itself, which is exactly the score matrix
BERT's self-attention forms before adding its mask (absolute position embeddings; models that rotate q and k after
the projection, such as Llama's RoPE, are not supported). ``scores="probabilities"`` compares the softmax over the
real keys instead, what ``output_attentions`` would return.

Reduction (``reduction``):

- ``"tokens"`` (default): the mean over the real (query, key) pairs of every head,
  :math:`\frac{1}{h\,\sum_b n_b^2}\sum_{b,i,q,k:\,real} (A^S - A^T)^2` with :math:`n_b` the real tokens of row b;
- ``"reference"``: the authors' ``task_distill.py``: the additive mask (-10000) sends padded keys' scores below -100,
  ``torch.where(att <= -1e2, 0, att)`` zeroes them in both, and ``MSELoss()`` averages over all
  :math:`B\,h\,L^2` entries of the padded batch; padded *query* rows still count. There is no exact conversion to
  ``"tokens"``: the padded query rows' errors are in it, and it scales with the batch's padded length L.

Heads: both models need the same number of heads (``heads``; the paper's students keep the teacher's 12), their
head widths may differ. The attention mask comes from the teacher's ``"attention_mask"`` feature
(:class:`~kdistill.teachers.hf.HFTeacher`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from kdistill.errors import MethodError, ShapeMismatchError
from kdistill.losses.base import BaseLoss, register_loss
from kdistill.losses.common import (
    as_target,
    check_non_negative,
    check_row_outputs,
    get_feature,
    require_teacher,
    with_cross_entropy,
)
from kdistill.losses.hidden import REDUCTIONS, layer_paths, token_mask
from kdistill.teachers.base import Outputs
from kdistill.teachers.hf import MASK_FEATURE

__all__ = ["SCORES", "TinyBERTAttention", "attention_mse", "attention_scores"]

SCORES = ("logits", "probabilities")
_REFERENCE_FLOOR = -1e2  # the authors' threshold below which a masked score is zeroed
_ADDITIVE_MASK = -10000.0  # the additive mask of the BERT code TinyBERT builds on


def attention_scores(query: torch.Tensor, key: torch.Tensor, heads: int) -> torch.Tensor:
    r"""(batch, seq, width) query and key projections -> (batch, heads, seq, seq) scores
    :math:`Q_i K_i^\top / \sqrt{d_k}`, :math:`d_k = width / heads`."""
    batch, seq, width = query.shape
    if width % heads:
        raise ShapeMismatchError(
            f"a query of width {width} does not split into {heads} heads",
            hint="pass heads= the models' num_attention_heads.",
        )
    size = width // heads
    q = query.reshape(batch, seq, heads, size).transpose(1, 2)
    k = key.reshape(batch, key.shape[1], heads, size).transpose(1, 2)
    return q @ k.transpose(-1, -2) / math.sqrt(size)


def attention_mse(
    student_scores: torch.Tensor, teacher_scores: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    r"""Mean squared error of (batch, heads, seq, seq) score matrices over the real (query, key) pairs:
    ``mask`` (batch, seq) bool gives the pairs :math:`m_q m_k`; None: every entry."""
    if student_scores.shape != teacher_scores.shape:
        raise ShapeMismatchError(
            f"attention maps of shapes {tuple(student_scores.shape)} and {tuple(teacher_scores.shape)} cannot be "
            "compared",
            hint="TinyBERT's attention loss compares head by head: give both models the same number of heads.",
        )
    squared = (student_scores - teacher_scores).pow(2)
    if mask is None:
        return squared.mean()
    pairs = (mask[:, None, :, None] & mask[:, None, None, :]).to(squared.dtype)
    count = pairs.sum() * squared.shape[1]
    return (squared * pairs).sum() / count.clamp_min(1.0)


def _probabilities(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return scores.softmax(-1)
    return scores.masked_fill(~mask[:, None, None, :], torch.finfo(scores.dtype).min).softmax(-1)


def _reference_scores(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The authors' masked scores: the additive mask on padded keys, then entries <= -100 zeroed."""
    if mask is None:
        return scores
    added = scores + (~mask[:, None, None, :]).to(scores.dtype) * _ADDITIVE_MASK
    return torch.where(added <= _REFERENCE_FLOOR, torch.zeros_like(added), added)


@register_loss(
    "tinybert_attention",
    "Jiao 2020 TinyBERT: CE + w·MSE(student attention scores, teacher's) before softmax, per head, real tokens",
)
class TinyBERTAttention(BaseLoss):
    r""":math:`\mathcal{L} = c\,\mathrm{CE} + w \sum_m \mathrm{MSE}(A^S_m, A^T_{g(m)})`, the scores computed from
    each layer's captured query and key projections.

    ``student_layers`` / ``teacher_layers`` / ``layer_map`` / ``student_stack`` / ``teacher_stack``: as for
    :class:`~kdistill.losses.hidden.TinyBERTHidden`. ``query`` / ``key``: the projections' paths inside a layer
    (BERT: ``"attention.self.query"``, ``"attention.self.key"``). ``heads``: attention heads of both models
    (MiniLM-L6 and BERT-base: 12). ``scores``: ``"logits"`` (pre-softmax, the paper's) or ``"probabilities"``.
    ``reduction``: ``"tokens"`` or ``"reference"`` (module docstring). Returns ``{"loss", "ce", "attention"}``;
    ``"attention"`` is the sum over layers before the weight ``w``.

    Reference code: the TinyBERT authors' ``task_distill.py`` (``att_loss``: ``MSELoss()`` between
    ``student_atts[i]`` and ``teacher_atts[i * k + k - 1]`` after zeroing entries <= -100, summed over layers).
    """

    at_equal = "zero"
    batch_order_invariant = True
    sequence_features = True  # (batch, seq, width) features under the batch's attention mask

    def __init__(
        self,
        student_layers: int = 3,
        teacher_layers: int = 6,
        layer_map: Sequence[int] | None = None,
        student_stack: str = "bert.encoder.layer",
        teacher_stack: str | None = None,
        query: str = "attention.self.query",
        key: str = "attention.self.key",
        heads: int = 12,
        scores: str = "logits",
        reduction: str = "tokens",
        attention_weight: float = 1.0,
        ce_weight: float = 1.0,
    ) -> None:
        if scores not in SCORES:
            raise MethodError(f"scores must be one of {SCORES}, got {scores!r}", hint="'logits' is the paper's.")
        if reduction not in REDUCTIONS:
            raise MethodError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
            raise MethodError(f"heads must be a positive integer, got {heads!r}", hint="pass num_attention_heads.")
        layers = layer_paths(
            student_layers, teacher_layers, layer_map, student_stack, teacher_stack, "tinybert_attention"
        )
        self.pairs = [((f"{s}.{query}", f"{s}.{key}"), (f"{t}.{query}", f"{t}.{key}")) for s, t in layers]
        self.heads = heads
        self.scores = scores
        self.reduction = reduction
        self.attention_weight = check_non_negative("attention_weight", attention_weight)
        self.ce_weight = check_non_negative("ce_weight", ce_weight)
        self.student_features = tuple(path for pair, _ in self.pairs for path in pair)
        self.teacher_features = (*(path for _, pair in self.pairs for path in pair), MASK_FEATURE)

    def _scores(self, outputs: Outputs, paths: tuple[str, str], role: str) -> torch.Tensor:
        query, key = (get_feature(outputs, path, role=role, method="tinybert_attention") for path in paths)
        if query.ndim != 3 or key.shape != query.shape:
            raise ShapeMismatchError(
                f"tinybert_attention needs (batch, seq, width) query and key projections; got {tuple(query.shape)} "
                f"and {tuple(key.shape)} for {paths}",
                hint="name the layers' query and key Linear modules (query='attention.self.query').",
            )
        if role == "teacher":
            query, key = as_target(query), as_target(key)
        return attention_scores(query, key, self.heads)

    def __call__(
        self, student: Outputs, teacher: Outputs | None, target: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        check_row_outputs(student, teacher, "tinybert_attention")
        teacher = require_teacher(teacher, "tinybert_attention")
        total = student.logits.new_zeros(())
        for student_paths, teacher_paths in self.pairs:
            mine = self._scores(student, student_paths, "student")
            theirs = self._scores(teacher, teacher_paths, "teacher")
            mask = token_mask(teacher, (mine.shape[0], mine.shape[2]), "tinybert_attention")
            if self.scores == "probabilities":
                mine, theirs = _probabilities(mine, mask), _probabilities(theirs, mask)
            if self.reduction == "reference":
                if self.scores == "logits":
                    mine, theirs = _reference_scores(mine, mask), _reference_scores(theirs, mask)
                total = total + attention_mse(mine, theirs, None)
            else:
                total = total + attention_mse(mine, theirs, mask)
        return with_cross_entropy(
            {"attention": total}, self.attention_weight * total, student.logits, target, self.ce_weight
        )
