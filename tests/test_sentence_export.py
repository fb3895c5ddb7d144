"""The transformer sentence student: initialised from chosen teacher layers, trained on the teacher's embeddings
through the one pipeline (``distill``), saved by the run as a sentence-transformers folder that
``SentenceTransformer(path)`` loads with the same embeddings, and exported to ONNX (fp32 checked against PyTorch, and
INT8)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import kdistill
from kdistill.embedding_eval import similarity_report
from kdistill.errors import ConfigError, ExportError, StudentError
from kdistill.sentence_export import export_sentence_onnx, save_sentence_transformer
from kdistill.students.transformer import FreshWeightsWarning
from kdistill.teachers import SentenceEncoder, SentenceTeacher
from sentence_cases import SENTENCES, tiny_bert, tiny_tokenizer


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> SentenceTeacher:
    tokenizer = tiny_tokenizer(tmp_path_factory.mktemp("vocab"))
    return SentenceTeacher(SentenceEncoder(tiny_bert(tokenizer.vocab_size, layers=3)), tokenizer, max_length=32)


def test_the_student_starts_from_the_chosen_teacher_layers(teacher: SentenceTeacher) -> None:
    student = teacher.transformer_student(layer_map=[0, 2])
    assert student.model.config.num_hidden_layers == 2
    assert (student.pooling, student.normalize) == ("mean", True)
    source = teacher.encoder.model.encoder.layer[2].state_dict()
    for name, value in student.model.encoder.layer[1].state_dict().items():
        torch.testing.assert_close(value, source[name], rtol=0, atol=0)
    full = teacher.transformer_student(layer_map=[0, 1, 2]).eval()  # every layer: the teacher itself
    tokens = teacher.tokenize(SENTENCES)
    torch.testing.assert_close(full(**tokens).detach(), teacher(tokens).logits, rtol=1e-5, atol=1e-6)


def test_trained_student_saves_as_a_sentence_transformer_with_the_same_embeddings(
    teacher: SentenceTeacher, tmp_path: Path
) -> None:
    sentence_transformers = pytest.importorskip("sentence_transformers")
    with pytest.warns(FreshWeightsWarning):  # narrower than the teacher: fresh weights, 16-d embeddings
        untrained = teacher.transformer_student(layer_map=[2], hidden_size=16)
    tokens, targets = teacher.tokenize(SENTENCES), teacher.encode(SENTENCES)
    before = similarity_report(targets, untrained.eval()(**tokens).detach(), pairs=500)["spearman_random"]
    # 16-d student, 32-d teacher: the contrastive loss compares similarities, so the widths may differ
    with pytest.warns(FreshWeightsWarning):
        result = kdistill.distill(
            teacher, "transformer", SENTENCES, task="embedding", method="contrastive",
            student_params={"layer_map": [2], "hidden_size": 16}, epochs=40, batch_size=8, lr=3e-3,
            weight_decay=0.0, report=False, verbose=False, out=tmp_path / "run",
        )  # fmt: skip
    student = result.student
    assert isinstance(student, SentenceEncoder)
    ours = student(**tokens).detach()
    after = similarity_report(targets, ours, pairs=500)["spearman_random"]
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert after > before + 0.2, (before, after)  # measured: 0.2-0.3 before, 0.74 after
    torch.testing.assert_close(student.encode(SENTENCES), ours, rtol=1e-5, atol=1e-6)
    folder = tmp_path / "run" / "model"  # the run saved it as a sentence-transformers folder
    theirs = sentence_transformers.SentenceTransformer(str(folder), device="cpu").encode(SENTENCES, batch_size=5)
    np.testing.assert_allclose(ours.numpy(), theirs, rtol=1e-5, atol=1e-5)
    reloaded = SentenceTeacher.from_pretrained(folder).encode(SENTENCES)  # and kdistill reads it back as a teacher
    torch.testing.assert_close(reloaded, ours, rtol=1e-5, atol=1e-5)
    with pytest.raises(ExportError, match="already exists"):
        save_sentence_transformer(student, teacher.tokenizer, folder)


def test_onnx_export_matches_pytorch_and_int8_stays_close(
    teacher: SentenceTeacher, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("onnxruntime")
    monkeypatch.chdir(tmp_path)  # ONNX Runtime's shape inference leaves scratch files in the current folder
    student = teacher.transformer_student(layer_map=[1]).eval()
    summary = export_sentence_onnx(student, teacher.tokenizer, SENTENCES, tmp_path / "onnx")
    assert summary["max_abs_diff"] < 1e-4
    assert Path(summary["onnx"]).exists() and Path(summary["int8"]).exists()
    assert summary["int8_min_cosine"] > 0.9
    import onnxruntime

    session = onnxruntime.InferenceSession(summary["onnx"], providers=["CPUExecutionProvider"])
    tokens = teacher.tokenize([*SENTENCES[:3], "A much longer sentence about the sorted values of a large matrix."])
    got = session.run(None, {name: value.numpy() for name, value in tokens.items()})[0]  # other batch and length
    np.testing.assert_allclose(got, student(**tokens).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_a_run_refuses_methods_and_params_that_do_not_fit(teacher: SentenceTeacher) -> None:
    with pytest.raises(ConfigError, match="method 'rkd' does not fit task 'embedding'"):
        kdistill.distill(teacher, "transformer", SENTENCES, task="embedding", method="rkd", verbose=False)
    with pytest.raises(StudentError, match="has no param 'hidden'"):
        kdistill.distill(teacher, "transformer", SENTENCES, task="embedding", student_params={"hidden": [4]})
    with pytest.raises(StudentError, match="builds student 'static' or 'transformer', got 'mlp'"):
        kdistill.distill(teacher, "mlp", SENTENCES, task="embedding", verbose=False)
