"""For every diagnosis rule, one case where it fires and following its advice improves the result (3 seeds).

Each case runs ``distill`` as a user would (the "before" run), checks which rules the report fired, then runs it
again with the advice applied (the "after" run) and compares the metric the advice is about: test accuracy, ECE
(lower is better) or the student's parameter count at the same accuracy. Small data (digits, breast cancer, wine,
digits subsets) so the whole benchmark runs in minutes; the table goes to docs/report.md.

    nice -n 10 python benchmarks/diagnosis.py            # all cases, 3 seeds
    nice -n 10 python benchmarks/diagnosis.py --cases soft_term_flat --seeds 1

Prints one line per case and, last, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.datasets import load_wine
from sklearn.ensemble import ExtraTreesClassifier, RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from kdistill import distill
from kdistill.datasets import Dataset, load_digits
from kdistill.diagnose import gaussian_noise

Run = Callable[[int], tuple[Any, Any]]  # seed -> (before result, after result)


@dataclass(frozen=True)
class Case:
    rule: str
    description: str
    advice: str
    metric: str  # "accuracy", "ece" (lower is better) or "parameters" (lower, at equal accuracy)
    run: Run


def _split(name: str, x: np.ndarray, y: np.ndarray, seed: int, train_rows: int | None = None) -> Dataset:
    x = StandardScaler().fit_transform(x).astype(np.float32)
    x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)
    x_train, x_val, y_train, y_val = train_test_split(x_rest, y_rest, test_size=0.2, random_state=seed, stratify=y_rest)
    if train_rows is not None:
        x_train, y_train = x_train[:train_rows], y_train[:train_rows]
    return Dataset(name, (x_train, y_train), (x_val, y_val), (x_test, y_test))


def _distill(teacher: Any, data: Dataset, seed: int, **overrides: Any) -> Any:
    """A run as a user makes it; the "after" runs (``baseline=False``) skip the baseline, which they do not need."""
    arguments: dict[str, Any] = {"val": data.val, "test": data.test, "seed": seed, "profile": False, "verbose": False}
    return distill(teacher, overrides.pop("student", "mlp"), data.train, **(arguments | overrides))


def _hot(seed: int) -> tuple[Any, Any]:
    data = load_digits(seed)
    teacher = RandomForestClassifier(200, random_state=seed).fit(*data.train)
    return _distill(teacher, data, seed, temperature=4.0), _distill(
        teacher, data, seed, temperature=1.0, baseline=False
    )


def _memorised(seed: int) -> tuple[Any, Any]:
    full = load_digits(seed)
    generator = np.random.default_rng(seed)
    labels = full.train[1].copy()
    flipped = generator.random(len(labels)) < 0.25  # a quarter of the training labels replaced by random ones
    labels[flipped] = generator.integers(0, 10, int(flipped.sum()))
    data = Dataset("digits-noisy", (full.train[0], labels), full.val, full.test)
    teacher = ExtraTreesClassifier(300, random_state=seed).fit(*data.train)  # fully grown, no bootstrap: one-hot
    before = _distill(teacher, data, seed, temperature=1.0)
    return before, _distill(teacher, data, seed, temperature=1.0, soft_targets="oof", baseline=False)


def _agreement(seed: int) -> tuple[Any, Any]:
    full = load_digits(seed)
    teacher = LogisticRegression(max_iter=2000).fit(*full.train)
    data = Dataset("digits-100", (full.train[0][:100], full.train[1][:100]), full.val, full.test)
    before = _distill(teacher, data, seed, temperature=1.0)
    return before, _distill(teacher, data, seed, temperature=1.0, augment=gaussian_noise(0.1), baseline=False)


def _capacity(seed: int) -> tuple[Any, Any]:
    data = load_digits(seed)
    teacher = RandomForestClassifier(500, random_state=seed).fit(*data.train)
    before = _distill(teacher, data, seed, temperature=2.0, hidden=[4])
    assistant = _distill(teacher, data, seed, temperature=2.0, hidden=[32], baseline=False).student
    return before, _distill(assistant, data, seed, temperature=2.0, hidden=[4], baseline=False)


def _matches(seed: int) -> tuple[Any, Any]:
    x, y = load_wine(return_X_y=True)
    data = _split("wine", x, y, seed)
    teacher = LogisticRegression(max_iter=2000).fit(*data.train)
    before = _distill(teacher, data, seed, temperature=1.0)
    smaller = [max(1, width // 2) for width in before.spec["hidden"]]
    return before, _distill(teacher, data, seed, temperature=1.0, hidden=smaller, baseline=False)


def _flat(seed: int) -> tuple[Any, Any]:
    data = load_digits(seed)
    teacher = LogisticRegression(max_iter=2000).fit(*data.train)
    return _distill(teacher, data, seed, temperature=1.0, lr=3.0), _distill(
        teacher, data, seed, temperature=1.0, lr=0.3, baseline=False
    )


def _calibration(seed: int) -> tuple[Any, Any]:
    data = load_digits(seed)
    teacher = RandomForestClassifier(100, max_depth=4, random_state=seed).fit(*data.train)  # shallow: under-confident
    before = _distill(teacher, data, seed, temperature=1.0)
    return before, _distill(teacher, data, seed, temperature=1.0, soft_weight=0.1)


CASES = {
    case.rule: case
    for case in (
        Case("probability_teacher_hot", "digits, RandomForest(200) -> MLP at T=4", "temperature=1", "accuracy", _hot),
        Case("memorised_teacher", "digits, 25% noisy labels, ExtraTrees(300) (one-hot on its rows)",
             'soft_targets="oof"', "accuracy",
             _memorised),
        Case("agreement_gap", "digits, 100 training rows, LogisticRegression teacher", "augment=gaussian_noise(0.1)",
             "accuracy", _agreement),
        Case("capacity_gap", "digits, RandomForest(500) -> MLP hidden=[4], T=2", "assistant MLP hidden=[32]",
             "accuracy", _capacity),
        Case("student_matches_teacher", "wine, LogisticRegression -> default MLP", "hidden=[w // 2]",
             "parameters", _matches),
        Case("soft_term_flat", "digits, LogisticRegression -> MLP at lr=3", "lr=0.3", "accuracy", _flat),
        Case("calibration_worse", "digits, RandomForest(100, max_depth=4) (under-confident) -> MLP",
             "soft_weight=0.1", "ece", _calibration),
    )
}  # fmt: skip


def _score(result: Any, metric: str) -> float:
    return float(result.report.models["student"][metric])


def _improved(metric: str, row: dict[str, Any]) -> bool:
    """Better on the case's metric; fewer parameters counts only at the same accuracy (within half a point)."""
    if metric == "parameters":
        return row["after"] < row["before"] and row["accuracy_after"] >= row["accuracy_before"] - 0.005
    return row["after"] < row["before"] if metric == "ece" else row["after"] > row["before"]


