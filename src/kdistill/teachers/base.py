"""The one protocol every teacher follows, and the outputs it returns.

The engine and the losses only ever see :class:`Outputs`; they cannot tell a random forest from a CNN, which is what
makes caching, ensembles and black-box teachers possible.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Protocol, cast, runtime_checkable

import numpy as np
import torch

from kdistill.errors import MethodError, ShapeMismatchError

__all__ = [
    "PROB_FLOOR",
    "TOPK_EMPTY_REST",
    "Outputs",
    "Teacher",
    "TeacherBase",
    "TopK",
    "batch_logits",
    "probs_to_logits",
    "teacher_logits",
]

PROB_FLOOR = 1e-12
"""Probabilities are floored here before the log, so the exact zeros of a tree ensemble give finite logits.

At temperature 4 a floored class keeps (1e-12)^(1/4) = 1e-3 of the weight of a certain one: negligible mass, and
never inf or NaN in any loss.
"""


TOPK_EMPTY_REST = -1e30
"""Finite stand-in for log(0): :attr:`TopK.rest` when k covers every class (exp() of it is exactly 0)."""


@dataclass(frozen=True)
class TopK:
    r"""A teacher's k largest logits per row (or per token), their class ids, and the log-sum-exp of all the others.

    ``values``: (..., k) float, largest first. ``indices``: (..., k) int64 class (token) ids. ``rest``: (...)
    :math:`\log\sum_{j \notin \text{top-k}} e^{z_j}` (:data:`TOPK_EMPTY_REST` when k == classes). The leading
    axes are (rows,) for classification and (batch, seq) for token outputs. This is exactly what the cache's
    ``"topk:K"`` storage keeps, and what ``kd_topk`` reads (``Outputs.topk``); integer indices of another dtype (the
    cache stores int16) are widened to int64.

    A sampled tail (the cache's ``"topk16:K+S"`` storage) adds ``tail_ids`` (..., S): S token ids drawn with
    replacement from the teacher's distribution renormalised over the tokens outside its top k, and ``tail_plogp``
    (...): :math:`\sum_{v \notin \text{top-k}} p_v \log p_v` over the full vocabulary, exact. Forward KL reads them
    as an unbiased estimate of its full-vocabulary value and gradient (see
    :func:`~kdistill.losses.token.token_distill_loss`); both are None otherwise.
    """

    values: torch.Tensor
    indices: torch.Tensor
    rest: torch.Tensor
    tail_ids: torch.Tensor | None = None
    tail_plogp: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.indices.is_floating_point() or self.indices.is_complex():
            raise ShapeMismatchError(
                f"top-k indices must be integers, got {self.indices.dtype}",
                hint="build a TopK from a packed (rows, 2k + 1) table with TopK.from_packed(table).",
            )
        if self.indices.dtype != torch.int64:
            object.__setattr__(self, "indices", self.indices.long())
        if (self.tail_ids is None) != (self.tail_plogp is None):
            raise ShapeMismatchError(
                "a sampled tail needs both tail_ids and tail_plogp", hint="pass both, or neither (the rest bucket)."
            )
        if self.tail_ids is not None and self.tail_plogp is not None:
            if self.tail_ids.is_floating_point() or self.tail_ids.is_complex():
                raise ShapeMismatchError(f"tail ids must be integers, got {self.tail_ids.dtype}")
            if self.tail_ids.dtype != torch.int64:
                object.__setattr__(self, "tail_ids", self.tail_ids.long())
            if (
                self.tail_ids.ndim != self.values.ndim
                or self.tail_ids.shape[:-1] != self.values.shape[:-1]
                or self.tail_ids.shape[-1] < 1
                or self.tail_plogp.shape != self.values.shape[:-1]
            ):
                raise ShapeMismatchError(
                    f"tail ids {tuple(self.tail_ids.shape)} and tail_plogp {tuple(self.tail_plogp.shape)} do not fit "
                    f"top-k values {tuple(self.values.shape)}",
                    hint="tail_ids are (..., S) with S >= 1 and tail_plogp is (...), the top-k's leading axes.",
                )
        if (
            self.values.ndim == 0
            or self.values.shape != self.indices.shape
            or self.rest.shape != self.values.shape[:-1]
        ):
            raise ShapeMismatchError(
                f"top-k values {tuple(self.values.shape)}, indices {tuple(self.indices.shape)} and rest "
                f"{tuple(self.rest.shape)} do not fit together",
                hint="values and indices are (..., k) and rest is (...), the same leading axes.",
            )

    @property
    def k(self) -> int:
        """How many classes are kept per row."""
        return int(self.values.shape[-1])

    @property
    def samples(self) -> int:
        """How many tail ids are drawn per row (0 without a sampled tail)."""
        return 0 if self.tail_ids is None else int(self.tail_ids.shape[-1])

    def map(self, per_row: Callable[[torch.Tensor], torch.Tensor]) -> TopK:
        """The same top-k with ``per_row`` applied to every field; the fields share their leading axes, so
        ``per_row`` may select or move rows along them (``index_select(0, ...)``, a boolean mask of the leading
        axes, ``.to(device)``)."""
        tail = None if self.tail_ids is None else per_row(self.tail_ids)
        plogp = None if self.tail_plogp is None else per_row(self.tail_plogp)
        return TopK(per_row(self.values), per_row(self.indices), per_row(self.rest), tail, plogp)

    def flat(self) -> TopK:
        """The same top-k with its leading axes flattened to one (rows, ...)."""
        lead = self.rest.ndim
        return self.map(lambda field: field.reshape(-1, *field.shape[lead:]))

    @classmethod
    def from_logits(cls, logits: torch.Tensor, k: int) -> TopK:
        """The top-k form of dense ``logits`` (..., classes), computed in float32."""
        classes = logits.shape[-1]
        if not 1 <= k <= classes:
            raise ShapeMismatchError(f"top-k needs 1 <= k <= classes, got k={k} for {classes} classes")
        dense = logits.float()
        values, indices = torch.topk(dense, k, dim=-1)
        rest = dense.scatter(-1, indices, TOPK_EMPTY_REST).logsumexp(dim=-1)
        if k == classes:
            rest = torch.full_like(rest, TOPK_EMPTY_REST)
        return cls(values, indices, rest)

    @classmethod
    def from_packed(cls, table: torch.Tensor, samples: int = 0) -> TopK:
        """Read kdistill 0.1's packed (rows, 2k + 1) float32 table ``[values | indices | rest]`` (what
        ``CacheEntry.teacher_targets()`` returns for ``"topk:K"`` storage). ``values`` and ``rest`` are views of it.

        ``samples`` = S > 0 reads a ``"topk16:K+S"`` entry's (..., 2k + 2 + S) table ``[values | indices | rest |
        tail_ids | tail_plogp]``."""
        width = (table.shape[-1] if table.ndim else 0) - (samples + 1 if samples else 0)
        if table.ndim not in (2, 3) or width % 2 != 1 or width < 3:
            tail = f" + {samples + 1} for a sampled tail of {samples}" if samples else ""
            raise ShapeMismatchError(
                f"a packed top-k table has shape (rows, 2k + 1{tail}) (or (rows, seq, ...) per token); got "
                f"{tuple(table.shape)}",
                hint="kd_topk reads the cache's 'topk:K' storage; for dense teacher logits use 'kd'.",
            )
        k = (width - 1) // 2
        tail_ids = table[..., 2 * k + 1 : 2 * k + 1 + samples].long() if samples else None
        tail_plogp = table[..., -1].float() if samples else None
        values, indices, rest = table[..., :k].float(), table[..., k : 2 * k].long(), table[..., 2 * k].float()
        return cls(values, indices, rest, tail_ids, tail_plogp)

    def packed(self) -> torch.Tensor:
        """The (rows, 2k + 1) float32 table :meth:`from_packed` reads (rows only; indices exact below 2^24)."""
        if self.values.ndim != 2:
            raise ShapeMismatchError(f"only (rows, k) top-k packs into a table, got values {tuple(self.values.shape)}")
        return torch.cat([self.values.float(), self.indices.float(), self.rest.float().reshape(-1, 1)], dim=1)

    def index_select(self, index: torch.Tensor) -> TopK:
        """The rows ``index`` (batch,) of every field (the per-batch gather of a static teacher)."""
        return self.map(lambda rows: rows.index_select(0, index))

    def to(self, device: torch.device | str) -> TopK:
        """The same top-k on ``device``."""
        return self.map(lambda field: field.to(device))


class _NoLogits:
    """The class attribute behind ``Outputs.logits``. Outputs that hold logits find them in their own ``__dict__``
    first (a non-data descriptor never shadows an instance attribute, so reading them costs nothing extra); outputs
    without (a teacher given only as top-k) reach this and get a clear error instead of None."""

    def __get__(self, instance: object, owner: type | None = None) -> None:
        if instance is None:  # the dataclass asks for the field's default
            return None
        raise MethodError(
            "these outputs hold only the teacher's top-k (Outputs.topk), no dense logits",
            hint="use method 'kd_topk', which reads the top-k exactly, or cache the teacher with "
            "storage 'fp32' or 'fp16' for methods that need every logit.",
        )


_NO_LOGITS: Any = _NoLogits()


@dataclass(frozen=True, repr=False)
class Outputs:
    """What a model produced for a batch.

    ``logits``: (batch, classes) unnormalised scores (log-probabilities count: softmax gives back the probabilities),
    (batch, seq, vocab) per-token scores, or (batch, dim) embeddings. A teacher given only as top-k has no dense
    logits: build ``Outputs(topk=...)`` (``logits`` omitted); reading ``.logits`` then raises
    :class:`~kdistill.errors.MethodError` naming ``kd_topk`` (test with :attr:`has_logits`). Student outputs always
    have logits.
    ``features``: intermediate outputs by module path, only those a method asked for.
    ``index``: (batch,) positions of the rows in the transfer set, set by the engine on the teacher's outputs, for
    methods that keep per-row state (CRD's memory bank).
    ``precomputed``: the batch's rows of what the loss's optional ``precompute`` hook returned for the whole transfer
    set, when the teacher's outputs never change (see :class:`~kdistill.losses.Loss`).
    ``mask``: (batch, seq) bool, True for real tokens, for sequence outputs (an integer attention mask is turned into
    bool); the token losses average over the True positions. None: every position counts.
    ``topk``: the teacher's top-k values, ids and tail (:class:`TopK`), typed, instead of dense logits.
    """

    logits: torch.Tensor = _NO_LOGITS
    features: Mapping[str, torch.Tensor] = field(default_factory=dict)
    index: torch.Tensor | None = None
    precomputed: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    topk: TopK | None = None

    def __post_init__(self) -> None:
        if self.logits is None:  # omitted (or None): a top-k-only teacher
            if self.topk is None:
                raise MethodError(
                    "Outputs needs logits or topk, got neither", hint="pass Outputs(logits) or Outputs(topk=...)."
                )
            del self.__dict__["logits"]  # reading .logits now reaches _NoLogits and its error
        if self.mask is not None and self.mask.dtype != torch.bool:
            object.__setattr__(self, "mask", self.mask != 0)

    @property
    def has_logits(self) -> bool:
        """Whether dense logits are present (False for a teacher given only as top-k)."""
        return "logits" in self.__dict__

    def replace(self, **changes: Any) -> Outputs:
        """A copy with ``changes`` (``dataclasses.replace`` would read the missing logits of a top-k-only teacher)."""
        current: dict[str, Any] = {f.name: self.__dict__.get(f.name) for f in fields(self)}
        return Outputs(**(current | changes))

    def __repr__(self) -> str:
        def shape(value: Any) -> str:
            return "None" if value is None else str(tuple(value.shape))

        logits = self.__dict__.get("logits")
        parts = [f"logits={shape(logits)}"]
        if self.features:
            parts.append("features={" + ", ".join(f"{k!r}: {shape(v)}" for k, v in self.features.items()) + "}")
        parts += [
            f"{name}={shape(getattr(self, name))}"
            for name in ("index", "precomputed", "mask")
            if getattr(self, name) is not None
        ]
        if self.topk is not None:
            parts.append(f"topk=(k={self.topk.k}, rows={tuple(self.topk.rest.shape)})")
        return f"Outputs({', '.join(parts)})"


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


def teacher_logits(teacher: Teacher, x: Any, *, batch_size: int = 1024) -> torch.Tensor:
    """All of ``teacher``'s logits for ``x`` ((rows, *features), or a mapping of (rows, ...) tensors), batched, in
    row order: (rows, classes) float32."""
    from kdistill.data import rows_in, take_rows

    parts = [
        batch_logits(teacher, take_rows(x, slice(start, start + batch_size))).float()
        for start in range(0, rows_in(x), batch_size)
    ]
    return torch.cat(parts)


def batch_logits(teacher: Teacher, batch: Any) -> torch.Tensor:
    """``teacher(batch).logits``; a mapping with an ``attention_mask`` runs cut to its longest row (dynamic padding,
    :func:`kdistill.data.run_trimmed`): per-token outputs come back at the batch's full length."""
    from kdistill.data import run_trimmed

    # a mapping goes only to teachers that take one (torch modules, transformers models)
    return run_trimmed(lambda rows: teacher(cast(torch.Tensor, rows)).logits, batch)
