"""Benchmark: a gradient-boosted regressor distilled into an MLP, against the same MLP trained without a teacher.

Two data sets: scikit-learn's bundled diabetes (442 rows, 10 features) and ``make_friedman1(n_samples=20000,
noise=1.0)`` (10 features, 5 informative). Each is split once (60/20/20 train/val/test, seed 0); the teacher is a
``HistGradientBoostingRegressor`` fitted on the training rows; then for each of 3 seeds ``kdistill.distill`` trains
the student (``regression_kd``, soft weight 0.5, targets standardised inside) and, with the same seed, epochs and
rows, the baseline (``label_mse``: labels only), both early-stopped on the validation RMSE. With ``--transfer`` (on in
``--quick``), friedman1 gets a third row that adds teacher-labelled rows: as many extra inputs as training rows,
drawn from the same generator without targets (NaN), learnt from the teacher alone. Then the seed-0 student is
exported to ONNX and quantized to INT8 (dynamic), and every model's size and latency (batch 1, p50; throughput at
batch 256; 1 thread) are measured with ``kdistill.profile.time_inference``.

    python benchmarks/regression.py              # full sizes, both data sets (~15 min of CPU at 1 thread)
    python benchmarks/regression.py --transfer   # and the teacher-labelled rows on friedman1 (~2x the time)
    python benchmarks/regression.py --quick      # friedman1 with 3000 rows, 2 seeds, 40 epochs: ~1 min

Prints a table per data set, one summary line, and ONE JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_diabetes, make_friedman1
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.metrics import mean_squared_error, r2_score
from sklearn.model_selection import train_test_split

import kdistill
from kdistill.profile import model_size_bytes, time_inference


def _data(name: str, rows: int) -> tuple[np.ndarray, np.ndarray]:
    if name == "diabetes":
        x, y = load_diabetes(return_X_y=True)
    else:
        x, y = make_friedman1(n_samples=rows, noise=1.0, random_state=0)
    return x.astype(np.float32), y.astype(np.float64)


def _split(x: np.ndarray, y: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    x_train, x_rest, y_train, y_rest = train_test_split(x, y, test_size=0.4, random_state=0)
    x_val, x_test, y_val, y_test = train_test_split(x_rest, y_rest, test_size=0.5, random_state=0)
    return {"train": (x_train, y_train), "val": (x_val, y_val), "test": (x_test, y_test)}


def _mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def _runs(
    name: str, splits: dict[str, Any], teacher: Any, seeds: list[int], epochs: int, extra: np.ndarray | None
) -> tuple[dict[str, Any], Any]:
    """R² and RMSE on the test rows per seed, for the distilled student, the baseline and (given ``extra`` inputs)
    the student that also learns from teacher-labelled rows."""
    rows: dict[str, dict[str, list[float]]] = {}
    first = None
    for seed in seeds:
        common = {"val": splits["val"], "test": splits["test"], "epochs": epochs, "seed": seed}
        result = kdistill.distill(teacher, "mlp", splits["train"], verbose=False, profile=False, **common)
        assert result.report is not None
        first = first or result
        for model in ("teacher", "student", "baseline"):
            metrics = result.report.models[model]
            entry = rows.setdefault(model, {"r2": [], "rmse": [], "agreement": []})
            entry["r2"].append(metrics["r2"])
            entry["rmse"].append(metrics["rmse"])
            entry["agreement"].append(metrics.get("agreement", 1.0))
        if extra is not None:
            x_train, y_train = splits["train"]
            x_all = np.concatenate([x_train, extra])
            y_all = np.concatenate([y_train, np.full(len(extra), np.nan)])
            more = kdistill.distill(
                teacher, "mlp", (x_all, y_all), verbose=False, profile=False, baseline=False, **common
            )
            assert more.report is not None
            metrics = more.report.models["student"]
            entry = rows.setdefault("student_plus_teacher_rows", {"r2": [], "rmse": [], "agreement": []})
            entry["r2"].append(metrics["r2"])
            entry["rmse"].append(metrics["rmse"])
            entry["agreement"].append(metrics["agreement"])
    summary = {model: {key: _mean_std(values) for key, values in metrics.items()} for model, metrics in rows.items()}
    summary["per_seed"] = rows  # type: ignore[assignment]
    return summary, first


def _deploy(student: torch.nn.Module, teacher: Any, splits: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Size, R² and latency of the teacher, the student (PyTorch), its ONNX export and the INT8 quantization."""
    from kdistill.compress.export import OnnxPredictor, export_onnx
    from kdistill.compress.quantize import quantize_onnx

    x_train, _ = splits["train"]
    x_test, y_test = splits["test"]
    rows = torch.as_tensor(x_test)
    onnx_path, int8_path = folder / "student.onnx", folder / "student_int8.onnx"
    tolerance = 1e-4 * max(1.0, float(np.abs(y_test).max()))  # the outputs are in the targets' units
    export_onnx(student, torch.as_tensor(x_train[:256]), onnx_path, tolerance=tolerance)
    quantize_onnx(onnx_path, int8_path, mode="dynamic")
    predictors: dict[str, Any] = {
        "teacher": lambda x: torch.as_tensor(teacher.predict(np.asarray(x))),
        "student": student.eval(),
        "student_onnx": OnnxPredictor(onnx_path),
        "student_int8": OnnxPredictor(int8_path),
    }
    sizes = {
        "teacher": model_size_bytes(teacher),
        "student": model_size_bytes(student),
        "student_onnx": onnx_path.stat().st_size,
        "student_int8": int8_path.stat().st_size,
    }
    out: dict[str, Any] = {}
    for name, predict in predictors.items():
        with torch.inference_mode():
            predicted = np.asarray(predict(rows)).reshape(len(rows), -1)[:, 0]
        timing = time_inference(predict, rows, threads=1)
        out[name] = {
            "r2": float(r2_score(y_test, predicted)),
            "rmse": float(mean_squared_error(y_test, predicted) ** 0.5),
            "size_bytes": int(sizes[name]),
            "latency_ms": timing["latency_ms"],
            "throughput_rows_s": timing["throughput_rows_s"],
        }
    return out


