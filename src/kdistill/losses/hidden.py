r"""TinyBERT's hidden-state loss: the student's hidden states, through one learned linear map, regress the teacher's
under a layer map, over the real tokens.

Jiao, Yin, Shang, Jiang, Chen, Li, Wang & Liu, "TinyBERT: Distilling BERT for Natural Language Understanding",
Findings of EMNLP 2020, https://arxiv.org/abs/1909.10351 (eq. 8 for the layers, eq. 9 for the embeddings):

.. math::

    \mathcal{L}_{hidn} = \sum_{m} \mathrm{MSE}(H^S_m W_h,\; H^T_{g(m)}),\qquad
    \mathcal{L}_{embd} = \mathrm{MSE}(E^S W_e,\; E^T)

with :math:`H_m` (batch, seq, d) the output of layer m, :math:`W_h` a learned (d_s, d_t) matrix (one matrix shared by
every layer and the embeddings in the authors' code, ``fit_dense``), and the uniform layer map
:math:`g(m) = m\,N/M` (1-based: student layer m of M takes teacher layer m·N/M of N), :func:`uniform_map`.

Reduction (``reduction``):

- ``"tokens"`` (default): the mean squared error over the real tokens (attention mask 1) and the teacher's width,
  :math:`\frac{1}{n_{real}\,d_t}\sum_{b,i:\,mask=1}\|H^S W - H^T\|^2`; padding never counts, so the number does not
  depend on how long a batch was padded;
- ``"reference"``: the authors' ``MSELoss()`` mean over every position of the padded batch, padding included,
  :math:`\frac{1}{B\,L\,d_t}\sum_{b,i}\|\cdot\|^2`. Conversion: reference = tokens × n_real / (B·L) plus the padded
  positions' own error / (B·L·d_t); the authors pad every batch to a fixed ``max_seq_length`` (128), kdistill pads to
  each batch's longest row, so the reference number also changes with the batch's padding.

Width: equal widths need no map (identity, as :class:`~kdistill.losses.projector.Projector`); different widths get
one ``nn.Linear(d_s, d_t)`` with bias (``fit_dense``), or one per layer with ``shared_projection=False``.

The attention mask comes from the teacher's outputs, feature ``"attention_mask"``
(:data:`kdistill.teachers.hf.MASK_FEATURE`, which :class:`~kdistill.teachers.hf.HFTeacher` serves).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

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
from kdistill.teachers.base import Outputs
from kdistill.teachers.hf import MASK_FEATURE

__all__ = ["MASK_FEATURE", "REDUCTIONS", "TinyBERTHidden", "hidden_mse", "layer_paths", "token_mask", "uniform_map"]

REDUCTIONS = ("tokens", "reference")


def uniform_map(teacher_layers: int, student_layers: int) -> list[int]:
    r"""TinyBERT's uniform map, 0-based: student layer i takes teacher layer :math:`\lfloor (i+1)N/M \rfloor - 1`
    (the last layer of each block of N/M; the authors' ``teacher_atts[i * k + k - 1]``). 6 -> 3 gives [1, 3, 5],
    12 -> 4 gives [2, 5, 8, 11]. The last student layer always meets the teacher's last."""
    if not 1 <= student_layers <= teacher_layers:
        raise MethodError(
            f"a layer map needs 1 <= student layers ({student_layers}) <= teacher layers ({teacher_layers})",
            hint="pass student_layers and teacher_layers as the two models' num_hidden_layers.",
        )
    return [(index + 1) * teacher_layers // student_layers - 1 for index in range(student_layers)]


def layer_paths(
    student_layers: int,
    teacher_layers: int,
    layer_map: Sequence[int] | None,
    student_stack: str,
    teacher_stack: str | None,
    method: str,
) -> list[tuple[str, str]]:
    """``(student path, teacher path)`` for each student layer: ``f"{student_stack}.{i}"`` with
    ``f"{teacher_stack}.{layer_map[i]}"`` (default map: :func:`uniform_map`). A map of the wrong length, out of
    range or not increasing is a :class:`MethodError`."""
    chosen = uniform_map(teacher_layers, student_layers) if layer_map is None else [int(v) for v in layer_map]
    if len(chosen) != student_layers:
        raise MethodError(
            f"method {method!r}: layer_map {chosen} has {len(chosen)} entries for {student_layers} student layers",
            hint="give one teacher layer (0-based) per student layer.",
        )
    if any(not 0 <= value < teacher_layers for value in chosen):
        raise MethodError(
            f"method {method!r}: layer_map {chosen} is out of range for a teacher of {teacher_layers} layers",
            hint=f"teacher layers are 0..{teacher_layers - 1}.",
        )
    if any(later <= earlier for earlier, later in itertools.pairwise(chosen)):
        raise MethodError(f"method {method!r}: layer_map {chosen} is not strictly increasing")
    teacher_stack = student_stack if teacher_stack is None else teacher_stack
    return [(f"{student_stack}.{i}", f"{teacher_stack}.{t}") for i, t in enumerate(chosen)]


def token_mask(teacher: Outputs, shape: Sequence[int], method: str) -> torch.Tensor:
    """The batch's (batch, seq) mask as bool, from the teacher's ``"attention_mask"`` feature, checked against the
    (batch, seq) of the hidden states."""
    mask = get_feature(teacher, MASK_FEATURE, role="teacher", method=method)
    if tuple(mask.shape) != tuple(shape):
        raise ShapeMismatchError(
            f"method {method!r}: the attention mask is {tuple(mask.shape)} but the hidden states are "
            f"(batch, seq) = {tuple(shape)}",
            hint="the mask must be the batch's own (the HF teacher serves it as the feature 'attention_mask').",
        )
    return mask.detach().ne(0)


def hidden_mse(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    r"""Mean squared error of (batch, seq, d) hidden states (the student's already mapped to the teacher's width).

    ``mask`` (batch, seq) bool: :math:`\sum_{mask}\|s-t\|^2 / (n_{real}\,d)`, the mean over real tokens; None: the
    plain mean over every element (``F.mse_loss``)."""
    if student_hidden.shape != teacher_hidden.shape:
        raise ShapeMismatchError(
            f"hidden states of shapes {tuple(student_hidden.shape)} and {tuple(teacher_hidden.shape)} cannot be "
            "compared",
            hint="student and teacher see the same batch: (batch, seq) agree; widths are mapped by the projection.",
        )
    squared = (student_hidden - teacher_hidden).pow(2)
    if mask is None:
        return squared.mean()
    weights = mask.to(squared.dtype).unsqueeze(-1)
    real = weights.sum().clamp_min(1.0)
    return (squared * weights).sum() / (real * squared.shape[-1])


@register_loss(
    "tinybert_hidden",
    "Jiao 2020 TinyBERT: CE + w·MSE(W·student hidden states, teacher's) under a layer map, over real tokens",
)
class TinyBERTHidden(nn.Module, BaseLoss):
    r""":math:`\mathcal{L} = c\,\mathrm{CE} + w\,(\mathcal{L}_{embd} + \sum_m \mathrm{MSE}(H^S_m W, H^T_{g(m)}))`.

    ``student_layers`` / ``teacher_layers``: the two models' layer counts; ``layer_map``: teacher layer (0-based)
    per student layer (None: TinyBERT's :func:`uniform_map`; a student built with
    :func:`kdistill.students.transformer.from_teacher` may pass the map it was initialised from). ``student_stack``
    / ``teacher_stack``: the module path of each model's layer list (BERT classifiers ``"bert.encoder.layer"``);
    ``embeddings``: the embedding module's path in both (None leaves out the embedding term).
    ``reduction``: ``"tokens"`` or ``"reference"`` (module docstring). ``shared_projection``: one ``W`` for every
    layer (the authors'), or one per pair. Returns ``{"loss", "ce", "hidden"}``; ``"hidden"`` is the sum over the
    pairs (embeddings included) before the weight ``w``.

    Reference code: the TinyBERT authors' ``task_distill.py`` (``rep_loss``: ``MSELoss()`` between
    ``fit_dense(student_reps[i])`` and ``teacher_reps[i * k]``, summed over i = 0..M).
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
        embeddings: str | None = "bert.embeddings",
        reduction: str = "tokens",
        shared_projection: bool = True,
        hidden_weight: float = 1.0,
        ce_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise MethodError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.pairs = layer_paths(
            student_layers, teacher_layers, layer_map, student_stack, teacher_stack, "tinybert_hidden"
        )
        if embeddings is not None:
            self.pairs.insert(0, (embeddings, embeddings))
        self.reduction = reduction
        self.shared_projection = shared_projection
        self.hidden_weight = check_non_negative("hidden_weight", hidden_weight)
        self.ce_weight = check_non_negative("ce_weight", ce_weight)
        self.student_features = tuple(s for s, _ in self.pairs)
        masks = (MASK_FEATURE,) if reduction == "tokens" else ()
        self.teacher_features = (*(t for _, t in self.pairs), *masks)
        self.projections = nn.ModuleList()

    def prepare(self, student: Outputs, teacher: Outputs | None, rows: int) -> None:
        """Build the projection(s) from the dry batch's widths: identity when they agree, else ``Linear(d_s, d_t)``."""
        teacher = require_teacher(teacher, "tinybert_hidden")
        widths = [
            (
                int(get_feature(student, s, role="student", method="tinybert_hidden").shape[-1]),
                int(get_feature(teacher, t, role="teacher", method="tinybert_hidden").shape[-1]),
            )
            for s, t in self.pairs
        ]
        count = 1 if self.shared_projection else len(widths)
        if self.shared_projection and len(set(widths)) > 1:
            raise ShapeMismatchError(
                f"tinybert_hidden: one shared projection cannot map the widths {sorted(set(widths))}",
                hint="pass shared_projection=False for layers of different widths.",
            )
        self.projections = nn.ModuleList(
            (nn.Identity() if d_s == d_t else nn.Linear(d_s, d_t)).to(student.logits.device)
            for d_s, d_t in widths[:count]
        )

    def forward(
        self, student: Outputs, teacher: Outputs | None, target: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        check_row_outputs(student, teacher, "tinybert_hidden")
        teacher = require_teacher(teacher, "tinybert_hidden")
        if len(self.projections) == 0:
            self.prepare(student, teacher, 0)
        hidden = student.logits.new_zeros(())
        for position, (s, t) in enumerate(self.pairs):
            mine = get_feature(student, s, role="student", method="tinybert_hidden")
            theirs = as_target(get_feature(teacher, t, role="teacher", method="tinybert_hidden"))
            if mine.ndim != 3 or theirs.ndim != 3:
                raise ShapeMismatchError(
                    f"tinybert_hidden compares (batch, seq, width) hidden states; got {tuple(mine.shape)} for "
                    f"{s!r} and {tuple(theirs.shape)} for {t!r}",
                    hint="name transformer layers (bert.encoder.layer.<i>) and the embeddings module.",
                )
            projection = self.projections[0 if self.shared_projection else position]
            mask = token_mask(teacher, mine.shape[:2], "tinybert_hidden") if self.reduction == "tokens" else None
            hidden = hidden + hidden_mse(projection(mine), theirs, mask)
        return with_cross_entropy(
            {"hidden": hidden}, self.hidden_weight * hidden, student.logits, target, self.ce_weight
        )
