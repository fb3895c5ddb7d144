"""Candidate spaces: for each registered student family, the architectures a search may draw.

A space is keyed by the registered student it builds (``"mlp"``, ``"cnn"``; a transformer student joins with one
:func:`register_space` call). It answers three questions, all from the data's row shape and class count:

- ``fits(in_shape, num_classes)``: can this family read such rows at all (a CNN needs a signal or an image);
- ``suggest(trial, in_shape, num_classes)``: the builder params of one candidate, drawn through an Optuna trial
  (parameter names are prefixed with the family, so conditional spaces never collide);
- ``grid(in_shape, num_classes)``: every candidate of the space, as builder params (the smallest one names a budget
  that nothing meets; a hand grid for the benchmark is a subset).

Optional, for a warm start: ``seeds(in_shape, num_classes)``, the family's usual shapes as *ladders*, one list per
shape (an MLP of one, two or three layers tapering by half; a CNN of one, two or three equal blocks), each from narrow
to wide; and ``encode(params)``, the trial parameters that draw those builder params. A new search starts from the
widest rung inside the budget of every ladder of each family that has both: the widest candidate of each depth that
fits, so a small budget is spent on shapes that fill it (two blocks of 8 channels, not three of 4).

Nothing here imports Optuna: ``trial`` is anything with ``suggest_int``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["SEARCH_SPACES", "CandidateSpace", "CnnSpace", "MlpSpace", "register_space"]


class _Trial(Protocol):
    def suggest_int(self, name: str, low: int, high: int) -> int: ...


class CandidateSpace(Protocol):
    """The architectures one student family offers a search (see the module docstring)."""

    @property
    def family(self) -> str: ...

    @property
    def description(self) -> str: ...

    def fits(self, in_shape: Sequence[int], num_classes: int) -> bool: ...

    def suggest(self, trial: Any, in_shape: Sequence[int], num_classes: int) -> dict[str, Any]: ...

    def grid(self, in_shape: Sequence[int], num_classes: int) -> list[dict[str, Any]]: ...


def _widths(trial: _Trial, prefix: str, depth_range: tuple[int, int], log2_range: tuple[int, int]) -> list[int]:
    """``depth`` layers, each ``2**k`` wide: ordered integers, so TPE learns that wider costs more."""
    depth = trial.suggest_int(f"{prefix}.depth", *depth_range)
    return [2 ** trial.suggest_int(f"{prefix}.log2_width{layer}", *log2_range) for layer in range(depth)]


def _all_widths(depth_range: tuple[int, int], log2_range: tuple[int, int]) -> list[list[int]]:
    powers = [2**k for k in range(log2_range[0], log2_range[1] + 1)]
    return [
        list(widths)
        for depth in range(depth_range[0], depth_range[1] + 1)
        for widths in itertools.product(powers, repeat=depth)
    ]


@dataclass(frozen=True)
class MlpSpace:
    """MLPs of ``depth`` hidden layers (``depth_range``), each ``2**k`` units (``log2_range``: 4 to 256 by default)."""

    family: str = "mlp"
    description: str = "MLP: 1-3 hidden layers of 4..256 units (powers of two)"
    depth_range: tuple[int, int] = (1, 3)
    log2_range: tuple[int, int] = (2, 8)

    def fits(self, in_shape: Sequence[int], num_classes: int) -> bool:
        return math.prod(in_shape) > 0

    def suggest(self, trial: Any, in_shape: Sequence[int], num_classes: int) -> dict[str, Any]:
        return {"hidden": _widths(trial, self.family, self.depth_range, self.log2_range)}

    def grid(self, in_shape: Sequence[int], num_classes: int) -> list[dict[str, Any]]:
        return [{"hidden": widths} for widths in _all_widths(self.depth_range, self.log2_range)]

    def seeds(self, in_shape: Sequence[int], num_classes: int) -> list[list[dict[str, Any]]]:
        """One ladder per depth, each layer half the one before (``[w]``, ``[w, w/2]``, ``[w, w/2, w/4]``: the
        shape of ``kdistill.students.default_hidden``), narrow to wide, every width inside ``log2_range``."""
        low, high = self.log2_range
        return [
            [{"hidden": [2 ** (k - layer) for layer in range(depth)]} for k in range(low + depth - 1, high + 1)]
            for depth in range(self.depth_range[0], self.depth_range[1] + 1)
        ]

    def encode(self, params: dict[str, Any]) -> dict[str, Any]:
        hidden = params["hidden"]
        encoded: dict[str, Any] = {f"{self.family}.depth": len(hidden)}
        return encoded | {f"{self.family}.log2_width{i}": int(math.log2(w)) for i, w in enumerate(hidden)}


@dataclass(frozen=True)
class CnnSpace:
    """CNNs of ``depth`` stride-2 conv blocks (``depth_range``) of ``2**k`` channels (``log2_range``: 2 to 64) and
    kernel 3 or 5; for rows the ``cnn`` student reads as a signal or an image."""

    family: str = "cnn"
    description: str = "CNN: 1-3 conv blocks of 2..64 channels (powers of two), kernel 3 or 5"
    depth_range: tuple[int, int] = (1, 3)
    log2_range: tuple[int, int] = (1, 6)
    kernel_sizes: tuple[int, ...] = (3, 5)

    def fits(self, in_shape: Sequence[int], num_classes: int) -> bool:
        shape = tuple(in_shape)
        return len(shape) == 1 or len(shape) in (2, 3)

    def suggest(self, trial: Any, in_shape: Sequence[int], num_classes: int) -> dict[str, Any]:
        channels = _widths(trial, self.family, self.depth_range, self.log2_range)
        kernel = self.kernel_sizes[trial.suggest_int(f"{self.family}.kernel", 0, len(self.kernel_sizes) - 1)]
        return {"channels": channels, "kernel_size": kernel}

    def grid(self, in_shape: Sequence[int], num_classes: int) -> list[dict[str, Any]]:
        return [
            {"channels": channels, "kernel_size": kernel}
            for channels in _all_widths(self.depth_range, self.log2_range)
            for kernel in self.kernel_sizes
        ]

    def seeds(self, in_shape: Sequence[int], num_classes: int) -> list[list[dict[str, Any]]]:
        """One ladder per depth of equal blocks with the largest kernel (the ``cnn`` student's default is three),
        narrow to wide."""
        low, high = self.log2_range
        kernel = max(self.kernel_sizes)
        return [
            [{"channels": [2**k] * depth, "kernel_size": kernel} for k in range(low, high + 1)]
            for depth in range(self.depth_range[0], self.depth_range[1] + 1)
        ]

    def encode(self, params: dict[str, Any]) -> dict[str, Any]:
        channels = params["channels"]
        encoded: dict[str, Any] = {f"{self.family}.depth": len(channels)}
        encoded |= {f"{self.family}.log2_width{i}": int(math.log2(c)) for i, c in enumerate(channels)}
        return encoded | {f"{self.family}.kernel": self.kernel_sizes.index(params["kernel_size"])}


SEARCH_SPACES: dict[str, CandidateSpace] = {}
"""Every family a search can draw from, by registered student name."""


def register_space(space: CandidateSpace, *, replace: bool = False) -> CandidateSpace:
    """Make ``space`` searchable under ``space.family`` (a registered student name: the search builds candidates with
    ``kdistill.students.build_student(space.family, ..., **params)``). ``replace=True`` swaps an existing one."""
    if space.family in SEARCH_SPACES and not replace:
        raise ValueError(f"search family {space.family!r} is registered twice (pass replace=True to swap it)")
    SEARCH_SPACES[space.family] = space
    return space


register_space(MlpSpace())
register_space(CnnSpace())
