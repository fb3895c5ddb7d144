"""The image methods (AT, FitNets, CRD) where they were designed to work: CIFAR-style residual networks on 32x32
images, with no download. Written to docs/images.md (``--out``); docs/methods.md quotes it.

    python benchmarks/images.py                                   # the published table (3 seeds)
    python benchmarks/images.py --seeds 1 --epochs 1 --teacher-epochs 1 --out /tmp/images.md   # a smoke run

Data ("shifted digits"): scikit-learn's 8x8 digits, each upscaled to a random size between 16 and 24 pixels and
pasted at a random place on a 32x32 canvas with Gaussian noise (σ = 0.25 on [0, 1] intensities), generated from a
fixed seed: a translation-heavy image task where where-to-look matters. The digits' rows are split 60 / 15 / 25 %
(stratified) into train / val / test before placement.

Teacher: a CIFAR ResNet (3x3 stem, three stages of two basic blocks, widths 16-32-64 at 32/16/8 pixels, ~0.17 M
parameters), trained on labels with the same engine. Student: a ResNet with one block per stage and widths 8-16-32
(~20 k parameters). AT reads the outputs of the three stages (``layer1..3``) as in the paper; FitNets hints
the middle stage (``layer2``) through a 1x1-conv projector, as in the paper's middle-layer hint; CRD reads the pooled
penultimate features (``pool``). Every run uses AdamW with ``TRAIN``'s settings, the best validation epoch kept.
Runs are spread over ``--workers`` processes, one torch thread each.

Prints one summary line, then ONE JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

CANVAS, NOISE = 32, 0.25
TRAIN: dict[str, Any] = {"lr": 3e-3, "weight_decay": 5e-4, "batch_size": 64, "patience": None}
TEACHER_WIDTHS = (16, 32, 64)
STUDENT_WIDTHS = (8, 16, 32)
ROWS: list[tuple[str, Any, dict[str, Any]]] = [
    ("ce (no teacher)", "ce", {}),
    ("kd", "kd", {}),
    ("at", "at", {"student_layers": ["layer1", "layer2", "layer3"], "teacher_layers": ["layer1", "layer2", "layer3"]}),
    ("fitnet", "fitnet", {"student_layers": "layer2", "teacher_layers": "layer2"}),
    ("crd", "crd", {"student_layer": "pool", "teacher_layer": "pool"}),
]


class _Block(nn.Module):
    """A basic residual block: two 3x3 convolutions with batch norm, a 1x1 projection when the shape changes."""

    def __init__(self, width_in: int, width: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width_in, width, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or width_in != width:
            self.shortcut = nn.Sequential(
                nn.Conv2d(width_in, width, 1, stride=stride, bias=False), nn.BatchNorm2d(width)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """``stem (3x3) -> layer1 (32 px) -> layer2 (16 px) -> layer3 (8 px) -> pool -> fc``, as He et al.'s CIFAR
    ResNets; ``blocks`` per stage. Rows may come flat (batch, 1024) or as (batch, 1, 32, 32)."""

    def __init__(self, widths: Sequence[int], blocks: int, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        stages: list[nn.Module] = []
        width_in = widths[0]
        for position, width in enumerate(widths):
            stride = 1 if position == 0 else 2
            stages.append(
                nn.Sequential(
                    *(_Block(width_in if b == 0 else width, width, stride if b == 0 else 1) for b in range(blocks))
                )
            )
            width_in = width
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(width_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], 1, CANVAS, CANVAS)
        return self.fc(self.pool(self.layer3(self.layer2(self.layer1(self.stem(x))))))


def shifted_digits(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The generated task: {"train", "val", "test"} -> (x (rows, 1024) float32 in about [0, 1], y (rows,) int64)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    images = torch.as_tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    index = np.arange(len(y))
    rest, test = train_test_split(index, test_size=0.25, random_state=seed, stratify=y)
    train, val = train_test_split(rest, test_size=0.2, random_state=seed, stratify=y[rest])
    rng = np.random.default_rng(seed)

    def place(rows: np.ndarray, copies: int) -> tuple[np.ndarray, np.ndarray]:
        canvases, labels = [], []
        for _ in range(copies):
            for row in rows:
                size = int(rng.integers(16, 25))
                digit = F.interpolate(images[row : row + 1], size=(size, size), mode="bilinear", align_corners=False)
                top, left = (int(v) for v in rng.integers(0, CANVAS - size + 1, size=2))
                canvas = torch.zeros(1, 1, CANVAS, CANVAS)
                canvas[:, :, top : top + size, left : left + size] = digit
                canvas += NOISE * torch.as_tensor(rng.normal(size=(1, 1, CANVAS, CANVAS)), dtype=torch.float32)
                canvases.append(canvas.reshape(-1).numpy())
                labels.append(y[row])
        return np.stack(canvases).astype(np.float32), np.asarray(labels, dtype=np.int64)

    return {"train": place(train, 1), "val": place(val, 1), "test": place(test, 1)}


_STATE: dict[str, Any] = {}


def _accuracy(module: nn.Module, split: tuple[np.ndarray, np.ndarray]) -> float:
    x, y = (torch.as_tensor(a) for a in split)
    with torch.no_grad():
        return float((module.eval()(x).argmax(1) == y).float().mean())


def _init(teacher_path: str | None, epochs: int) -> None:
    torch.set_num_threads(1)
    _STATE.update(data=shifted_digits(0), epochs=epochs)
    if teacher_path is not None:
        from safetensors.torch import load_file

        teacher = CifarResNet(TEACHER_WIDTHS, 2)
        teacher.load_state_dict(load_file(teacher_path))
        _STATE["teacher"] = teacher.eval()


def train_teacher(path: str, epochs: int, seed: int = 0) -> tuple[float, float, int]:
    """Train (or load) the teacher; returns (test accuracy, seconds, parameters)."""
    from safetensors.torch import load_file, save_file

    from kdistill.engine import TrainConfig, TransferSet, fit
    from kdistill.losses import get_loss

    started = time.perf_counter()
    torch.manual_seed(seed)
    teacher = CifarResNet(TEACHER_WIDTHS, 2)
    data = _STATE["data"]
    if Path(path).exists():
        teacher.load_state_dict(load_file(path))
    else:
        x, y = (torch.as_tensor(a) for a in data["train"])
        settings = {key: TRAIN[key] for key in ("lr", "weight_decay", "batch_size")}
        config = TrainConfig(epochs=epochs, seed=seed, verbose=False, **settings)
        fit(
            teacher,
            get_loss("ce"),
            TransferSet(x, y, None),
            val=tuple(torch.as_tensor(a) for a in data["val"]),
            config=config,
        )
        save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, path)
    parameters = sum(p.numel() for p in teacher.parameters())
    return _accuracy(teacher, data["test"]), time.perf_counter() - started, parameters


def run_job(job: tuple[str, Any, dict[str, Any], int]) -> dict[str, Any]:
    import kdistill

    label, method, params, seed = job
    torch.set_num_threads(1)
    data = _STATE["data"]
    torch.manual_seed(seed)
    student = CifarResNet(STUDENT_WIDTHS, 1)
    started = time.perf_counter()
    kdistill.distill(
        _STATE["teacher"],
        student,
        data["train"],
        val=data["val"],
        method=method,
        method_params=params or None,
        epochs=_STATE["epochs"],
        seed=seed,
        baseline=False,
        report=False,
        profile=False,
        verbose=False,
        **TRAIN,
    )
    return {
        "label": label,
        "seed": seed,
        "accuracy": _accuracy(student, data["test"]),
        "seconds": time.perf_counter() - started,
    }


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def render(results: list[dict[str, Any]], teacher: dict[str, Any], meta: dict[str, Any]) -> str:
    student_parameters = sum(p.numel() for p in CifarResNet(STUDENT_WIDTHS, 1).parameters())
    rows = meta["rows"]
    lines = [
        "# Image methods on a generated 32x32 task",
        "",
        "Written by `benchmarks/images.py`; do not edit by hand. Command:",
        "",
        f"    {meta['command']}",
        "",
        f"Run time: {meta['wall_s'] / 60:.1f} min on {meta['machine']} ({meta['workers']} worker processes, one torch "
        f"thread each; 1-minute load average {meta['load_average']:.1f} at the end: measured under load). "
        f"{meta['seeds']} seeds per row; mean ± std (population) of test accuracy, in %.",
        "",
        f"Data: shifted digits (scikit-learn's digits upscaled to 16-24 px at a random place on a 32x32 canvas, noise "
        f"σ = {NOISE}), {rows['train']} train / {rows['val']} val (keeps the best epoch) / {rows['test']} test images. "
        f"Teacher: CIFAR ResNet, two basic blocks per stage, widths {TEACHER_WIDTHS}, {teacher['parameters']:,} "
        f"parameters, {teacher['epochs']} epochs: {teacher['accuracy'] * 100:.1f}% test accuracy. Student: one block "
        f"per stage, widths {STUDENT_WIDTHS}, {student_parameters:,} parameters, {meta['epochs']} epochs. AdamW lr "
        f"{TRAIN['lr']}, weight decay {TRAIN['weight_decay']}, batch {TRAIN['batch_size']}, no early stopping. AT "
        "reads the three stages, FitNets the middle one (1x1-conv projector), CRD the pooled features; method "
        "hyper-parameters are the registry defaults unless the row says otherwise.",
        "",
        "| method | test accuracy (%) | Δ vs CE | s / run |",
        "|---|---|---|---|",
        f"| teacher (ResNet {TEACHER_WIDTHS}) | {teacher['accuracy'] * 100:.1f} | | |",
    ]
    labels = list(dict.fromkeys(r["label"] for r in results))
    ce = statistics.fmean(r["accuracy"] for r in results if r["label"] == "ce (no teacher)") * 100
    for label in labels:
        runs = [r for r in results if r["label"] == label]
        mean, std = _mean_std([r["accuracy"] * 100 for r in runs])
        delta = "" if label == "ce (no teacher)" else f"{mean - ce:+.1f}"
        seconds = statistics.fmean(r["seconds"] for r in runs)
        lines.append(f"| {label} | {mean:.1f} ± {std:.1f} | {delta} | {seconds:.0f} |")
    lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--teacher-epochs", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="docs/images.md")
    parser.add_argument("--teacher-dir", default=".kdistill-cache/benchmark-teachers")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    Path(args.teacher_dir).mkdir(parents=True, exist_ok=True)
    teacher_path = os.path.join(args.teacher_dir, f"images-teacher-{args.teacher_epochs}.safetensors")
    _init(None, args.epochs)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    accuracy, seconds, parameters = train_teacher(teacher_path, args.teacher_epochs)
    print(f"teacher: {accuracy:.4f} ({seconds:.0f} s, {parameters} parameters)", file=sys.stderr, flush=True)
    jobs = [(label, method, params, seed) for seed in range(args.seeds) for label, method, params in ROWS]
    results: list[dict[str, Any]] = []
    context = multiprocessing.get_context("spawn")
    with context.Pool(args.workers, initializer=_init, initargs=(teacher_path, args.epochs)) as pool:
        for done, result in enumerate(pool.imap_unordered(run_job, jobs), start=1):
            results.append(result)
            print(
                f"[{done}/{len(jobs)}] {result['label']} seed {result['seed']}: {result['accuracy']:.4f} "
                f"({result['seconds']:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
    order = {label: i for i, (label, _, _) in enumerate(ROWS)}
    results.sort(key=lambda r: (order[r["label"]], r["seed"]))
    wall = time.perf_counter() - started
    data = _STATE["data"]
    meta = {
        "command": " ".join(["python benchmarks/images.py", *(argv if argv is not None else sys.argv[1:])]),
        "wall_s": wall,
        "machine": f"a {os.cpu_count()}-core CPU box ({platform.machine()}, torch {torch.__version__})",
        "workers": args.workers,
        "load_average": os.getloadavg()[0],
        "seeds": args.seeds,
        "epochs": args.epochs,
        "rows": {split: len(data[split][1]) for split in ("train", "val", "test")},
    }
    teacher = {"accuracy": accuracy, "parameters": parameters, "epochs": args.teacher_epochs}
    from kdistill.io import atomic_write_bytes

    atomic_write_bytes(args.out, (render(results, teacher, meta) + "\n").encode())
    summary: dict[str, Any] = {"teacher": teacher, **meta}
    for label in dict.fromkeys(r["label"] for r in results):
        summary[label] = _mean_std([r["accuracy"] for r in results if r["label"] == label])
    ce = summary.get("ce (no teacher)", (float("nan"), 0.0))[0]
    best = max((v[0], k) for k, v in summary.items() if isinstance(v, tuple))
    print(
        f"images: {len(results)} runs in {wall / 60:.1f} min; ce {ce:.4f}, best {best[1]} {best[0]:.4f}; "
        f"wrote {args.out}"
    )
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
