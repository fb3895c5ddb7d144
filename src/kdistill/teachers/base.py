"""The one protocol every teacher follows, and the outputs it returns.

The engine and the losses only ever see :class:`Outputs`; they cannot tell a random forest from a CNN, which is what
makes caching, ensembles and black-box teachers possible.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
import torch

__all__ = ["PROB_FLOOR", "Outputs", "Teacher", "TeacherBase", "probs_to_logits", "teacher_logits"]

PROB_FLOOR = 1e-12
"""Probabilities are floored here before the log, so the exact zeros of a tree ensemble give finite logits.

At temperature 4 a floored class keeps (1e-12)^(1/4) = 1e-3 of the weight of a certain one: negligible mass, and
never inf or NaN in any loss.
"""


@dataclass(frozen=True)
class Outputs:
    """What a model produced for a batch.

    ``logits``: (batch, classes) unnormalised scores (log-probabilities count: softmax gives back the probabilities).
    ``features``: intermediate outputs by module path, only those a method asked for.
    ``index``: (batch,) positions of the rows in the transfer set, set by the engine on the teacher's outputs, for
    methods that keep per-row state (CRD's memory bank).
    ``precomputed``: the batch's rows of what the loss's optional ``precompute`` hook returned for the whole transfer
    set, when the teacher's outputs never change (see :class:`~kdistill.losses.Loss`).
    """

    logits: torch.Tensor
    features: Mapping[str, torch.Tensor] = field(default_factory=dict)
    index: torch.Tensor | None = None
    precomputed: torch.Tensor | None = None


def probs_to_logits(probs: torch.Tensor) -> torch.Tensor:
    """Turn probabilities (rows summing to 1) into log-probabilities, safely: exact zeros become log(PROB_FLOOR)."""
    return torch.log(probs.clamp_min(PROB_FLOOR))


@runtime_checkable
class Teacher(Protocol):
    """A teacher, whatever it wraps.

    ``classes``: the label of each output column when the teacher knows them (scikit-learn's ``classes_``), else None
    and labels are column indices. ``num_classes`` may be None until the first call for teachers that cannot tell.
    ``size_bytes()`` and ``parameter_count()`` are what the report shows for the teacher, None when unknown (a model
    behind a function); :class:`TeacherBase` gives those defaults. An object with only the first four members is
    still accepted by :func:`~kdistill.as_teacher`, which adds the defaults.
    """

    classes: np.ndarray | None

    @property
    def num_classes(self) -> int | None: ...

    def fingerprint(self) -> str:
        """A content hash that changes whenever the teacher's outputs could (what a cache keys on)."""
        ...

    def __call__(self, x: torch.Tensor, *, features: Sequence[str] = ()) -> Outputs:
        """Outputs for a batch ``x``: (batch, *features), run without gradients."""
        ...

    def size_bytes(self) -> int | None:
        """Bytes the model takes stored the usual way (safetensors of a torch state dict, a pickle of a scikit-learn
        model, the file of an ONNX model), or None when unknown."""
        ...

    def parameter_count(self) -> int | None:
        """Numbers in the model (torch parameters, a fitted scikit-learn model's arrays), or None when unknown."""
        ...


class TeacherBase:
    """Defaults for the optional parts of :class:`Teacher`: size and parameter count unknown (None, a dash in the
    report). Adapters that can measure their model override both."""

    def size_bytes(self) -> int | None:
        return None

    def parameter_count(self) -> int | None:
        return None


def teacher_logits(teacher: Teacher, x: torch.Tensor, *, batch_size: int = 1024) -> torch.Tensor:
    """All of ``teacher``'s logits for ``x``, batched, in row order: (rows, classes) float32."""
    parts = [teacher(x[start : start + batch_size]).logits.float() for start in range(0, len(x), batch_size)]
    return torch.cat(parts)
