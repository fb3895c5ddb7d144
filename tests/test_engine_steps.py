"""Step-level control: gradient accumulation gives the big batch's mean gradient, clipping bounds the total norm,
``on_batch_end`` sees every step, validation is pluggable and early stopping follows its mode; a streaming source
and mapping inputs (int64 token ids) train through the same loop."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from kdistill.engine import (
    Callback,
    EarlyStopping,
    InMemorySource,
    StaticSource,
    StreamingSource,
    TrainConfig,
    TrainState,
    TransferSet,
    fit,
)
from kdistill.errors import ConfigError
from kdistill.losses import get_loss
from kdistill.teachers import Outputs

ROWS = 10


@pytest.fixture(autouse=True)
def _restore_global_rng() -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        yield


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(ROWS, 4, generator=generator)
    return x, torch.randint(0, 3, (ROWS,), generator=generator)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


# one optimizer step of plain SGD (lr 1): the weights move by exactly minus the step's gradient
ONE_SGD_STEP = {
    "epochs": 1,
    "batch_size": ROWS,
    "lr": 1.0,
    "weight_decay": 0.0,
    "optimizer": "sgd",
    "momentum": 0.0,
    "schedule": "constant",
    "verbose": False,
    "num_threads": 1,
}


def _step_taken(**config: Any) -> list[torch.Tensor]:
    x, y = _data()
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    fit(model, get_loss("ce"), TransferSet(x, y, None), config=TrainConfig(**(ONE_SGD_STEP | config)))
    return [b - p.detach() for b, p in zip(before, model.parameters(), strict=True)]


def _gradient(loss_of: Any) -> list[torch.Tensor]:
    model = _model()
    x, y = _data()
    loss_of(model, x, y).backward()
    return [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]


def test_accumulated_gradient_is_the_big_batch_mean_gradient() -> None:
    # the reference: one backward of the mean cross-entropy over all 10 rows
    whole = _gradient(lambda model, x, y: F.cross_entropy(model(x), y))
    # what a naive accumulation (mean of the micro-batches' means) would give for micro-batches of 4, 3 and 3 rows
    naive = _gradient(
        lambda model, x, y: sum(F.cross_entropy(model(x[p]), y[p]) for p in torch.arange(ROWS).tensor_split(3)) / 3
    )
    assert max(float((a - b).abs().max()) for a, b in zip(whole, naive, strict=True)) > 1e-4  # the test can tell
    for parts in (1, 3, 4):
        taken = _step_taken(grad_accumulation=parts)
        for got, expected in zip(taken, whole, strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_accumulation_trains_like_the_big_batch_over_epochs() -> None:
    x, y = _data()
    logits = torch.randn(ROWS, 3, generator=torch.Generator().manual_seed(1))
    states = []
    for parts in (1, 2):
        model = _model()
        config = TrainConfig(epochs=4, batch_size=4, grad_accumulation=parts, verbose=False, num_threads=1)
        state = fit(model, get_loss("kd"), TransferSet(x, y, logits), config=config)
        states.append((model, state))
    (one, state_one), (two, state_two) = states
    for a, b in zip(one.parameters(), two.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert state_one.global_step == state_two.global_step == 4 * 3  # the schedule counts optimizer steps
    for a, b in zip(state_one.history, state_two.history, strict=True):  # the logged loss is the step's mean
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)


def test_clipping_scales_the_total_norm_down_to_the_maximum_and_leaves_small_ones() -> None:
    whole = _gradient(lambda model, x, y: F.cross_entropy(model(x), y))
    norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in whole)))
    clipped = _step_taken(clip_grad_norm=norm / 4)
    for got, expected in zip(clipped, whole, strict=True):
        torch.testing.assert_close(got, expected / 4, rtol=1e-4, atol=1e-7)
    assert float(torch.sqrt(sum((g.double() ** 2).sum() for g in clipped))) == pytest.approx(norm / 4, rel=1e-5)
    untouched = _step_taken(clip_grad_norm=norm * 2)
    for got, expected in zip(untouched, whole, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    with pytest.raises(ConfigError, match="clip_grad_norm must be a positive number or None, got 0"):
        TrainConfig(clip_grad_norm=0)
    with pytest.raises(ConfigError, match="grad_accumulation must be >= 1, got 0"):
        TrainConfig(grad_accumulation=0)


class Steps(Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[int, int, int, float]] = []

    def on_batch_end(self, state: TrainState, terms: dict[str, torch.Tensor]) -> None:
        assert not terms["loss"].requires_grad
        self.seen.append((state.epoch, state.step_in_epoch, state.global_step, float(terms["loss"])))


def test_on_batch_end_sees_every_step_and_its_terms() -> None:
    x, y = _data()
    steps = Steps()
    state = fit(
        _model(), get_loss("ce"), TransferSet(x, y, None), config=TrainConfig(epochs=2, batch_size=4, verbose=False)
    )
    other = fit(
        _model(),
        get_loss("ce"),
        TransferSet(x, y, None),
        config=TrainConfig(epochs=2, batch_size=4, verbose=False),
        callbacks=[steps],
    )
    assert [s[:3] for s in steps.seen] == [(0, 1, 1), (0, 2, 2), (0, 3, 3), (1, 1, 4), (1, 2, 5), (1, 3, 6)]
    for epoch in range(2):  # the epoch's logged loss is the mean of the steps' losses the hook saw
        losses = [s[3] for s in steps.seen if s[0] == epoch]
        assert other.history[epoch]["train_loss"] == pytest.approx(sum(losses) / 3, rel=1e-6)
    assert [h["train_loss"] for h in state.history] == [h["train_loss"] for h in other.history]


def _mse_validation(model: nn.Module, val: tuple[torch.Tensor, torch.Tensor]) -> Mapping[str, float]:
    x, target = val
    with torch.no_grad():
        return {"val_mse": float(((model(x).softmax(1) - target) ** 2).mean())}


def test_validation_is_pluggable_and_early_stopping_follows_its_mode() -> None:
    x, y = _data()
    onehot = F.one_hot(y, 3).float()
    config = TrainConfig(epochs=5, batch_size=4, lr=0.05, verbose=False)
    stopper = EarlyStopping(monitor="val_mse", patience=None, mode="min")
    state = fit(
        _model(),
        get_loss("ce"),
        TransferSet(x, y, None),
        val=(x, onehot),
        validate=_mse_validation,
        config=config,
        callbacks=[stopper],
    )
    scores = [h["val_mse"] for h in state.history]
    assert "val_accuracy" not in state.history[0]
    assert state.best_epoch == min(range(5), key=lambda e: scores[e])  # the lowest, as mode="min" asks
    assert _mse_validation(state.model, (x, onehot))["val_mse"] == pytest.approx(min(scores))  # best weights back
    highest = EarlyStopping(monitor="val_mse", patience=None, mode="max")
    again = fit(
        _model(),
        get_loss("ce"),
        TransferSet(x, y, None),
        val=(x, onehot),
        validate=_mse_validation,
        config=config,
        callbacks=[highest],
    )
    assert again.best_epoch == max(range(5), key=lambda e: scores[e])
    with pytest.raises(ConfigError, match=r"(?s)monitors 'val_accuracy', which the validation did not return.*val_mse"):
        fit(
            _model(),
            get_loss("ce"),
            TransferSet(x, y, None),
            val=(x, onehot),
            validate=_mse_validation,
            config=config,
            callbacks=[EarlyStopping()],
        )
    with pytest.raises(ConfigError, match="mode must be 'max' or 'min', got 'up'"):
        EarlyStopping(mode="up")


def test_a_streaming_dataset_trains_the_same_weights_as_the_in_memory_set() -> None:
    x, y = _data()
    logits = torch.randn(ROWS, 3, generator=torch.Generator().manual_seed(2))
    config = TrainConfig(epochs=3, batch_size=4, verbose=False)
    memory, streamed = _model(), _model()
    fit(memory, get_loss("kd"), TransferSet(x, y, logits), config=config)
    loss = get_loss("kd")
    fit(
        streamed,
        loss,
        StreamingSource(TensorDataset(x, y)),
        teacher_source=StaticSource.build(loss, logits, y),
        config=config,
    )
    for a, b in zip(memory.parameters(), streamed.parameters(), strict=True):
        assert torch.equal(a, b)


class TokenStudent(nn.Module):
    """Embeds int64 token ids, averages the real tokens (attention mask) and classifies."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        assert input_ids.dtype == torch.int64
        mask = attention_mask.unsqueeze(-1).float()
        return self.head((self.embed(input_ids) * mask).sum(1) / mask.sum(1))


