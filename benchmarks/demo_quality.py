"""The digits demo over 5 seeds: RandomForest(200) teacher, distilled MLP, and the MLP without a teacher.

The demo's recipe (``kdistill.demo.demo_recipe``: T=2 and a gentler optimizer than ``kdistill.defaults``);
``--library-defaults`` keeps T=2 but trains with ``kdistill.defaults`` instead, to show why the demo does not.

Reports mean ± std of test accuracy for teacher, student and baseline, the student's retention, and the teacher /
student ratios of size on disk and of p50 latency at batch 1 (1 thread). Each seed draws a new split, forest and
student init. Runs twice per seed: soft targets from the forest's own training rows ("predict") and out-of-fold
("oof", 5 folds), to measure whether out-of-fold targets help a teacher that memorised its training rows.

    python benchmarks/demo_quality.py                      # ~1 minute on a 2-core CPU box
    python benchmarks/demo_quality.py --library-defaults
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

from kdistill import distill
from kdistill.datasets import load_digits
from kdistill.demo import DIGITS_OPTIMIZER, demo_recipe


def _summary(values: list[float]) -> dict[str, float]:
    return {"mean": round(statistics.mean(values), 4), "std": round(statistics.stdev(values), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--library-defaults", action="store_true", help="train with kdistill.defaults")
    args = parser.parse_args()
    started = time.perf_counter()
    rows: dict[str, dict[str, list[float]]] = {}
    for seed in range(args.seeds):
        data = load_digits(seed)
        teacher, student, settings = demo_recipe(data, seed)
        if args.library_defaults:
            settings = {key: value for key, value in settings.items() if key not in DIGITS_OPTIMIZER}
        for soft_targets in ("predict", "oof"):
            result = distill(
                teacher,
                student,
                data.train,
                val=data.val,
                test=data.test,
                seed=seed,
                soft_targets=soft_targets,
                verbose=False,
                **settings,
            )
            assert result.report is not None
            models = result.report.models
            row = rows.setdefault(soft_targets, {})
            for key, value in {
                "teacher_accuracy": models["teacher"]["accuracy"],
                "student_accuracy": models["student"]["accuracy"],
                "baseline_accuracy": models["baseline"]["accuracy"],
                "retention": models["student"]["retention"],
                "agreement": models["student"]["agreement"],
                "size_ratio": models["teacher"]["size_bytes"] / models["student"]["size_bytes"],
                "latency_ratio": models["teacher"]["latency_ms"] / models["student"]["latency_ms"],
            }.items():
                row.setdefault(key, []).append(value)
    summary = {name: {key: _summary(values) for key, values in row.items()} for name, row in rows.items()}
    result_json = {
        "benchmark": "demo_quality",
        "dataset": "digits",
        "seeds": args.seeds,
        "teacher": "RandomForestClassifier(n_estimators=200)",
        "student": "mlp (64-128-64-10)",
        "results": summary,
        "wall_time_s": round(time.perf_counter() - started, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }
    for name, row in summary.items():
        print(
            f"[{name}] teacher {row['teacher_accuracy']['mean']:.4f} ± {row['teacher_accuracy']['std']:.4f} | "
            f"student {row['student_accuracy']['mean']:.4f} ± {row['student_accuracy']['std']:.4f} | "
            f"baseline {row['baseline_accuracy']['mean']:.4f} ± {row['baseline_accuracy']['std']:.4f} | "
            f"retention {row['retention']['mean']:.1%} | {row['size_ratio']['mean']:.0f}x smaller, "
            f"{row['latency_ratio']['mean']:.0f}x faster at batch 1"
        )
    print(json.dumps(result_json))


if __name__ == "__main__":
    main()
