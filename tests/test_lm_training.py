"""Training at length: step-based schedules (max_steps; warm-up then cosine or linear decay by step), evaluation
every N steps as history rows, and perplexity with token agreement (top-1 match with the teacher) in the history
and the report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import kdistill
from kdistill.engine import TrainConfig, TrainState, TransferSet, fit
from kdistill.engine.callbacks import Callback, TimeBudget
from kdistill.engine.loop import _lr_lambda
from kdistill.errors import ConfigError
from kdistill.losses import get_loss
from kdistill.tasks import TokenValBatch, get_task
from kdistill.teachers import TorchTeacher

VOCAB, ROWS, SEQ = 11, 40, 8


class Bigram(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.table = nn.Embedding(VOCAB, VOCAB)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.table(input_ids)


class LearningRates(Callback):
    def __init__(self) -> None:
        self.rates: list[float] = []

    def on_batch_end(self, state, terms) -> None:  # type: ignore[no-untyped-def]
        self.rates.append(state.optimizer.param_groups[0]["lr"])


def _ids(seed: int = 0, rows: int = ROWS) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, SEQ), generator=torch.Generator().manual_seed(seed))


def test_step_schedules_follow_their_formulas() -> None:
    total, warmup = 20, 4
    cosine = _lr_lambda(total, 0.05, "warmup_cosine", warmup_steps=warmup)
    linear = _lr_lambda(total, 0.05, "warmup_linear", warmup_steps=warmup)
    for step in range(total):
        if step < warmup:
            expected_cos = expected_lin = (step + 1) / warmup
        else:
            progress = (step - warmup) / (total - warmup)
            expected_cos, expected_lin = 0.5 * (1 + math.cos(math.pi * progress)), 1 - progress
        assert cosine(step) == pytest.approx(expected_cos) and linear(step) == pytest.approx(expected_lin)
    assert _lr_lambda(total, 0.25, "warmup_linear")(0) == pytest.approx(1 / 5)  # the fraction when no steps given
    with pytest.raises(ConfigError, match="max_steps"):
        TrainConfig(max_steps=0)
    with pytest.raises(ConfigError, match="schedule"):
        TrainConfig(schedule="cosine_by_step")


def test_max_steps_stops_mid_pass_and_the_schedule_runs_over_those_steps() -> None:
    ids = _ids()
    target = get_task("token_lm").encode_targets(ids)
    rates = LearningRates()
    config = TrainConfig(
        batch_size=8, lr=0.1, max_steps=12, warmup_steps=3, schedule="warmup_linear", verbose=False, epochs=99
    )
    state = fit(Bigram(1), get_loss("ce"), TransferSet(ids, target, None), config=config, callbacks=(rates,))
    assert state.global_step == 12  # 5 steps a pass: 2 whole passes and 2 steps of a third
    assert [row["epoch"] for row in state.history] == [0.0, 1.0, 2.0]
    assert [row["step"] for row in state.history] == [5.0, 10.0, 12.0]
    # the rate after each step is the schedule's value for the next one: warm-up over 3, linear to 0 at step 12
    schedule = _lr_lambda(12, 0.0, "warmup_linear", warmup_steps=3)
    assert rates.rates == pytest.approx([0.1 * schedule(step + 1) for step in range(12)])
    assert rates.rates[-1] == pytest.approx(0.0)


class Clock(Callback):
    """A fake wall clock that moves one second at the end of every optimizer step, however often it is read."""

    def __init__(self) -> None:
        self.now = 0.0

    def read(self) -> float:
        return self.now

    def on_batch_end(self, state, terms) -> None:  # type: ignore[no-untyped-def]
        self.now += 1.0


def _budgeted_rates(monkeypatch: pytest.MonkeyPatch, seconds: float, schedule: bool) -> tuple[list[float], int]:
    clock = Clock()
    monkeypatch.setattr(TimeBudget, "clock", staticmethod(clock.read))
    rates = LearningRates()
    config = TrainConfig(batch_size=8, lr=0.1, epochs=99, warmup_steps=3, schedule="warmup_linear", verbose=False)
    budget = TimeBudget(seconds, schedule=schedule)
    ids = _ids()
    data = TransferSet(ids, get_task("token_lm").encode_targets(ids), None)
    state = fit(Bigram(1), get_loss("ce"), data, config=config, callbacks=(clock, budget, rates))
    return rates.rates, state.global_step


def test_a_schedule_on_the_budget_decays_with_the_clock_and_a_long_budget_changes_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    planned = 99 * 5  # 99 epochs of 5 steps
    schedule = _lr_lambda(planned, 0.0, "warmup_linear", warmup_steps=3)
    cut, steps = _budgeted_rates(monkeypatch, 10.0, schedule=False)
    assert steps == 10 and cut == pytest.approx([0.1 * schedule(step) for step in range(1, 11)])
    assert cut[-1] > 0.09  # cut short near the peak: what a budget did before to_budget
    on_clock, steps = _budgeted_rates(monkeypatch, 10.0, schedule=True)
    # after step k the clock reads k - 1 seconds: the schedule stands at the larger of k and (k - 1) / 10 of its steps
    expected = [0.1 * (1 - (int((k - 1) / 10 * planned) - 3) / (planned - 3)) for k in range(2, 11)]
    assert steps == 10 and on_clock[1:] == pytest.approx(expected)
    assert on_clock[0] == pytest.approx(0.1 * 2 / 3)  # step 1 at 0 s: the warm-up's first step (the steps lead)
    assert on_clock[-1] < 0.011  # at 90% of the budget, 10% of the peak rate is left; linear to 0 at its end
    long, steps = _budgeted_rates(monkeypatch, 10_000.0, schedule=True)
    assert steps == planned and long == pytest.approx([0.1 * schedule(step) for step in range(1, planned + 1)])


def test_a_resumed_time_budget_continues_from_the_seconds_already_spent(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    monkeypatch.setattr(TimeBudget, "clock", staticmethod(lambda: now[0]))
    first = TimeBudget(10.0)
    state = TrainState.__new__(TrainState)
    state.stop, state.scheduler = False, None
    first.on_train_begin(state)
    now[0] = 4.0
    saved = first.state_dict()
    resumed = TimeBudget(10.0)
    resumed.load_state_dict(saved)
    now[0] = 100.0
    resumed.on_train_begin(state)
    now[0] = 105.5  # 4 + 5.5 seconds spent: inside the budget
    resumed.on_batch_end(state, {})
    assert not state.stop
    now[0] = 106.0  # 10 spent
    resumed.on_batch_end(state, {})
    assert state.stop
    legacy = TimeBudget(10.0)
    legacy.load_state_dict({})  # a checkpoint written before the budget kept its seconds: a whole budget
    assert legacy._spent_before == 0.0


def test_a_schedule_to_the_budget_needs_a_budget() -> None:
    with pytest.raises(ConfigError, match=r"to_budget.*max_minutes is not set"):
        kdistill.distill(
            Bigram(0), Bigram(1), _ids(), task="token_lm", epochs=1, verbose=False, report=False,
            settings={"train": {"schedule": {"to_budget": True}}},
        )  # fmt: skip


def test_evaluation_every_n_steps_adds_history_rows_with_perplexity_and_agreement() -> None:
    ids, val_ids = _ids(), _ids(seed=1, rows=12)
    task = get_task("token_lm")
    teacher = Bigram(2)
    val = [TokenValBatch(val_ids, task.encode_targets(val_ids), teacher(val_ids).argmax(-1))]
    config = TrainConfig(batch_size=8, lr=0.1, max_steps=7, eval_every_steps=2, verbose=False)
    student = Bigram(1)
    state = fit(
        student,
        get_loss("forward_kl"),
        TransferSet(ids, task.encode_targets(ids), None),
        config=config,
        teacher=TorchTeacher(teacher),
        val=val,
        validate=task.validate,
    )
    # evaluations at steps 2 and 4, the first pass's end (5), 6, and the last step (7, the second pass's end)
    assert [row["step"] for row in state.history] == [2.0, 4.0, 5.0, 6.0, 7.0]
    assert [row["epoch"] for row in state.history] == [0.0, 0.0, 0.0, 1.0, 1.0]
    last = state.history[-1]
    with torch.no_grad():  # an independent count over the validation tokens (all but each row's last position)
        logits = student(val_ids)[:, :-1]
        agreement = float((logits.argmax(-1) == teacher(val_ids)[:, :-1].argmax(-1)).float().mean())
        nll = float(nn.functional.cross_entropy(logits.reshape(-1, VOCAB), val_ids[:, 1:].reshape(-1)))
    assert last["val_agreement"] == pytest.approx(agreement)
    assert last["val_perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)
    assert all({"val_perplexity", "val_agreement", "train_loss", "lr"} <= set(row) for row in state.history)


def test_distill_reports_agreement_and_evaluates_every_n_steps_from_settings(tmp_path: Path) -> None:
    ids, val_ids = _ids(), _ids(seed=1, rows=12)
    result = kdistill.distill(
        TorchTeacher(Bigram(2)), Bigram(1), ids, val=val_ids, test=val_ids, task="token_lm", method="forward_kl",
        batch_size=8, max_steps=9, settings={"train": {"eval_every_steps": 3, "schedule": {"name": "warmup_linear",
        "warmup_steps": 2}}}, verbose=False, profile=False, baseline=False, out=tmp_path / "run",
    )  # fmt: skip
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged if row["phase"] == "student"] == [3.0, 5.0, 6.0, 9.0]
    steps = [row["step"] for row in result.history]
    assert steps == [3.0, 5.0, 6.0, 9.0]  # every 3 steps, and each pass's end (5 steps a pass)
    assert all("val_agreement" in row and "val_perplexity" in row for row in result.history)
    student = result.report.models["student"]
    assert {"perplexity", "agreement"} <= set(student)
    assert result.report.to_dict()["settings"]["epochs_run"] == 2
