"""kdistill.distill end to end: the report, saving and loading, determinism, and row alignment of soft targets."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import kdistill
from kdistill import Outputs
from kdistill.errors import CheckpointError

FAST = {"epochs": 15, "verbose": False, "profile": False}


def test_distill_forest_into_mlp_reports_all_three(digits, forest) -> None:
    result = kdistill.distill(forest, "mlp", digits["train"], val=digits["val"], test=digits["test"], **FAST)
    report = result.report
    assert report is not None and report.split == "test" and report.rows == 450
    assert set(report.models) == {"teacher", "student", "baseline"}
    teacher, student = report.models["teacher"], report.models["student"]
    x_test = torch.tensor(digits["test"][0], dtype=torch.float32)
    student_acc = float((result.student(x_test).argmax(1).numpy() == digits["test"][1]).mean())
    assert student["accuracy"] == pytest.approx(student_acc)
    assert teacher["accuracy"] == pytest.approx(forest.score(*digits["test"]))
    assert student["retention"] == pytest.approx(student["accuracy"] / teacher["accuracy"])
    assert student["accuracy"] > 0.9  # a real student, not chance (10%)
    assert student["size_bytes"] * 10 < teacher["size_bytes"]  # 30 trees here; the 200-tree demo is >100x
    assert 0.0 <= student["ece"] <= 1.0 and student["nll"] > 0
    assert report.settings["epochs_run"] == len(result.history) <= 15
    assert result.baseline is not None and result.baseline_history is not None


def test_profile_measures_latency_and_throughput(digits, forest) -> None:
    small = (digits["train"][0][:200], digits["train"][1][:200])
    result = kdistill.distill(forest, "mlp", small, test=digits["test"], epochs=2, verbose=False, baseline=False)
    assert result.report is not None
    for name in ("teacher", "student"):
        metrics = result.report.models[name]
        assert metrics["latency_ms"] > 0 and metrics["throughput_rows_s"] > 0 and metrics["threads"] == 1


def test_save_and_load_round_trip(tmp_path: Path, digits, forest) -> None:
    result = kdistill.distill(forest, "mlp", digits["train"], val=digits["val"], test=digits["test"], **FAST)
    folder = result.save(tmp_path / "run")
    assert {p.name for p in folder.iterdir()} == {"student.safetensors", "history.json", "report.json"}
    restored = kdistill.load(folder)
    x = torch.tensor(digits["test"][0], dtype=torch.float32)
    assert torch.equal(restored(x), result.student(x))
    assert restored.kdistill_classes == list(range(10))
    report = json.loads((folder / "report.json").read_text())
    assert report["models"]["student"]["accuracy"] == pytest.approx(result.report.models["student"]["accuracy"])
    history = json.loads((folder / "history.json").read_text())
    assert len(history["student"]) == len(result.history) and history["baseline"]
    assert kdistill.Report.load(folder / "report.json").retention == pytest.approx(result.report.retention)


def test_load_refuses_corrupt_or_custom_files(tmp_path: Path, digits, forest) -> None:
    result = kdistill.distill(forest, "mlp", digits["train"], epochs=1, verbose=False, baseline=False)
    folder = result.save(tmp_path / "run")
    weights = folder / "student.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt"):
        kdistill.load(folder)
    with pytest.raises(CheckpointError, match="no saved student"):
        kdistill.load(tmp_path / "missing")

    custom = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    custom_result = kdistill.distill(forest, custom, digits["train"], epochs=1, verbose=False, baseline=False)
    custom_result.save(tmp_path / "custom")
    with pytest.raises(CheckpointError, match="custom student"):
        kdistill.load(tmp_path / "custom")
    restored = kdistill.load(tmp_path / "custom", student=nn.Sequential(nn.Flatten(), nn.Linear(64, 10)))
    x = torch.randn(3, 64)
    assert torch.equal(restored(x), custom_result.student(x))


def test_same_seed_gives_identical_weights(digits, forest) -> None:
    def weights(seed: int) -> list[torch.Tensor]:
        result = kdistill.distill(forest, "mlp", digits["train"], epochs=3, seed=seed, verbose=False, report=False)
        return [p.detach().clone() for p in result.student.parameters()]

    first, again, other = weights(0), weights(0), weights(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_threads_are_restored(digits, forest) -> None:
    before = torch.get_num_threads()
    kdistill.distill(forest, "mlp", digits["train"], epochs=1, verbose=False, report=False, num_threads=1)
    assert torch.get_num_threads() == before


class _RecordingStudent(nn.Module):
    """A student that remembers its last input, so a loss can recompute what the teacher says about it."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 3)
        self.last_input = torch.empty(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last_input = x.detach()
        return self.linear(x)


class _AlignmentCheck:
    """Asserts, at every step, that the precomputed soft targets are the teacher's outputs for *these* rows."""

    needs_teacher = True
    student_features: Sequence[str] = ()
    teacher_features: Sequence[str] = ()

    def __init__(self, student: _RecordingStudent, teacher: nn.Module) -> None:
        self.student, self.teacher, self.steps = student, teacher, 0

    def __call__(self, student: Outputs, teacher: Outputs | None, target: torch.Tensor | None):
        assert teacher is not None and target is not None
        with torch.no_grad():
            expected = self.teacher(self.student.last_input)
        assert torch.allclose(teacher.logits, expected, atol=1e-6)
        assert torch.equal(target, expected.argmax(1))
        self.steps += 1
        return kdistill.kd_loss(student.logits, teacher.logits, target)


def test_soft_targets_stay_aligned_with_their_rows() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(300, 8, generator=generator)
    teacher = nn.Linear(8, 3)
    y = teacher(x).argmax(1).detach()
    student = _RecordingStudent()
    check = _AlignmentCheck(student, teacher)
    kdistill.distill(teacher, student, (x, y), method=check, epochs=3, batch_size=32, verbose=False, report=False)
    assert check.steps == 3 * 10


def test_early_stopping_restores_the_best_epoch(digits, forest) -> None:
    result = kdistill.distill(
        forest, "mlp", digits["train"], val=digits["val"], epochs=40, patience=3, lr=0.05, verbose=False, report=False
    )
    history = result.history
    best = max(history, key=lambda row: (row["val_accuracy"], -row["val_nll"]))
    x_val = torch.tensor(digits["val"][0], dtype=torch.float32)
    restored_acc = float((result.student(x_val).argmax(1).numpy() == digits["val"][1]).mean())
    assert restored_acc == pytest.approx(best["val_accuracy"])
    assert len(history) < 40  # patience 3 stopped it


def test_out_of_fold_soft_targets_differ_from_in_sample(digits, forest) -> None:
    from kdistill.api import _oof_logits
    from kdistill.data import as_split
    from kdistill.teachers import SklearnTeacher, teacher_logits

    teacher = SklearnTeacher(forest)
    split = as_split(digits["train"], classes=teacher.classes)
    in_sample = teacher_logits(teacher, split.x).argmax(1)
    out_of_fold = _oof_logits(teacher, split, folds=3, seed=0).argmax(1)
    # a forest is near perfect on its own training rows, not on rows it never saw
    assert float((in_sample == split.y).float().mean()) > 0.99
    assert float((out_of_fold == split.y).float().mean()) < 0.99
    result = kdistill.distill(
        forest, "mlp", digits["train"], soft_targets="oof", oof_folds=3, epochs=2, verbose=False, report=False
    )
    assert len(result.history) == 2


def test_string_labels_and_predict_use_teacher_classes(digits) -> None:
    from sklearn.linear_model import LogisticRegression

    names = np.array(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])
    x, y = digits["train"]
    teacher = LogisticRegression(max_iter=300).fit(x, names[y])
    result = kdistill.distill(
        teacher,
        "mlp",
        (x, names[y]),
        test=(digits["test"][0], names[digits["test"][1]]),
        epochs=5,
        verbose=False,
        profile=False,
    )
    predicted = result.predict(digits["test"][0])
    assert set(predicted) <= set(names) and np.mean(predicted == names[digits["test"][1]]) > 0.85
    assert result.classes == sorted(names.tolist())


