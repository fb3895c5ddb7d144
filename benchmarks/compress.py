"""Benchmark: the whole last mile (distil -> prune -> quantize -> export) on digits and MNIST-1D, measured on one
harness: size on disk, p50/p95 latency at batch 1, throughput at batch 256, accuracy, for the teacher, the student
(PyTorch fp32, ONNX Runtime fp32, INT8) and the pruned student (PyTorch, INT8).

    python benchmarks/compress.py                 # both data sets, ~2-4 min on a 2-core CPU box
    python benchmarks/compress.py --dataset digits  # ~30 s

Target on digits: the INT8 student >= 100x smaller on disk and >= 20x faster at batch 1 than the 200-tree forest,
with retention >= 97%. Prints a table per data set, one summary line, and ONE JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import torch

from kdistill.compress.commands import run_pipeline

ROWS = ("teacher", "baseline", "student", "student_onnx", "student_int8", "pruned", "pruned_onnx", "pruned_int8")


def _bench(dataset: str, seed: int, latency_budget_s: float) -> dict:
    started = time.perf_counter()
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    with tempfile.TemporaryDirectory(prefix=f"kdistill-bench-{dataset}-") as out:
        result = run_pipeline(dataset, out, seed=seed, html=False, latency_budget_s=latency_budget_s)
    models = result.report.models
    table = {
        name: {
            key: models[name].get(key)
            for key in (
                "accuracy",
                "retention",
                "accuracy_delta",
                "parameters",
                "size_bytes",
                "latency_ms",
                "latency_p95_ms",
                "throughput_rows_s",
                "peak_memory_bytes",
            )
        }
        for name in ROWS
        if name in models
    }
    teacher, student, int8 = models["teacher"], models["student"], models["student_int8"]
    onnx_fp32, pruned_int8 = models["student_onnx"], models["pruned_int8"]
    ratios = {
        "distil_size_x": teacher["size_bytes"] / student["size_bytes"],
        "int8_size_x_vs_onnx_fp32": onnx_fp32["size_bytes"] / int8["size_bytes"],
        "total_size_x_int8": teacher["size_bytes"] / int8["size_bytes"],
        "total_size_x_pruned_int8": teacher["size_bytes"] / pruned_int8["size_bytes"],
        "distil_latency_x": teacher["latency_ms"] / student["latency_ms"],
        "int8_latency_x_vs_onnx_fp32": onnx_fp32["latency_ms"] / int8["latency_ms"],
        "total_latency_x_int8": teacher["latency_ms"] / int8["latency_ms"],
        "total_latency_x_pruned_int8": teacher["latency_ms"] / pruned_int8["latency_ms"],
        "int8_retention": int8["retention"],
        "pruned_int8_retention": pruned_int8["retention"],
    }
    return {
        "dataset": dataset,
        "models": table,
        "ratios": ratios,
        "quantize": result.report.settings["quantize"],
        "export_max_abs_diff": result.report.settings["export_max_abs_diff"],
        "wall_time_s": round(time.perf_counter() - started, 1),
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0] if load_before is not None else None},
    }


def _print_table(entry: dict) -> None:
    print(f"\n== {entry['dataset']} (quantization: {entry['quantize']}, wall {entry['wall_time_s']} s)")
    print(f"{'model':<14}{'accuracy':>9}{'retention':>10}{'size KB':>11}{'p50 ms':>9}{'p95 ms':>9}{'rows/s @256':>13}")
    for name, m in entry["models"].items():
        print(
            f"{name:<14}{m['accuracy']:>9.4f}{m['retention']:>10.1%}{m['size_bytes'] / 1024:>11.1f}"
            f"{m['latency_ms']:>9.3f}{m['latency_p95_ms']:>9.3f}{m['throughput_rows_s']:>13,.0f}"
        )
    print("ratios: " + ", ".join(f"{k} {v:.3g}" for k, v in entry["ratios"].items()))


def _kb(value: float | None) -> str:
    return "—" if value is None else f"{value / 1024:,.0f} KB"


def _markdown(results: list[dict]) -> str:
    """The tables docs/compress.md quotes: claims vs measured ratios, then every model's numbers."""
    lines = [
        "| | distil (teacher / student fp32) | INT8 (ONNX fp32 / INT8) | total (teacher / INT8) | "
        "total, pruned (teacher / pruned INT8) | INT8 retention |",
        "| --- | --- | --- | --- | --- | --- |",
        "| usual claim, size | 10× | 4× | 40× | — | — |",
    ]
    for r in results:
        q = r["ratios"]
        lines.append(
            f"| {r['dataset']}, size on disk | {q['distil_size_x']:.0f}× | {q['int8_size_x_vs_onnx_fp32']:.2f}× | "
            f"{q['total_size_x_int8']:.0f}× | {q['total_size_x_pruned_int8']:.0f}× | {q['int8_retention']:.1%} |"
        )
        lines.append(
            f"| {r['dataset']}, p50 latency @1 | {q['distil_latency_x']:.0f}× | "
            f"{q['int8_latency_x_vs_onnx_fp32']:.2f}× | {q['total_latency_x_int8']:.0f}× | "
            f"{q['total_latency_x_pruned_int8']:.0f}× | |"
        )
    lines += [
        "",
        "| data set | model | accuracy | retention | Δ acc INT8 | params | size on disk | p50 ms @1 | p95 ms @1 | "
        "rows/s @256 | peak mem growth |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        for name, m in r["models"].items():
            delta = "" if m["accuracy_delta"] is None else f"{m['accuracy_delta']:+.4f}"
            lines.append(
                f"| {r['dataset']} | {name} | {m['accuracy']:.4f} | {m['retention']:.1%} | {delta} | "
                f"{m['parameters']:,.0f} | {m['size_bytes'] / 1024:,.1f} KB | {m['latency_ms']:.3f} | "
                f"{m['latency_p95_ms']:.3f} | {m['throughput_rows_s']:,.0f} | {_kb(m['peak_memory_bytes'])} |"
            )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=["digits", "mnist1d", "both"], default="both")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--latency-budget", type=float, default=1.0, help="seconds of batch-1 calls per model")
    args = parser.parse_args()
    datasets = ["digits", "mnist1d"] if args.dataset == "both" else [args.dataset]
    results = [_bench(name, args.seed, args.latency_budget) for name in datasets]
    for entry in results:
        _print_table(entry)
    print("\n" + _markdown(results))
    digits = next((r for r in results if r["dataset"] == "digits"), None)
    target = None
    if digits is not None:
        r = digits["ratios"]
        target = {
            "size_x_at_least_100": r["total_size_x_int8"] >= 100,
            "latency_x_at_least_20": r["total_latency_x_int8"] >= 20,
            "retention_at_least_0.97": r["int8_retention"] >= 0.97,
        }
    machine = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "threads": 1,
    }
    summary = "; ".join(
        f"{r['dataset']}: INT8 student {r['ratios']['total_size_x_int8']:.0f}x smaller, "
        f"{r['ratios']['total_latency_x_int8']:.0f}x faster at batch 1, retention {r['ratios']['int8_retention']:.1%}"
        for r in results
    )
    print(f"\nSUMMARY {summary}; digits target met: {target}")
    print(json.dumps({"benchmark": "compress", "machine": machine, "target_digits": target, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
