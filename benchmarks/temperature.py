"""Temperature x soft_weight x soft-target source for a probability teacher (RandomForest(200) on digits).

A forest's outputs are vote fractions; kdistill takes their log as logits, so temperature T turns votes p into
p^(1/T) renormalised. This sweep measures which T suits such a teacher; it is why the digits demo uses T = 2.
Mean test accuracy of the distilled MLP over 3 seeds, and the no-teacher baseline, with the demo's optimizer
(``kdistill.demo.DIGITS_OPTIMIZER``).

    python benchmarks/temperature.py         # ~2 minutes on a 2-core CPU box
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

from kdistill import distill
from kdistill.datasets import load_digits
from kdistill.demo import DIGITS_OPTIMIZER, builtin_teacher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    started = time.perf_counter()
    accuracy: dict[str, list[float]] = {}
    for seed in range(args.seeds):
        data = load_digits(seed)
        teacher = builtin_teacher(data, seed)
        grid = itertools.product([1.0, 2.0, 4.0], [0.3, 0.5, 0.9], ["predict", "oof"])
        for index, (temperature, soft_weight, soft_targets) in enumerate(grid):
            result = distill(
                teacher,
                "mlp",
                data.train,
                val=data.val,
                test=data.test,
                seed=seed,
                temperature=temperature,
                soft_weight=soft_weight,
                soft_targets=soft_targets,
                baseline=index == 0,
                profile=False,
                verbose=False,
                **DIGITS_OPTIMIZER,
            )
            assert result.report is not None
            key = f"T={temperature:g} w={soft_weight:g} {soft_targets}"
            accuracy.setdefault(key, []).append(result.report.models["student"]["accuracy"])
            if index == 0:
                accuracy.setdefault("teacher", []).append(result.report.models["teacher"]["accuracy"])
                accuracy.setdefault("baseline (no teacher)", []).append(result.report.models["baseline"]["accuracy"])
    means = {key: round(statistics.mean(values), 4) for key, values in accuracy.items()}
    best = max((k for k in means if k.startswith("T=")), key=means.__getitem__)
    for key, value in means.items():
        print(f"{key:<24} {value:.4f}")
    print(
        f"best: {best} {means[best]:.4f}; baseline {means['baseline (no teacher)']:.4f}; teacher {means['teacher']:.4f}"
    )
    print(
        json.dumps(
            {
                "benchmark": "temperature",
                "dataset": "digits",
                "seeds": args.seeds,
                "mean_accuracy": means,
                "best": best,
                "wall_time_s": round(time.perf_counter() - started, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
