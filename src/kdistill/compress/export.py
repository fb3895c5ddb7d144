"""ONNX export with a numerical check against PyTorch, and an ONNX Runtime predictor for the exported file.

The exported graph has one input ``input`` of shape (batch, *row_shape) and one output ``logits`` of shape
(batch, classes), with the batch axis dynamic. A model taking a mapping of inputs (a transformers student:
``input_ids``, ``attention_mask``[, ``token_type_ids``]) gets one int64 graph input per key, with the batch and
sequence axes dynamic, and is checked at a second, shorter sequence length too. The check runs the file in ONNX
Runtime at batch 1 and at a larger batch (so a batch size frozen into the graph is caught) and compares with the
module in eval mode::

    max_abs_diff = max over rows r, classes c of |logits_onnx[r, c] - logits_torch[r, c]|

A difference above ``tolerance`` raises :class:`~kdistill.errors.ExportError`; it is never only a warning.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdistill._deps import require
from kdistill.errors import ExportError
from kdistill.io import atomic_write_bytes

__all__ = ["OnnxExport", "OnnxPredictor", "check_onnx", "export_onnx"]

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
DEFAULT_OPSET = 17


@dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_onnx` wrote and how closely it matches PyTorch.

    ``max_abs_diff``: the largest |ONNX - PyTorch| logit difference over ``checked_rows`` rows (checked at batch 1
    and batch ``checked_rows``). ``size_bytes``: the file's size on disk.
    """

    path: Path
    max_abs_diff: float
    tolerance: float
    checked_rows: int
    opset: int
    size_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "max_abs_diff": self.max_abs_diff,
            "tolerance": self.tolerance,
            "checked_rows": self.checked_rows,
            "opset": self.opset,
            "size_bytes": self.size_bytes,
        }


