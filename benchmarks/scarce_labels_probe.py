"""Why a larger pool did worse on MNIST-1D (issue 15): the hard term's weight and the weight decay, probed.

    python benchmarks/scarce_labels_probe.py            # 5 runs, 2 worker processes of one torch thread

The full MNIST-1D training set (3,600 labelled rows, ``load_mnist1d``), its CNN teacher (the demo's), and 50,000
unlabeled rows from the ``mnist1d`` generator (seed 1000), labelled once by the teacher. An MLP 40-100-100-10 student
is trained with the engine alone (``fit``, KD at T=4, soft weight 0.5, lr 3e-2, no early stopping) and scored on the
test split after a fixed number of epochs (5 epochs: 4,190 optimizer steps; 20: 16,760). Today's rule runs as users
get it (KD's packed form); the old one in the textbook form, with its hard term swapped in:

- ``labelled_mean``: the hard term averaged over the batch's labelled rows alone (kdistill before issue 15's fix);
- ``per_row``: summed over the labelled rows and divided by all the batch's rows (each row 1/B; today's rule);
- weight decay 0.1 as given, 0, or scaled by sqrt(labelled / rows) (today's default: 0.1 * sqrt(3600/53600)).

Prints one summary line, then ONE JSON object as the last line.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

RUNS: dict[str, dict[str, Any]] = {
    "labelled_mean, wd 0.1, 5 epochs": {"rule": "labelled_mean", "weight_decay": 0.1, "scale": False, "epochs": 5},
    "per_row, wd 0.1, 5 epochs": {"rule": "per_row", "weight_decay": 0.1, "scale": False, "epochs": 5},
    "per_row, wd 0.1, 20 epochs": {"rule": "per_row", "weight_decay": 0.1, "scale": False, "epochs": 20},
    "per_row, wd 0, 20 epochs": {"rule": "per_row", "weight_decay": 0.0, "scale": False, "epochs": 20},
    "per_row, wd scaled, 20 epochs": {"rule": "per_row", "weight_decay": 0.1, "scale": True, "epochs": 20},
}
_STATE: dict[str, Any] = {}


def _labelled_mean(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The old rule: the mean over the batch's labelled rows (0 without one)."""
    if not bool((target != -100).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, target)


def _data() -> dict[str, Any]:
    from mnist1d.data import get_dataset_args, make_dataset

    from kdistill.datasets import load_dataset
    from kdistill.demo import builtin_teacher
    from kdistill.engine.loop import predict_logits

    torch.set_num_threads(1)
    dataset = load_dataset("mnist1d", 0)
    teacher = builtin_teacher(dataset, seed=0)
    args = get_dataset_args()
    args.num_samples, args.seed = int(50_000 / 0.8) + 1, 1000
    generated = make_dataset(args)
    pool = np.concatenate([generated["x"], generated["x_test"]]).astype(np.float32)[:50_000]
    x = torch.as_tensor(np.concatenate([dataset.train[0], pool]))
    return {
        "dataset": dataset,
        "x": x,
        "logits": predict_logits(teacher, x),
        "y": torch.as_tensor(np.concatenate([dataset.train[1], np.zeros(len(pool), dtype=np.int64)])),
        "mask": torch.arange(len(x)) < len(dataset.train[1]),
    }


def run(name: str) -> dict[str, Any]:
    import kdistill.losses.kd as kd_module
    from kdistill.engine.loop import TrainConfig, TransferSet, fit, predict_logits
    from kdistill.losses.kd import KDLoss
    from kdistill.students import MLP

    class TextbookKD(KDLoss):  # the packed fast path follows today's rule; the old rule needs the textbook form
        def precompute(self, teacher_logits: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor | None:
            return None

    torch.set_num_threads(1)
    spec, data = RUNS[name], _STATE["data"]
    today = kd_module.labelled_cross_entropy
    if spec["rule"] == "labelled_mean":  # for this run only: the worker's next run gets today's rule back
        kd_module.labelled_cross_entropy = _labelled_mean  # type: ignore[assignment]
    torch.manual_seed(0)
    student = MLP((40,), 10, hidden=(100, 100))
    student.standardize.fit(torch.as_tensor(data["dataset"].train[0]))
    config = TrainConfig(
        epochs=spec["epochs"],
        weight_decay=spec["weight_decay"],
        scale_weight_decay=spec["scale"],
        patience=None,
        verbose=False,
    )
    started = time.perf_counter()
    try:
        state = fit(
            student,
            (TextbookKD if spec["rule"] == "labelled_mean" else KDLoss)(temperature=4.0, soft_weight=0.5),
            TransferSet(data["x"], data["y"], data["logits"], label_mask=data["mask"]),
            config=config,
        )
    finally:
        kd_module.labelled_cross_entropy = today
    x_test, y_test = data["dataset"].test
    accuracy = float((predict_logits(student, torch.as_tensor(x_test)).argmax(1).numpy() == y_test).mean())
    return {
        "run": name,
        "test_accuracy": accuracy,
        "steps": state.global_step,
        "weight_decay": state.optimizer.param_groups[0]["weight_decay"],
        "seconds": time.perf_counter() - started,
    }


def main() -> dict[str, Any]:
    started, load_start = time.perf_counter(), os.getloadavg()
    _STATE["data"] = _data()
    with multiprocessing.get_context("fork").Pool(2) as pool:
        results = pool.map(run, list(RUNS), chunksize=1)
    summary = {
        "benchmark": "scarce_labels_probe",
        "runs": results,
        "wall_s": time.perf_counter() - started,
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
    }
    print("scarce_labels_probe: " + "; ".join(f"{r['run']}: {100 * r['test_accuracy']:.1f}%" for r in results))
    print(json.dumps(summary, default=float))
    return summary


if __name__ == "__main__":
    main()