class TokenTeacher:
    """A teacher that reads the same mapping of inputs and records it."""

    classes = None
    num_classes = 3

    def __init__(self) -> None:
        torch.manual_seed(3)
        self.module = TokenStudent().eval()
        self.seen: list[torch.Tensor] = []
        self.masks: list[torch.Tensor] = []

    def fingerprint(self) -> str:
        return "token-teacher"

    def __call__(self, x: Any, *, features: tuple[str, ...] = ()) -> Outputs:
        self.seen.append(x["input_ids"])
        self.masks.append(x["attention_mask"])
        with torch.inference_mode():
            return Outputs(self.module(**x).clone())


def test_mapping_inputs_reach_the_student_as_keywords_and_the_teacher_live() -> None:
    generator = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 20, (ROWS, 5), generator=generator)
    mask = (torch.arange(5) < torch.randint(1, 6, (ROWS, 1), generator=generator)).long()
    y = torch.randint(0, 3, (ROWS,), generator=generator)
    teacher = TokenTeacher()
    torch.manual_seed(0)
    student = TokenStudent()
    state = fit(
        student,
        get_loss("kd"),
        InMemorySource({"input_ids": ids, "attention_mask": mask}, y),
        teacher=teacher,
        config=TrainConfig(epochs=2, batch_size=4, verbose=False),
    )
    assert len(teacher.seen) == 2 * 3 and all(t.dtype == torch.int64 for t in teacher.seen)
    # each batch is cut to its longest row (dynamic padding); the real tokens of every row reach the teacher
    assert all(bool(m[:, -1].any()) for m in teacher.masks)
    seen = torch.cat([i[m.bool()] for i, m in zip(teacher.seen[:3], teacher.masks[:3], strict=True)])
    assert sorted(seen.tolist()) == sorted(ids[mask.bool()].tolist())
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in state.history)
    assert state.history[-1]["train_loss"] < state.history[0]["train_loss"]