def _bench(name: str, rows: int, seeds: list[int], epochs: int, transfer: bool) -> dict[str, Any]:
    started = time.perf_counter()
    x, y = _data(name, rows)
    splits = _split(x, y)
    teacher = HistGradientBoostingRegressor(max_iter=300, random_state=0).fit(*splits["train"])
    extra = None
    if name == "friedman1" and transfer:  # unlabeled inputs from the same generator, as many as the training rows
        extra = make_friedman1(n_samples=len(splits["train"][0]), noise=1.0, random_state=1)[0].astype(np.float32)
    summary, first = _runs(name, splits, teacher, seeds, epochs, extra)
    with tempfile.TemporaryDirectory(prefix=f"kdistill-bench-regression-{name}-") as folder:
        deploy = _deploy(first.student, teacher, splits, Path(folder))
    return {
        "dataset": name,
        "rows": {split: len(value[0]) for split, value in splits.items()},
        "seeds": seeds,
        "epochs": epochs,
        "models": summary,
        "deploy": deploy,
        "student_parameters": sum(p.numel() for p in first.student.parameters()),
        "wall_time_s": round(time.perf_counter() - started, 1),
    }


def _print(result: dict[str, Any]) -> None:
    print(f"\n{result['dataset']}: rows {result['rows']}, seeds {result['seeds']}, {result['wall_time_s']} s")
    print(f"{'model':28} {'test R²':>16} {'test RMSE':>16} {'corr. teacher':>14}")
    for model, metrics in result["models"].items():
        if model == "per_seed":
            continue
        r2, rmse, agreement = metrics["r2"], metrics["rmse"], metrics["agreement"]
        print(
            f"{model:28} {r2['mean']:>9.4f} ± {r2['std']:.4f} {rmse['mean']:>9.3f} ± {rmse['std']:.3f}"
            f" {agreement['mean']:>14.4f}"
        )
    print(f"{'deployed (seed 0)':28} {'R²':>8} {'size':>10} {'p50 ms @1':>10} {'rows/s @256':>12}")
    for model, metrics in result["deploy"].items():
        print(
            f"{model:28} {metrics['r2']:>8.4f} {metrics['size_bytes']:>10,} {metrics['latency_ms']:>10.3f}"
            f" {metrics['throughput_rows_s']:>12,.0f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="friedman1 with 3000 rows, 2 seeds, 40 epochs")
    parser.add_argument("--dataset", choices=["diabetes", "friedman1", "both"], default="both")
    parser.add_argument("--transfer", action="store_true", help="friedman1: also train with teacher-labelled rows")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        plan = [("friedman1", 3000, [0, 1], 40, True)]
    else:
        names = ["diabetes", "friedman1"] if args.dataset == "both" else [args.dataset]
        plan = [(name, 20000, [0, 1, 2], kdistill.defaults.EPOCHS, args.transfer) for name in names]
    started = time.perf_counter()
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    results = []
    for step in plan:  # each data set's table as soon as it is measured
        results.append(_bench(*step))
        _print(results[-1])
        sys.stdout.flush()
    parts = []
    for result in results:
        models = result["models"]
        student, baseline = models["student"]["r2"]["mean"], models["baseline"]["r2"]["mean"]
        line = f"{result['dataset']}: R² student {student:.3f} vs baseline {baseline:.3f}"
        if "student_plus_teacher_rows" in models:
            line += f", +teacher rows {models['student_plus_teacher_rows']['r2']['mean']:.3f}"
        deploy = result["deploy"]
        line += (
            f", teacher {models['teacher']['r2']['mean']:.3f}; INT8 {deploy['student_int8']['size_bytes']:,} B vs "
            f"teacher {deploy['teacher']['size_bytes']:,} B"
        )
        parts.append(line)
    print("\nsummary: " + "; ".join(parts))
    machine = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "load_before": load_before,
        "load_after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "wall_time_s": round(time.perf_counter() - started, 1),
        "quick": args.quick,
    }
    print(json.dumps({"benchmark": "regression", "machine": machine, "results": results}))


if __name__ == "__main__":
    main()
