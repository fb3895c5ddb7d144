"""The runs whose trained weights tests/test_pins.py pins (see tests/golden/make_pins.py).

Each case trains a small student for a few epochs through a public entry point and returns its state dict. They
cover the paths the one-pipeline redesign rebuilds: distill() with a static teacher (packed kd), a composed method
with a learned projector, a top-k cache, augmentation with the live teacher, out-of-fold targets, the CNN student,
DistilledClassifier and a YAML run.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.ensemble import RandomForestClassifier

import kdistill
from kdistill.run import run


def machine_key() -> str:
    """Which CPU kernels this machine's floats come from: the CPU vendor and the instruction set torch dispatches
    to (``GenuineIntel-AVX512``, ...). Two machines with the same key give the same bits for the same code; the
    pins of a vendor and instruction set other than the one kdistill 0.1 was pinned on are kept per key."""
    vendor = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("vendor_id"):
                vendor = line.split(":", 1)[1].strip()
                break
    return f"{vendor}-{torch.backends.cpu.get_cpu_capability()}"


_COMMON = {"epochs": 4, "verbose": False, "profile": False, "report": False, "baseline": False, "seed": 3}


def _data() -> tuple[np.ndarray, np.ndarray]:
    x, y = load_digits(return_X_y=True)
    return x[:600], y[:600]


def _forest() -> RandomForestClassifier:
    return RandomForestClassifier(n_estimators=10, random_state=0, n_jobs=1).fit(*_data())


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(module.state_dict())


def kd_mlp() -> dict[str, torch.Tensor]:
    x, y = _data()
    result = kdistill.distill(_forest(), "mlp", (x, y), val=(x[:100], y[:100]), temperature=2.0, **_COMMON)
    return _state(result.student)


def kd_fitnet() -> dict[str, torch.Tensor]:
    x, y = _data()
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    torch.manual_seed(1)
    for p in teacher.parameters():
        torch.nn.init.normal_(p, std=0.1)
    result = kdistill.distill(
        teacher,
        "mlp",
        (x, y),
        method=["kd", "fitnet"],
        hidden=(16,),
        method_params={"fitnet": {"student_layers": "layers.1", "teacher_layers": "2"}},
        **_COMMON,
    )
    return _state(result.student)


def kd_topk_cache() -> dict[str, torch.Tensor]:
    x, y = _data()
    with tempfile.TemporaryDirectory() as folder:
        result = kdistill.distill(_forest(), "mlp", (x, y), cache_dir=folder, cache_storage="topk:3", **_COMMON)
    return _state(result.student)


def augmented() -> dict[str, torch.Tensor]:
    x, y = _data()

    def jitter(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return batch + 0.1 * torch.randn(batch.shape, generator=generator)

    result = kdistill.distill(_forest(), "mlp", (x, y), augment=jitter, **_COMMON)
    return _state(result.student)


def oof() -> dict[str, torch.Tensor]:
    x, y = _data()
    # A forest, not LogisticRegression: lbfgs's floats follow the CPU's BLAS kernels, so a linear teacher's pin held
    # on one machine and failed on another (an AMD EPYC box, scikit-learn 1.8-1.9.1 alike); trees use no BLAS.
    result = kdistill.distill(_forest(), "mlp", (x, y), soft_targets="oof", oof_folds=3, **_COMMON)
    return _state(result.student)


def cnn() -> dict[str, torch.Tensor]:
    x, y = _data()
    result = kdistill.distill(
        _forest(), "cnn", (x, y), student_params={"channels": (4, 4), "in_shape": (1, 8, 8)}, **_COMMON
    )
    return _state(result.student)


def classifier() -> dict[str, torch.Tensor]:
    x, y = _data()
    model = kdistill.DistilledClassifier(
        RandomForestClassifier(n_estimators=10, random_state=0), max_epochs=4, random_state=2
    ).fit(x, y)
    return _state(model.student_)


def yaml_run() -> dict[str, torch.Tensor]:
    config = Path(__file__).resolve().parents[1] / "examples" / "digits_rf_mlp.yaml"
    with tempfile.TemporaryDirectory() as folder:
        result = run(
            config,
            overrides=["train.epochs=3", "teacher.params.n_estimators=10", f"out={folder}", "device.type=cpu"],
            verbose=False,
        )
        assert result.result is not None
        return _state(result.result.student)


CASES: dict[str, Callable[[], dict[str, torch.Tensor]]] = {
    "kd_mlp": kd_mlp,
    "kd_fitnet": kd_fitnet,
    "kd_topk_cache": kd_topk_cache,
    "augmented": augmented,
    "oof": oof,
    "cnn": cnn,
    "classifier": classifier,
    "yaml_run": yaml_run,
}