def test_decision_function_teacher_binary_and_multiclass(digits) -> None:
    from sklearn.svm import LinearSVC

    x, y = digits["train"]
    binary = (y >= 5).astype(int)
    svm = LinearSVC(dual="auto").fit(x, binary)
    result = kdistill.distill(
        svm,
        "mlp",
        (x, binary),
        test=(digits["test"][0], (digits["test"][1] >= 5).astype(int)),
        epochs=5,
        verbose=False,
        profile=False,
        baseline=False,
    )
    assert result.report is not None and result.report.models["student"]["agreement"] > 0.85
    multi = LinearSVC(dual="auto").fit(x, y)
    result = kdistill.distill(multi, "mlp", (x, y), epochs=2, verbose=False, report=False)
    assert result.student(torch.zeros(1, 64)).shape == (1, 10)


def test_torch_dataset_and_cnn_student() -> None:
    from torch.utils.data import TensorDataset

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(200, 2, 16, generator=generator)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(32, 4))
    y = teacher(x).argmax(1).detach()
    result = kdistill.distill(
        teacher,
        "cnn",
        TensorDataset(x, y),
        test=TensorDataset(x, y),
        epochs=3,
        student_params={"channels": (8, 8)},
        verbose=False,
        profile=False,
    )
    assert result.spec is not None and result.spec["kind"] == "cnn"
    assert result.student(x[:5]).shape == (5, 4)


