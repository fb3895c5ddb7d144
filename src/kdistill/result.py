"""What a run returns and how a trained student is saved and restored (safetensors + JSON; nothing is unpickled)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_save
from torch import nn

from kdistill.data import as_split
from kdistill.engine import predict_logits
from kdistill.errors import CheckpointError
from kdistill.io import atomic_write_bytes, atomic_write_json
from kdistill.report import Report
from kdistill.students import student_from_spec

__all__ = ["WEIGHTS_FILE", "DistillResult", "load", "save_student"]

WEIGHTS_FILE = "student.safetensors"
NATIVE_FOLDER = "model"
"""Where a student with its own saved form (a sentence encoder's) is written inside a run folder."""


@dataclass
class DistillResult:
    """What :func:`distill` returns.

    ``student``: the trained module (eval mode, best validation weights). ``history``: one dict of metrics per epoch.
    ``report``: the side-by-side :class:`~kdistill.report.Report` (None with ``report=False``). ``baseline``: the same
    student trained on hard labels only (None with ``baseline=False``). ``spec``: how to rebuild a built-in student.
    ``classes``: the label of each output column. ``task``: the run's task name (``"regression"``: ``predict``
    returns the predictions themselves).
    """

    student: nn.Module
    history: list[dict[str, float]]
    report: Report | None
    baseline: nn.Module | None
    spec: dict[str, Any] | None
    classes: list[Any] | None
    baseline_history: list[dict[str, float]] | None = None
    task: str = "classification"

    def predict(self, x: Any) -> np.ndarray:
        """Predicted labels for ``x`` (in the teacher's label space when it had one); for task ``regression`` the
        (rows, outputs) predictions in the targets' units."""
        logits = predict_logits(self.student, as_split(x, name="x", labeled=False).x)
        if self.task == "regression":
            return logits.numpy()
        index = logits.argmax(dim=1).numpy()
        return np.asarray(self.classes)[index] if self.classes is not None else index

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Save into folder ``path``: ``student.safetensors`` (weights, with the spec and classes as metadata),
        ``history.json`` and ``report.json``; a student with a format of its own (``save_native(folder)``: a
        sentence-transformers or Model2Vec folder) also in ``model/``. Every file is written atomically."""
        folder = Path(path)
        save_student(self.student, folder / WEIGHTS_FILE, spec=self.spec, classes=self.classes)
        native = getattr(self.student, "save_native", None)
        if callable(native):  # a sentence student's own format: sentence-transformers or Model2Vec
            native(folder / NATIVE_FOLDER)
        atomic_write_json(folder / "history.json", {"student": self.history, "baseline": self.baseline_history})
        if self.report is not None:
            self.report.save(folder / "report.json")
        return folder


def save_student(student: nn.Module, path: Path, *, spec: dict[str, Any] | None, classes: Sequence[Any] | None) -> Path:
    """Write ``student``'s state dict as safetensors with ``spec`` and ``classes`` as JSON metadata, atomically."""
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in student.state_dict().items():
        pointer = t.untyped_storage().data_ptr()
        # tied weights (a language model's input and output embedding) share storage, which safetensors refuses:
        # a repeat is saved as its own copy, so the state dict loads back strictly into the tied model
        tensors[name] = t.detach().cpu().contiguous().clone() if pointer in seen else t.detach().cpu().contiguous()
        seen.add(pointer)
    metadata = {"kdistill_spec": json.dumps(spec), "classes": json.dumps(_jsonable(classes))}
    return atomic_write_bytes(path, safetensors_save(tensors, metadata=metadata))


def _jsonable(classes: Sequence[Any] | np.ndarray | None) -> list[Any] | None:
    return None if classes is None else np.asarray(classes).tolist()


def load(path: str | os.PathLike[str], *, student: nn.Module | None = None) -> nn.Module:
    """Restore a saved student (eval mode) from a folder written by :meth:`DistillResult.save` or its weights file.

    Built-in students are rebuilt from the spec stored with the weights; for your own module, pass an instance of
    it as ``student`` and its weights are loaded into it. Nothing is unpickled. The column labels are on
    ``module.kdistill_classes``.
    """
    target = Path(path)
    weights = target / WEIGHTS_FILE if target.is_dir() else target
    if not weights.exists():
        raise CheckpointError(f"no saved student at {weights}", hint="pass the folder given to DistillResult.save.")
    try:
        with safe_open(str(weights), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 - not a dict
    except (SafetensorError, ValueError, OSError) as exc:
        raise CheckpointError(
            f"{weights} is not a readable safetensors file ({exc})",
            hint="the file is corrupt or truncated; save the student again from its run.",
        ) from exc
    spec = json.loads(metadata.get("kdistill_spec", "null"))
    if student is None:
        if spec is None:
            raise CheckpointError(
                f"{weights} holds a custom student, which cannot be rebuilt from a spec",
                hint="pass an instance of your module: kdistill.load(path, student=MyNet()).",
            )
        student = student_from_spec(spec)
    try:
        student.load_state_dict(tensors)
    except RuntimeError as exc:
        raise CheckpointError(f"the weights in {weights} do not fit {type(student).__name__}: {exc}") from exc
    student.kdistill_classes = json.loads(metadata.get("classes", "null"))
    return student.eval()
