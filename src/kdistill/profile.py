"""Cost of a model: parameters, size on disk, latency at batch 1 and throughput at a larger batch.

Every timing warms up first, takes the median of repeats, and records the thread count it ran with; teacher and
students go through the same harness.
"""

from __future__ import annotations

import pickle
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from kdistill.engine.loop import num_threads

__all__ = ["count_parameters", "model_size_bytes", "time_inference"]


def count_parameters(model: Any) -> int:
    """Trainable and buffer numbers of a torch module; for a scikit-learn model, the numbers in its fitted arrays
    (a tree counts, per node, its children, feature, threshold, impurity, sample counts and class values)."""
    if isinstance(model, nn.Module):
        return sum(p.numel() for p in model.parameters())
    return _count_numbers(model, set())


def _count_numbers(obj: Any, seen: set[int], alive: list[Any] | None = None) -> int:
    # ``alive`` holds every state dict made on the way, so no id() in ``seen`` is reused by a freed temporary.
    alive = [] if alive is None else alive
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    alive.append(obj)
    if isinstance(obj, np.ndarray):
        if obj.dtype.names:  # a tree's structured node array
            return obj.size * len(obj.dtype.names)
        return obj.size if obj.dtype != object else sum(_count_numbers(item, seen, alive) for item in obj.flat)
    if isinstance(obj, (list, tuple)):
        return sum(_count_numbers(item, seen, alive) for item in obj)
    if isinstance(obj, dict):
        return sum(_count_numbers(item, seen, alive) for item in obj.values())
    if hasattr(obj, "__getstate__") and not isinstance(obj, (str, bytes, int, float, type)):
        try:
            state = obj.__getstate__()
        except TypeError:
            return 0
        if not isinstance(state, dict):
            return 0
        fitted = {k: v for k, v in state.items() if k.endswith("_") or k in ("nodes", "values")}
        return _count_numbers(fitted, seen, alive)
    return 0


def model_size_bytes(model: Any) -> int:
    """Bytes the model takes on disk the usual way: a safetensors file of the state dict for torch modules, a
    pickle (what ``joblib.dump`` writes, uncompressed) for scikit-learn models."""
    if isinstance(model, nn.Module):
        tensors = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
        return len(safetensors_bytes(tensors))
    return len(pickle.dumps(model, protocol=pickle.HIGHEST_PROTOCOL))


def _median_seconds(fn: Callable[[], Any], *, repeats: int, min_time: float) -> float:
    """Median over ``repeats`` of the time per call, each repeat looping until it lasts ``min_time`` seconds."""
    fn()
    start = time.perf_counter()
    loops = 0
    while time.perf_counter() - start < min_time / 4 or loops < 1:
        fn()
        loops += 1
    per_call = (time.perf_counter() - start) / loops
    inner = max(1, int(min_time / max(per_call, 1e-9)))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - start) / inner)
    return statistics.median(samples)


def time_inference(
    predict: Callable[[torch.Tensor], Any],
    rows: torch.Tensor,
    *,
    batch_size: int = 256,
    threads: int = 1,
    repeats: int = 7,
    min_time: float = 0.02,
) -> dict[str, float]:
    """p50 latency at batch 1 (ms) and throughput at ``batch_size`` (rows/s) of ``predict`` on ``rows``.

    ``predict`` is called under ``torch.inference_mode()`` with ``threads`` intra-op threads (scikit-learn models run
    with their own ``n_jobs``). Each figure is the median of ``repeats`` timings after a warm-up call.
    """
    one = rows[:1]
    batch = rows[:batch_size]
    if len(batch) < batch_size:
        batch = rows[torch.arange(batch_size) % len(rows)]
    with torch.inference_mode(), num_threads(threads):
        latency = _median_seconds(lambda: predict(one), repeats=repeats, min_time=min_time)
        per_batch = _median_seconds(lambda: predict(batch), repeats=repeats, min_time=min_time)
    return {
        "latency_ms": latency * 1e3,
        "throughput_rows_s": batch_size / per_batch,
        "batch_size": float(batch_size),
        "threads": float(threads),
    }
