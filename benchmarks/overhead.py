"""kdistill's training loop against a minimal hand-written PyTorch loop doing the same work.

Same student (MLP 40-100-100-10 on MNIST-1D, 3,600 rows), same precomputed teacher logits, same KD loss, AdamW with
the same warm-up + cosine schedule, batch 64, one thread. The two loops run interleaved, repeated, and the median
epoch time of each is compared; also the fastest epoch of each and the median CPU time of the training thread per
epoch, which load on a shared machine disturbs least. Target (issue 11):
kdistill / hand-written <= 1.0.

    python benchmarks/overhead.py            # ~1 minute on a 2-core CPU box
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time

import torch
from torch import nn

from kdistill import get_loss, kd_loss
from kdistill.datasets import load_mnist1d
from kdistill.engine import Callback, TrainConfig, TrainState, TransferSet, fit, num_threads
from kdistill.engine.loop import _lr_lambda


def _student() -> nn.Module:
    return nn.Sequential(nn.Linear(40, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10))


def hand_written(
    x: torch.Tensor, y: torch.Tensor, soft: torch.Tensor, epochs: int, batch: int
) -> tuple[list[float], list[float]]:
    """The loop a careful user writes by hand: index tensors, KD loss, AdamW + schedule. Wall and CPU seconds per
    epoch."""
    torch.manual_seed(0)
    model = _student()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    steps = math.ceil(len(x) / batch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(steps * epochs, 0.05))
    generator = torch.Generator().manual_seed(0)
    times, cpu = [], []
    for _ in range(epochs):
        started, started_cpu = time.perf_counter(), time.thread_time()
        model.train()
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch):
            index = order[start : start + batch]
            loss = kd_loss(model(x[index]), soft[index], y[index], temperature=4.0, soft_weight=0.5)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        times.append(time.perf_counter() - started)
        cpu.append(time.thread_time() - started_cpu)
    return times, cpu


class _CpuClock(Callback):
    """This thread's CPU seconds from one epoch's end to the next (one thread: the training runs in it)."""

    def on_train_begin(self, state: TrainState) -> None:
        self.seconds: list[float] = []
        self._last = time.thread_time()

    def on_epoch_end(self, state: TrainState) -> None:
        now = time.thread_time()
        self.seconds.append(now - self._last)
        self._last = now


def with_kdistill(
    x: torch.Tensor, y: torch.Tensor, soft: torch.Tensor, epochs: int, batch: int
) -> tuple[list[float], list[float]]:
    torch.manual_seed(0)
    model = _student()
    config = TrainConfig(epochs=epochs, batch_size=batch, lr=3e-3, weight_decay=1e-2, num_threads=1, verbose=False)
    clock = _CpuClock()
    state = fit(model, get_loss("kd"), TransferSet(x, y, soft), config=config, callbacks=[clock])
    return [row["time_s"] for row in state.history], clock.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    data = load_mnist1d(seed=0)
    x = torch.tensor(data.train[0])
    y = torch.tensor(data.train[1])
    torch.manual_seed(1)
    soft = nn.Linear(40, 10)(x).detach() * 3  # stands in for precomputed teacher logits: the loop never sees a model
    hand, ours, hand_cpu, ours_cpu = [], [], [], []
    with num_threads(1):
        for _ in range(args.repeats):  # interleaved, so drifts in machine load hit both alike
            wall, cpu = hand_written(x, y, soft, args.epochs, args.batch_size)
            hand, hand_cpu = hand + wall[1:], hand_cpu + cpu[1:]  # first epoch is warm-up
            wall, cpu = with_kdistill(x, y, soft, args.epochs, args.batch_size)
            ours, ours_cpu = ours + wall[1:], ours_cpu + cpu[1:]
    hand_ms, ours_ms = statistics.median(hand) * 1e3, statistics.median(ours) * 1e3
    # under load, noise only ever adds time: the fastest epochs are the steadiest estimate of each loop's own cost
    hand_min_ms, ours_min_ms = min(hand) * 1e3, min(ours) * 1e3
    result = {
        "benchmark": "overhead",
        "rows": len(x),
        "batch_size": args.batch_size,
        "epochs_timed": len(hand),
        "hand_written_epoch_ms_median": round(hand_ms, 2),
        "kdistill_epoch_ms_median": round(ours_ms, 2),
        "ratio": round(ours_ms / hand_ms, 3),
        "hand_written_epoch_ms_min": round(hand_min_ms, 2),
        "kdistill_epoch_ms_min": round(ours_min_ms, 2),
        "ratio_of_fastest": round(ours_min_ms / hand_min_ms, 3),
        "ratio_cpu_time": round(statistics.median(ours_cpu) / statistics.median(hand_cpu), 3),
        "target_ratio": 1.0,
        "threads": 1,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_count": __import__("os").cpu_count(),
        "torch": torch.__version__,
    }
    print(f"kdistill epoch {ours_ms:.1f} ms vs hand-written {hand_ms:.1f} ms: ratio {result['ratio']} (target <= 1.0)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
