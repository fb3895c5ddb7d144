"""How small can the student be? The searched student (``distill(teacher, "auto", budget=...)``) against the best of
a hand-made grid of the same cost and against today's default student, on MNIST-1D and digits; docs/search.md.

    python benchmarks/search.py --size quick    # two budgets per data set, small grid and search
    python benchmarks/search.py --size medium   # three budgets (1x, 1/4x, 1/16x), the quick grid plus width 8
    python benchmarks/search.py                 # the full sizes: three budgets, the whole hand grid

For each data set: the demo's teacher and default student (digits: RandomForest(200) -> "mlp" sized from the data,
T=2 and the gentle optimizer; MNIST-1D: CNN(64, 64, 64) -> CNN(16, 16, 16), today's defaults), trained fully. Its
parameter count sets the budgets (1x, 1/4x and, full size, 1/16x). Per budget:

- hand grid: every candidate of a fixed list (MLPs [w] and [w, w/2]; on MNIST-1D also CNNs [c]*2 and [c]*3) inside
  the budget, crossed with temperature x soft weight, each a short KD run of the search's length; the best on
  validation is trained fully. Its compute: the epochs of every short run.
- search: ``max_epochs`` = a third of the grid's epochs (its compute budget), the run's own settings (the demo's T,
  lr), the short-run length left to the search (chosen from the compute budget), median pruning, warm start; the
  chosen student is trained fully. Its compute: the epochs its short runs spent (a run that starts under the limit
  finishes, so it may end a little above it).

Accuracies are on the test rows after full training. Prints one summary line, then ONE JSON object as the last line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time
from typing import Any

import torch

import kdistill
from kdistill import defaults
from kdistill.profile import count_parameters

_SIZES = ("quick", "medium", "full")


def _data(name: str, quick: bool) -> tuple[Any, Any, str, dict[str, Any]]:
    """(dataset, teacher, default student name, the demo's distill settings for it)."""
    from kdistill.datasets import load_dataset, load_mnist1d
    from kdistill.demo import builtin_teacher, demo_recipe

    if name == "mnist1d":
        data = load_mnist1d(0, num_samples=2500 if quick else 5000)
        teacher, student, settings = builtin_teacher(data, 0), "cnn", {"student_params": {"channels": (16, 16, 16)}}
        return data, teacher, student, settings
    data = load_dataset(name, 0)
    teacher, student, settings = demo_recipe(data, 0)
    return data, teacher, student, settings


def _grid_archs(name: str, size: str) -> list[tuple[str, dict[str, Any]]]:
    quick = size != "full"
    widths = {"quick": (16, 32, 64, 128), "medium": (8, 16, 32, 64, 128)}.get(size, (8, 16, 32, 64, 128, 256))
    archs: list[tuple[str, dict[str, Any]]] = [("mlp", {"hidden": [w]}) for w in widths]
    archs += [("mlp", {"hidden": [w, w // 2]}) for w in widths]
    if name == "mnist1d":
        channels = (4, 8, 16) if quick else (4, 8, 16, 32)
        archs += [("cnn", {"channels": [c] * depth}) for c in channels for depth in (2, 3)]
    return archs


def _params(family: str, params: dict[str, Any], in_shape: tuple[int, ...]) -> int:
    from kdistill.students import STUDENTS

    return count_parameters(STUDENTS.get(family).factory(list(in_shape), 10, **params))


def _run(teacher: Any, family: str, data: Any, common: dict[str, Any], **kwargs: Any) -> Any:
    given = common | kwargs  # the call's own settings (a short run's epochs) win over the case's
    return kdistill.distill(
        teacher, family, data.train, val=data.val, test=data.test, verbose=False, profile=False, **given
    )


def _grid(
    teacher: Any, data: Any, points: list[tuple[str, dict[str, Any], float, float]], common: dict[str, Any], short: int
) -> dict[str, Any]:
    started, results = time.perf_counter(), []
    for family, params, temperature, soft_weight in points:
        result = _run(
            teacher,
            family,
            data,
            common,
            student_params=params,
            temperature=temperature,
            soft_weight=soft_weight,
            epochs=short,
            patience=max(2, short // 3),
            baseline=False,
            report=False,
        )
        accuracy = max(epoch["val_accuracy"] for epoch in result.history)
        results.append(
            (accuracy, -count_parameters(result.student), family, params, temperature, soft_weight, len(result.history))
        )
    best = max(results, key=lambda item: item[:2])
    full = _run(
        teacher, best[2], data, common, student_params=best[3], temperature=best[4], soft_weight=best[5], baseline=False
    )
    return {
        "points": len(points),
        "epochs": sum(item[6] for item in results),
        "wall_s": round(time.perf_counter() - started, 1),
        "best": {
            "family": best[2],
            "params": best[3],
            "temperature": best[4],
            "soft_weight": best[5],
            "val_accuracy": best[0],
            "parameters": -best[1],
        },
        "test_accuracy": full.report.models["student"]["accuracy"],
    }


def _search(
    teacher: Any,
    data: Any,
    budget: int,
    max_epochs: int,
    common: dict[str, Any],
    own: dict[str, Any],
    short: int,
    families: list[str],
) -> dict[str, Any]:
    started = time.perf_counter()
    lr = common.get("lr", defaults.LR)
    result = _run(
        teacher,
        "auto",
        data,
        common,
        baseline=False,
        **own,  # the run's own kd settings (the demo's T): the warm start's first point
        budget={"max_params": budget, "threads": 1},
        search={
            "trials": 1000,
            "max_epochs": max_epochs,  # the short-run length is the search's own choice from this compute budget
            "patience": max(2, short // 3),
            "families": families,
            "lr": [lr / 10, lr * 3],
            "temperature": [1.0, 8.0],
            "soft_weight": [0.1, 0.95],
        },
    )
    found = result.report.search
    return {
        "max_epochs": max_epochs,
        "short_epochs": found["search"]["epochs"],
        "epochs": found["epochs_trained"],
        "wall_s": round(time.perf_counter() - started, 1),
        "chosen": {
            key: found["chosen"][key]
            for key in (
                "label",
                "parameters",
                "size_bytes",
                "latency_ms",
                "temperature",
                "soft_weight",
                "lr",
                "val_accuracy",
            )
        },
        "counts": found["counts"],
        "test_accuracy": result.report.models["student"]["accuracy"],
        "answer": found["answer"],
    }


def _case(name: str, size: str) -> dict[str, Any]:
    quick = size != "full"
    data, teacher, default_student, settings = _data(name, quick)
    common = {key: value for key, value in settings.items() if key in ("lr", "weight_decay", "patience")}
    if quick:
        common["epochs"] = 60
    started = time.perf_counter()
    default = _run(
        teacher, default_student, data, common, baseline=False, **{k: v for k, v in settings.items() if k not in common}
    )
    default_params = count_parameters(default.student)
    case: dict[str, Any] = {
        "default": {
            "student": default_student,
            "parameters": default_params,
            "test_accuracy": default.report.models["student"]["accuracy"],
            "wall_s": round(time.perf_counter() - started, 1),
        },
        "teacher_accuracy": default.report.models["teacher"]["accuracy"],
        "budgets": [],
    }
    in_shape = tuple(int(size) for size in torch.as_tensor(data.train[0]).shape[1:])
    short = 15 if quick else 20
    knobs = list(itertools.product((2.0, 4.0), (0.5,) if quick else (0.5, 0.9)))
    families = ["mlp", "cnn"] if name == "mnist1d" else ["mlp"]
    own = {key: value for key, value in settings.items() if key in ("temperature", "soft_weight")}
    for divisor in (1, 4) if size == "quick" else (1, 4, 16):
        budget = default_params // divisor
        archs = [(f, p) for f, p in _grid_archs(name, size) if _params(f, p, in_shape) <= budget]
        points = [(f, p, t, w) for (f, p), (t, w) in itertools.product(archs, knobs)]
        grid = _grid(teacher, data, points, common, short)
        search = _search(teacher, data, budget, max(short, grid["epochs"] // 3), common, own, short, families)
        print(f"{name} budget {budget:,}: {search['answer']}", file=sys.stderr, flush=True)
        case["budgets"].append({"max_params": budget, "grid": grid, "search": search})
    return case


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--size",
        choices=_SIZES,
        default="full",
        help="quick: two budgets, a small grid; medium: "
        "three budgets, the quick grid plus width 8; full: the whole grid",
    )
    parser.add_argument("--quick", action="store_true", help="the same as --size quick")
    parser.add_argument("--datasets", nargs="+", default=["digits", "mnist1d"], choices=["digits", "mnist1d"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    size = "quick" if args.quick else args.size
    cases = {name: _case(name, size) for name in args.datasets}
    lines = []
    for name, case in cases.items():
        for entry in case["budgets"]:
            grid, search = entry["grid"], entry["search"]
            lines.append(
                f"{name} <= {entry['max_params']:,} params: search {search['test_accuracy']:.4f} "
                f"({search['chosen']['parameters']:,} params, {search['epochs']} epochs) vs grid best "
                f"{grid['test_accuracy']:.4f} ({grid['best']['parameters']:,} params, {grid['epochs']} epochs) vs "
                f"default {case['default']['test_accuracy']:.4f} ({case['default']['parameters']:,} params)"
            )
    print("; ".join(lines))
    summary = {
        "benchmark": "search",
        "size": size,
        "cases": cases,
        "wall_time_s": round(time.perf_counter() - started, 1),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__},
        "threads": 1,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
