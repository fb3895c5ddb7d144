"""What the teacher-output cache buys: epoch time of CE-only, KD with a live teacher, and KD from the cache.

Setup (as issue 4 asks): MNIST-1D (the ``mnist1d`` package, generated offline, 3,600 training rows) replicated 11x
to 39,600 rows; batch 128; a CNN teacher with (320, 320, 320) channels (~7.7M multiply-adds per row, >= 20x the larger
student); two MLP students, 40-100-100-10 (~15k MACs) and 40-512-512-10 (~288k MACs). A hand-written loop (index
in-memory tensors, AdamW), one torch thread (what the engine picks for students this small). Each configuration runs
``--repeats`` epochs (``--live-repeats`` for the slow live-teacher one) after one warm-up round, the configurations
taking turns every 16 steps (in an order that rotates every turn) so that all see the same load on a shared machine
and none always follows the live teacher; the median epoch is reported, and the per-round (c)/(a) ratios:

(a) CE only; (b) KD, the teacher run live on every batch (``kdistill.kd_loss``); (c) KD from the cache (fp32 entry,
memory-mapped), as the engine does it (``StaticTargets``): the ``kd`` loss packs its targets once beside the cached
logits (``KDLoss.precompute``) and each batch gathers its rows of that table once; and (c, textbook) the same from
the cache with the textbook loss (each batch's cached logits given to ``kd_loss``), to show what packing saves.

Then what content-keyed chunks buy when rows are added: the teacher fills a set of 33,000 distinct rows (the 39,600
made distinct by a 1e-3 jitter, 5/6 of them), then the whole 39,600 (20% more, shuffled in), against a fresh fill of
the 39,600: seconds and rows the teacher ran on; and what keying by content costs: the row fingerprints of 39,600 rows.

Then the accuracy effect of each storage (fp32, fp16, top-k): ``kdistill.distill`` on the original 3,600 rows with
each ``cache_storage``, ``--seeds`` seeds, mean and sd of the test accuracy; and bytes per row of each storage, for
these 10 classes and for a synthetic 1,000-class teacher.

Run: ``python benchmarks/cache.py`` (about 11 minutes on the shared 2-core CPU box). Prints one summary line, then
one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import kdistill
from kdistill.cache import cached_teacher_outputs, row_fingerprints
from kdistill.datasets import load_mnist1d
from kdistill.engine import TrainConfig, TransferSet, fit
from kdistill.losses import KDLoss, StaticTargets, get_loss, kd_loss
from kdistill.students import CNN
from kdistill.teachers import Outputs, TorchTeacher

TEMPERATURE, SOFT_WEIGHT, BATCH = 4.0, 0.5, 128


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-adds of one row through the Linear and Conv layers (the rest is negligible here)."""
    total = 0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Linear):
            total += module.in_features * module.out_features
        elif isinstance(module, (nn.Conv1d, nn.Conv2d)):
            per_output = (module.in_channels // module.groups) * int(np.prod(module.kernel_size))
            total += per_output * int(output[0].numel())

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d))]
    with torch.no_grad():
        model.eval()(example[:1])
    for handle in handles:
        handle.remove()
    return total


