"""Student builders. A student is any ``nn.Module`` mapping a batch to (batch, classes) logits; ``"mlp"`` and
``"cnn"`` build one sized from the data, and those can be saved and rebuilt from a small JSON spec."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from kdistill.errors import StudentError
from kdistill.students.cnn import CNN
from kdistill.students.layers import Standardize
from kdistill.students.mlp import MLP, default_hidden

__all__ = ["CNN", "MLP", "STUDENTS", "build_student", "default_hidden", "student_from_spec"]

STUDENTS = {
    "mlp": "multilayer perceptron sized from the data (hidden=(w1, w2, ...) to choose)",
    "cnn": "small 1-D/2-D convolutional net for signals and images (channels=(c1, ...), in_shape=...)",
}


def student_from_spec(spec: dict[str, Any]) -> nn.Module:
    """Rebuild a built-in student (untrained) from the spec :func:`build_student` returned."""
    kind = spec.get("kind")
    if kind == "mlp":
        return MLP(spec["in_shape"], spec["num_classes"], hidden=spec["hidden"], dropout=spec.get("dropout", 0.0))
    if kind == "cnn":
        return CNN(spec["in_shape"], spec["num_classes"], channels=spec["channels"], kernel_size=spec["kernel_size"])
    raise StudentError(f"unknown student kind {kind!r} in spec", hint=f"known kinds: {sorted(STUDENTS)}")


def build_student(
    student: str | nn.Module,
    train_x: torch.Tensor,
    num_classes: int,
    *,
    hidden: Sequence[int] | None = None,
    dropout: float = 0.0,
    channels: Sequence[int] = (32, 32, 32),
    kernel_size: int = 5,
    in_shape: Sequence[int] | None = None,
) -> tuple[nn.Module, dict[str, Any] | None]:
    """Return ``(module, spec)``. For a name, builds it sized from ``train_x`` (its input standardisation is fitted
    on those rows) and returns the spec to rebuild it; for a module, returns it unchanged and ``None``."""
    if isinstance(student, nn.Module):
        return student, None
    if not isinstance(student, str) or student not in STUDENTS:
        raise StudentError(
            f"unknown student {student!r}",
            hint=f"pass one of {sorted(STUDENTS)} or any torch.nn.Module returning (batch, classes) logits.",
        )
    shape = list(in_shape) if in_shape is not None else list(train_x.shape[1:])
    spec: dict[str, Any] = {"kind": student, "in_shape": shape, "num_classes": num_classes}
    if student == "mlp":
        size = int(torch.tensor(shape).prod())
        spec |= {"hidden": list(hidden or default_hidden(size, num_classes)), "dropout": dropout}
    else:
        spec |= {"channels": list(channels), "kernel_size": kernel_size}
    module = student_from_spec(spec)
    standardize = module.standardize
    assert isinstance(standardize, Standardize)
    standardize.fit(train_x)
    return module, spec
