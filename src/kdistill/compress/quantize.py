"""INT8 quantization of an exported ONNX model with ONNX Runtime.

Two schemes, as ONNX Runtime recommends them:

- **dynamic** (MLPs, transformers): weights are stored as int8, **one scale per output channel** (per column of
  each MatMul's weight; ``per_channel=True``, the default); each MatMul's input is quantized on the fly with a
  per-batch scale ``s = (max(x) - min(x)) / 255`` and zero point, then an integer matrix product runs. Needs no
  data. What ONNX Runtime quantizes here: every MatMul whose second input is a weight (a transformer's Q/K/V and
  output projections, both feed-forward layers, and the pooler and classifier, whose Gemms the pre-pass turns into
  MatMul + Add) and the embedding tables (Gather); the attention products QK^T and PV (both inputs activations),
  LayerNorm, softmax and GELU stay fp32. ``reduce_range`` (7-bit weights) is off: it is for CPUs without VNNI,
  where u8 x s8 products can saturate; on a VNNI CPU it changed a few more of the benchmark's predictions.
- **static** (CNNs): weights *and* activations are int8, with activation ranges fixed beforehand by running the
  fp32 model on calibration rows (min/max calibration). The graph is written in QDQ form
  (QuantizeLinear/DequantizeLinear pairs around each quantized operator), per-channel weight scales.

``mode="auto"`` picks static when the graph has a Conv, else dynamic. A quantized model's accuracy must be measured
again: :func:`kdistill.compress.compress` reports it next to the fp32 model's, with the delta.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kdistill._deps import require
from kdistill.errors import ExportError
from kdistill.io import atomic_write_bytes

__all__ = ["QUANTIZE_MODES", "QuantizedModel", "choose_mode", "quantize_onnx"]

QUANTIZE_MODES = ("auto", "dynamic", "static")


@dataclass(frozen=True)
class QuantizedModel:
    """An INT8 ONNX file: where, which scheme, its size and its fp32 source's size."""

    path: Path
    mode: str
    size_bytes: int
    source_size_bytes: int
    calibration_rows: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "mode": self.mode,
            "size_bytes": self.size_bytes,
            "source_size_bytes": self.source_size_bytes,
            "calibration_rows": self.calibration_rows,
        }


def choose_mode(onnx_path: str | os.PathLike[str]) -> str:
    """``"static"`` when the graph has a Conv node (CNNs gain from int8 activations), else ``"dynamic"``."""
    onnx = require("onnx")
    graph = onnx.load(str(onnx_path)).graph
    return "static" if any(node.op_type == "Conv" for node in graph.node) else "dynamic"


def _calibration_reader(input_name: str, rows: np.ndarray, batch_size: int) -> Any:
    quantization = require("onnxruntime.quantization")

    class _Rows(quantization.CalibrationDataReader):  # type: ignore[name-defined]
        """Feeds the calibration rows to ONNX Runtime in batches."""

        def __init__(self) -> None:
            self._batches = iter([rows[i : i + batch_size] for i in range(0, len(rows), batch_size)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._batches, None)
            return None if batch is None else {input_name: batch}

    return _Rows()


def _preprocess(source: Path, target: Path) -> Path:
    """ONNX Runtime's recommended pre-pass (shape inference and graph optimisation, which folds constants such as
    the input standardisation); the source itself when the pre-pass fails on a graph."""
    shape_inference = require("onnxruntime.quantization.shape_inference")
    here = os.getcwd()
    os.chdir(target.parent)  # its symbolic shape inference writes scratch files (sym_shape_infer_temp.onnx) here
    try:
        shape_inference.quant_pre_process(str(Path(source).resolve()), str(target.resolve()))
    except Exception:  # an optimisation, not a requirement: quantize the graph as exported
        return source
    finally:
        os.chdir(here)
    return target


def quantize_onnx(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    *,
    mode: str = "auto",
    calibration_rows: Any = None,
    max_calibration_rows: int = 512,
    per_channel: bool = True,
    reduce_range: bool = False,
) -> QuantizedModel:
    """Quantize the fp32 ONNX file ``source`` to INT8 at ``target``.

    Args:
        mode: ``"dynamic"``, ``"static"`` (QDQ, needs ``calibration_rows``) or ``"auto"`` (:func:`choose_mode`).
        calibration_rows: (rows, *row_shape) training rows for static calibration; the first
            ``max_calibration_rows`` are used, in batches of 64.
        per_channel: one weight scale per output channel, in both modes. It keeps small convolutions accurate, and a
            transformer's predictions: on the docstring benchmark's 3-layer student (docs/transformers.md,
            "Measured") one scale per weight matrix changed about twice as many test predictions as one per channel.
        reduce_range: 7-bit weights (ONNX Runtime's option for CPUs without VNNI instructions); off by default.

    Returns:
        A :class:`QuantizedModel`; ``target`` is written atomically.
    """
    quantization = require("onnxruntime.quantization")
    onnx = require("onnx")
    source_path = Path(source)
    if not source_path.exists():
        raise ExportError(f"no ONNX file to quantize at {source_path}", hint="export the fp32 model first.")
    if mode not in QUANTIZE_MODES:
        raise ExportError(f"unknown quantization mode {mode!r}", hint=f"use one of {list(QUANTIZE_MODES)}.")
    chosen = choose_mode(source_path) if mode == "auto" else mode
    used_rows = 0
    with tempfile.TemporaryDirectory(prefix="kdistill-quant-") as scratch:
        out = Path(scratch) / "int8.onnx"
        prepared = _preprocess(source_path, Path(scratch) / "prepared.onnx")
        try:
            if chosen == "dynamic":
                quantization.quantize_dynamic(
                    str(prepared),
                    str(out),
                    weight_type=quantization.QuantType.QInt8,
                    per_channel=per_channel,
                    reduce_range=reduce_range,
                )
            else:
                if calibration_rows is None:
                    raise ExportError(
                        "static quantization needs calibration rows and none were given",
                        hint="pass calibration_rows=X_train (a few hundred rows), or use mode='dynamic'.",
                    )
                rows = np.ascontiguousarray(np.asarray(calibration_rows, dtype=np.float32)[:max_calibration_rows])
                used_rows = len(rows)
                input_name = onnx.load(str(prepared)).graph.input[0].name
                quantization.quantize_static(
                    str(prepared),
                    str(out),
                    _calibration_reader(input_name, rows, 64),
                    quant_format=quantization.QuantFormat.QDQ,
                    activation_type=quantization.QuantType.QUInt8,
                    weight_type=quantization.QuantType.QInt8,
                    per_channel=per_channel,
                    reduce_range=reduce_range,
                    calibrate_method=quantization.CalibrationMethod.MinMax,
                )
        except ExportError:
            raise
        except Exception as exc:
            raise ExportError(
                f"ONNX Runtime could not quantize {source_path} ({chosen}): {exc}",
                hint="try the other mode (mode='dynamic' or 'static'), or ship the fp32 file.",
            ) from exc
        written = atomic_write_bytes(target, out.read_bytes())
    return QuantizedModel(
        path=written,
        mode=chosen,
        size_bytes=written.stat().st_size,
        source_size_bytes=source_path.stat().st_size,
        calibration_rows=used_rows,
    )
