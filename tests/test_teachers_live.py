"""Live teachers with augmentation: the teacher labels each augmented batch, under inference mode, with or without
the background prefetch, and the same seed gives the same run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import kdistill
from kdistill.engine import TrainConfig, TransferSet, fit
from kdistill.engine.callbacks import Callback
from kdistill.engine.checkpoint import Checkpoint, Checkpointer, load_checkpoint
from kdistill.engine.loop import TrainState
from kdistill.losses import get_loss
from kdistill.teachers import Outputs, TorchTeacher


@pytest.fixture(autouse=True)
def _restore_global_rng() -> Iterator[None]:
    """These tests seed torch's global generator; later tests (in other files) get it back untouched."""
    with torch.random.fork_rng(devices=[]):
        yield


def _jitter(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return x + 0.1 * torch.randn(x.shape, generator=generator)


class Recording(TorchTeacher):
    """Keeps what it was asked about, and whether it ran under inference mode."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        self.inputs: list[torch.Tensor] = []
        self.inference: list[bool] = []

    def __call__(self, x: torch.Tensor, *, features: tuple[str, ...] = ()) -> Outputs:
        self.inputs.append(x.clone())
        out = super().__call__(x, features=features)
        self.inference.append(out.logits.is_inference())
        return out


def _setup() -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    rng = np.random.default_rng(0)
    x = torch.as_tensor(rng.normal(size=(96, 6)).astype(np.float32))
    y = (x[:, 0] > 0).long()
    torch.manual_seed(0)
    return x, y, nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2))


def _student() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))


def test_teacher_runs_live_on_augmented_batches_and_prefetch_changes_nothing() -> None:
    x, y, module = _setup()
    config = TrainConfig(epochs=2, batch_size=32, verbose=False)
    runs = []
    for prefetch in (False, True):
        teacher = Recording(module)
        student = _student()
        state = fit(
            student,
            get_loss("kd"),
            TransferSet(x, y, None),
            config=config,
            teacher=teacher,
            augment=_jitter,
            prefetch_teacher=prefetch,
        )
        runs.append((teacher, student, state))
    (plain, student_a, state_a), (prefetched, student_b, state_b) = runs
    assert len(plain.inputs) == 2 * 3  # every batch of every epoch
    assert all(plain.inference)  # the adapter ran the teacher under torch.inference_mode()
    seen = torch.cat(plain.inputs)
    assert not any(bool((seen == row).all(dim=1).any()) for row in x)  # never the raw rows: augmented ones
    epoch_one, epoch_two = torch.cat(plain.inputs[:3]), torch.cat(plain.inputs[3:])
    assert not torch.equal(epoch_one.sort(dim=0).values, epoch_two.sort(dim=0).values)  # new augmentation per epoch
    assert all(torch.equal(a, b) for a, b in zip(plain.inputs, prefetched.inputs, strict=True))
    assert [h["train_loss"] for h in state_a.history] == [h["train_loss"] for h in state_b.history]
    for a, b in zip(student_a.parameters(), student_b.parameters(), strict=True):
        assert torch.equal(a, b)


def test_distill_with_augmentation_trains_student_and_baseline() -> None:
    x, y, module = _setup()
    teacher = Recording(module)
    result = kdistill.distill(
        teacher,
        "mlp",
        (x.numpy(), y.numpy()),
        val=(x.numpy()[:32], y.numpy()[:32]),
        epochs=2,
        batch_size=32,
        augment=_jitter,
        prefetch_teacher=True,
        verbose=False,
        profile=False,
    )
    assert len(result.history) == 2
    assert result.baseline_history is not None
    assert len(result.baseline_history) == 2
    # 8 rows to check the classes, 3 batches x 2 epochs live (the baseline needs no teacher), then the report
    assert [len(batch) for batch in teacher.inputs[:7]] == [8, 32, 32, 32, 32, 32, 32]


class _Interrupt(Exception):
    pass


class _StopAfterFirstEpoch(Callback):
    def on_epoch_end(self, state: TrainState) -> None:
        raise _Interrupt


def test_resumed_run_replays_the_same_augmentations(tmp_path: Path) -> None:
    x, y, module = _setup()
    config = TrainConfig(epochs=3, batch_size=32, verbose=False)

    def train(callbacks: list[Callback], resume: Checkpoint | None = None) -> tuple[Recording, nn.Module]:
        teacher, student = Recording(module), _student()
        fit(
            student,
            get_loss("kd"),
            TransferSet(x, y, None),
            config=config,
            teacher=teacher,
            augment=_jitter,
            callbacks=callbacks,
            resume=resume,
        )
        return teacher, student

    whole_teacher, whole_student = train([])
    with pytest.raises(_Interrupt):  # killed after the first epoch's checkpoint
        train([Checkpointer(tmp_path / "ckpt.safetensors"), _StopAfterFirstEpoch()])
    resumed_teacher, resumed_student = train([], resume=load_checkpoint(tmp_path / "ckpt.safetensors"))
    assert len(resumed_teacher.inputs) == 2 * 3  # epochs 2 and 3 only
    assert all(torch.equal(a, b) for a, b in zip(whole_teacher.inputs[3:], resumed_teacher.inputs, strict=True))
    for a, b in zip(whole_student.parameters(), resumed_student.parameters(), strict=True):
        assert torch.equal(a, b)
