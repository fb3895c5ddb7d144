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


def _weight_errors(int8_path: Path, fp32_path: Path) -> list[float]:
    """For each MatMulInteger weight of the INT8 graph: the largest error of its dequantized values,
    |(q - zero_point) * scale - w|, relative to its output channel's largest |w| (the fp32 weights read from
    ``fp32_path``, the graph it was quantized from). One scale per channel bounds it by 1/254."""
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    fp32 = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(fp32_path)).graph.initializer}
    graph = onnx.load(str(int8_path)).graph
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    errors = []
    for node in graph.node:
        if node.op_type != "MatMulInteger" or node.input[1] not in values:
            continue
        quantized, zero = values[node.input[1]].astype(np.float64), values[node.input[3]].astype(np.float64)
        scale = values[node.input[1].removesuffix("_quantized") + "_scale"].astype(np.float64)
        name = node.input[1].removesuffix("_quantized")
        # (in, out); a Gemm's weight is (out, in), transposed by the quantizer
        weight = fp32[name] if name in fp32 else fp32[name.removesuffix("_Transposed")].T
        restored = (quantized - zero) * scale
        errors.append(float((np.abs(restored - weight).max(axis=0) / np.abs(weight).max(axis=0)).max()))
    return errors


def test_transformer_int8_is_per_channel_and_close_to_pytorch(tmp_path: Path) -> None:
    """The dynamic INT8 default for transformers: one weight scale per output channel, checked against PyTorch.
    The output channels of every linear layer are given scales spread over two decades (trained BERTs have outlier
    channels): one scale per matrix then rounds the small channels away, one per channel keeps them."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("onnxruntime")
    from kdistill.compress import OnnxPredictor, export_onnx
    from kdistill.compress.quantize import _preprocess

    config = transformers.BertConfig(
        vocab_size=300,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=24,
        num_labels=3,
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    with torch.no_grad():
        for module in model.bert.encoder.modules():
            if isinstance(module, torch.nn.Linear):
                spread = torch.logspace(-1, 1, module.out_features)[torch.randperm(module.out_features)]
                module.weight.mul_(spread.unsqueeze(1))
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(4, 300, (48, 16), generator=generator)
    mask = torch.ones_like(ids)
    mask[5, 9:] = 0
    inputs = {"input_ids": ids * mask, "attention_mask": mask}
    exported = export_onnx(model, inputs, tmp_path / "bert.onnx")
    prepared = _preprocess(exported.path, tmp_path / "prepared.onnx")  # the graph quantize_onnx quantizes
    with torch.no_grad():
        reference = model(**inputs).logits
    errors = {}
    for per_channel in (True, False):
        int8 = quantize_onnx(exported.path, tmp_path / f"bert-{per_channel}.int8.onnx", per_channel=per_channel)
        errors[per_channel] = _weight_errors(int8.path, prepared)
        assert len(errors[per_channel]) == 2 * 6 + 2  # per layer Q, K, V, attention out, FFN in, out; pooler, head
        if per_channel:  # the default
            predicted = OnnxPredictor(int8.path)(inputs)
            assert float((predicted - reference).abs().max()) < 0.05 * float(reference.abs().max())
            assert (predicted.argmax(1) == reference.argmax(1)).float().mean() >= 0.95
    assert max(errors[True]) <= 1 / 254 + 1e-6  # half a step of max|w| / 127, in every channel
    assert max(errors[False]) > 0.02  # one scale per matrix: the small channels lose far more
