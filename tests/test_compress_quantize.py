"""INT8 quantization with ONNX Runtime: the right scheme per model, int8 weights really stored, outputs close."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdistill.compress import OnnxPredictor, export_onnx, quantize_onnx
from kdistill.compress.quantize import choose_mode
from kdistill.errors import ExportError
from kdistill.students import CNN, MLP

onnx = pytest.importorskip("onnx")


@pytest.fixture(autouse=True)
def _leave_the_global_rng_as_found():
    """These tests draw random tensors; the global generator is restored after each so no other test's draws change."""
    with torch.random.fork_rng(devices=[]):
        yield


def _int8_weight_numbers(path) -> int:
    """How many numbers the graph stores as int8 initializers."""
    graph = onnx.load(str(path)).graph
    return sum(int(np.prod(t.dims)) for t in graph.initializer if t.data_type == onnx.TensorProto.INT8)


def _fp32_weight_numbers(path) -> int:
    graph = onnx.load(str(path)).graph
    return sum(int(np.prod(t.dims)) for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT)


def test_dynamic_int8_for_an_mlp(tmp_path):
    torch.manual_seed(0)
    model = MLP((64,), 10, hidden=(256, 128)).eval()
    rows = torch.randn(200, 64)
    fp32 = export_onnx(model, rows, tmp_path / "mlp.onnx")
    assert choose_mode(fp32.path) == "dynamic"
    int8 = quantize_onnx(fp32.path, tmp_path / "mlp.int8.onnx")
    assert int8.mode == "dynamic"
    ops = {node.op_type for node in onnx.load(str(int8.path)).graph.node}
    assert "DynamicQuantizeLinear" in ops or "MatMulInteger" in ops
    weights = 64 * 256 + 256 * 128 + 128 * 10  # the three weight matrices, now int8
    assert _int8_weight_numbers(int8.path) == weights + 256 + 128 + 10  # + one int8 zero point per output channel
    # int8 weights: ~1 byte per weight instead of 4, so the file shrinks to well under half.
    assert int8.size_bytes < 0.4 * fp32.size_bytes
    with torch.no_grad():
        reference = model(rows)
    got = OnnxPredictor(int8.path)(rows)
    scale = float(reference.abs().max())
    assert float((got - reference).abs().max()) < 0.05 * scale
    assert float((got.argmax(1) == reference.argmax(1)).float().mean()) > 0.9


def test_static_qdq_int8_for_a_cnn_calibrated_on_rows(tmp_path):
    torch.manual_seed(0)
    model = CNN((32,), 4, channels=(8, 16)).eval()
    rows = torch.randn(300, 32)
    fp32 = export_onnx(model, rows, tmp_path / "cnn.onnx")
    assert choose_mode(fp32.path) == "static"
    with pytest.raises(ExportError, match="calibration rows"):
        quantize_onnx(fp32.path, tmp_path / "nope.onnx", mode="static")
    int8 = quantize_onnx(fp32.path, tmp_path / "cnn.int8.onnx", calibration_rows=rows.numpy())
    assert (int8.mode, int8.calibration_rows) == ("static", 300)
    ops = [node.op_type for node in onnx.load(str(int8.path)).graph.node]
    assert ops.count("QuantizeLinear") >= 2
    assert ops.count("DequantizeLinear") >= 2
    conv_weights = 8 * 1 * 5 + 16 * 8 * 5
    assert _int8_weight_numbers(int8.path) >= conv_weights
    with torch.no_grad():
        reference = model(rows)
    got = OnnxPredictor(int8.path)(rows)
    assert float((got - reference).abs().max()) < 0.1 * float(reference.abs().max())


def test_unknown_mode_and_missing_source_are_explained(tmp_path):
    with pytest.raises(ExportError, match="no ONNX file to quantize"):
        quantize_onnx(tmp_path / "missing.onnx", tmp_path / "out.onnx")
    model = MLP((8,), 2).eval()
    fp32 = export_onnx(model, torch.randn(10, 8), tmp_path / "m.onnx")
    with pytest.raises(ExportError, match="unknown quantization mode 'int4'"):
        quantize_onnx(fp32.path, tmp_path / "out.onnx", mode="int4")
    assert _fp32_weight_numbers(fp32.path) > 0
