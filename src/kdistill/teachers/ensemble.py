"""Several teachers as one: their logits, or their probabilities, averaged."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from kdistill.errors import ShapeMismatchError, TeacherError
from kdistill.teachers.base import Outputs, Teacher, TeacherBase
from kdistill.teachers.registry import register_adapter

__all__ = ["EnsembleTeacher"]

MEMBERS = "members"
"""The feature name under which an ensemble returns each member's logits: (batch, members, classes)."""


def _is_sequence(obj: object) -> bool:
    return isinstance(obj, (list, tuple))


def _total(values: Sequence[int | None]) -> int | None:
    """The sum, or None when any part is unknown."""
    return None if any(value is None for value in values) else sum(value for value in values if value is not None)


@register_adapter(
    "ensemble",
    "a list or tuple of teachers: mean of probabilities (default) or of logits, optional weights",
    accepts=_is_sequence,
    order=50,
)
class EnsembleTeacher(TeacherBase):
    r"""Combines ``members`` (anything :func:`~kdistill.as_teacher` accepts) with optional ``weights``.

    With normalised weights :math:`w_i = \text{weights}_i / \sum_j \text{weights}_j` and member logits :math:`z_i`:

    - ``combine="logits"``: :math:`z = \sum_i w_i z_i`. A geometric mean of the members' distributions
      (:math:`\mathrm{softmax}(z) \propto \prod_i \mathrm{softmax}(z_i)^{w_i}`): confident members dominate, and
      the result is sharper than any one member when they agree.
    - ``combine="probs"``: :math:`z = \log \sum_i w_i\,\mathrm{softmax}(z_i)`, the log of the arithmetic mean of
      their probabilities (a mixture): it never assigns a class less than :math:`w_i` times what member i gives it,
      so disagreement shows up as spread-out, softer targets. The usual "ensemble average".

    Both use temperature 1 to combine; the loss applies its own temperature to the combined logits.
    ``features=("members",)`` also returns the stacked member logits under ``"members"``: (batch, members, classes),
    for methods that weigh teachers themselves.
    """

    def __init__(
        self, members: Sequence[Any], *, weights: Sequence[float] | None = None, combine: str = "probs"
    ) -> None:
        from kdistill.teachers import as_teacher

        if len(members) == 0:
            raise TeacherError("an ensemble needs at least one member", hint="pass a list of teachers.")
        if combine not in ("logits", "probs"):
            raise TeacherError(f"unknown combine {combine!r}", hint="use 'logits' or 'probs'.")
        raw_weights = np.ones(len(members)) if weights is None else np.asarray(weights, dtype=np.float64)
        if raw_weights.shape != (len(members),) or not np.all(raw_weights >= 0) or raw_weights.sum() <= 0:
            raise TeacherError(
                f"weights {list(raw_weights)} do not fit {len(members)} members",
                hint="pass one non-negative weight per member, not all zero.",
            )
        self.members: list[Teacher] = [as_teacher(member) for member in members]
        self.weights = raw_weights / raw_weights.sum()
        self.combine = combine
        known = [m.classes for m in self.members if m.classes is not None]
        for other in known[1:]:
            if len(other) != len(known[0]) or not np.array_equal(other, known[0]):
                raise TeacherError(
                    f"ensemble members have different classes: {known[0].tolist()} vs {other.tolist()}",
                    hint="members must output the same classes in the same order.",
                )
        self.classes: np.ndarray | None = known[0] if known else None
        self._num_classes: int | None = None if self.classes is None else len(self.classes)

    @property
    def num_classes(self) -> int | None:
        return self._num_classes

    def size_bytes(self) -> int | None:
        """Total bytes of the members, for the report; None if any member's size is unknown."""
        return _total([member.size_bytes() for member in self.members])

    def parameter_count(self) -> int | None:
        """Total parameters of the members; None if any member's count is unknown."""
        return _total([member.parameter_count() for member in self.members])

    def fingerprint(self) -> str:
        parts = [self.combine, *(f"{w:.17g}" for w in self.weights), *(m.fingerprint() for m in self.members)]
        return hashlib.blake2b(":".join(parts).encode(), digest_size=16).hexdigest()

    def __call__(self, x: torch.Tensor, *, features: Sequence[str] = ()) -> Outputs:
        unknown = [name for name in features if name != MEMBERS]
        if unknown:
            raise TeacherError(
                f"an ensemble has no feature {unknown}",
                hint=f"ask for {MEMBERS!r} (each member's logits), or for features on a member teacher itself.",
            )
        member_logits = [member(x).logits.float() for member in self.members]
        shapes = {tuple(logits.shape) for logits in member_logits}
        if len(shapes) != 1:
            raise ShapeMismatchError(
                f"ensemble members output different shapes: {sorted(shapes)}",
                hint="members must output the same classes in the same order.",
            )
        stacked = torch.stack(member_logits, dim=1)  # (batch, members, classes)
        weights = torch.as_tensor(self.weights, dtype=stacked.dtype).view(1, -1, *([1] * (stacked.ndim - 2)))
        if self.combine == "logits":
            combined = (weights * stacked).sum(dim=1)
        else:
            log_weights = torch.log(weights.clamp_min(torch.finfo(stacked.dtype).tiny))
            log_probs = torch.log_softmax(stacked, dim=-1)
            combined = torch.logsumexp(log_weights + log_probs, dim=1)
            combined = combined.clamp_min(math.log(torch.finfo(stacked.dtype).tiny))
        self._num_classes = int(combined.shape[-1])
        return Outputs(logits=combined, features={MEMBERS: stacked} if MEMBERS in features else {})
