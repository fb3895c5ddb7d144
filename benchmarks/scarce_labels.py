"""When labels are scarce: does a transfer set that the teacher labels close the gap? (issue 15)

    python benchmarks/scarce_labels.py --quick     # 10% labels, 3 seeds, a 10k pool at the end
    python benchmarks/scarce_labels.py             # 5/10/25% labels, 3 seeds, the defaults' 100 epochs, a 50k pool

For each data set (scikit-learn's digits; MNIST-1D, ``load_mnist1d``: 3,600 training rows), labelled fraction and
seed: a stratified ``fraction`` of the training rows keeps its labels, the rest is unlabeled. The teacher is trained
on the labelled rows only (digits: RandomForest(200); MNIST-1D: the demo's CNN (64, 64, 64)). The student (digits:
``"mlp"`` at the demo's T=2 and gentle optimizer; MNIST-1D: an MLP 40-100-100-10 with the defaults) is trained

- ``ce``: on the labelled rows alone, cross-entropy only (the run's no-teacher baseline);
- ``kd``: by KD on the labelled rows;
- ``kd+unlabeled``: by KD on the labelled rows plus the unlabeled rest of the training rows (the teacher labels them);
- ``kd+<generator>``: by KD on the labelled rows plus a pool of generated rows (MUNGE, mixup, jitter, per-class
  Gaussian; fitted on the labelled rows only), labelled once by the teacher.

Every run early-stops on the data set's validation split (labelled, as in the other benchmarks) and is scored on its
test split. Mean ± std over the seeds. On digits the teacher is barely above the ``ce`` student, so the measure there
is the share of that gap closed: ``(student - ce) / (teacher - ce)``. Last, the full MNIST-1D training set (teacher
trained on all of it) plus a pool of unlabeled rows drawn from the ``mnist1d`` generator (another seed).

Runs are spread over ``--workers`` processes, one torch thread each: the two full-MNIST-1D runs (the pool, and the
labels alone) and the 10% runs first, each group's longest first, so that the issue's three numbers come first and
the workers end close together. ``--log runs.jsonl`` appends each run as it ends; ``--summarise runs.jsonl`` prints
the summary of such a file without training (what a run cut short had finished). Prints one summary line, then ONE
JSON object as the last line (keys ``mnist1d_10pct_gain``, ``digits_10pct_gap_closed``, ``mnist1d_pool_acc`` among
them), with the load average at the start and the end.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import time
from typing import Any

import numpy as np
import torch

GENERATORS = ("munge", "mixup", "jitter", "class_gaussian")
KINDS = ("ce", "kd", "kd+unlabeled", *(f"kd+{name}" for name in GENERATORS))
GENERATOR_PARAMS: dict[str, dict[str, dict[str, Any]]] = {
    "digits": {"munge": {"p": 0.5, "s": 10.0}, "mixup": {"alpha": 1.0}, "jitter": {"noise": 0.2}},
    "mnist1d": {"munge": {"p": 0.5, "s": 10.0}, "mixup": {"alpha": 1.0}, "jitter": {"noise": 0.2, "shift": 3}},
}

_STATE: dict[str, Any] = {}


def _labelled_part(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A stratified ``fraction`` of the row positions (at least one row per class)."""
    rng = np.random.default_rng(seed)
    picked = []
    for label in np.unique(y):
        rows = np.flatnonzero(y == label)
        count = max(1, round(fraction * len(rows)))
        picked.append(rng.choice(rows, size=count, replace=False))
    return np.sort(np.concatenate(picked))


def _datasets() -> dict[str, Any]:
    from kdistill.datasets import load_dataset

    return {"digits": load_dataset("digits", 0), "mnist1d": load_dataset("mnist1d", 0)}


def _teacher(name: str, dataset: Any, train: tuple[np.ndarray, np.ndarray], seed: int) -> Any:
    from kdistill.datasets import Dataset
    from kdistill.demo import builtin_teacher

    return builtin_teacher(Dataset(name, train, dataset.val, dataset.test), seed=seed)


def _student(name: str, x: np.ndarray, seed: int) -> tuple[Any, dict[str, Any]]:
    from kdistill.data import as_split
    from kdistill.demo import DIGITS_OPTIMIZER
    from kdistill.students import MLP

    if name == "digits":
        return "mlp", {"temperature": 2.0, **DIGITS_OPTIMIZER}
    torch.manual_seed(seed)
    module = MLP((40,), 10, hidden=(100, 100))
    module.standardize.fit(as_split((x, np.zeros(len(x), dtype=np.int64))).x)
    return module, {}