def test_every_entry_point_shares_the_training_defaults() -> None:
    """distill(), DistilledClassifier, run configs and TrainConfig read one module, so they cannot drift apart."""
    import inspect

    from kdistill import defaults
    from kdistill.config import OptimizerConfig, TrainSection
    from kdistill.engine import TrainConfig

    expected = {"lr": defaults.LR, "weight_decay": defaults.WEIGHT_DECAY, "patience": defaults.PATIENCE}
    signature = inspect.signature(kdistill.distill).parameters
    assert {name: signature[name].default for name in expected} == expected
    estimator = kdistill.DistilledClassifier(teacher=None).get_params()
    assert {name: estimator[name] for name in expected} == expected
    assert {name: getattr(TrainConfig(), name) for name in expected} == expected
    section = TrainSection()
    assert (OptimizerConfig().lr, OptimizerConfig().weight_decay, section.patience) == tuple(expected.values())
    assert (section.epochs, section.batch_size) == (defaults.EPOCHS, defaults.BATCH_SIZE) == (100, 64)


def test_temperature_and_soft_weight_reach_the_method_that_takes_them(tmp_path: Path, digits, forest) -> None:
    """distill(temperature=, soft_weight=) configure whichever method takes them, and are refused (not ignored) by
    one that does not: a silently ignored temperature would train something other than what was asked."""
    quick = {"epochs": 1, "verbose": False, "profile": False, "baseline": False}
    train, val = digits["train"], digits["val"]
    dkd = kdistill.distill(forest, "mlp", train, val=val, method="dkd", temperature=2.0, out=tmp_path, **quick)
    assert dkd.report is not None and dkd.report.settings["temperature"] == 2.0
    run = json.loads((tmp_path / "config.json").read_text())  # what the run was built from
    assert [(term["name"], term["params"]) for term in run["config"]["method"]] == [("dkd", {"temperature": 2.0})]
    kd = kdistill.distill(forest, "mlp", train, val=val, **quick)
    assert kd.report is not None and (kd.report.settings["temperature"], kd.report.settings["soft_weight"]) == (
        4.0,
        0.5,
    )
    with pytest.raises(kdistill.ConfigError, match="method 'ce' has no temperature, but distill"):
        kdistill.distill(forest, "mlp", train, val=val, method="ce", temperature=2.0, **quick)
    with pytest.raises(kdistill.ConfigError, match="configure the 'kd' term"):
        kdistill.distill(forest, "mlp", train, val=val, method=["ce", "logit_std"], soft_weight=0.9, **quick)
    # the estimator passes them only when set, so a method without them fits with the defaults
    model = kdistill.DistilledClassifier(forest, method="ce", hidden=(16,), max_epochs=1, report=False).fit(*train)
    assert model.score(*val) > 0.5
    with pytest.raises(kdistill.ConfigError, match="has no temperature"):
        kdistill.DistilledClassifier(forest, method="ce", temperature=3.0, max_epochs=1, report=False).fit(*train)