def mlp(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(40, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def train_teacher(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray], epochs: int) -> CNN:
    x, y = torch.as_tensor(train[0]), torch.as_tensor(train[1])
    torch.manual_seed(0)
    teacher = CNN((40,), 10, channels=(320, 320, 320))
    teacher.standardize.fit(x)
    config = TrainConfig(epochs=epochs, batch_size=128, lr=1e-2, weight_decay=5e-2, verbose=False, num_threads=2)
    fit(teacher, get_loss("ce"), TransferSet(x, y, None), config=config)
    return teacher.eval()


def interleaved_epoch(
    students: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    x: torch.Tensor,
    order: torch.Tensor,
    step_losses: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]],
    block: int = 16,
) -> dict[str, float]:
    """Seconds each configuration spends on one epoch of the hand-written loop (``step_loss(student_logits,
    index)``), run in turns of ``block`` steps so that all of them see the same load on a shared machine, in an
    order that rotates every turn."""
    spent = dict.fromkeys(step_losses, 0.0)
    starts = list(range(0, len(order), BATCH))
    names = list(step_losses)
    for turn, first in enumerate(range(0, len(starts), block)):
        # the order rotates every turn: a configuration that always ran right after the live teacher would always
        # start on caches the teacher's large activations had just evicted
        for name in names[turn % len(names) :] + names[: turn % len(names)]:
            step_loss = step_losses[name]
            student, optimizer = students[name], optimizers[name]
            started = time.perf_counter()
            for start in starts[first : first + block]:
                index = order[start : start + BATCH]
                loss = step_loss(student(x[index]), index)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            spent[name] += time.perf_counter() - started
    return spent


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def epoch_times(
    x: torch.Tensor, y: torch.Tensor, teacher: nn.Module, cached: torch.Tensor, repeats: int, live_repeats: int
) -> dict[str, dict[str, float]]:
    kd = KDLoss(TEMPERATURE, SOFT_WEIGHT)

    def live(student_logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            teacher_logits = teacher(x[index])
        return kd_loss(student_logits, teacher_logits, y[index], temperature=TEMPERATURE, soft_weight=SOFT_WEIGHT)[
            "loss"
        ]

    packed = StaticTargets.build(kd, cached, y)  # what the engine does once when the teacher's outputs never change
    plain = StaticTargets(cached)
    assert packed.packed and not plain.packed

    def from_cache(student_logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return kd(Outputs(student_logits), packed.select(index), y[index])["loss"]

    def from_cache_textbook(student_logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return kd(Outputs(student_logits), plain.select(index), y[index])["loss"]

    losses: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
        "a_ce": lambda s, index: F.cross_entropy(s, y[index]),
        "b_kd_live": live,
        "c_kd_cache": from_cache,
        "c_kd_cache_textbook": from_cache_textbook,
    }
    results: dict[str, dict[str, float]] = {}
    for hidden in (100, 512):
        times: dict[str, list[float]] = {name: [] for name in losses}
        students, optimizers = {}, {}
        for name in losses:
            torch.manual_seed(0)
            students[name] = mlp(hidden)
            optimizers[name] = torch.optim.AdamW(students[name].parameters(), lr=1e-3)
        generator = torch.Generator().manual_seed(0)
        for round_number in range(repeats + 1):  # the first round warms up and is dropped
            order = torch.randperm(len(x), generator=generator)
            # the live teacher's epochs are long and their ratio large: fewer repeats suffice
            chosen = {n: f for n, f in losses.items() if n != "b_kd_live" or round_number <= live_repeats}
            for name, seconds in interleaved_epoch(students, optimizers, x, order, chosen).items():
                times[name].append(seconds)
            log(f"mlp_{hidden} round {round_number}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()))
        median = {name: statistics.median(values[1:]) for name, values in times.items()}
        base = median["a_ce"]
        paired = [c / a for c, a in zip(times["c_kd_cache"][1:], times["a_ce"][1:], strict=True)]
        results[f"mlp_{hidden}"] = {
            **{f"{name}_s": round(value, 4) for name, value in median.items()},
            "b_over_a": round(median["b_kd_live"] / base, 3),
            "c_over_a": round(median["c_kd_cache"] / base, 3),
            "c_textbook_over_a": round(median["c_kd_cache_textbook"] / base, 3),
            "b_over_c": round(median["b_kd_live"] / median["c_kd_cache"], 3),
            "c_over_a_per_round": [round(r, 3) for r in paired],
        }
    return results


def storage_effect(
    teacher: TorchTeacher, data: kdistill.datasets.Dataset, cache_dir: Path, epochs: int, seeds: int
) -> dict[str, dict[str, float]]:
    """Test accuracy of the tiny student distilled from each storage (and trained on labels only), over seeds."""
    accuracy: dict[str, list[float]] = {}
    for seed in range(seeds):
        for storage in ("fp32", "fp16", "topk:1", "topk:3"):
            result = kdistill.distill(
                teacher,
                mlp(100),
                data.train,
                val=data.val,
                test=data.test,
                epochs=epochs,
                patience=None,
                batch_size=BATCH,
                temperature=TEMPERATURE,
                soft_weight=SOFT_WEIGHT,
                cache_dir=cache_dir,
                cache_storage=storage,
                baseline=storage == "fp32",
                profile=False,
                verbose=False,
                seed=seed,
            )
            assert result.report is not None
            models = result.report.models
            accuracy.setdefault(storage, []).append(models["student"]["accuracy"])
            if storage == "fp32":
                accuracy.setdefault("ce_only", []).append(models["baseline"]["accuracy"])
                accuracy.setdefault("teacher", []).append(models["teacher"]["accuracy"])
        log(f"storage accuracy, seed {seed}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in accuracy.items()))
    return {
        name: {"test_accuracy_mean": round(float(np.mean(v)), 4), "test_accuracy_sd": round(float(np.std(v)), 4)}
        for name, v in accuracy.items()
    }


class CountingTeacher(TorchTeacher):
    """The same teacher (same fingerprint), counting the rows it runs on."""

    rows = 0

    def __call__(self, x: torch.Tensor, *, features: tuple[str, ...] | list[str] = ()) -> Outputs:
        self.rows += len(x)
        return super().__call__(x, features=features)


def growth(teacher_module: nn.Module, x: torch.Tensor, cache_dir: Path) -> dict[str, float]:
    """Fill 5/6 of a set of distinct rows, then the whole set shuffled (20% more rows), against a fresh fill."""
    generator = torch.Generator().manual_seed(0)
    distinct = x + 1e-3 * torch.randn(x.shape, generator=generator)
    base = distinct[: len(distinct) * 5 // 6]
    superset = distinct[torch.randperm(len(distinct), generator=generator)]
    result: dict[str, float] = {"base_rows": len(base), "superset_rows": len(superset)}
    for name, rows, folder in (("base", base, "grow"), ("superset", superset, "grow"), ("fresh", superset, "fresh")):
        teacher = CountingTeacher(teacher_module)
        started = time.perf_counter()
        cached_teacher_outputs(teacher, rows, cache_dir=cache_dir / folder)
        result[f"{name}_fill_s"] = round(time.perf_counter() - started, 3)
        result[f"{name}_teacher_rows"] = teacher.rows
        log(f"growth: {name} fill {result[f'{name}_fill_s']:.1f}s, teacher on {teacher.rows} rows")
    started = time.perf_counter()
    row_fingerprints(superset)
    result["row_fingerprints_s"] = round(time.perf_counter() - started, 3)
    result["superset_over_fresh"] = round(result["superset_fill_s"] / result["fresh_fill_s"], 3)
    return result


def bytes_per_row(teacher: TorchTeacher, x: torch.Tensor, cache_dir: Path) -> dict[str, dict[str, float]]:
    """Stored array bytes per row, whole-entry bytes per row (headers and manifest included), and the chunk store's."""

    def measure(t: TorchTeacher, rows: torch.Tensor, storages: tuple[str, ...]) -> dict[str, float]:
        sizes = {}
        for storage in storages:
            entry = cached_teacher_outputs(t, rows, cache_dir=cache_dir, storage=storage)
            folder_bytes = sum(f.stat().st_size for f in entry.folder.iterdir())
            sizes[storage] = round(entry.nbytes() / entry.rows, 2)
            sizes[f"{storage}_on_disk"] = round(folder_bytes / entry.rows, 2)
            store = cache_dir / "chunks" / entry.key.store()  # the chunks later sets reuse: a second copy on disk
            sizes[f"{storage}_chunks_on_disk"] = round(sum(f.stat().st_size for f in store.iterdir()) / entry.rows, 2)
        return sizes

    torch.manual_seed(0)
    wide = TorchTeacher(nn.Linear(40, 1000))
    wide_rows = torch.randn(2000, 40)
    return {
        "mnist1d_10_classes": measure(teacher, x, ("fp32", "fp16", "topk:1", "topk:3")),
        "synthetic_1000_classes": measure(wide, wide_rows, ("fp32", "fp16", "topk:10")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed epochs per configuration (median reported)")
    parser.add_argument("--replicate", type=int, default=11, help="copies of the 3,600 training rows")
    parser.add_argument("--live-repeats", type=int, default=3, help="timed epochs of (b), the live teacher")
    parser.add_argument("--teacher-epochs", type=int, default=5)
    parser.add_argument("--student-epochs", type=int, default=40, help="epochs of each storage-accuracy run")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of each storage-accuracy run")
    args = parser.parse_args()
    started = time.perf_counter()
    data = load_mnist1d(seed=0)
    teacher_module = train_teacher(data.train, data.val, args.teacher_epochs)
    log(f"teacher trained in {time.perf_counter() - started:.1f}s")
    teacher = TorchTeacher(teacher_module)
    x = torch.as_tensor(np.tile(data.train[0], (args.replicate, 1)))
    y = torch.as_tensor(np.tile(data.train[1], args.replicate))
    example = x[:1]
    macs = {
        "teacher": count_macs(teacher_module, example),
        "mlp_100": count_macs(mlp(100), example),
        "mlp_512": count_macs(mlp(512), example),
    }
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = Path(tmp)
        fill_started = time.perf_counter()
        filling = CountingTeacher(teacher_module)  # the 11 copies are the same rows: each is computed once
        entry = cached_teacher_outputs(filling, x, cache_dir=cache_dir, storage="fp32")
        fill_s = time.perf_counter() - fill_started
        reopen_started = time.perf_counter()
        entry = cached_teacher_outputs(teacher, x, cache_dir=cache_dir, storage="fp32")
        reopen_s = time.perf_counter() - reopen_started
        cached = entry.teacher_targets()
        log(f"cache filled in {fill_s:.1f}s, reopened and verified in {reopen_s:.2f}s")
        timing = epoch_times(x, y, teacher_module, cached, args.repeats, args.live_repeats)
        grown = growth(teacher_module, x, cache_dir)
        storage = storage_effect(teacher, data, cache_dir, args.student_epochs, args.seeds)
        sizes = bytes_per_row(teacher, torch.as_tensor(data.train[0]), cache_dir)
    result = {
        "benchmark": "cache",
        "machine": f"{platform.machine()} {torch.get_num_threads()} torch thread(s), {platform.processor() or 'cpu'}",
        "rows": len(x),
        "batch_size": BATCH,
        "repeats": args.repeats,
        "live_repeats": args.live_repeats,
        "macs_per_row": macs,
        "teacher_over_students_macs": {
            "mlp_100": round(macs["teacher"] / macs["mlp_100"], 1),
            "mlp_512": round(macs["teacher"] / macs["mlp_512"], 1),
        },
        "cache_fill_s": round(fill_s, 3),
        "cache_fill_teacher_rows": filling.rows,
        "cache_reopen_verified_s": round(reopen_s, 3),
        "epoch_times": timing,
        "growth": grown,
        "storage_accuracy": storage,
        "bytes_per_row": sizes,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    tiny, large = timing["mlp_100"], timing["mlp_512"]
    print(
        f"cache: (c)/(a) = {tiny['c_over_a']} tiny, {large['c_over_a']} larger "
        f"(textbook loss {tiny['c_textbook_over_a']}, {large['c_textbook_over_a']}); (b)/(a) = {tiny['b_over_a']}, "
        f"{large['b_over_a']}; (b)/(c) = {tiny['b_over_c']}, {large['b_over_c']}; bytes/row fp32/fp16/topk:3 = "
        f"{sizes['mnist1d_10_classes']['fp32']}/{sizes['mnist1d_10_classes']['fp16']}/"
        f"{sizes['mnist1d_10_classes']['topk:3']}; 20% more rows: teacher on {grown['superset_teacher_rows']} rows, "
        f"{grown['superset_over_fresh']}x a fresh fill's time"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
