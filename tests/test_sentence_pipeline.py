"""Sentence encoders through the one pipeline: the teacher's rows as the cache keys them, the teacher's sub-batches,
the text-file splits of a config, the report's sentences/s, the wall-time budget, and bad input at the run level."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import kdistill
from kdistill.engine import TrainState
from kdistill.engine.callbacks import TimeBudget
from kdistill.errors import ConfigError, DataError, ShapeMismatchError
from kdistill.sentences import read_sentences, sentence_split
from kdistill.teachers import SentenceEncoder, SentenceTeacher
from sentence_cases import SENTENCES, tiny_bert, tiny_tokenizer


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> SentenceTeacher:
    tokenizer = tiny_tokenizer(tmp_path_factory.mktemp("vocab"))
    return SentenceTeacher(SentenceEncoder(tiny_bert(tokenizer.vocab_size)), tokenizer, max_length=32)


def test_a_sentence_row_is_the_same_in_any_corpus_and_the_sub_batches_change_nothing(teacher: SentenceTeacher) -> None:
    whole = sentence_split(teacher, SENTENCES, "train")
    part = sentence_split(teacher, SENTENCES[3:5], "train")
    assert whole.x["input_ids"].shape == (len(SENTENCES), 32)  # padded to max_length: rows do not depend on the set
    torch.testing.assert_close(part.x["input_ids"], whole.x["input_ids"][3:5], rtol=0, atol=0)
    assert whole.raw_x == SENTENCES and whole.y is None
    one_by_one = torch.cat([teacher.encode([sentence]) for sentence in SENTENCES])
    teacher.sub_batch = 3  # rows sorted by length, run 3 at a time, put back in order
    try:
        torch.testing.assert_close(teacher(whole.x).logits, one_by_one, rtol=1e-5, atol=1e-6)
    finally:
        teacher.sub_batch = 64


def test_a_text_file_is_split_by_a_seeded_shuffle(tmp_path: Path) -> None:
    source = tmp_path / "sentences.txt"
    source.write_text("\n".join([*SENTENCES, "", "  ", SENTENCES[0]]) + "\n")  # blank lines and a repeat dropped
    train, val, test = read_sentences(str(source), val=2, seed=1)
    assert len(test) == 3 and val is not None and len(val) == 2 and len(train) == len(SENTENCES) - 5
    assert sorted([*train, *val, *test]) == sorted(SENTENCES)
    assert read_sentences(str(source), val=2, seed=1) == (train, val, test)
    assert read_sentences("sentences.txt", train=4, base=tmp_path)[0] == read_sentences(str(source))[0][:4]
    with pytest.raises(ConfigError, match="neither 'docstrings' nor a file"):
        read_sentences("missing.txt", base=tmp_path)
    source.write_text("One sentence.\nTwo sentences.\nThree.\nFour.\n")
    with pytest.raises(DataError, match="too few for 3 test, 0 validation and 2 training sentences"):
        read_sentences(str(source))


def test_the_report_has_sentences_per_second_for_teacher_and_student(teacher: SentenceTeacher) -> None:
    result = kdistill.distill(
        teacher, "static", SENTENCES, val=SENTENCES[:4], test=SENTENCES[4:10], task="embedding",
        student_params={"pca_dims": None}, epochs=2, batch_size=8, lr=1e-2, verbose=False,
    )  # fmt: skip
    assert result.report is not None
    models = result.report.models
    for name in ("teacher", "student"):
        assert models[name]["sentences_per_s_batch_1"] > 0 and models[name]["sentences_per_s_batch_64"] > 0
    assert models["teacher"]["speedup_batch_64"] == 1.0
    assert "val_cosine" in result.history[-1]  # validated on the teacher's embeddings of val


def test_a_time_budget_stops_training_at_the_next_step() -> None:
    budget = TimeBudget(1e-9)
    state = TrainState.__new__(TrainState)
    state.stop = False
    budget.on_train_begin(state)
    budget.on_batch_end(state, {})
    assert state.stop
    with pytest.raises(ConfigError, match="must be > 0 seconds"):
        TimeBudget(0)


def test_a_run_with_a_time_budget_stops_early(teacher: SentenceTeacher, monkeypatch: pytest.MonkeyPatch) -> None:
    ticks = iter(range(10**6))  # a fake clock: each reading is one second later, whatever the machine's load
    monkeypatch.setattr(TimeBudget, "clock", staticmethod(lambda: float(next(ticks))))
    result = kdistill.distill(
        teacher, "static", SENTENCES, task="embedding", student_params={"pca_dims": None}, epochs=500,
        batch_size=2, settings={"train": {"max_minutes": 2.5 / 60}}, report=False, verbose=False,
    )  # fmt: skip
    # read at the start (0 s) and after each step (1, 2, 3 s): the third step is past 2.5 s and ends the run there
    assert len(result.history) == 1 and result.history[-1]["step"] == 3


def test_a_pooling_rule_that_is_not_two_dimensional_fails_before_training(teacher: SentenceTeacher) -> None:
    flat = SentenceTeacher(SentenceEncoder(teacher.encoder.model, pooling=lambda h, m: h), teacher.tokenizer)
    with pytest.raises(ShapeMismatchError, match="a sentence encoder gives \\(batch, dim\\)"):
        kdistill.distill(flat, "transformer", SENTENCES, task="embedding", verbose=False)
    with pytest.raises(DataError, match=r"train sentences\[2\] is empty or whitespace only"):
        kdistill.distill(teacher, "transformer", [*SENTENCES[:2], "\t"], task="embedding", verbose=False)


def test_a_transformer_student_with_fewer_feed_forward_units_keeps_the_teachers_pooling(
    teacher: SentenceTeacher,
) -> None:
    from kdistill.errors import StudentError
    from kdistill.sentences import sentence_student
    from kdistill.students.transformer import from_teacher

    student = sentence_student("transformer", teacher, SENTENCES, {"layers": 1, "intermediate_size": 16})()
    assert isinstance(student, SentenceEncoder) and student.model.config.intermediate_size == 16
    expected = from_teacher(teacher.encoder.model, layers=1, intermediate_size=16)
    assert all(torch.equal(a, b) for a, b in zip(student.model.parameters(), expected.parameters(), strict=True))
    batch = teacher.tokenize(SENTENCES[:3])
    with torch.no_grad():
        hidden = expected.eval()(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1)
        torch.testing.assert_close(student.eval()(**batch), pooled, rtol=1e-5, atol=1e-6)
    with pytest.raises(StudentError, match="has no param 'ffn'"):
        sentence_student("transformer", teacher, SENTENCES, {"ffn": 16})
