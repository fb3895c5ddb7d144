"""Teacher-output sources: where each batch's teacher outputs come from, chosen once, before the loop.

The loop hands every optimizer step (a list of micro-batches, one without gradient accumulation) to the source's
``stream`` and trains on what comes back: each micro-batch paired with the teacher's outputs on it (None for methods
without a teacher). It never asks which kind of source it has:

- :class:`NoTeacher`: the hard-label baseline, or a method that needs no teacher;
- :class:`StaticSource`: teacher logits that never change (precomputed, cached or out-of-fold), gathered by the
  batch's ``index`` (:class:`~kdistill.losses.prepare.StaticTargets`, with the loss's ``precompute`` table);
- :class:`BankSource`: the teacher's logits and features for every row, computed once
  (:class:`~kdistill.losses.prepare.TeacherBank`);
- :class:`~kdistill.engine.live.LiveTeacher` and :class:`~kdistill.engine.live.AugmentedTeacher`: the teacher run on
  each batch, as given or augmented (optionally one step ahead in a background thread).

:func:`choose_teacher_source` picks one from what ``fit`` was given. A source with state that a run resumed in the
middle of an epoch needs (the augmentation generator) returns it from ``state_dict()``; checkpoints store it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from kdistill.engine.batches import Batch, DataSource, InMemorySource
from kdistill.errors import ConfigError
from kdistill.losses.base import Loss
from kdistill.losses.prepare import StaticTargets, TeacherBank
from kdistill.teachers.base import Outputs, Teacher

if TYPE_CHECKING:
    from kdistill.engine.live import Augment

__all__ = ["BankSource", "NoTeacher", "StaticSource", "TeacherSource", "choose_teacher_source"]

Step = Sequence[Batch]
"""One optimizer step's micro-batches (one batch without gradient accumulation)."""


class TeacherSource:
    """Base class: a source answers ``outputs(batch)``; ``stream`` pairs every batch of every step with it.

    Override ``stream`` instead when the batches themselves change (augmentation) or work runs ahead (prefetch).
    ``state_dict`` / ``load_state_dict``: what a mid-epoch resume needs (tensors, numbers, lists, dicts).
    """

    def outputs(self, batch: Batch) -> Outputs | None:
        """The teacher's outputs for ``batch``'s rows, with ``Outputs.index`` set to ``batch.index``."""
        raise NotImplementedError

    def stream(self, steps: Iterator[Step], epoch: int) -> Iterator[list[tuple[Batch, Outputs | None]]]:
        """Each step's micro-batches, each with its teacher outputs."""
        for step in steps:
            yield [(batch, self.outputs(batch)) for batch in step]

    def state_dict(self) -> dict[str, Any]:
        """Empty: a source whose outputs depend only on the batch has nothing to resume."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back what :meth:`state_dict` returned."""


class NoTeacher(TeacherSource):
    """No teacher outputs (the loss receives None)."""

    def outputs(self, batch: Batch) -> Outputs | None:
        return None


class StaticSource(TeacherSource):
    """Teacher logits that never change, gathered by row position; ``logits``: (rows, classes) aligned with the
    data source's ``index``. :meth:`build` lets the loss precompute its per-row teacher side once."""

    def __init__(self, targets: StaticTargets, logits: torch.Tensor) -> None:
        self.targets = targets
        self.logits = logits

    @classmethod
    def build(cls, loss_fn: Loss, logits: torch.Tensor, target: torch.Tensor | None = None) -> StaticSource:
        """Serve ``logits`` (rows, classes) to ``loss_fn``, with its optional ``precompute(logits, target)`` table."""
        return cls(StaticTargets.build(loss_fn, logits, target), logits)

    def outputs(self, batch: Batch) -> Outputs:
        return self.targets.select(batch.index)


class BankSource(TeacherSource):
    """The teacher's logits and named features for every row, computed once (:class:`TeacherBank`)."""

    def __init__(self, bank: TeacherBank) -> None:
        self.bank = bank

    def outputs(self, batch: Batch) -> Outputs:
        return self.bank.select(batch.index)


def choose_teacher_source(
    loss_fn: Loss,
    data: DataSource,
    *,
    teacher: Teacher | None,
    logits: torch.Tensor | None,
    augment: Augment | None = None,
    seed: int = 0,
    prefetch: bool = False,
) -> TeacherSource:
    """The teacher-output source for a run, in this order of preference:

    1. with ``augment``: the teacher live on each augmented batch (``AugmentedTeacher``; no teacher when the loss
       needs none); precomputed ``logits`` are not used, the rows change every batch;
    2. a loss that reads teacher features: a bank of the teacher's outputs on every row when the data are in memory
       and the bank fits (``logits``, when given, replace the teacher's own in it), else the teacher live;
    3. precomputed ``logits`` (rows, classes): a static source;
    4. a loss that needs the teacher and no logits: the teacher live;
    5. otherwise none.
    """
    from kdistill.engine.live import AugmentedTeacher, LiveTeacher  # live.py builds on this module's base class

    features = tuple(loss_fn.teacher_features)
    live_teacher = teacher if loss_fn.needs_teacher else None
    if augment is not None:
        if live_teacher is None and loss_fn.needs_teacher:
            raise ConfigError("augmentation needs the live teacher", hint="pass teacher= to fit().")
        return AugmentedTeacher(augment, live_teacher, features, seed=seed, prefetch=prefetch)
    in_memory = isinstance(data, InMemorySource) and isinstance(data.inputs, torch.Tensor)
    if features:
        if teacher is None:
            raise ConfigError(
                f"this method reads teacher features {list(features)}, so it needs the live teacher",
                hint="pass teacher= to fit() (precomputed logits hold no features).",
            )
        if in_memory:
            assert isinstance(data, InMemorySource) and isinstance(data.inputs, torch.Tensor)
            bank = TeacherBank.build(teacher, data.inputs, features, logits=logits)
            if bank is not None:
                return BankSource(bank)
        return LiveTeacher(teacher, features)
    if logits is not None:
        target = data.target if isinstance(data, InMemorySource) else None
        return StaticSource.build(loss_fn, logits, target)
    if live_teacher is not None:
        return LiveTeacher(live_teacher)
    return NoTeacher()