def run_job(job: tuple[str, float, int, str]) -> dict[str, Any]:
    """One student: data set, labelled fraction, seed, kind."""
    import kdistill
    from kdistill.transfer import GENERATORS as REGISTRY
    from kdistill.transfer import Transfer

    name, fraction, seed, kind = job
    torch.set_num_threads(1)
    dataset, settings = _STATE["datasets"][name], _STATE["settings"]
    x, y = dataset.train
    labelled = _labelled_part(y, fraction, seed)
    rest = np.setdiff1d(np.arange(len(y)), labelled)
    teacher = _STATE["teachers"][(name, fraction, seed)]
    student, extra = _student(name, x[labelled], seed)
    transfer_kwargs: dict[str, Any] = {}
    if kind == "kd+unlabeled":
        transfer_kwargs["unlabeled"] = x[rest]
    elif kind.startswith("kd+"):
        generator = kind[3:]
        rows = settings["pool_factor"] * len(labelled)
        built = REGISTRY.build(generator, **GENERATOR_PARAMS[name].get(generator, {}))
        transfer_kwargs["transfer"] = Transfer(built, rows=rows)
    started = time.perf_counter()
    result = kdistill.distill(
        teacher,
        student,
        (x[labelled], y[labelled]),
        val=dataset.val,
        test=dataset.test,
        seed=seed,
        epochs=settings["epochs"],
        baseline=kind == "kd",
        profile=False,
        verbose=False,
        settings={"report": {"privacy": False}},
        **transfer_kwargs,
        **extra,
    )
    seconds = time.perf_counter() - started
    assert result.report is not None
    models = result.report.models
    out = {
        "dataset": name,
        "fraction": fraction,
        "seed": seed,
        "kind": kind,
        "accuracy": models["student"]["accuracy"],
        "teacher_accuracy": models["teacher"]["accuracy"],
        "labelled_rows": len(labelled),
        "epochs": len(result.history),
        "seconds": seconds,
        "transfer_seconds": result.report.settings.get("transfer_seconds", {}),
        "transfer_rows": result.report.settings.get("transfer_rows", {}),
    }
    if kind == "kd":
        out["baseline_accuracy"] = models["baseline"]["accuracy"]
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per data set and fraction: each kind's test accuracy (mean, std in points), the teacher's, the gain over
    ``ce``, the share of the teacher-``ce`` gap closed, and the time per run."""
    table: dict[str, Any] = {}
    for name in sorted({r["dataset"] for r in results}):
        for fraction in sorted({r["fraction"] for r in results if r["dataset"] == name}):
            rows = [r for r in results if r["dataset"] == name and r["fraction"] == fraction]
            kd_rows = [r for r in rows if r["kind"] == "kd"]
            if not kd_rows:  # a partial log (--summarise) without this group's kd runs: no ce, no table row
                continue
            by_kind = {"ce": [100 * r["baseline_accuracy"] for r in kd_rows]}
            seconds = {"ce": None}
            for kind in KINDS[1:]:
                runs = [r for r in rows if r["kind"] == kind]
                if runs:
                    by_kind[kind] = [100 * r["accuracy"] for r in runs]
                    seconds[kind] = statistics.fmean(r["seconds"] for r in runs)
            teacher = [100 * r["teacher_accuracy"] for r in kd_rows]
            ce_mean = statistics.fmean(by_kind["ce"])
            teacher_mean = statistics.fmean(teacher)
            gap = teacher_mean - ce_mean
            entry: dict[str, Any] = {
                "labelled_rows": kd_rows[0]["labelled_rows"],
                "seeds": len(kd_rows),
                "teacher": _mean_std(teacher),
                "kinds": {},
            }
            for kind, values in by_kind.items():
                mean, std = _mean_std(values)
                entry["kinds"][kind] = {
                    "accuracy": mean,
                    "std": std,
                    "gain_over_ce": mean - ce_mean,
                    "gap_closed": (mean - ce_mean) / gap if gap > 0 else None,
                    "seconds_per_run": seconds.get(kind),
                    "transfer_seconds": _transfer_seconds(rows, kind),
                }
            table[f"{name}@{fraction:g}"] = entry
    return table


def _transfer_seconds(rows: list[dict[str, Any]], kind: str) -> dict[str, float]:
    runs = [r["transfer_seconds"] for r in rows if r["kind"] == kind and r["transfer_seconds"]]
    if not runs:
        return {}
    return {key: statistics.fmean(run[key] for run in runs) for key in runs[0]}


def _pool_data(pool_rows: int) -> dict[str, Any]:
    """The full MNIST-1D training set's teacher and ``pool_rows`` unlabeled rows from the mnist1d generator (its
    other seed), built before the workers fork."""
    from mnist1d.data import get_dataset_args, make_dataset

    from kdistill.demo import builtin_teacher

    started = time.perf_counter()
    teacher = builtin_teacher(_STATE["datasets"]["mnist1d"], seed=0)
    teacher_s = time.perf_counter() - started
    args = get_dataset_args()
    args.num_samples = int(pool_rows / 0.8) + 1  # the generator keeps 80% as its own train split
    args.seed = 1000  # the benchmark's data sets use 42 + seed
    started = time.perf_counter()
    generated = make_dataset(args)
    pool = np.concatenate([generated["x"], generated["x_test"]]).astype(np.float32)[:pool_rows]
    return {"teacher": teacher, "pool": pool, "generate_s": time.perf_counter() - started, "teacher_s": teacher_s}


def pool_job(label: str) -> dict[str, Any]:
    """One student on the full MNIST-1D training set: ``labels_only`` (KD, and the CE-only baseline) or
    ``with_pool`` (KD plus the pool as unlabeled rows)."""
    import kdistill

    torch.set_num_threads(1)
    dataset, data = _STATE["datasets"]["mnist1d"], _STATE["pool"]
    x, _ = dataset.train
    student, _ = _student("mnist1d", x, 0)
    extra = {"unlabeled": data["pool"]} if label == "with_pool" else {}
    started = time.perf_counter()
    result = kdistill.distill(
        data["teacher"],
        student,
        dataset.train,
        val=dataset.val,
        test=dataset.test,
        seed=0,
        epochs=_STATE["settings"]["epochs"],
        baseline=label == "labels_only",
        profile=False,
        verbose=False,
        settings={"report": {"privacy": False}},
        **extra,
    )
    assert result.report is not None
    models = result.report.models
    out = {
        "job": label,
        "student": models["student"]["accuracy"],
        "teacher": models["teacher"]["accuracy"],
        "seconds": time.perf_counter() - started,
        "epochs": len(result.history),
        "transfer_rows": result.report.settings.get("transfer_rows", {}),
    }
    if "baseline" in models:
        out["ce"] = models["baseline"]["accuracy"]
    out["generate_s"], out["pool_teacher_s"] = data["generate_s"], data["teacher_s"]
    return out


def _logged(result: dict[str, Any], path: str | None) -> dict[str, Any]:
    if path is not None:
        with open(path, "a") as log:
            log.write(json.dumps(result, default=float) + "\n")
    return result


def _any_job(job: tuple[Any, ...]) -> dict[str, Any]:
    return pool_job(job[1]) if job[0] == "pool" else run_job(job)


def _job_rows(job: tuple[Any, ...]) -> float:
    """A job's training rows (student and baseline), to start the longest first."""
    if job[0] == "pool":
        return float(_STATE["settings"]["pool_rows"] if job[1] == "with_pool" else 0)
    name, fraction, _, kind = job
    rows = len(_STATE["datasets"][name].train[1])
    labelled = fraction * rows
    extra = {"kd": labelled, "kd+unlabeled": rows}.get(kind, (1 + _STATE["settings"]["pool_factor"]) * labelled)
    return extra * (100 if name == "mnist1d" else 10)  # MNIST-1D steps cost ~10x digits' (teacher-free, wider)


