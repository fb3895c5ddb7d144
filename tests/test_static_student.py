"""The static-embedding student: its initialisation against an independent transcription of Model2Vec's recipe
(teacher on [CLS] token [SEP], centred PCA, SIF weights), Model2Vec's tokenisation, the saved folder loading in
Model2Vec with the same embeddings, the corpus vocabulary, fine-tuning through the one pipeline (``distill``, the
teacher's token ids mapped to the student's rows, a narrower student trained in its PCA space), and bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA

import kdistill
from kdistill.config import validate_settings
from kdistill.embedding_eval import similarity_report
from kdistill.errors import DataError, StudentError
from kdistill.pipeline import RunSpec, prepare
from kdistill.sentence_export import save_model2vec
from kdistill.sentences import sentence_split, sentence_student
from kdistill.students.static import StaticEmbedding, corpus_vocabulary, sif_weights, zipf_probabilities
from kdistill.teachers import SentenceEncoder, SentenceTeacher
from sentence_cases import SENTENCES, tiny_bert, tiny_tokenizer


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> SentenceTeacher:
    tokenizer = tiny_tokenizer(tmp_path_factory.mktemp("vocab"))
    return SentenceTeacher(SentenceEncoder(tiny_bert(tokenizer.vocab_size)), tokenizer, max_length=32)


def _distill(teacher: SentenceTeacher, params: dict, **kwargs: object) -> kdistill.DistillResult:
    options: dict = {"epochs": 2, "batch_size": 8, "lr": 1e-2, "weight_decay": 0.0, "verbose": False} | kwargs
    return kdistill.distill(teacher, "static", SENTENCES, task="embedding", student_params=params, **options)


def test_zipf_and_sif_weights_follow_the_formulas() -> None:
    probabilities = zipf_probabilities(4)
    ranks = np.array([1 / 2, 1 / 3, 1 / 4, 1 / 5])
    np.testing.assert_allclose(probabilities, ranks / ranks.sum())
    np.testing.assert_allclose(sif_weights(probabilities, 1e-3), 1e-3 / (1e-3 + probabilities))
    np.testing.assert_array_equal(sif_weights(probabilities, None), np.ones(4))
    with pytest.raises(StudentError, match="sif_coefficient must be in"):
        sif_weights(probabilities, 2.0)


def _token_vectors(teacher: SentenceTeacher) -> np.ndarray:
    """The teacher on ``[CLS] token [SEP]`` for every token id in order, as Model2Vec's create_embeddings (no
    padding)."""
    vocab = teacher.tokenizer.get_vocab()
    cls, sep = vocab["[CLS]"], vocab["[SEP]"]
    rows = []
    for token_id in sorted(vocab.values()):
        ids = torch.tensor([[cls, token_id, sep]])
        rows.append(teacher.encoder(ids, torch.ones_like(ids)).detach())
    return torch.cat(rows).double().numpy()


def test_vectors_are_the_teacher_on_each_token_pca_and_sif(teacher: SentenceTeacher) -> None:
    """Model2Vec's recipe (``pca_center=True``): scikit-learn's centred PCA, signs fixed, then SIF on Zipf ranks."""
    student = StaticEmbedding.from_teacher(teacher, pca_dims=8, pca_center=True, sif_coefficient=1e-2, weighting="zipf")
    token_vectors = _token_vectors(teacher)
    reduced = PCA(n_components=8, svd_solver="full").fit_transform(token_vectors)
    signs = np.sign(reduced[np.abs(reduced).argmax(axis=0), np.arange(8)])
    reduced = reduced * signs
    ranks = 1.0 / np.arange(2, len(token_vectors) + 2)
    weights = 1e-2 / (1e-2 + ranks / ranks.sum())
    expected = reduced * weights[:, None]
    np.testing.assert_allclose(student.vectors.weight.detach().numpy(), expected, rtol=1e-4, atol=1e-5)


def test_an_uncentred_pca_keeps_the_teachers_cosines(teacher: SentenceTeacher) -> None:
    """``pca_center=False``: the top right singular vectors of the raw token vectors (no mean
    subtracted), signs fixed as Model2Vec fixes them. Kept whole it is a rotation, so the projected teacher
    embeddings have exactly the teacher's cosines, which a centred PCA of the same width does not keep."""
    token_vectors = _token_vectors(teacher)
    _, _, right = np.linalg.svd(token_vectors, full_matrices=False)
    scores = token_vectors @ right[:8].T
    signs = np.sign(scores[np.abs(scores).argmax(axis=0), np.arange(8)])
    student = StaticEmbedding.from_teacher(
        teacher, pca_dims=8, pca_center=False, sif_coefficient=None, weighting="zipf"
    )
    np.testing.assert_allclose(student.vectors.weight.detach().numpy(), scores * signs, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(student.pca_mean.numpy(), np.zeros(token_vectors.shape[1]))
    width = token_vectors.shape[1]
    targets = teacher.encode(SENTENCES).double()
    cosines = targets @ targets.T / (targets.norm(dim=1, keepdim=True) * targets.norm(dim=1))
    for center, keeps in ((False, True), (True, False)):
        whole = StaticEmbedding.from_teacher(teacher, pca_dims=width, pca_center=center, sif_coefficient=None)
        projected = whole.project(targets.float()).double()
        assert torch.allclose(projected @ projected.T, cosines, atol=1e-4) is keeps, center
    with pytest.raises(StudentError, match="pca_center must be true or false"):
        StaticEmbedding.from_teacher(teacher, pca_dims=8, pca_center="yes")  # type: ignore[arg-type]


def test_a_sentence_is_the_normalised_mean_of_its_known_tokens(teacher: SentenceTeacher) -> None:
    student = StaticEmbedding.from_teacher(teacher, pca_dims=None, sif_coefficient=None)
    vocab = teacher.tokenizer.get_vocab()
    sentence = "Return the sum of the zzq array."  # "zzq" is [UNK] pieces: dropped, as Model2Vec drops them
    ids = [vocab[token] for token in ["return", "the", "sum", "of", "the", "array", "."]]
    mean = student.vectors.weight.detach()[ids].mean(dim=0)
    torch.testing.assert_close(student.encode([sentence])[0], mean / mean.norm(), rtol=1e-5, atol=1e-6)
    assert student.token_ids([sentence])[0] == ids


def test_model2vec_loads_the_saved_student_with_the_same_embeddings(teacher: SentenceTeacher, tmp_path: Path) -> None:
    model2vec = pytest.importorskip("model2vec")
    result = _distill(teacher, {"pca_dims": 16}, test=SENTENCES[:5], out=tmp_path / "run")
    student = result.student
    assert isinstance(student, StaticEmbedding)
    folder = tmp_path / "run" / "model"  # the run saves the student in Model2Vec's format
    loaded = model2vec.StaticModel.from_pretrained(folder)
    sentences = [*SENTENCES, "zzq qqz", "THE ARRAY, sorted; the matrix!"]  # one with no known token: zeros
    theirs = loaded.encode(sentences, use_multiprocessing=False)
    ours = student.encode(sentences).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    assert np.all(ours[-2] == 0)
    with pytest.raises(Exception, match="already exists"):
        save_model2vec(student, folder)
    save_model2vec(student, folder, overwrite=True)


def test_corpus_vocabulary_adds_whole_words_embedded_from_their_pieces(teacher: SentenceTeacher) -> None:
    corpus = [*SENTENCES, "Distillation and distillation.", "The distillation of data."]
    words = corpus_vocabulary(teacher, corpus, min_count=2)
    assert words == ["distillation"]  # split into dist ##ill ##ation by the teacher, seen 4 times
    student = StaticEmbedding.from_teacher(teacher, vocabulary=words, pca_dims=None, sif_coefficient=None)
    new_id = student.tokenizer.token_to_id("distillation")
    assert new_id == teacher.tokenizer.vocab_size  # appended after the teacher's own tokens
    assert student.token_ids(["distillation"]) == [[new_id]]
    pieces = teacher.tokenizer("distillation")["input_ids"]  # [CLS] dist ##ill ##ation [SEP]
    ids = torch.tensor([pieces])
    expected = teacher.encoder(ids, torch.ones_like(ids)).detach()[0]
    torch.testing.assert_close(student.vectors.weight.detach()[new_id], expected, rtol=1e-5, atol=1e-6)


def test_pruning_to_the_corpus_keeps_its_tokenisation(teacher: SentenceTeacher) -> None:
    full = StaticEmbedding.from_teacher(teacher, pca_dims=None, sif_coefficient=None)
    pruned = StaticEmbedding.from_teacher(
        teacher, corpus=SENTENCES, prune_to_corpus=True, pca_dims=None, sif_coefficient=None
    )
    assert pruned.vectors.num_embeddings < full.vectors.num_embeddings
    torch.testing.assert_close(pruned.encode(SENTENCES), full.encode(SENTENCES), rtol=1e-5, atol=1e-6)


def test_corpus_weighting_uses_token_counts(teacher: SentenceTeacher) -> None:
    plain = StaticEmbedding.from_teacher(teacher, pca_dims=None, sif_coefficient=None)
    weighted = StaticEmbedding.from_teacher(teacher, corpus=SENTENCES, pca_dims=None, sif_coefficient=0.01)
    counts = np.zeros(plain.vectors.num_embeddings)
    for ids in plain.token_ids(SENTENCES):
        for i in ids:
            counts[i] += 1
    weights = 0.01 / (0.01 + counts / counts.sum())
    np.testing.assert_allclose(
        weighted.vectors.weight.detach().numpy(),
        plain.vectors.weight.detach().numpy() * weights[:, None],
        rtol=1e-5,
        atol=1e-6,
    )


def test_fine_tuning_brings_the_similarities_closer_to_the_teacher(teacher: SentenceTeacher) -> None:
    targets = teacher.encode(SENTENCES)
    before = StaticEmbedding.from_teacher(teacher, corpus=SENTENCES, pca_dims=None).encode(SENTENCES)
    before_score = similarity_report(targets, before, pairs=500)["spearman_random"]
    for loss in ("cosine", "contrastive", "mse"):
        result = _distill(teacher, {"pca_dims": None}, method=loss, epochs=40, lr=1e-3, report=False)
        after = similarity_report(targets, result.student.encode(SENTENCES), pairs=500)["spearman_random"]
        assert result.history[-1]["train_loss"] < result.history[0]["train_loss"], loss
        assert after > before_score + 0.2, (loss, before_score, after)  # measured: 0.53 before, 0.96-0.99 after


def test_the_teacher_token_ids_give_what_model2vec_tokenisation_gives(teacher: SentenceTeacher) -> None:
    for prune in (False, True):  # the run feeds the teacher's ids; encode() is Model2Vec's own tokenisation
        student = StaticEmbedding.from_teacher(teacher, corpus=SENTENCES, prune_to_corpus=prune, pca_dims=8)
        sentences = [*SENTENCES[:4], "THE ARRAY, sorted; the matrix!"]
        from_teacher_ids = student(**teacher.tokenize(sentences, fixed_width=True))
        torch.testing.assert_close(from_teacher_ids, student.encode(sentences), rtol=1e-5, atol=1e-6)
    words = StaticEmbedding.from_teacher(teacher, vocabulary=["distillation"], pca_dims=None)
    with pytest.raises(StudentError, match="whole words beyond the teacher's tokens"):
        words(**teacher.tokenize(SENTENCES[:2]))


def test_a_narrower_student_trains_on_the_teacher_embeddings_in_its_pca_space(teacher: SentenceTeacher) -> None:
    train = sentence_split(teacher, SENTENCES, "train")
    for method, projected in (("cosine", True), ("mse", True), ("contrastive", False)):
        spec = RunSpec(
            settings=validate_settings({"task": "embedding", "method": method, "report": {"baseline": False}}),
            train=train,
            teacher=teacher,
            student=sentence_student("static", teacher, SENTENCES, {"pca_dims": 8}),
        )
        prepared = prepare(spec)
        raw = teacher.encode(SENTENCES)
        assert isinstance(prepared.student, StaticEmbedding) and prepared.targets is not None
        expected = prepared.student.project(raw) if projected else raw  # (t - mu) V^T, normalised
        assert prepared.targets.shape == expected.shape, method
        torch.testing.assert_close(prepared.targets, expected, rtol=1e-4, atol=1e-5)
    result = _distill(teacher, {"pca_dims": 8}, test=SENTENCES[:6], method="cosine", epochs=20, lr=1e-2)
    student_metrics = result.report.models["student"]
    assert np.isnan(student_metrics["cosine"])  # 8 against 32 dimensions: no cosine to the teacher's embeddings
    assert 0 < student_metrics["spearman"] <= 1 and result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_project_maps_teacher_vectors_with_the_pca(teacher: SentenceTeacher) -> None:
    student = StaticEmbedding.from_teacher(teacher, pca_dims=8)
    targets = teacher.encode(SENTENCES[:4])
    mean, components = student.pca_mean, student.pca_components
    expected = (targets - mean) @ components.T
    torch.testing.assert_close(student.project(targets), expected / expected.norm(dim=1, keepdim=True))


def test_a_corpus_smaller_than_the_pca_dimension_is_refused(teacher: SentenceTeacher) -> None:
    with pytest.raises(DataError, match=r"PCA to 32 dimensions needs at least 32 token vectors.*corpus"):
        StaticEmbedding.from_teacher(teacher, corpus=SENTENCES[:2], prune_to_corpus=True, pca_dims=32)
    with pytest.raises(StudentError, match="more than the teacher's 32 dimensions"):
        StaticEmbedding.from_teacher(teacher, pca_dims=64)


def test_a_vocabulary_the_teacher_cannot_encode_is_refused(teacher: SentenceTeacher) -> None:
    with pytest.raises(DataError, match=r"cannot encode vocabulary\[1\] 'ƒ' .*\[UNK\]"):
        StaticEmbedding.from_teacher(teacher, vocabulary=["distillation", "ƒ"], pca_dims=None)
    with pytest.raises(DataError, match=r"vocabulary\[0\] 'two words' is 2 words"):
        StaticEmbedding.from_teacher(teacher, vocabulary=["two words"], pca_dims=None)
    with pytest.raises(DataError, match=r"vocabulary\[0\] is ''"):
        StaticEmbedding.from_teacher(teacher, vocabulary=[""], pca_dims=None)


def test_empty_sentences_small_corpora_and_bad_params_are_refused(teacher: SentenceTeacher) -> None:
    student = StaticEmbedding.from_teacher(teacher, pca_dims=8)
    with pytest.raises(DataError, match=r"corpus\[2\] is empty"):
        StaticEmbedding.from_teacher(teacher, corpus=["a b", "c", " "], pca_dims=8)
    with pytest.raises(DataError, match=r"sentences\[0\] is empty"):
        student.encode([""])
    with pytest.raises(DataError, match=r"train sentences\[1\] is empty or whitespace only"):
        kdistill.distill(teacher, "static", ["a b", "   ", "c"], task="embedding", verbose=False)
    with pytest.raises(DataError, match=r"test sentences\[0\] is empty"):
        kdistill.distill(teacher, "static", SENTENCES, test=["", "a"], task="embedding", verbose=False)
    with pytest.raises(DataError, match=r"PCA to 32 dimensions needs at least 32 token vectors"):
        kdistill.distill(  # two sentences use fewer than 32 tokens
            teacher, "static", SENTENCES[:2], task="embedding", student_params={"pca_dims": 32, "vocabulary": "corpus"}
        )
    with pytest.raises(StudentError, match="has no param 'pca'"):
        _distill(teacher, {"pca": 8})


def test_token_vectors_through_the_cache_are_the_same(teacher: SentenceTeacher, tmp_path: Path) -> None:
    direct = StaticEmbedding.from_teacher(teacher, pca_dims=8)
    cached = StaticEmbedding.from_teacher(teacher, pca_dims=8, cache_dir=tmp_path)
    again = StaticEmbedding.from_teacher(teacher, pca_dims=8, cache_dir=tmp_path)  # read from the entry
    torch.testing.assert_close(cached.vectors.weight, direct.vectors.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(again.vectors.weight, cached.vectors.weight, rtol=0, atol=0)
    assert any((tmp_path / "sets").iterdir())


def test_a_tokenizer_that_pads_every_text_does_not_change_the_token_vectors(
    teacher: SentenceTeacher, tmp_path: Path
) -> None:
    padded = tiny_tokenizer(tmp_path / "padded")  # MiniLM's tokenizer.json pads every text to 128 tokens
    padded.backend_tokenizer.enable_padding(length=16, pad_id=0, pad_token="[PAD]")
    padding_teacher = SentenceTeacher(teacher.encoder, padded, max_length=32)
    plain = StaticEmbedding.from_teacher(teacher, pca_dims=None, normalize=False)
    from_padded = StaticEmbedding.from_teacher(padding_teacher, pca_dims=None, normalize=False)
    torch.testing.assert_close(from_padded.vectors.weight, plain.vectors.weight, rtol=1e-5, atol=1e-6)
