"""The profiling harness: p50/p95 latency, throughput, warm-up and threads stated, peak memory that sees a real
allocation."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from kdistill.profile import peak_memory_bytes, time_inference
from kdistill.students import MLP


@pytest.fixture(autouse=True)
def _leave_the_global_rng_as_found():
    """These tests draw random tensors; the global generator is restored after each so no other test's draws change."""
    with torch.random.fork_rng(devices=[]):
        yield


def test_time_inference_reports_percentiles_throughput_and_settings():
    model = MLP((16,), 3, hidden=(8,)).eval()
    result = time_inference(model, torch.randn(40, 16), batch_size=32, threads=1, repeats=5, min_time=0.002)
    for key in ("latency_ms", "latency_p95_ms", "throughput_rows_s", "batch_size", "threads", "warmup_calls"):
        assert key in result
    assert 0 < result["latency_ms"] <= result["latency_p95_ms"]
    assert result["latency_calls"] >= 5
    assert (result["batch_size"], result["threads"], result["warmup_calls"]) == (32.0, 1.0, 3.0)
    assert result["throughput_rows_s"] > 0
    assert "peak_memory_bytes" not in result  # only measured when asked


def test_every_call_sees_batch_one_then_the_throughput_batch():
    sizes: list[int] = []

    def predict(x: torch.Tensor) -> torch.Tensor:
        sizes.append(len(x))
        return x

    time_inference(predict, torch.randn(10, 4), batch_size=24, repeats=3, min_time=0.001)
    assert sizes[:2] == [1, 24]  # warm-up alternates both batch sizes
    assert set(sizes) == {1, 24}  # rows are recycled to fill a batch larger than the data


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RSS is read from /proc/self/statm")
def test_peak_memory_sees_a_40_mb_working_array():
    def allocate() -> float:
        block = np.ones(40 * 2**20 // 8)  # 40 MiB of float64, every page touched
        return float(block.sum())

    peak = peak_memory_bytes(allocate, calls=1)
    assert peak is not None
    assert peak >= 30 * 2**20
    idle = peak_memory_bytes(lambda: None, calls=1)
    assert idle is not None
    assert idle < 10 * 2**20
