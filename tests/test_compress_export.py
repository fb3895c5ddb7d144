"""ONNX export: the file runs in ONNX Runtime at any batch size and matches PyTorch; a mismatch is an error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from kdistill.compress import OnnxPredictor, export_onnx
from kdistill.errors import ExportError
from kdistill.students import CNN, MLP

pytest.importorskip("onnxruntime")


@pytest.fixture(autouse=True)
def _leave_the_global_rng_as_found():
    """These tests draw random tensors; the global generator is restored after each so no other test's draws change."""
    with torch.random.fork_rng(devices=[]):
        yield


@pytest.mark.parametrize(
    ("build", "row_shape"),
    [
        (lambda: MLP((20,), 4, hidden=(16, 8)), (20,)),
        (lambda: CNN((24,), 3, channels=(4, 6)), (24,)),
        (lambda: CNN((1, 8, 8), 5, channels=(4, 4)), (1, 8, 8)),
    ],
)
def test_export_matches_torch_at_every_batch_size(tmp_path, build, row_shape):
    torch.manual_seed(0)
    model = build().eval()
    rows = torch.randn(50, *row_shape) * 3 + 1
    exported = export_onnx(model, rows, tmp_path / "model.onnx")
    assert exported.max_abs_diff < 1e-5
    assert exported.size_bytes == (tmp_path / "model.onnx").stat().st_size
    predictor = OnnxPredictor(exported.path)
    for batch in (1, 7, 123):  # none of these is the export's dummy batch (2)
        x = torch.randn(batch, *row_shape)
        with torch.no_grad():
            expected = model(x).numpy()
        got = predictor(x).numpy()
        assert got.shape == (batch, expected.shape[1])
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


class _FrozenBatch(nn.Module):
    """Uses len(x) in a reshape: the traced graph freezes the export batch size."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.reshape(len(x), 6))


class _DriftsAfterExport(nn.Module):
    """Adds a Python-side counter that tracing captures as a constant, so eager and ONNX disagree."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 3)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.linear(x) + float(self.calls)


def test_frozen_batch_size_is_an_error(tmp_path):
    with pytest.raises(ExportError, match="fails at batch"):
        export_onnx(_FrozenBatch(), torch.randn(10, 6), tmp_path / "frozen.onnx")


def test_mismatch_above_tolerance_is_an_error_with_the_difference(tmp_path):
    with pytest.raises(ExportError, match=r"differ by up to .* above the tolerance 0.0001"):
        export_onnx(_DriftsAfterExport(), torch.randn(10, 6), tmp_path / "drift.onnx")


def test_bad_sample_rows_and_missing_file_are_explained(tmp_path):
    with pytest.raises(ExportError, match="non-empty batch"):
        export_onnx(MLP((6,), 2), torch.randn(6), tmp_path / "m.onnx")
    with pytest.raises(ExportError, match="no ONNX file"):
        OnnxPredictor(tmp_path / "missing.onnx")
