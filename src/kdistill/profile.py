"""Cost of a model: parameters, size on disk, latency at batch 1 (p50, p95), throughput at a larger batch, and peak
memory during inference.

Every timing warms up first, states its warm-up and thread count, and reports medians; teacher and students (PyTorch
eager, ONNX Runtime fp32 and INT8, scikit-learn) go through the same harness, :func:`time_inference`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pickle
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from kdistill.engine.loop import num_threads

__all__ = ["MEMORY_MEASURE", "count_parameters", "model_size_bytes", "peak_memory_bytes", "time_inference"]

MEMORY_MEASURE = (
    "peak growth of process RSS (/proc/self/statm sampled every 0.5 ms) over 3 batch calls, after malloc_trim(0); "
    "a lower bound: memory an allocator keeps (ONNX Runtime's arena) is not counted again"
)


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


def _latency_samples(fn: Callable[[], Any], *, budget_s: float, min_calls: int, max_calls: int) -> list[float]:
    """Seconds taken by each of several single calls: at least ``min_calls``, more while within ``budget_s``."""
    samples: list[float] = []
    spent = 0.0
    while len(samples) < min_calls or (spent < budget_s and len(samples) < max_calls):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
        spent += samples[-1]
    return samples


def _resident_bytes() -> int | None:
    """The process's resident set size from /proc/self/statm (Linux); None where that file does not exist."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _return_free_memory_to_the_os() -> None:
    """glibc's ``malloc_trim(0)``: hand memory freed by earlier work back to the OS, so that reusing it does not hide
    a model's allocations from RSS. A no-op where glibc is absent."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def peak_memory_bytes(fn: Callable[[], Any], *, calls: int = 3, interval_s: float = 0.0005) -> float | None:
    """Peak growth of the process's resident memory (RSS) while ``fn`` runs ``calls`` times, in bytes.

    Free heap memory is first handed back to the OS (glibc ``malloc_trim(0)``); then a background thread samples
    RSS (``/proc/self/statm``) every ``interval_s``; the result is the highest sample minus the RSS just before the
    first call. It counts every allocation the model makes (torch, numpy, scikit-learn's C code), but memory an
    allocator keeps for itself is reused without growing RSS (ONNX Runtime's arena, which holds its buffers after
    the first run), so it is a lower bound on the working memory. None where RSS cannot be read (non-Linux).
    """
    _return_free_memory_to_the_os()
    before = _resident_bytes()
    if before is None:
        return None
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _resident_bytes() or 0)
            time.sleep(interval_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        for _ in range(calls):
            fn()
    finally:
        done.set()
        sampler.join()
    peak = max(peak, _resident_bytes() or 0)
    return float(max(0, peak - before))


def time_inference(
    predict: Callable[[Any], Any],
    rows: Any,
    *,
    batch_size: int = 256,
    threads: int = 1,
    repeats: int = 7,
    min_time: float = 0.02,
    latency_budget_s: float | None = None,
    memory: bool = False,
) -> dict[str, float]:
    """Latency at batch 1 (p50 and p95, ms) and throughput at ``batch_size`` (rows/s) of ``predict`` on ``rows``
    ((rows, *features), or a mapping of (rows, ...) tensors, cut to each batch's longest row).

    The one harness for teachers and students, whatever runs them (PyTorch eager, ONNX Runtime, scikit-learn).
    ``predict`` is called under ``torch.inference_mode()`` with ``threads`` intra-op threads (an ONNX Runtime
    predictor is built with its own thread count; scikit-learn models run with their own ``n_jobs``).

    - warm-up: ``warmup_calls`` calls at each batch size, not timed (first-call allocation, lazy initialisation).
    - latency: single batch-1 calls timed one by one, at least ``repeats`` of them and more until
      ``latency_budget_s`` (default ``repeats * min_time``) is spent, at most 1,000; ``latency_ms`` is their median
      (p50), ``latency_p95_ms`` the 95th percentile, ``latency_calls`` how many were timed.
    - throughput: the median over ``repeats`` timings of a loop of ``batch_size``-row calls lasting ``min_time``.
    - ``peak_memory_bytes`` (with ``memory=True``): :func:`peak_memory_bytes` over 3 batch calls, measured after the
      timings so the sampling thread cannot slow them.
    """
    from kdistill.data import rows_in, take_rows, trim_padding

    one = trim_padding(take_rows(rows, slice(0, 1)))  # a mapping of token rows: each call at its own length
    batch = take_rows(rows, slice(0, batch_size))
    if rows_in(batch) < batch_size:
        batch = take_rows(rows, torch.arange(batch_size) % rows_in(rows))
    batch = trim_padding(batch)
    warmup_calls = 3
    budget = repeats * min_time if latency_budget_s is None else latency_budget_s
    with torch.inference_mode(), num_threads(threads):
        for _ in range(warmup_calls):
            predict(one)
            predict(batch)
        samples = _latency_samples(lambda: predict(one), budget_s=budget, min_calls=repeats, max_calls=1000)
        per_batch = _median_seconds(lambda: predict(batch), repeats=repeats, min_time=min_time)
        peak = peak_memory_bytes(lambda: predict(batch)) if memory else None
    timings = np.asarray(samples) * 1e3
    result = {
        "latency_ms": float(np.percentile(timings, 50)),
        "latency_p95_ms": float(np.percentile(timings, 95)),
        "latency_calls": float(len(samples)),
        "throughput_rows_s": batch_size / per_batch,
        "batch_size": float(batch_size),
        "threads": float(threads),
        "warmup_calls": float(warmup_calls),
    }
    if peak is not None:
        result["peak_memory_bytes"] = peak
    return result
