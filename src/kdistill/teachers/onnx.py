"""An ONNX model run by ONNX Runtime as a teacher: a model from another team, whatever framework made it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdistill.errors import TeacherError
from kdistill.teachers._convert import FileBacked, check_output_kind, to_logits
from kdistill.teachers.base import Outputs
from kdistill.teachers.registry import register_adapter

__all__ = ["OnnxTeacher"]

_ONNX_TO_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise TeacherError(
            "ONNX teachers need onnxruntime", hint="pip install 'kdistill[onnx]' (or: pip install onnxruntime)."
        ) from exc
    return onnxruntime


def _is_onnx_path(obj: object) -> bool:
    return isinstance(obj, (str, os.PathLike)) and Path(obj).suffix == ".onnx"


@register_adapter(
    "onnx",
    "an .onnx file (a path) run by ONNX Runtime on the CPU, output chosen by name [onnx]",
    accepts=_is_onnx_path,
    order=60,
)
class OnnxTeacher(FileBacked):
    """Runs ``path`` (an ``.onnx`` file) with ONNX Runtime on the CPU.

    ``output_name``: which of the model's outputs holds the class scores (default: the first); ``input_name``: which
    input receives the batch (default: the only one). The batch is cast to the input's declared type (float32, int64
    token ids, ...). ``output``: ``"logits"``, ``"probs"`` or ``"auto"`` (detected on the first batch and logged).
    ONNX models have no named modules, so intermediate features are only those the model exposes as outputs: asking for
    ``features=("hidden",)`` returns the model output called ``hidden``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        output_name: str | None = None,
        input_name: str | None = None,
        output: str = "auto",
        classes: Sequence[Any] | np.ndarray | None = None,
        threads: int | None = None,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise TeacherError(f"no ONNX model at {self.path}", hint="pass the path of an .onnx file.")
        runtime = _onnxruntime()
        options = runtime.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        try:
            self.session = runtime.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for unreadable models
            raise TeacherError(
                f"ONNX Runtime cannot load {self.path}: {exc}", hint="check the file with onnx.checker.check_model."
            ) from exc
        inputs = {item.name: item for item in self.session.get_inputs()}
        outputs = [item.name for item in self.session.get_outputs()]
        if input_name is None:
            if len(inputs) != 1:
                raise TeacherError(
                    f"{self.path.name} has {len(inputs)} inputs {sorted(inputs)}", hint="choose one with input_name=."
                )
            input_name = next(iter(inputs))
        if input_name not in inputs:
            raise TeacherError(f"{self.path.name} has no input {input_name!r}", hint=f"inputs: {sorted(inputs)}")
        output_name = outputs[0] if output_name is None else output_name
        if output_name not in outputs:
            raise TeacherError(f"{self.path.name} has no output {output_name!r}", hint=f"outputs: {outputs}")
        self.input_name = input_name
        self.output_name = output_name
        self.output_names = outputs
        self._input_dtype = _ONNX_TO_NUMPY.get(inputs[input_name].type, np.float32)
        self.output = check_output_kind(output)
        self._kind = self.output
        self.classes = None if classes is None else np.asarray(classes)
        self._num_classes: int | None = None if classes is None else len(classes)
        self._fingerprint: str | None = None

    @property
    def num_classes(self) -> int | None:
        return self._num_classes

    def _fingerprint_header(self) -> str:
        return f"onnx:{self.input_name}:{self.output_name}:{self.output}"

    def __call__(self, x: torch.Tensor, *, features: Sequence[str] = ()) -> Outputs:
        unknown = [name for name in features if name not in self.output_names]
        if unknown:
            raise TeacherError(
                f"{self.path.name} has no output {unknown} to use as features",
                hint=f"an ONNX teacher's features are its outputs: {self.output_names}",
            )
        batch = x.detach().cpu().numpy()
        batch = (
            batch.round().astype(self._input_dtype)
            if np.issubdtype(self._input_dtype, np.integer)
            else (batch.astype(self._input_dtype, copy=False))
        )
        names = [self.output_name, *features]
        results = self.session.run(names, {self.input_name: batch})
        logits, self._kind = to_logits(results[0], self._kind, source=f"ONNX teacher {self.path.name}")
        self._num_classes = int(logits.shape[-1])
        extra = {name: torch.as_tensor(value) for name, value in zip(features, results[1:], strict=True)}
        return Outputs(logits=logits, features=extra)
