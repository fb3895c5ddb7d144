"""Recipes that chain several distillations: born-again generations and teacher-assistant chains.

Each step is one :func:`kdistill.distill` call whose teacher is the previous step's trained student, so every step
gets its own history and report (the report's "teacher" row is the previous generation, measured on the same split).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from kdistill.api import DistillResult, distill
from kdistill.errors import StudentError

__all__ = ["born_again", "teacher_assistant_chain"]

StudentSpec = str | nn.Module | Callable[[], nn.Module]


def _fresh(student: StudentSpec) -> str | nn.Module:
    """A new, untrained student for one step: names are built by distill, modules are deep-copied (so each step
    starts from the same initial weights and never overwrites a previous step), factories are called."""
    if isinstance(student, str):
        return student
    if isinstance(student, nn.Module):
        return copy.deepcopy(student)
    if callable(student):
        built = student()
        if not isinstance(built, nn.Module):
            raise StudentError(
                f"the student factory returned {type(built).__name__}, not a torch.nn.Module",
                hint="pass a function that builds a fresh nn.Module each call.",
            )
        return built
    raise StudentError(
        f"cannot build a student from {type(student).__name__}",
        hint="pass 'mlp', 'cnn', an nn.Module (copied per step) or a function returning a fresh one.",
    )


def _chain(teacher: Any, students: Sequence[StudentSpec], train: Any, kwargs: dict[str, Any]) -> list[DistillResult]:
    results: list[DistillResult] = []
    current = teacher
    for student in students:
        result = distill(current, _fresh(student), train, **kwargs)
        results.append(result)
        current = result.student
    return results


def born_again(
    teacher: Any, student: StudentSpec, train: Any, *, generations: int = 2, **distill_kwargs: Any
) -> list[DistillResult]:
    """Born-again networks (Furlanello et al., ICML 2018, https://arxiv.org/abs/1805.04770): generation 1 learns
    from ``teacher``, generation k from generation k-1, all with the same student architecture.

    Args:
        teacher: anything :func:`kdistill.distill` takes as a teacher.
        student: ``"mlp"`` / ``"cnn"``, an ``nn.Module`` (deep-copied per generation) or a function returning a fresh
            module.
        generations: how many students to train in sequence (>= 1).
        distill_kwargs: passed to every :func:`kdistill.distill` call (``val``, ``test``, ``method``, ``epochs``...).

    Returns:
        One :class:`~kdistill.DistillResult` per generation, in order. Furlanello et al. also average the
        generations' predictions (BANE); do it from ``[r.student for r in results]`` if wanted.
    """
    if generations < 1:
        raise ValueError(f"generations must be >= 1, got {generations}")
    return _chain(teacher, [student] * generations, train, distill_kwargs)


def teacher_assistant_chain(
    teacher: Any, assistants: Sequence[StudentSpec], student: StudentSpec, train: Any, **distill_kwargs: Any
) -> list[DistillResult]:
    """TAKD (Mirzadeh et al., AAAI 2020, https://arxiv.org/abs/1902.03393): bridge a large gap between teacher and
    student with intermediate-size assistants, ``teacher -> assistants[0] -> ... -> student``.

    ``assistants`` and ``student`` take the same forms as :func:`born_again`'s student (``student_params`` in
    ``distill_kwargs`` applies to every built-in one; give modules for different sizes). Returns one
    :class:`~kdistill.DistillResult` per step; the last is the student's.
    """
    return _chain(teacher, [*assistants, student], train, distill_kwargs)
