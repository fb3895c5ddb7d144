"""On-policy data (GKD) in the engine: the share of on-policy steps is λ's coins for the seed, a resumed run draws the
same sequence and ends with the same weights, the live teacher labels the student's own tokens, and only the
generated positions count (the prompt is masked); reachable from distill() and a config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import kdistill
from kdistill.config import validate_settings
from kdistill.engine import TrainConfig, TransferSet, fit
from kdistill.engine.batches import Batch
from kdistill.engine.callbacks import Callback
from kdistill.engine.checkpoint import Checkpointer, load_checkpoint
from kdistill.engine.on_policy import OnPolicy, OnPolicySource
from kdistill.engine.sources import NoTeacher
from kdistill.errors import ConfigError, DataError
from kdistill.losses import get_loss
from kdistill.tasks import get_task
from kdistill.teachers import TorchTeacher
from test_lm_training import VOCAB, Bigram  # the same next-token table model and its vocabulary

ROWS, SEQ, PROMPT = 40, 8, 3


class Successor(nn.Module):
    """A student that always predicts (current id + 1) mod vocab, with near-certainty."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot((input_ids + 1) % VOCAB, VOCAB).float() * 50.0


class Recording(nn.Module):
    """The teacher's module, remembering every batch of ids it was run on."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.seen: list[torch.Tensor] = []

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.seen.append(input_ids.clone())
        return self.inner(input_ids)


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (ROWS, SEQ), generator=torch.Generator().manual_seed(0))


def _targets(ids: torch.Tensor) -> torch.Tensor:
    return get_task("token_lm").encode_targets(ids)


class StepLog(Callback):
    """Which optimizer steps were on-policy (the source's counter after each step)."""

    def __init__(self) -> None:
        self.flags: list[bool] = []
        self._before = 0

    def on_train_begin(self, state) -> None:  # type: ignore[no-untyped-def]
        self._before = state.teacher_source.on_policy_steps

    def on_batch_end(self, state, terms) -> None:  # type: ignore[no-untyped-def]
        now = state.teacher_source.on_policy_steps
        self.flags.append(now > self._before)
        self._before = now


def _fit(share: float, *, epochs: int = 5, callbacks: tuple = (), resume=None, seed: int = 4):  # type: ignore[no-untyped-def]
    ids = _ids()
    student = Bigram(1)
    config = TrainConfig(epochs=epochs, batch_size=8, lr=0.05, verbose=False, schedule="constant")
    state = fit(
        student,
        get_loss("forward_kl", soft_weight=1.0),
        TransferSet(ids, _targets(ids), None),
        config=config,
        teacher=TorchTeacher(Bigram(2)),
        on_policy=OnPolicy(share, prompt_length=PROMPT, seed=seed),
        callbacks=callbacks,
        resume=resume,
    )
    return state, student


def test_the_share_of_on_policy_steps_is_lambdas_coins_for_the_seed() -> None:
    log = StepLog()
    state, _ = _fit(0.3, epochs=8, callbacks=(log,))
    steps = 8 * ROWS // 8
    coins = torch.Generator().manual_seed(4)
    expected = [float(torch.rand((), generator=coins)) < 0.3 for _ in range(steps)]  # one coin per step
    assert log.flags == expected
    assert isinstance(state.teacher_source, OnPolicySource) and state.teacher_source.draws == steps
    assert 0.15 < sum(expected) / steps < 0.45  # 40 coins at λ = 0.3
    never, always = StepLog(), StepLog()
    _fit(0.0, epochs=2, callbacks=(never,))
    _fit(1.0, epochs=2, callbacks=(always,))
    assert never.flags == [False] * 10 and always.flags == [True] * 10


def test_lambda_zero_trains_exactly_the_run_without_on_policy_data() -> None:
    ids = _ids()
    student = Bigram(1)
    config = TrainConfig(epochs=2, batch_size=8, lr=0.05, verbose=False, schedule="constant")
    loss = get_loss("forward_kl", soft_weight=1.0)
    fit(student, loss, TransferSet(ids, _targets(ids), None), config=config, teacher=TorchTeacher(Bigram(2)))
    _, zero = _fit(0.0, epochs=2)
    _, one = _fit(1.0, epochs=2)
    assert torch.equal(zero.table.weight, student.table.weight)
    assert not torch.allclose(one.table.weight, student.table.weight)


def test_the_live_teacher_labels_the_students_tokens_and_the_prompt_is_masked() -> None:
    ids = _ids()[:6]
    teacher_module = Recording(Bigram(2))
    source = OnPolicySource(NoTeacher(), TorchTeacher(teacher_module), Successor(), OnPolicy(1.0, prompt_length=PROMPT))
    batch = Batch(inputs=ids, target=_targets(ids), index=torch.arange(6))
    [[(generated, outputs)]] = list(source.stream(iter([[batch]]), epoch=0))
    new = generated.inputs
    assert torch.equal(new[:, :PROMPT], ids[:, :PROMPT])  # the prompt is kept
    for position in range(PROMPT, SEQ):  # the rest is the student's: its successor rule, token by token
        assert torch.equal(new[:, position], (new[:, position - 1] + 1) % VOCAB)
    assert not torch.equal(new, ids)
    assert torch.equal(teacher_module.seen[-1], new)  # the teacher ran on the generated ids...
    assert outputs is not None
    torch.testing.assert_close(outputs.logits, Bigram(2)(new))  # ...and its logits are what the loss gets
    target = generated.target
    assert target is not None
    assert (target[:, : PROMPT - 1] == -100).all() and (target[:, -1] == -100).all()
    assert torch.equal(target[:, PROMPT - 1 : -1], new[:, PROMPT:])  # each generated token is a target
    # only the generated positions count in the loss: rows x (seq - prompt) tokens
    terms = get_loss("forward_kl", soft_weight=0.0)(kdistill.Outputs(torch.zeros(6, SEQ, VOCAB)), outputs, target)
    torch.testing.assert_close(terms["ce"], torch.tensor(float(torch.tensor(VOCAB).log())))
    counted = (target != -100).sum()
    assert int(counted) == 6 * (SEQ - PROMPT)


def test_a_resumed_run_draws_the_same_coins_and_samples_and_ends_with_the_same_weights(tmp_path: Path) -> None:
    whole_log = StepLog()
    _, whole = _fit(0.5, epochs=4, callbacks=(whole_log,))

    class Kill(Callback):
        def on_batch_end(self, state, terms) -> None:  # type: ignore[no-untyped-def]
            if state.global_step == 13:
                raise KeyboardInterrupt

    path = tmp_path / "checkpoint.safetensors"
    first_log = StepLog()
    with pytest.raises(KeyboardInterrupt):
        _fit(0.5, epochs=4, callbacks=(first_log, Kill(), Checkpointer(path, every_steps=3)))
    checkpoint = load_checkpoint(path)
    assert (checkpoint.epoch, checkpoint.step_in_epoch) == (1, 2)  # after step 12: epoch 2, its 2nd step
    second_log = StepLog()
    _, resumed = _fit(0.5, epochs=4, callbacks=(second_log, Checkpointer(path, every_steps=3)), resume=checkpoint)
    assert first_log.flags[:12] + second_log.flags == whole_log.flags
    assert any(whole_log.flags[12:]) and not all(whole_log.flags[12:])
    assert torch.equal(resumed.table.weight, whole.table.weight)


def test_on_policy_from_distill_and_from_a_config() -> None:
    ids = _ids()

    def run(on_policy: dict | None) -> torch.Tensor:
        student = Bigram(1)
        kdistill.distill(
            TorchTeacher(Bigram(2)), student, ids, task="token_lm", method="forward_kl",
            method_params={"soft_weight": 1.0}, epochs=2, batch_size=8, on_policy=on_policy,
            verbose=False, profile=False, baseline=False, report=False,
        )  # fmt: skip
        return student.table.weight.detach().clone()

    off = run(None)
    assert torch.equal(run({"student_share": 0.0, "prompt_length": PROMPT}), off)
    assert not torch.equal(run({"student_share": 1.0, "prompt_length": PROMPT}), off)
    settings = validate_settings({"task": "token_lm", "on_policy": {"student_share": 0.5, "prompt_length": 4}})
    assert settings.on_policy is not None and settings.on_policy.student_share == 0.5
    with pytest.raises(ConfigError, match="student_share"):
        validate_settings({"on_policy": {"student_share": 1.5, "prompt_length": 4}})
    with pytest.raises(ConfigError, match="task 'token_lm'"):
        kdistill.distill(
            TorchTeacher(nn.Linear(4, 3)), nn.Linear(4, 3), (torch.randn(20, 4), torch.randint(0, 3, (20,))),
            on_policy={"student_share": 0.5, "prompt_length": 2}, epochs=1, verbose=False, report=False,
        )  # fmt: skip


def test_bad_on_policy_settings_are_clear_errors() -> None:
    with pytest.raises(ConfigError, match="student_share"):
        OnPolicy(-0.1, prompt_length=2)
    with pytest.raises(ConfigError, match="prompt_length"):
        OnPolicy(0.5, prompt_length=0)
    ids = _ids()
    with pytest.raises(ConfigError, match="kd_topk cannot read"):
        fit(Bigram(1), get_loss("kd_topk"), TransferSet(ids, _targets(ids), None), teacher=TorchTeacher(Bigram(2)),
            on_policy=OnPolicy(0.5, prompt_length=2), config=TrainConfig(epochs=1, verbose=False))  # fmt: skip
    ids = ids[:4]
    source = OnPolicySource(NoTeacher(), TorchTeacher(Bigram(2)), Bigram(1), OnPolicy(1.0, prompt_length=SEQ))
    with pytest.raises(DataError, match="leaves nothing to generate"):
        list(source.stream(iter([[Batch(inputs=ids, target=_targets(ids), index=torch.arange(4))]]), epoch=0))
