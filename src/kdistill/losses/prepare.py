"""Getting a loss ready to train: one dry pass so lazy parts exist, then the parameters the optimizer must also see.

Methods with learned parts (FitNets projectors, CRD embeddings and memory bank, BYOT heads) are ``nn.Module`` losses
whose parts are built from the first batch's shapes. :func:`prepare_loss` runs the student (eval mode, no gradients)
and, when the method reads teacher features, the teacher on the first rows, calls the loss's optional
``prepare(student, teacher, rows)`` hook, and returns the loss's trainable parameters.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from kdistill.data import Inputs, rows_in, take_rows, trim_padding
from kdistill.features import capture_features
from kdistill.losses.base import Loss, defines_hook
from kdistill.teachers.base import Outputs, Teacher, TopK

__all__ = ["StaticTargets", "TeacherBank", "prepare_loss"]


def prepare_loss(
    loss_fn: Loss,
    model: nn.Module,
    x: Inputs,
    teacher_logits: torch.Tensor | None,
    teacher: Teacher | None,
    *,
    batch_size: int = 64,
) -> list[nn.Parameter]:
    """Build ``loss_fn``'s lazy parts from a dry batch and return its trainable parameters (empty for plain losses).

    ``x``: the transfer set's inputs (rows, ...), or a mapping of them (``input_ids``, ``attention_mask``: the dry
    batch is cut to its longest row and passed as keywords; an output's ``.logits`` is read); ``teacher_logits``:
    the precomputed (rows, classes) or None.
    The model's train/eval mode is restored; BatchNorm statistics are not touched (eval mode, no gradients).
    """
    hook = getattr(loss_fn, "prepare", None)
    device = x.device if isinstance(x, torch.Tensor) else next(iter(x.values())).device
    if hook is not None and defines_hook(loss_fn, "prepare"):  # the base class's no-op needs no dry batch
        rows = rows_in(x)
        index = torch.arange(min(batch_size, rows), device=device)
        first = trim_padding(take_rows(x, index))  # a mapping (input_ids, attention_mask) goes in as keywords
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), capture_features(model, tuple(loss_fn.student_features)) as captured:
                output = model(**first) if isinstance(first, Mapping) else model(first)
            logits = output if isinstance(output, torch.Tensor) else output.logits
            student = Outputs(logits, dict(captured))
        finally:
            model.train(was_training)
        teacher_out: Outputs | None = None
        if loss_fn.teacher_features:
            if teacher is None:
                raise ValueError("this method reads teacher features, so it needs the live teacher")
            batch: Any = first  # adapters take a mapping of inputs as it is (transformers teachers)
            live = teacher(batch, features=tuple(loss_fn.teacher_features))
            teacher_out = Outputs(live.logits, live.features, index)
        elif teacher_logits is not None:
            teacher_out = Outputs(teacher_logits[index], index=index)
        hook(student, teacher_out, rows)
    if isinstance(loss_fn, nn.Module):
        loss_fn.to(device)
        return [parameter for parameter in loss_fn.parameters() if parameter.requires_grad]
    return []


class TeacherBank:
    """The teacher's logits and named features for every row of the transfer set, computed once.

    Teachers run in eval mode without gradients, so their outputs for a row never change: methods that read teacher
    features index this bank instead of running the teacher on every batch (10x or more faster for feature methods
    on small students). :meth:`build` returns None when the bank would hold more than ``max_numbers`` numbers (then
    the engine runs the teacher live).
    """

    def __init__(self, outputs: Outputs) -> None:
        self.outputs = outputs

    @classmethod
    def build(
        cls,
        teacher: Teacher | None,
        x: torch.Tensor,
        features: tuple[str, ...],
        *,
        logits: torch.Tensor | None = None,
        batch_size: int = 512,
        max_numbers: int = 50_000_000,
    ) -> TeacherBank | None:
        """Run ``teacher`` over ``x`` (rows, ...) once, asking for ``features``; None without features or teacher,
        or when too large. ``logits``: the (rows, classes) soft targets already computed (out-of-fold ones, say),
        which the bank serves instead of the teacher's own."""
        if not features or teacher is None or len(x) == 0:
            return None
        first = teacher(x[:batch_size], features=features)
        per_row = first.logits[0].numel() + sum(value[0].numel() for value in first.features.values())
        if per_row * len(x) > max_numbers:
            return None
        parts = [first] + [
            teacher(x[start : start + batch_size], features=features) for start in range(batch_size, len(x), batch_size)
        ]
        if logits is None:
            logits = torch.cat([part.logits for part in parts])
        logits = logits.to(x.device)
        named = {name: torch.cat([part.features[name] for part in parts]).to(x.device) for name in first.features}
        return cls(Outputs(logits, named))

    def select(self, index: torch.Tensor) -> Outputs:
        """The bank's rows ``index`` (batch,), as the teacher's outputs for that batch (with ``index`` set)."""
        features = {name: value.index_select(0, index) for name, value in self.outputs.features.items()}
        return Outputs(self.outputs.logits.index_select(0, index), features, index)