class OnnxPredictor:
    """An ONNX Runtime session on the CPU that maps a batch (torch or numpy, (batch, *row_shape)) to a
    (batch, classes) float32 torch tensor of logits.

    ``threads`` sets ONNX Runtime's intra-op thread count (inter-op is 1, sequential execution), so timings compare
    with PyTorch run at ``torch.set_num_threads(threads)``.
    """

    def __init__(self, path: str | os.PathLike[str], *, threads: int = 1) -> None:
        ort = require("onnxruntime")
        self.path = Path(path)
        if not self.path.exists():
            raise ExportError(f"no ONNX file at {self.path}", hint="export the model first: kdistill export ...")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(
                str(self.path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors for unreadable graphs
            raise ExportError(
                f"ONNX Runtime cannot load {self.path}: {exc}",
                hint="export the model again; the file may be truncated.",
            ) from exc
        self.threads = threads
        self.input_name = self.session.get_inputs()[0].name

        self.input_names = [item.name for item in self.session.get_inputs()]

    def run_numpy(self, x: np.ndarray) -> np.ndarray:
        """Logits as a numpy array for a float32 numpy batch."""
        return np.asarray(self.session.run(None, {self.input_name: x})[0])

    def __call__(self, x: torch.Tensor | np.ndarray | Mapping[str, Any]) -> torch.Tensor:
        if isinstance(x, Mapping):  # a multi-input graph: each named input as int64 (token ids, masks)
            feeds = {name: _int64(x[name]) for name in self.input_names}
            return torch.from_numpy(np.asarray(self.session.run(None, feeds)[0]))
        array = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        return torch.from_numpy(self.run_numpy(np.ascontiguousarray(array, dtype=np.float32)))


def _int64(value: Any) -> np.ndarray:
    array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    return np.ascontiguousarray(array, dtype=np.int64)


class _KeywordLogits(nn.Module):
    """``model(**dict(zip(names, inputs)))`` as positional inputs, returning the logits tensor (a transformers
    output's ``.logits``): what the TorchScript exporter can trace for a multi-input model."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.names = tuple(names)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        output = self.model(**dict(zip(self.names, inputs, strict=True)))
        return output if isinstance(output, torch.Tensor) else output.logits


def _mapping_rows(rows: Mapping[str, Any], limit: int | None = None) -> dict[str, torch.Tensor]:
    """A mapping of (rows, seq) inputs as int64 tensors (the first ``limit`` rows), cut to its longest row."""
    from kdistill.data import trim_padding

    tensors = {
        name: torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value).long()
        for name, value in rows.items()
    }
    lengths = {int(value.shape[0]) for value in tensors.values()}
    if not tensors or len(lengths) != 1 or 0 in lengths:
        raise ExportError(
            f"sample inputs must be a mapping of non-empty tensors of the same rows; got "
            f"{ {name: tuple(value.shape) for name, value in tensors.items()} }",
            hint="pass the tokenizer's mapping, e.g. {'input_ids': ..., 'attention_mask': ...}[:64].",
        )
    if limit is not None:
        tensors = {name: value[:limit] for name, value in tensors.items()}
    return dict(trim_padding(tensors))


def _logits_of(model: nn.Module, x: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
    output = model(**x) if isinstance(x, Mapping) else model(x)
    return (output if isinstance(output, torch.Tensor) else output.logits).float()


def _check_batches(rows: torch.Tensor | dict[str, torch.Tensor]) -> list[Any]:
    """The batches a check runs: batch 1 and all rows; for a mapping, also all rows cut to a shorter length."""
    if isinstance(rows, torch.Tensor):
        return [rows[:1], rows]
    batches: list[Any] = [{name: value[:1] for name, value in rows.items()}, rows]
    seq = int(next(iter(rows.values())).shape[1])
    if seq > 2:
        shorter = max(2, seq // 2)
        batches.append({name: value[:, :shorter] if value.ndim >= 2 else value for name, value in rows.items()})
    return batches


def _as_rows(rows: Any) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(rows) if not isinstance(rows, torch.Tensor) else rows, dtype=torch.float32)
    if tensor.ndim < 2 or len(tensor) == 0:
        raise ExportError(
            f"sample rows must be a non-empty batch (rows, *row_shape); got shape {tuple(tensor.shape)}",
            hint="pass a few real input rows, e.g. X_train[:64].",
        )
    return tensor


def check_onnx(model: nn.Module, path: str | os.PathLike[str], sample_rows: Any, *, tolerance: float = 1e-4) -> float:
    """Run the ONNX file at batch 1 and at batch ``len(sample_rows)``, compare with ``model`` in eval mode, and
    return the max absolute logit difference. Raises :class:`ExportError` above ``tolerance`` or when the file fails
    to run at either batch size."""
    rows = _mapping_rows(sample_rows) if isinstance(sample_rows, Mapping) else _as_rows(sample_rows)
    predictor = OnnxPredictor(path)
    was_training = model.training
    model.eval()
    worst = 0.0
    for batch in _check_batches(rows):
        with torch.no_grad():
            expected = _logits_of(model, batch)
        size = _batch_rows(batch)
        try:
            got = predictor(batch)
        except Exception as exc:
            model.train(was_training)
            raise ExportError(
                f"the exported model fails at batch {size}: {exc}",
                hint="the graph froze a batch size: in forward(), use x.shape[0] or -1 instead of len(x).",
            ) from exc
        if got.shape != expected.shape:
            raise ExportError(f"ONNX logits have shape {tuple(got.shape)}, PyTorch {tuple(expected.shape)}")
        worst = max(worst, float((got - expected).abs().max()))
    model.train(was_training)
    if not np.isfinite(worst) or worst > tolerance:
        raise ExportError(
            f"ONNX and PyTorch logits differ by up to {worst:.3g}, above the tolerance {tolerance:g}",
            hint="the model may use an operator that exports differently; check its forward(), or raise tolerance "
            "if the difference is expected (e.g. after quantization).",
        )
    return worst


def export_onnx(
    model: nn.Module,
    sample_rows: Any,
    path: str | os.PathLike[str],
    *,
    tolerance: float = 1e-4,
    opset: int = DEFAULT_OPSET,
    check_rows: int = 64,
) -> OnnxExport:
    """Export ``model`` (eval mode, on the CPU) to ONNX at ``path`` and check it against PyTorch.

    Args:
        model: maps (batch, *row_shape) float32 inputs to (batch, classes) logits; or takes a mapping of inputs as
            keywords (a transformers model, whose output's ``.logits`` are exported).
        sample_rows: real input rows, (rows, *row_shape), or a mapping of (rows, seq) int64 inputs (the graph then
            has one input per key, batch and sequence axes dynamic); the first ``check_rows`` are used for the check.
        tolerance: the largest max-abs logit difference accepted (fp32 exports typically differ by ~1e-6).
        opset: the ONNX opset (the TorchScript exporter is used, which needs no extra package).

    Returns:
        An :class:`OnnxExport`. The file is written (atomically) before the check, so a file that fails the check
        stays on disk for inspection while :class:`ExportError` is raised.
    """
    require("onnx")
    module = model.cpu().eval()
    rows: torch.Tensor | dict[str, torch.Tensor]
    if isinstance(sample_rows, Mapping):
        rows = _mapping_rows(sample_rows, check_rows)
        names = list(rows)
        traced: nn.Module = _KeywordLogits(module, names).eval()  # a wrapper in train mode would train the model
        dummy: tuple[torch.Tensor, ...] = tuple(value[: min(2, len(value))] for value in rows.values())
        input_names = names
        axes = {name: {0: "batch", 1: "sequence"} for name in names}
    else:
        rows = _as_rows(sample_rows)[:check_rows]
        traced, dummy, input_names, axes = (
            module,
            (rows[: min(2, len(rows))],),
            [INPUT_NAME],
            {INPUT_NAME: {0: "batch"}},
        )
    try:
        with (
            tempfile.TemporaryDirectory(prefix="kdistill-onnx-") as scratch,
            warnings.catch_warnings(),
            torch.no_grad(),
        ):
            exported = Path(scratch) / "model.onnx"
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice and tracer chatter
            with _eager_attention(module):
                torch.onnx.export(
                    traced,
                    dummy,
                    str(exported),
                    dynamo=False,
                    input_names=input_names,
                    output_names=[OUTPUT_NAME],
                    dynamic_axes={**axes, OUTPUT_NAME: {0: "batch"}},
                    opset_version=opset,
                )
            graph_bytes = exported.read_bytes()
    except Exception as exc:
        raise ExportError(
            f"torch.onnx.export failed for {type(model).__name__}: {exc}",
            hint="the model's forward() must be traceable: tensors in, tensors out, no data-dependent Python control.",
        ) from exc
    target = atomic_write_bytes(path, graph_bytes)
    onnx = require("onnx")
    onnx.checker.check_model(str(target))
    worst = check_onnx(module, target, rows, tolerance=tolerance)
    return OnnxExport(
        path=target,
        max_abs_diff=worst,
        tolerance=tolerance,
        checked_rows=_batch_rows(rows),
        opset=opset,
        size_bytes=target.stat().st_size,
    )


def _batch_rows(batch: torch.Tensor | Mapping[str, torch.Tensor]) -> int:
    return int(batch.shape[0]) if isinstance(batch, torch.Tensor) else int(next(iter(batch.values())).shape[0])


@contextlib.contextmanager
def _eager_attention(module: nn.Module) -> Iterator[None]:
    """A transformers model traced with its eager attention (the SDPA path's traced shortcuts diverge in ONNX),
    switched back afterwards; other modules are left alone."""
    config = getattr(module, "config", None)
    before = getattr(config, "_attn_implementation", None)
    switch = getattr(module, "set_attn_implementation", None)
    if before in (None, "eager") or not callable(switch):
        yield
        return
    switch("eager")
    try:
        yield
    finally:
        switch(before)
