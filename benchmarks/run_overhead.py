"""What checkpoints and the NaN check cost next to one epoch of training: a digits MLP (the digits example's student)
is trained for a few epochs (median epoch time), then its full checkpoint (weights, AdamW state, RNGs, history) is
saved and loaded repeatedly (median times, file size), and a mid-epoch one (``Checkpointer(every_steps=N)``: also the
epoch's step losses and the generator's state at the epoch's start); and the per-epoch non-finite check is timed
against a per-step one.

    python benchmarks/run_overhead.py            # ~30 s on a 2-core CPU box

Prints one summary line, then ONE JSON object as its last line. Medians over ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kdistill.data import as_split
from kdistill.datasets import load_digits
from kdistill.engine import TrainConfig, TrainState, TransferSet, fit
from kdistill.engine.checkpoint import load_checkpoint, save_checkpoint
from kdistill.losses import get_loss
from kdistill.students import build_student


def _train(epochs: int) -> tuple[float, TrainState]:
    data = load_digits(0)
    train = as_split(data.train)
    val = as_split(data.val)
    assert val.y is not None
    torch.manual_seed(0)
    student, _ = build_student("mlp", train.x, 10, hidden=[128, 64])
    config = TrainConfig(epochs=epochs, batch_size=64, seed=0, verbose=False)
    started = time.perf_counter()
    state = fit(student, get_loss("ce"), TransferSet(train.x, train.y, None), val=(val.x, val.y), config=config)
    return (time.perf_counter() - started) / epochs, state


def _finite_checks(steps: int, repeats: int) -> tuple[float, float]:
    """Seconds per epoch of checking ``steps`` step losses: one check on the sum vs one ``bool()`` per step."""
    losses = [torch.rand(()) for _ in range(steps)]
    per_epoch, per_step = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        total = losses[0]
        for loss in losses[1:]:
            total = total + loss
        bool(torch.isfinite(total))
        per_epoch.append(time.perf_counter() - started)
        started = time.perf_counter()
        for loss in losses:
            bool(torch.isfinite(loss))
        per_step.append(time.perf_counter() - started)
    return statistics.median(per_epoch), statistics.median(per_step)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    epochs = [_train(args.epochs)[0] for _ in range(args.repeats)]
    _, state = _train(args.epochs)
    saves, loads, mid_saves = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "checkpoint.safetensors"
        for _ in range(args.repeats * 4):
            started = time.perf_counter()
            save_checkpoint(path, state, mid_epoch=True)
            mid_saves.append(time.perf_counter() - started)
            started = time.perf_counter()
            save_checkpoint(path, state)
            saves.append(time.perf_counter() - started)
            started = time.perf_counter()
            load_checkpoint(path)
            loads.append(time.perf_counter() - started)
        size = path.stat().st_size
    steps = 17  # digits: 1,077 rows in batches of 64
    sum_check, step_checks = _finite_checks(steps, 200)
    epoch_s, save_s, load_s = statistics.median(epochs), statistics.median(saves), statistics.median(loads)
    result = {
        "machine": f"2-core {platform.machine()} CPU box (torch threads: {torch.get_num_threads()})",
        "student": "digits MLP (128, 64), AdamW, 17 steps/epoch",
        "epoch_s": round(epoch_s, 4),
        "checkpoint_save_s": round(save_s, 4),
        "checkpoint_load_s": round(load_s, 4),
        "checkpoint_save_over_epoch": round(save_s / epoch_s, 3),
        "mid_epoch_checkpoint_save_s": round(statistics.median(mid_saves), 4),
        "checkpoint_bytes": size,
        "finite_check_per_epoch_s": round(sum_check, 7),
        "finite_check_per_step_s": round(step_checks, 7),
        "finite_check_over_epoch": round(sum_check / epoch_s, 6),
        "repeats": args.repeats,
        "epochs": args.epochs,
    }
    print(
        f"epoch {epoch_s * 1e3:.1f} ms; checkpoint save {save_s * 1e3:.1f} ms "
        f"({result['checkpoint_save_over_epoch']:.1%} of an epoch, fsync included; mid-epoch "
        f"{result['mid_epoch_checkpoint_save_s'] * 1e3:.1f} ms), load {load_s * 1e3:.1f} ms, "
        f"{size / 1024:.0f} KiB; NaN check {sum_check * 1e6:.0f} us/epoch (a bool() per step: "
        f"{step_checks * 1e6:.0f} us/epoch)"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
