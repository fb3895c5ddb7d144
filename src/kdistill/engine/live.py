"""Live teachers: the teacher runs on each batch, as given (:class:`LiveTeacher`) or augmented
(:class:`AugmentedTeacher`, for inputs that change every epoch).

With ``prefetch=True`` the next step is augmented and labelled by the teacher in a background thread while the
student trains on the current one, so the student does not wait on the teacher (PyTorch releases the GIL inside its
kernels, so the two overlap on a multi-core CPU). One worker, fed in order, so the augmentation draws from its
generator in the same order with or without prefetching: the same seed gives the same batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, TypeVar

import torch

from kdistill.engine.batches import Batch
from kdistill.engine.sources import Step, TeacherSource
from kdistill.teachers.base import Outputs, Teacher

__all__ = ["Augment", "AugmentedTeacher", "LiveTeacher", "prefetched"]

Augment = Callable[[Any, torch.Generator], Any]
"""``augment(inputs, generator) -> inputs'``: a batch's inputs (batch, *features) in, the same shape out; all
randomness from ``generator``."""

_In = TypeVar("_In")
_Out = TypeVar("_Out")


def prefetched(items: Iterable[_In], produce: Callable[[_In], _Out]) -> Iterator[_Out]:
    """``produce(item)`` for each item, in order, the next one computed in a background thread while the caller
    works on the current one. One worker: ``produce`` runs on the items one at a time, in their order."""
    upcoming = iter(items)
    first = next(upcoming, None)
    if first is None:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdistill-teacher") as pool:
        pending = pool.submit(produce, first)
        for item in upcoming:
            ready = pending.result()
            pending = pool.submit(produce, item)
            yield ready
        yield pending.result()


def _ask(teacher: Teacher, inputs: Any, features: tuple[str, ...]) -> Outputs:
    """``teacher(inputs, features=...)``; a mapping of inputs goes to the adapter as is (transformers adapters take
    ``input_ids`` and ``attention_mask``)."""
    return teacher(inputs, features=features)


class LiveTeacher(TeacherSource):
    """The teacher run on every batch (for features that are not banked, or a teacher without precomputed logits).
    The adapter runs it in eval mode under ``torch.inference_mode()``."""

    def __init__(self, teacher: Teacher, features: Sequence[str] = ()) -> None:
        self.teacher = teacher
        self.features = tuple(features)

    def outputs(self, batch: Batch) -> Outputs:
        live = _ask(self.teacher, batch.inputs, self.features)
        return Outputs(live.logits, live.features, batch.index)


class AugmentedTeacher(TeacherSource):
    """Each batch augmented with ``augment(inputs, generator)``, then labelled by the live ``teacher`` (None: no
    teacher outputs, for a loss that needs none).

    The generator is seeded from ``seed`` and the epoch (``seed * 1_000_003 + epoch + 1``), so a run resumed at an
    epoch's start replays the same augmentations; :meth:`state_dict` holds the generator's state after the last step
    handed out, so a run resumed in the middle of an epoch continues the same draws. The teacher's outputs are cloned
    out of inference mode so that losses may save them for backward.
    """

    def __init__(
        self,
        augment: Augment,
        teacher: Teacher | None,
        features: Sequence[str] = (),
        *,
        seed: int = 0,
        prefetch: bool = False,
    ) -> None:
        self.augment = augment
        self.teacher = teacher
        self.features = tuple(features)
        self.seed = seed
        self.prefetch = prefetch
        self._position: dict[str, Any] = {}
        self._resume: dict[str, Any] = {}

    def _generator(self, epoch: int) -> torch.Generator:
        generator = torch.Generator()
        resume, self._resume = self._resume, {}
        if resume and int(resume["epoch"]) == epoch:
            generator.set_state(resume["generator"])
            return generator
        return generator.manual_seed(self.seed * 1_000_003 + epoch + 1)

    def _label(self, batch: Batch, generator: torch.Generator) -> tuple[Batch, Outputs | None]:
        augmented = replace(batch, inputs=self.augment(batch.inputs, generator))
        if self.teacher is None:
            return augmented, None
        out = _ask(self.teacher, augmented.inputs, self.features)
        features = {name: value.clone() for name, value in out.features.items()}
        return augmented, Outputs(out.logits.clone(), features, batch.index)

    def stream(self, steps: Iterator[Step], epoch: int) -> Iterator[list[tuple[Batch, Outputs | None]]]:
        generator = self._generator(epoch)

        def produce(step: Step) -> tuple[list[tuple[Batch, Outputs | None]], torch.Tensor]:
            labelled = [self._label(batch, generator) for batch in step]
            return labelled, generator.get_state()

        produced = prefetched(steps, produce) if self.prefetch else map(produce, steps)
        for labelled, after in produced:
            self._position = {"epoch": epoch, "generator": after}
            yield labelled

    def state_dict(self) -> dict[str, Any]:
        return dict(self._position)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume = dict(state)
