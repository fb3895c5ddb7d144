"""Generated transfer sets through the one pipeline: a pool labelled once, live rows appended to every batch, the
YAML ``transfer:`` section and ``data.unlabeled``, the report's rows, and resume refusing a changed transfer set."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import kdistill
from kdistill.config import load_config
from kdistill.engine import InMemorySource
from kdistill.errors import CheckpointError, ConfigError
from kdistill.teachers import as_teacher
from kdistill.transfer import ClassGaussian, Jitter, LiveTransfer, Mixup, Munge, Transfer

ROOT = Path(__file__).resolve().parents[1]


class Teacher(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.layer = nn.Linear(64, 10)
        self.rows: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows.append(len(x))
        return self.layer(x / 16.0) * 3.0


@pytest.fixture(scope="module")
def digits() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(1).permutation(len(x))
    x, y = x[order].astype(np.float32), y[order]
    return {"x": x[:120], "y": y[:120], "xv": x[1000:1300], "yv": y[1000:1300]}


def _small(**extra: object) -> dict[str, object]:
    return {"epochs": 2, "hidden": [16], "verbose": False, "profile": False, "seed": 0} | extra


@pytest.mark.parametrize("generator", [Munge(), Mixup(), Jitter(noise=0.2), ClassGaussian()])
def test_a_pool_is_labelled_once_and_reported(generator: object, digits: dict[str, np.ndarray]) -> None:
    teacher = Teacher()
    result = kdistill.distill(
        teacher,
        "mlp",
        (digits["x"], digits["y"]),
        val=(digits["xv"], digits["yv"]),
        transfer=Transfer(generator, rows=500),  # type: ignore[arg-type]
        **_small(),  # type: ignore[arg-type]
    )
    assert 500 in teacher.rows  # the pool, labelled in one call before training
    assert result.report is not None
    rows = result.report.settings["transfer_rows"]
    assert rows["labelled"]["rows"] == 120 and rows["generated"]["rows"] == 500
    assert result.report.settings["transfer"]["kind"] == generator.name  # type: ignore[attr-defined]
    assert set(result.report.settings["transfer_seconds"]) == {"fit", "generate", "label_generated"}


def test_a_pool_is_the_same_for_the_same_seed_and_changes_the_student(digits: dict[str, np.ndarray]) -> None:
    def student(seed: int | None) -> list[torch.Tensor]:
        result = kdistill.distill(
            Teacher(),
            "mlp",
            (digits["x"], digits["y"]),
            transfer=Transfer(Mixup(), rows=300, seed=seed),
            **_small(report=False, baseline=False),  # type: ignore[arg-type]
        )
        return list(result.student.state_dict().values())

    first, again, other = student(None), student(None), student(11)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_live_rows_are_appended_to_every_batch_unlabelled_and_labelled_by_the_teacher() -> None:
    x, y = torch.randn(10, 64), torch.arange(10) % 3
    teacher = as_teacher(Teacher())
    transfer = Transfer(Jitter(noise=0.5), mode="live", ratio=0.5)
    transfer.generator.fit(x)
    source = LiveTransfer(transfer, teacher, seed=0)
    data = InMemorySource(x, y)
    steps = ([batch] for batch in data.batches(0, batch_size=4, generator=torch.Generator().manual_seed(0)))
    seen = list(source.stream(steps, epoch=0))
    assert [len(step[0][0]) for step in seen] == [4 + 2, 4 + 2, 2 + 1]
    for ((batch, outputs),) in seen:
        rows = len(batch) - (len(batch) // 3)
        assert batch.label_mask is not None and batch.target is not None and outputs is not None
        assert bool(batch.label_mask[:rows].all()) and not bool(batch.label_mask[rows:].any())
        assert bool((batch.target[rows:] == -100).all())
        assert isinstance(batch.inputs, torch.Tensor)
        torch.testing.assert_close(batch.inputs[:rows], x[batch.index[:rows]])
        assert not torch.allclose(batch.inputs[rows:], x[batch.index[rows:]])  # new rows, drawn from the batch's
        torch.testing.assert_close(outputs.logits, teacher(batch.inputs).logits)


def test_live_mode_trains_through_distill_and_is_seeded(digits: dict[str, np.ndarray]) -> None:
    def run() -> kdistill.DistillResult:
        return kdistill.distill(
            Teacher(),
            "mlp",
            (digits["x"], digits["y"]),
            val=(digits["xv"], digits["yv"]),
            transfer=Transfer(Mixup(), mode="live"),
            **_small(),  # type: ignore[arg-type]
        )

    first, second = run(), run()
    for a, b in zip(first.student.state_dict().values(), second.student.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert first.report is not None
    generated = first.report.settings["transfer_rows"]["generated"]
    assert generated["rows"] == 120 and "live" in generated["mode"]


def test_a_changed_transfer_set_refuses_to_resume(digits: dict[str, np.ndarray], tmp_path: Path) -> None:
    common = _small(out=tmp_path / "run", report=False, baseline=False)
    kdistill.distill(Teacher(), "mlp", (digits["x"], digits["y"]), transfer=Transfer(Munge(), rows=200), **common)  # type: ignore[arg-type]
    with pytest.raises(CheckpointError, match="transfer"):
        kdistill.distill(
            Teacher(),
            "mlp",
            (digits["x"], digits["y"]),
            transfer=Transfer(Munge(p=0.2), rows=200),
            resume=True,
            **common,  # type: ignore[arg-type]
        )


YAML = """
name: scarce
seed: 0
data:
  train: {x: x.npy, y: y.npy}
  val: {x: xv.npy, y: yv.npy}
  unlabeled: u.npy