def _fired(result: Any) -> list[str]:
    return [item["rule"] for item in result.report.advice]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    started = time.perf_counter()
    results: dict[str, Any] = {}
    for rule in args.cases:
        case = CASES[rule]
        rows: list[dict[str, Any]] = []
        for seed in range(args.seeds):
            before, after = case.run(seed)
            row = {
                "seed": seed,
                "fired_before": rule in _fired(before),
                "fired_after": rule in _fired(after),
                "before": _score(before, case.metric),
                "after": _score(after, case.metric),
                "accuracy_before": _score(before, "accuracy"),
                "accuracy_after": _score(after, "accuracy"),
            }
            rows.append(row)
        before_mean = statistics.mean(row["before"] for row in rows)
        after_mean = statistics.mean(row["after"] for row in rows)
        improved = [_improved(case.metric, row) for row in rows]
        summary = {
            "description": case.description,
            "advice": case.advice,
            "metric": case.metric,
            "fired_before": sum(row["fired_before"] for row in rows),
            "fired_after": sum(row["fired_after"] for row in rows),
            "before_mean": round(before_mean, 4),
            "after_mean": round(after_mean, 4),
            "accuracy_before_mean": round(statistics.mean(r["accuracy_before"] for r in rows), 4),
            "accuracy_after_mean": round(statistics.mean(r["accuracy_after"] for r in rows), 4),
            "improved_seeds": sum(improved),
            "seeds": rows,
        }
        results[rule] = summary
        print(
            f"{rule:<24} fired {summary['fired_before']}/{len(rows)} (after: {summary['fired_after']}); "
            f"{case.metric} {before_mean:.4f} -> {after_mean:.4f} with {case.advice}; improved on "
            f"{sum(improved)}/{len(rows)} seeds; accuracy {summary['accuracy_before_mean']:.4f} -> "
            f"{summary['accuracy_after_mean']:.4f}",
            flush=True,
        )
    wall = round(time.perf_counter() - started, 1)
    print(f"diagnosis: {len(results)} rules x {args.seeds} seeds in {wall} s (measured under load)")
    print(json.dumps({"benchmark": "diagnosis", "seeds": args.seeds, "wall_s": wall, "cases": results}))


if __name__ == "__main__":
    main()
