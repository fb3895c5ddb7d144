"""Dynamic INT8 for transformers: a small BERT classifier, exported to ONNX, quantized by kdistill.compress."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kdistill.compress.quantize import quantize_onnx


def test_dynamic_int8_quantizes_a_transformer_and_keeps_its_predictions(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    config = transformers.BertConfig(
        vocab_size=500,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=32,
        num_labels=3,
        attn_implementation="eager",  # SDPA's traced shortcut for a missing mask diverges in ONNX
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()

    class Logits(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.inner(input_ids=input_ids).logits

    tokens = torch.randint(0, 500, (64, 16), generator=torch.Generator().manual_seed(1))
    fp32_path = tmp_path / "bert.onnx"
    torch.onnx.export(
        Logits(model).eval(),
        (tokens[:2],),
        str(fp32_path),
        input_names=["input_ids"],
        output_names=["logits"],
        dynamic_axes={"input_ids": {0: "batch"}, "logits": {0: "batch"}},
        dynamo=False,
    )
    quantized = quantize_onnx(fp32_path, tmp_path / "bert.int8.onnx", mode="dynamic")

    assert quantized.mode == "dynamic"
    assert quantized.size_bytes < 0.5 * fp32_path.stat().st_size  # int8 weights: the linear layers shrink ~4x
    node_types = {node.op_type for node in onnx.load(str(quantized.path)).graph.node}
    assert "DynamicQuantizeLinear" in node_types or "MatMulInteger" in node_types

    def run(path: Path) -> np.ndarray:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(["logits"], {"input_ids": tokens.numpy()})[0]

    with torch.no_grad():
        reference = model(input_ids=tokens).logits.numpy()
    fp32, int8 = run(fp32_path), run(quantized.path)
    assert np.abs(fp32 - reference).max() < 1e-4
    assert np.abs(int8 - fp32).max() < 0.25 * np.abs(fp32).max()  # quantized, not broken
    assert (int8.argmax(1) == fp32.argmax(1)).mean() >= 0.85


def test_quantizing_writes_nothing_into_the_working_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ONNX Runtime's pre-pass writes scratch files (sym_shape_infer_temp.onnx, uuid-named .data) into the current
    folder; kdistill runs it inside its own scratch folder, so a user's folder stays as it was."""
    pytest.importorskip("onnxruntime")
    from kdistill.compress.export import export_onnx

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).eval()
    rows = torch.randn(32, 8)
    export_onnx(model, rows, tmp_path / "model.onnx")
    quantize_onnx(tmp_path / "model.onnx", tmp_path / "model.int8.onnx", mode="dynamic")
    assert (tmp_path / "model.int8.onnx").is_file() and list(work.iterdir()) == []