teacher: {kind: random_forest, params: {n_estimators: 20}}
student: {kind: mlp, params: {hidden: [16]}}
transfer: {kind: munge, rows: 400, params: {p: 0.5, s: 10.0}}
train: {epochs: 2}
device: {type: cpu}
report: {privacy: false}
"""


def test_yaml_transfer_and_unlabeled_run_through_the_cli(digits: dict[str, np.ndarray], tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    x, _ = load_digits(return_X_y=True)
    for name, array in {"x": digits["x"], "y": digits["y"], "xv": digits["xv"], "yv": digits["yv"]}.items():
        np.save(tmp_path / f"{name}.npy", array)
    np.save(tmp_path / "u.npy", x[1300:1600].astype(np.float32))
    (tmp_path / "scarce.yaml").write_text(YAML + f"out: {tmp_path / 'out'}\n")
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-m", "kdistill.cli", "run", str(tmp_path / "scarce.yaml")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    rows = report["settings"]["transfer_rows"]
    assert (rows["labelled"]["rows"], rows["unlabeled"]["rows"], rows["generated"]["rows"]) == (120, 300, 400)
    assert any(line.startswith("training rows: labelled 120") for line in report["lines"])


def test_yaml_transfer_section_is_validated(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(YAML.replace("kind: munge", "kind: mungee"))
    with pytest.raises(ConfigError, match=r"(?s)transfer.kind.*did you mean 'munge'"):
        load_config(config)
    config.write_text(YAML.replace("p: 0.5", "q: 0.5"))
    with pytest.raises(ConfigError, match=r"transfer\.params: unknown param for transfer kind 'munge': 'q'"):
        load_config(config)
    config.write_text(YAML.replace("unlabeled: u.npy", "unlabeled: u.csv"))
    with pytest.raises(ConfigError, match=r"unlabeled must be a \.npy or \.npz file"):
        load_config(config)


def test_kdistill_list_transfers_prints_every_generator_and_its_params() -> None:
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-m", "kdistill.cli", "list", "transfers"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    for name, params in (("munge", "p, s, neighbours, categorical"), ("mixup", "alpha"), ("jitter", "noise")):
        assert name in done.stdout and params in done.stdout
    assert "class_gaussian" in done.stdout


def test_live_mode_with_unlabeled_rows_labels_them_live_too(digits: dict[str, np.ndarray]) -> None:
    from sklearn.datasets import load_digits

    x, _ = load_digits(return_X_y=True)
    teacher = Teacher()
    result = kdistill.distill(
        teacher,
        "mlp",
        (digits["x"], digits["y"]),
        val=(digits["xv"], digits["yv"]),
        unlabeled=x[1300:1500].astype(np.float32),
        transfer=Transfer(Jitter(noise=0.3), mode="live", ratio=0.5),
        **_small(batch_size=64),  # type: ignore[arg-type]
    )
    # after the 8-row probe of the outputs' shape, the first call is a live batch (64 rows + 32 generated), not the
    # unlabeled rows labelled up front (the report runs the teacher on them afterwards, for their agreement)
    assert teacher.rows[:2] == [8, 96]
    assert result.report is not None
    rows = result.report.settings["transfer_rows"]
    assert rows["unlabeled"]["rows"] == 200 and rows["generated"]["rows"] == 160  # ceil(0.5 * 320) per epoch
