"""The three tasks against independent computations: the engine's own validation for classification, plain loops for
next-token targets and per-token metrics, numpy for embeddings."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from kdistill.data import encode_labels
from kdistill.engine.callbacks import EarlyStopping
from kdistill.engine.loop import validate_classification
from kdistill.errors import DataError, LabelError, ShapeMismatchError
from kdistill.losses import UnknownNameError, kd_loss
from kdistill.tasks import TASKS, Task, get_task, list_tasks, split_batch
from kdistill.teachers import Outputs, TopK


def test_registry_lists_the_four_tasks_and_suggests_a_close_name() -> None:
    assert [name for name, _ in list_tasks()] == ["classification", "embedding", "regression", "token_lm"]
    for name in TASKS:
        task = get_task(name)
        assert isinstance(task, Task)
        assert task.monitor.startswith("val_") and task.report_columns[1] == "retention"
    with pytest.raises(UnknownNameError, match="did you mean 'token_lm'"):
        get_task("token-lm")


# ---- classification ------------------------------------------------------------------------------------------------


def _classifier(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))


def test_classification_validate_is_the_engines_validation_bit_for_bit() -> None:
    torch.manual_seed(1)
    x, y = torch.randn(2500, 6), torch.randint(0, 4, (2500,))
    model = _classifier().train()
    batches = [(x[i : i + 1024], y[i : i + 1024]) for i in range(0, len(x), 1024)]  # predict_logits' chunks
    got = get_task("classification").validate(model, batches)
    assert got == validate_classification(model, (x, y))
    assert model.training  # the mode is restored


def test_classification_score_orders_epochs_as_early_stopping_does() -> None:
    task, stopping = get_task("classification"), EarlyStopping()
    epochs = [
        {"val_accuracy": 0.8, "val_nll": 0.5},
        {"val_accuracy": 0.8, "val_nll": 0.4},
        {"val_accuracy": 0.9, "val_nll": 0.9},
    ]
    for first in epochs:
        for second in epochs:
            expected = stopping._score(first) > stopping._score(second)
            assert (task.score(first) > task.score(second)) == expected


def test_classification_checks_and_targets() -> None:
    task = get_task("classification")
    task.check_outputs(Outputs(torch.randn(5, 3)), Outputs(torch.randn(5, 3)))
    task.check_outputs(Outputs(torch.randn(5, 3)), Outputs(topk=TopK.from_logits(torch.randn(5, 3), 2)))
    with pytest.raises(ShapeMismatchError, match="the student outputs 3 classes, the teacher 4"):
        task.check_outputs(Outputs(torch.randn(5, 3)), Outputs(torch.randn(5, 4)))
    with pytest.raises(ShapeMismatchError, match="names classes id 5"):
        task.check_outputs(Outputs(torch.randn(5, 3)), Outputs(topk=TopK.from_logits(torch.randn(5, 6), 6)))
    with pytest.raises(ShapeMismatchError, match="token_lm"):
        task.check_outputs(Outputs(torch.randn(5, 2, 3)), Outputs(torch.randn(5, 2, 3)))
    labels = np.array(["b", "a", "c", "a"])
    assert torch.equal(task.encode_targets(labels, np.array(["a", "b", "c"])), torch.tensor([1, 0, 2, 0]))
    assert torch.equal(task.encode_targets([2, 0]), encode_labels([2, 0], None))
    with pytest.raises(LabelError, match="never saw"):
        task.encode_targets(labels, np.array(["a", "b"]))


def test_classification_report_metrics_and_retention() -> None:
    task = get_task("classification")
    logits, y = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]]), torch.tensor([0, 1, 1])
    metrics = task.metrics(logits, y, torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]))
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    assert metrics["agreement"] == pytest.approx(2 / 3)
    assert set(task.report_columns) - {"retention"} <= set(metrics)
    assert task.retention({"accuracy": 0.45}, {"accuracy": 0.9}) == pytest.approx(0.5)


# ---- token-level language modelling --------------------------------------------------------------------------------


def _shift_by_hand(ids: list[list[int]], attention: list[list[int]] | None) -> list[list[int]]:
    """target[t] = ids[t + 1] when both t and t + 1 are real tokens, else -100: as a reader would write it."""
    out = []
    for b, row in enumerate(ids):
        targets = []
        for t in range(len(row)):
            real_now = attention is None or attention[b][t] == 1
            real_next = t + 1 < len(row) and (attention is None or attention[b][t + 1] == 1)
            targets.append(row[t + 1] if real_now and real_next else -100)
        out.append(targets)
    return out


def test_next_token_targets_shift_ids_and_respect_padding() -> None:
    task = get_task("token_lm")
    ids = [[5, 6, 7, 0, 0], [1, 2, 3, 4, 9], [0, 0, 8, 8, 2]]  # right padding, none, left padding
    attention = [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]
    got = task.encode_targets({"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(attention)})
    assert got.tolist() == _shift_by_hand(ids, attention)
    assert task.encode_targets(torch.tensor(ids)).tolist() == _shift_by_hand(ids, None)
    labels = [[-100, -100, 7, 0, 0], [1, 2, 3, 4, 9], [0, 0, 8, 8, 2]]  # a prompt kept out of the loss
    with_labels = task.encode_targets(
        {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(attention), "labels": torch.tensor(labels)}
    )
    assert with_labels[0].tolist() == [-100, 7, -100, -100, -100]
    with pytest.raises(LabelError, match="outside the vocabulary of 9"):
        task.encode_targets(torch.tensor(ids), 9)
    with pytest.raises(DataError, match="integer token ids"):
        task.encode_targets(torch.randn(2, 3))


class _TinyLM(nn.Module):
    """Embedding -> linear head; takes input_ids and attention_mask as keywords (as Hugging Face models do)."""

    def __init__(self, vocab: int = 13, width: int = 8) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.embed, self.head = nn.Embedding(vocab, width), nn.Linear(width, vocab)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return {"logits": self.head(torch.tanh(self.embed(input_ids)))}


def _token_loop(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> tuple[float, float]:
    """Mean NLL per real next token and token accuracy over every batch, one token at a time."""
    nll, correct, tokens = 0.0, 0, 0
    with torch.no_grad():
        for batch in batches:
            logits = model(**batch)["logits"]
            ids, attention = batch["input_ids"].tolist(), batch["attention_mask"].tolist()
            for b, row in enumerate(ids):
                for t in range(len(row) - 1):
                    if attention[b][t] and attention[b][t + 1]:
                        log_probs = torch.log_softmax(logits[b, t], dim=0)
                        nll -= float(log_probs[row[t + 1]])
                        correct += int(int(logits[b, t].argmax()) == row[t + 1])
                        tokens += 1
    return nll / tokens, correct / tokens


def test_token_lm_validate_micro_averages_real_tokens_over_batches() -> None:
    generator = torch.Generator().manual_seed(3)
    batches = []
    for rows, seq in ((3, 6), (2, 9)):  # different lengths and padding: a per-batch mean would weigh them wrongly
        ids = torch.randint(0, 13, (rows, seq), generator=generator)
        lengths = torch.randint(2, seq + 1, (rows, 1), generator=generator)
        batches.append({"input_ids": ids, "attention_mask": (torch.arange(seq)[None, :] < lengths).long()})
    model = _TinyLM()
    task = get_task("token_lm")
    got = task.validate(model, [(batch, None) for batch in batches])
    loss, accuracy = _token_loop(model, batches)
    assert got["val_loss"] == pytest.approx(loss, rel=1e-6)
    assert got["val_perplexity"] == pytest.approx(math.exp(loss), rel=1e-6)
    assert got["val_token_accuracy"] == pytest.approx(accuracy)
    assert task.monitor == "val_loss" and not task.higher_is_better
    assert task.score({"val_loss": 1.0}) > task.score({"val_loss": 2.0})
    shifted = [(batch, task.encode_targets(batch)) for batch in batches]  # targets given: the same numbers
    assert task.validate(model, shifted) == got


def test_token_lm_checks_vocabulary_positions_and_masks() -> None:
    task = get_task("token_lm")
    mask = torch.ones(2, 4, dtype=torch.bool)
    task.check_outputs(Outputs(torch.randn(2, 4, 10), mask=mask), Outputs(torch.randn(2, 4, 10)))
    task.check_outputs(Outputs(torch.randn(2, 4, 10)), Outputs(topk=TopK.from_logits(torch.randn(2, 4, 10), 3)))
    with pytest.raises(ShapeMismatchError, match="the student outputs 10 vocabulary entries, the teacher 12"):
        task.check_outputs(Outputs(torch.randn(2, 4, 10)), Outputs(torch.randn(2, 4, 12)))
    with pytest.raises(ShapeMismatchError, match="same"):
        task.check_outputs(Outputs(torch.randn(2, 4, 10)), Outputs(torch.randn(2, 5, 10)))
    with pytest.raises(ShapeMismatchError, match="names tokens id"):
        task.check_outputs(Outputs(torch.randn(2, 4, 10)), Outputs(topk=TopK.from_logits(torch.randn(2, 4, 12), 12)))
    with pytest.raises(ShapeMismatchError, match="mask"):
        task.check_outputs(Outputs(torch.randn(2, 4, 10), mask=mask[:, :3]), Outputs(torch.randn(2, 4, 10)))
    with pytest.raises(ShapeMismatchError, match="every position"):
        task.check_outputs(Outputs(torch.randn(2, 10)), Outputs(torch.randn(2, 10)))


def test_token_lm_targets_feed_kd_loss_and_metrics_consistently() -> None:
    """What the task encodes is what the losses read: the CE term of kd_loss on encoded targets is the task's
    per-token NLL of the same logits."""
    ids = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 0, 0]])
    attention = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    task = get_task("token_lm")
    target = task.encode_targets({"input_ids": ids, "attention_mask": attention})
    torch.manual_seed(4)
    student, teacher = torch.randn(2, 5, 10), torch.randn(2, 5, 10)
    terms = kd_loss(student, teacher, target, mask=attention.bool())
    metrics = task.metrics(student, target, teacher, attention.bool())
    assert float(terms["ce"]) == pytest.approx(metrics["nll"], rel=1e-6)
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["nll"]))
    assert task.retention({"perplexity": 20.0}, {"perplexity": 10.0}) == pytest.approx(0.5)


# ---- embeddings ----------------------------------------------------------------------------------------------------


def test_embedding_validate_matches_numpy() -> None:
    torch.manual_seed(5)
    model = nn.Linear(6, 4)
    x = torch.randn(10, 6)
    teacher = torch.randn(10, 4)
    got = get_task("embedding").validate(model, [(x[:7], teacher[:7]), (x[7:], teacher[7:])])
    with torch.no_grad():
        student = model(x).numpy().astype(np.float64)
    t = teacher.numpy().astype(np.float64)
    cosines = (student * t).sum(1) / (np.linalg.norm(student, axis=1) * np.linalg.norm(t, axis=1))
    assert got["val_cosine"] == pytest.approx(cosines.mean(), rel=1e-5)
    assert got["val_mse"] == pytest.approx(((student - t) ** 2).mean(), rel=1e-5)
    with pytest.raises(DataError, match="teacher's embeddings"):
        get_task("embedding").validate(model, [(x, None)])


def test_embedding_checks_and_targets() -> None:
    task = get_task("embedding")
    assert task.encode_targets(np.arange(3)) is None
    task.check_outputs(Outputs(torch.randn(3, 8)), Outputs(torch.randn(3, 8)))
    with pytest.raises(ShapeMismatchError, match="the student outputs 8 dimensions, the teacher 16"):
        task.check_outputs(Outputs(torch.randn(3, 8)), Outputs(torch.randn(3, 16)))
    with pytest.raises(ShapeMismatchError, match="pool token embeddings"):
        task.check_outputs(Outputs(torch.randn(3, 2, 8)), Outputs(torch.randn(3, 8)))
    same = torch.randn(3, 8)
    metrics = task.metrics(same, None, same.clone())
    assert metrics["cosine"] == pytest.approx(1.0) and metrics["mse"] == 0.0
    assert task.retention({"cosine": 0.8}, metrics) == pytest.approx(0.8)


def test_batches_may_be_pairs_or_objects_with_inputs_and_target() -> None:
    class Batch:
        def __init__(self) -> None:
            self.inputs = {"input_ids": torch.zeros(1, 3, dtype=torch.long), "attention_mask": torch.ones(1, 3)}
            self.target = None

    inputs, target, mask = split_batch(Batch())
    assert isinstance(inputs, dict) and target is None and mask is not None and mask.shape == (1, 3)
    assert split_batch((torch.zeros(2), torch.ones(2)))[2] is None
    with pytest.raises(DataError, match="pair"):
        split_batch(torch.zeros(3))


def test_token_level_kd_trains_through_todays_engine_and_ignores_padding() -> None:
    """The engine indexes rows only, so (rows, seq) targets and (rows, seq, vocab) teacher logits flow through it
    unchanged; -100 targets keep padding out of both terms. Garbage in the teacher's padded positions changes no
    weight."""
    from kdistill.engine import TrainConfig, TransferSet, fit
    from kdistill.losses import KDLoss

    generator = torch.Generator().manual_seed(6)
    ids = torch.randint(1, 13, (40, 7), generator=generator)
    lengths = torch.randint(3, 8, (40, 1), generator=generator)
    attention = (torch.arange(7)[None, :] < lengths).long()
    target = get_task("token_lm").encode_targets({"input_ids": ids, "attention_mask": attention})
    teacher = torch.randn(40, 7, 13, generator=generator) * 2
    garbage = teacher.masked_fill((target == -100)[..., None], 1e6)
    weights = []
    for soft in (teacher, garbage):
        model = nn.Sequential(nn.Embedding(13, 8), nn.Linear(8, 13))
        torch.manual_seed(0)
        for parameter in model.parameters():
            nn.init.normal_(parameter, std=0.3)
        state = fit(
            model,
            KDLoss(2.0, 0.5),
            TransferSet(ids, target, soft),
            config=TrainConfig(epochs=3, batch_size=16, verbose=False),
        )
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        assert state.history[-1]["train_loss"] < state.history[0]["train_loss"]
    assert torch.equal(weights[0], weights[1])