class StaticTargets:
    """Teacher outputs that never change during training (cached, precomputed or out-of-fold, no augmentation), served
    per batch: dense logits (rows, classes) or (rows, seq, vocab), or a :class:`~kdistill.teachers.TopK` of the whole
    transfer set (rows, k), whose rows are gathered field by field into the teacher's ``Outputs.topk``.

    When the loss defines ``precompute(teacher_logits, y)`` (see :class:`~kdistill.losses.Loss`), its per-row table
    is built once from dense (rows, classes) logits and stored beside them in one float32 tensor, so that a single
    row gather per batch serves both: on a tiny student every gather from a transfer set larger than the CPU cache
    costs as much as several small ops. Without it the logits stay as given (a memory-mapped cache entry is not
    copied; fp16 is upcast per batch).

    kdistill 0.1's packed top-k table (rows, 2k + 1) passed as logits is read as a :class:`TopK` when the loss says it
    reads top-k (``reads_topk``, as ``kd_topk`` does), so callers that still pass the cache's packed form keep
    working; pass a :class:`TopK` instead.
    """

    def __init__(self, logits: torch.Tensor | TopK, precomputed: torch.Tensor | None = None) -> None:
        self.topk: TopK | None = None
        self.table: torch.Tensor | None = None
        self.classes: int | None = None
        self.packed = False
        if isinstance(logits, TopK):
            self.topk = logits
        elif precomputed is None:
            self.table, self.classes = logits, logits.shape[-1]
        else:
            self.classes, self.packed = logits.shape[1], True
            self.table = torch.cat([logits.float(), precomputed.float()], dim=1)

    @classmethod
    def build(cls, loss_fn: Loss, logits: torch.Tensor | TopK, y: torch.Tensor | None) -> StaticTargets:
        """Ask ``loss_fn``'s optional ``precompute`` hook for its table (it may return None) and serve it too. A TopK
        (or a packed table for a loss that ``reads_topk``) is served as it is: ``precompute`` takes dense logits."""
        if isinstance(logits, torch.Tensor) and getattr(loss_fn, "reads_topk", False):
            logits = TopK.from_packed(logits, getattr(loss_fn, "topk_samples", 0))
        if isinstance(logits, TopK):
            return cls(logits)
        precompute = getattr(loss_fn, "precompute", None)
        return cls(logits, None if precompute is None else precompute(logits, y))

    def select(self, index: torch.Tensor) -> Outputs:
        """The teacher's outputs for the rows ``index`` (batch,), with ``index`` and ``precomputed`` (or ``topk``)
        set."""
        if self.topk is not None:
            return Outputs(index=index, topk=self.topk.index_select(index))
        assert self.table is not None
        rows = self.table.index_select(0, index)
        if not self.packed:
            return Outputs(rows.float(), index=index)
        return Outputs(rows[:, : self.classes], index=index, precomputed=rows[:, self.classes :])