def _best(entry: dict[str, Any], key: str) -> tuple[str, float | None]:
    transfer = {kind: values[key] for kind, values in entry["kinds"].items() if kind.startswith("kd+")}
    transfer = {kind: value for kind, value in transfer.items() if value is not None}
    if not transfer:
        return "none", None
    kind = max(transfer, key=lambda k: transfer[k])
    return kind, transfer[kind]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10%% labels only, a 10k pool")
    parser.add_argument("--fractions", type=float, nargs="+", default=None)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=100, help="the defaults' 100")
    parser.add_argument("--pool-factor", type=int, default=10, help="generated rows per labelled row")
    parser.add_argument("--pool-rows", type=int, default=None, help="the final MNIST-1D pool (50k; 10k --quick)")
    parser.add_argument("--datasets", nargs="+", default=["digits", "mnist1d"])
    parser.add_argument("--kinds", nargs="+", default=list(KINDS[1:]), help="kd is always run (it gives ce)")
    parser.add_argument("--no-pool", action="store_true", help="skip the full MNIST-1D + pool run")
    parser.add_argument("--pool-only", action="store_true", help="only the full MNIST-1D + pool run")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--log", default=None, help="append each finished run to this JSONL file as it ends")
    parser.add_argument(
        "--summarise", default=None, help="no training: the summary of the runs in this JSONL file (--log's)"
    )
    args = parser.parse_args(argv)
    fractions = args.fractions or ([0.10] if args.quick else [0.05, 0.10, 0.25])
    epochs = args.epochs
    pool_rows = args.pool_rows or (10_000 if args.quick else 50_000)
    kinds = ["kd", *[kind for kind in args.kinds if kind != "kd"]]
    started = time.perf_counter()
    load_start = os.getloadavg()

    _STATE["datasets"] = _datasets()
    _STATE["settings"] = {"epochs": epochs, "pool_factor": args.pool_factor, "pool_rows": pool_rows}
    _STATE["teachers"] = {}
    teacher_started = time.perf_counter()
    for name in [] if args.pool_only or args.summarise else args.datasets:
        x, y = _STATE["datasets"][name].train
        for fraction in fractions:
            for seed in range(args.seeds):
                part = _labelled_part(y, fraction, seed)
                _STATE["teachers"][(name, fraction, seed)] = _teacher(
                    name, _STATE["datasets"][name], (x[part], y[part]), seed
                )
    teacher_s = time.perf_counter() - teacher_started
    with_pool = not args.no_pool and "mnist1d" in args.datasets
    if with_pool and not args.summarise:
        _STATE["pool"] = _pool_data(pool_rows)
    jobs: list[tuple[Any, ...]] = [("pool", "with_pool"), ("pool", "labels_only")] if with_pool else []
    jobs += [
        (name, fraction, seed, kind)
        for name in ([] if args.pool_only else args.datasets)
        for fraction in fractions
        for seed in range(args.seeds)
        for kind in kinds
    ]
    # the pool and the 10% runs first (the three numbers), each group's longest first
    jobs.sort(key=lambda job: (job[0] != "pool" and job[1] != 0.10, -_job_rows(job)))
    if args.summarise:
        with open(args.summarise) as lines:
            done = [json.loads(line) for line in lines if line.strip()]
    elif args.workers > 1 and jobs:
        with multiprocessing.get_context("fork").Pool(args.workers) as pool:
            done = [_logged(result, args.log) for result in pool.imap_unordered(_any_job, jobs, chunksize=1)]
    else:
        done = [_logged(_any_job(job), args.log) for job in jobs]
    results = [r for r in done if "job" not in r]
    table = summarise(results) if results else {}
    pool_result = None
    pooled = {r["job"]: r for r in done if "job" in r}
    if "with_pool" in pooled and "labels_only" in pooled:
        pool_result = {
            "pool_rows": pooled["with_pool"]["transfer_rows"]["unlabeled"]["rows"],
            "generate_s": pooled["with_pool"]["generate_s"],
            "teacher_s": pooled["with_pool"]["pool_teacher_s"],
            "teacher": pooled["labels_only"]["teacher"],
            "ce": pooled["labels_only"]["ce"],
            "labels_only": pooled["labels_only"],
            "with_pool": pooled["with_pool"],
        }

    summary: dict[str, Any] = {
        "benchmark": "scarce_labels",
        "quick": args.quick,
        "fractions": fractions,
        "seeds": args.seeds,
        "epochs": epochs,
        "pool_factor": args.pool_factor,
        "table": table,
        "pool": pool_result,
        "teachers_s": teacher_s,
        "wall_s": time.perf_counter() - started,
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__},
    }
    mnist = table.get("mnist1d@0.1")
    digits = table.get("digits@0.1")
    summary["mnist1d_10pct_best"], summary["mnist1d_10pct_gain"] = _best(mnist, "gain_over_ce") if mnist else ("", None)
    summary["digits_10pct_best"], summary["digits_10pct_gap_closed"] = (
        _best(digits, "gap_closed") if digits else ("", None)
    )
    summary["mnist1d_pool_acc"] = None if pool_result is None else 100 * pool_result["with_pool"]["student"]
    gain, closed, pooled = (summary[k] for k in ("mnist1d_10pct_gain", "digits_10pct_gap_closed", "mnist1d_pool_acc"))
    print(
        f"scarce_labels: MNIST-1D 10% labels best transfer ({summary['mnist1d_10pct_best']}) "
        f"{'n/a' if gain is None else f'{gain:+.1f}'} points over CE-only (target >= +12); digits 10% "
        f"({summary['digits_10pct_best']}) {'n/a' if closed is None else f'{100 * closed:.0f}%'} of the gap closed "
        f"(target >= 75%); full MNIST-1D + pool MLP {'n/a' if pooled is None else f'{pooled:.1f}%'} (target >= 94%); "
        f"{summary['wall_s']:.0f} s"
    )
    print(json.dumps(summary, default=float))
    return summary


if __name__ == "__main__":
    main()
