"""Live teachers: when inputs change every epoch (augmentation), the teacher runs on each augmented batch.

Optionally the next batch is augmented and labelled by the teacher in a background thread while the student trains on
the current one, so the student does not wait on the teacher (PyTorch releases the GIL inside its kernels, so the two
overlap on a multi-core CPU). One worker, fed in order, so the augmentation draws from its generator in the same order
with or without prefetching: the same seed gives the same batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from kdistill.teachers.base import Outputs, Teacher

__all__ = ["Augment", "live_batches"]

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
"""``augment(x, generator) -> x'``: a batch (batch, *features) in, the same shape out; all randomness from
``generator``."""


def live_batches(
    x: torch.Tensor,
    indices: Sequence[torch.Tensor],
    augment: Augment | None,
    generator: torch.Generator,
    teacher: Teacher | None,
    features: Sequence[str] = (),
    *,
    prefetch: bool = False,
) -> Iterator[tuple[torch.Tensor, Outputs | None, torch.Tensor]]:
    """For each step's row positions in ``indices``: the (augmented) batch, the teacher's outputs on it (None without
    a teacher; ``Outputs.index`` set to the positions), and the positions themselves, so the caller can check that
    they are the rows it meant.

    The teacher's adapter runs it in eval mode under ``torch.inference_mode()``; its outputs are cloned out of
    inference mode so losses may save them for backward.
    """

    def produce(index: torch.Tensor) -> tuple[torch.Tensor, Outputs | None, torch.Tensor]:
        xb = x[index]
        if augment is not None:
            xb = augment(xb, generator)
        if teacher is None:
            return xb, None, index
        out = teacher(xb, features=features)
        return xb, Outputs(out.logits.clone(), {name: t.clone() for name, t in out.features.items()}, index), index

    if not prefetch:
        for index in indices:
            yield produce(index)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdistill-teacher") as pool:
        pending = pool.submit(produce, indices[0])
        for upcoming in indices[1:]:
            ready = pending.result()
            pending = pool.submit(produce, upcoming)
            yield ready
        yield pending.result()
