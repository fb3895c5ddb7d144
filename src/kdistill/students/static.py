"""The static-embedding student: one vector per vocabulary token; a sentence is the mean of its tokens' vectors.

Built from a sentence-encoder teacher the way Model2Vec builds its models (Tulkens & van Dongen, "Model2Vec",
https://github.com/MinishLab/model2vec, ``distill/inference.py``), then fine-tuned on the teacher's sentence
embeddings of the user's corpus:

1. **Vocabulary**: the teacher tokenizer's (WordPiece) vocabulary, plus optional whole words
   (:func:`corpus_vocabulary` finds the frequent words of a corpus that the tokenizer splits into pieces), optionally
   pruned to the tokens the corpus uses (``prune_to_corpus``).
2. **Token vectors**: the teacher run on ``[CLS] token [SEP]`` for every token (a new word: on its pieces), pooled
   and normalised as the teacher does: :math:`e_w \\in R^D`.
3. **PCA**: centred on the token vectors' mean :math:`\\mu`, reduced to ``pca_dims`` components :math:`V` (rows):
   :math:`\\tilde e_w = (e_w - \\mu) V^\\top` (each component's sign fixed so its largest score is positive), as
   Model2Vec's scikit-learn PCA does. ``pca_center=False`` takes the components of the uncentred second moment
   instead (:math:`\\mu = 0`): the teacher's sentence embeddings, mapped the same way to train the student, then
   keep their cosines (kept whole it is a rotation), which subtracting :math:`\\mu` changes. Which trains the
   better student is measured, not assumed: ``benchmarks/sentence_encoders.py --no-pca-center``
   (docs/sentence_encoders.md).
4. **SIF weighting** (Arora et al. 2017, https://openreview.net/forum?id=SyK00v5xx):
   :math:`v_w = \\frac{a}{a + p(w)} \\tilde e_w`, ``a`` = ``sif_coefficient`` (1e-4). :math:`p(w)` is the token's
   frequency in the corpus when one is given (``weighting="corpus"``), else Zipf's law on the token's rank as
   Model2Vec estimates it (``weighting="zipf"``: :math:`p(r) \\propto 1/(r + 2)` for ids :math:`r = 0, 1, ...`).
5. **Fine-tuning** (a run: ``kdistill.distill(teacher, "static", sentences, task="embedding")``, or
   ``kdistill run`` with ``student: {kind: static}``): the vectors are trained so that the sentence embedding
   :math:`s = \\frac{1}{n}\\sum_{i} v_{w_i}` (L2-normalised when ``normalize``) matches the teacher's, with the
   ``cosine``, ``mse`` or ``contrastive`` loss. The teacher's (batch, D) targets are first mapped into the
   student's space with the same centring and PCA (:meth:`StaticEmbedding.project`), so the cosine and MSE losses
   compare like with like; the contrastive loss compares similarities and needs no mapping.

Tokenisation is Model2Vec's ``StaticModel.encode``: the tokenizer without special tokens, unknown tokens dropped, no
truncation; a sentence with no known token embeds as zeros. Saved with :func:`kdistill.sentence_export.save_model2vec`,
``model2vec.StaticModel.from_pretrained`` gives the same embeddings.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kdistill._deps import require
from kdistill.errors import DataError, StudentError
from kdistill.students.base import register_student
from kdistill.teachers.sentence import SentenceTeacher, check_sentences

__all__ = ["StaticEmbedding", "corpus_vocabulary", "sif_weights", "zipf_probabilities"]

SIF_COEFFICIENT = 1e-4
"""Model2Vec's default ``a`` in the SIF weight :math:`a / (a + p(w))`."""


def zipf_probabilities(size: int) -> np.ndarray:
    """Model2Vec's frequency estimate for ids sorted by frequency: :math:`p(r) = \\frac{1/(r+2)}{\\sum_k 1/(k+2)}`,
    ``r`` = 0 .. size - 1. Returns (size,) float64 summing to 1."""
    inverse_rank = 1.0 / np.arange(2, size + 2, dtype=np.float64)
    return inverse_rank / inverse_rank.sum()


def sif_weights(probabilities: np.ndarray, sif_coefficient: float | None = SIF_COEFFICIENT) -> np.ndarray:
    """:math:`a / (a + p(w))` per token (all ones when ``sif_coefficient`` is None)."""
    if sif_coefficient is None:
        return np.ones(len(probabilities))
    if not 0 < sif_coefficient < 1:
        raise StudentError(
            f"sif_coefficient must be in (0, 1), got {sif_coefficient}", hint="1e-4 is Model2Vec's default."
        )
    return sif_coefficient / (sif_coefficient + np.asarray(probabilities, dtype=np.float64))


def _pca(vectors: np.ndarray, dims: int, *, center: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), components (dims, D)): the top eigenvectors of the centred covariance (``center``, Model2Vec's
    ``_pca_fit_transform``) or of the uncentred second moment :math:`X^\\top X / n` (mean zeros), signs fixed so
    each component's largest-magnitude score is positive."""
    mean = vectors.mean(axis=0) if center else np.zeros(vectors.shape[1])
    centred = vectors - mean
    covariance = centred.T @ centred / max(1, len(vectors) - 1)
    _, eigenvectors = np.linalg.eigh(covariance)
    components = eigenvectors[:, ::-1][:, :dims].T
    scores = centred @ components.T
    largest = np.abs(scores).argmax(axis=0)
    signs = np.sign(scores[largest, np.arange(dims)])
    signs[signs == 0] = 1.0
    return mean, components * signs[:, None]


def _backend_of(tokenizer: Any) -> Any:
    """The ``tokenizers.Tokenizer`` behind a transformers fast tokenizer (or the object itself)."""
    tokenizers = require("tokenizers", "static students")
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if not isinstance(backend, tokenizers.Tokenizer):
        raise StudentError(
            "a static student needs a fast tokenizer (tokenizers.Tokenizer); the teacher has "
            f"{type(tokenizer).__name__}",
            hint="load the teacher's tokenizer with use_fast=True (AutoTokenizer does by default).",
        )
    # a copy without padding or truncation: a saved tokenizer.json may pad every text to a fixed length (MiniLM's
    # pads to 128), which would put 125 [PAD] tokens, attended to, into every "[CLS] token [SEP]" the teacher embeds
    plain = tokenizers.Tokenizer.from_str(backend.to_str())
    plain.no_padding()
    plain.no_truncation()
    return plain


def _words(backend: Any, sentences: Sequence[str]) -> list[str]:
    """The pre-tokenised words of ``sentences`` after the tokenizer's normaliser (what WordPiece sees)."""
    words: list[str] = []
    for sentence in sentences:
        text = backend.normalizer.normalize_str(sentence) if backend.normalizer is not None else sentence
        pieces = backend.pre_tokenizer.pre_tokenize_str(text) if backend.pre_tokenizer is not None else [(text, None)]
        words.extend(piece for piece, _ in pieces)
    return words


def corpus_vocabulary(
    teacher: SentenceTeacher, sentences: Sequence[str], *, min_count: int = 5, max_words: int | None = 10_000
) -> list[str]:
    """The words of ``sentences`` (as the teacher's tokenizer normalises and splits them) that occur at least
    ``min_count`` times and that the tokenizer does not already hold as one token, most frequent first (at most
    ``max_words``): the extra vocabulary a static student built for this corpus can take."""
    backend = _backend_of(teacher.tokenizer)
    vocab = backend.get_vocab()
    counts = Counter(word for word in _words(backend, check_sentences(sentences)) if word not in vocab)
    frequent = [word for word, count in sorted(counts.items(), key=lambda item: (-item[1], item[0]))]
    frequent = [word for word in frequent if counts[word] >= min_count and word.isalpha()]
    return frequent[:max_words] if max_words is not None else frequent


class StaticEmbedding(nn.Module):
    """One vector per token; ``forward(input_ids, attention_mask)`` -> (batch, dim): the mean of the real tokens'
    vectors, L2-normalised when ``normalize``. Build it with :meth:`from_teacher`.

    ``vectors``: (vocab, dim) ``nn.Embedding`` (the trained parameters). ``tokenizer``: the ``tokenizers.Tokenizer``
    whose ids index them. Buffers ``pca_mean`` (D,) and ``pca_components`` (dim, D) map teacher-space vectors into
    the student's space (:meth:`project`).
    """

    def __init__(
        self,
        vectors: torch.Tensor,
        tokenizer: Any,
        *,
        normalize: bool = True,
        pca_mean: torch.Tensor | None = None,
        pca_components: torch.Tensor | None = None,
        config: dict[str, Any] | None = None,
        teacher_index: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if vectors.ndim != 2:
            raise StudentError(f"static vectors are (vocab, dim), got shape {tuple(vectors.shape)}")
        self.tokenizer = tokenizer
        size = tokenizer.get_vocab_size(with_added_tokens=True)
        if size != len(vectors):
            raise StudentError(
                f"the tokenizer has {size} tokens but there are {len(vectors)} vectors",
                hint="build the student with StaticEmbedding.from_teacher, which keeps them aligned.",
            )
        self.vectors = nn.Embedding.from_pretrained(vectors.float().clone(), freeze=False)
        self.normalize = normalize
        dim = vectors.shape[1]
        self.register_buffer("pca_mean", torch.zeros(dim) if pca_mean is None else pca_mean.float().clone())
        self.register_buffer("pca_components", torch.eye(dim) if pca_components is None else pca_components.float())
        self.config: dict[str, Any] = dict(config or {})
        self.teacher_index: torch.Tensor | None
        self.register_buffer("teacher_index", None if teacher_index is None else teacher_index.long().clone())
        self._padded = require("tokenizers", "static students").Tokenizer.from_str(
            tokenizer.to_str()
        )  # pads each batch to its longest row
        self._padded.no_truncation()
        self._padded.enable_padding(pad_id=0, pad_token=self._padded.id_to_token(0) or "[PAD]")
        unk = _unk_of(tokenizer)  # read once: the tokenizer's JSON is the whole vocabulary
        self.unk_token_id: int | None = None if unk is None else tokenizer.token_to_id(unk)

    @property
    def dim(self) -> int:
        return int(self.vectors.embedding_dim)

    @classmethod
    def from_teacher(
        cls,
        teacher: SentenceTeacher,
        *,
        corpus: Sequence[str] | None = None,
        vocabulary: Sequence[str] = (),
        prune_to_corpus: bool = False,
        pca_dims: int | None = 256,
        pca_center: bool = True,
        sif_coefficient: float | None = SIF_COEFFICIENT,
        weighting: str | None = None,
        normalize: bool = True,
        batch_size: int = 512,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> StaticEmbedding:
        """Steps 1-4 of the module docstring. ``corpus``: the user's sentences (token frequencies, and the tokens to
        keep with ``prune_to_corpus``). ``vocabulary``: extra whole words (e.g. :func:`corpus_vocabulary`), each
        embedded by running the teacher on its pieces. ``pca_dims``: None keeps the teacher's width (no PCA);
        ``pca_center``: centre on the token vectors' mean first (Model2Vec's PCA, the default; see step 3).
        ``weighting``: ``"corpus"`` (the default with a corpus) or ``"zipf"`` (the default without). ``cache_dir``:
        keep the teacher's token vectors in kdistill's cache there (a second build skips the teacher)."""
        backend = _backend_of(teacher.tokenizer)
        texts = None if corpus is None else check_sentences(corpus, "corpus")
        weighting = weighting or ("corpus" if texts is not None else "zipf")
        if weighting not in ("corpus", "zipf"):
            raise StudentError(f"unknown weighting {weighting!r}", hint="use 'corpus' or 'zipf'.")
        if (weighting == "corpus" or prune_to_corpus) and texts is None:
            raise StudentError(
                f"weighting={weighting!r} / prune_to_corpus={prune_to_corpus} need the corpus",
                hint="pass corpus=sentences, or weighting='zipf' without pruning.",
            )
        if not isinstance(pca_center, bool):
            raise StudentError(
                f"pca_center must be true or false, got {pca_center!r}",
                hint="true (the default) centres as Model2Vec does.",
            )
        tokenizer, teacher_ids = _student_tokenizer(teacher, backend, vocabulary, texts, prune_to_corpus)
        size = tokenizer.get_vocab_size(with_added_tokens=True)
        dims = _check_pca_dims(pca_dims, size, teacher, prune_to_corpus)
        embedded = teacher.embed_token_ids(teacher_ids, batch_size=batch_size, cache_dir=cache_dir)
        token_vectors = embedded.double().numpy()
        if dims is None:
            mean, components = np.zeros(token_vectors.shape[1]), np.eye(token_vectors.shape[1])
        else:
            mean, components = _pca(token_vectors, dims, center=pca_center)
        reduced = (token_vectors - mean) @ components.T
        if weighting == "corpus":
            assert texts is not None
            counts = np.bincount(
                [i for ids in _encode_ids(tokenizer, texts, _unk_of(tokenizer)) for i in ids], minlength=size
            ).astype(np.float64)
            probabilities = counts / max(1.0, counts.sum())
        else:
            probabilities = zipf_probabilities(size)
        vectors = reduced * sif_weights(probabilities, sif_coefficient)[:, None]
        config = {
            "model_type": "model2vec",
            "architectures": ["StaticModel"],
            "apply_pca": dims,
            "pca_center": pca_center,
            "sif_coefficient": sif_coefficient,
            "weighting": weighting,
            "hidden_dim": int(vectors.shape[1]),
            "normalize": normalize,
            "max_length": None,
        }
        return cls(
            torch.from_numpy(vectors).float(),
            tokenizer,
            normalize=normalize,
            pca_mean=torch.from_numpy(mean).float(),
            pca_components=torch.from_numpy(np.ascontiguousarray(components)).float(),
            config=config,
            teacher_index=_teacher_index(backend, tokenizer),
        )

    # ---- text ------------------------------------------------------------------------------------------------------

    def token_ids(self, sentences: Sequence[str]) -> list[list[int]]:
        """Model2Vec's tokenisation: no special tokens, unknown tokens dropped, no truncation."""
        encodings = self.tokenizer.encode_batch(check_sentences(sentences), add_special_tokens=False)
        return [[i for i in encoding.ids if i != self.unk_token_id] for encoding in encodings]

    def tokenize(self, sentences: Sequence[str]) -> dict[str, torch.Tensor]:
        """``{"input_ids", "attention_mask"}``: int64 (rows, longest), padded with id 0; padding and unknown tokens
        are masked out (so the mean is over the tokens Model2Vec keeps)."""
        encodings = self._padded.encode_batch(check_sentences(sentences), add_special_tokens=False)
        ids = np.array([encoding.ids for encoding in encodings], dtype=np.int64).reshape(len(encodings), -1)
        mask = np.array([encoding.attention_mask for encoding in encodings], dtype=np.int64).reshape(ids.shape)
        if self.unk_token_id is not None:
            mask[ids == self.unk_token_id] = 0
        if ids.shape[1] == 0:  # every sentence without tokens
            ids, mask = np.zeros((len(encodings), 1), dtype=np.int64), np.zeros((len(encodings), 1), dtype=np.int64)
        return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, dim) embeddings from the **teacher's** tokenisation (``teacher.tokenize``: what a run feeds both
        models): each teacher id is mapped to this student's row (``teacher_index``), the teacher's special tokens
        ([CLS], [SEP], padding) and the tokens the student lacks are masked out, so the result is what
        :meth:`encode` (Model2Vec's tokenisation) gives for the same sentence, up to the teacher's truncation."""
        if self.teacher_index is None:
            raise StudentError(
                "this static student has whole words beyond the teacher's tokens (vocabulary=...), so the teacher's "
                "token ids cannot address them",
                hint="embed text with student.encode(sentences), or build it without extra words for a run "
                "(vocabulary: corpus keeps the teacher tokens the corpus uses).",
            )
        ids = input_ids.long()
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask.long()
        rows = self.teacher_index[ids.clamp(0, len(self.teacher_index) - 1)]
        mask = mask * (rows >= 0).long() * (ids < len(self.teacher_index)).long()
        return self.embed(rows.clamp_min(0), mask)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, dim) from this student's own token ids (:meth:`tokenize`): the mean of the real tokens' vectors,
        L2-normalised when ``normalize``."""
        ids = input_ids.long()
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask
        weights = mask.to(self.vectors.weight.dtype).unsqueeze(-1)
        summed = (self.vectors(ids) * weights).sum(dim=1)
        mean = summed / weights.sum(dim=1).clamp_min(1.0)
        return F.normalize(mean, dim=1, eps=1e-12) if self.normalize else mean

    @torch.no_grad()
    def encode(self, sentences: Sequence[str], *, batch_size: int = 1024) -> torch.Tensor:
        """(rows, dim) float32 embeddings of ``sentences`` (what ``StaticModel.encode`` returns for the saved model)."""
        texts = check_sentences(sentences)
        parts = [
            self.embed(**self.tokenize(texts[start : start + batch_size])) for start in range(0, len(texts), batch_size)
        ]
        return torch.cat(parts)

    def save_native(self, folder: str | os.PathLike[str]) -> Any:
        """Write the student in Model2Vec's format (:func:`kdistill.sentence_export.save_model2vec`); a run saves
        it as ``<out>/model``."""
        from kdistill.sentence_export import save_model2vec

        return save_model2vec(self, folder, overwrite=True)

    def project_teacher_outputs(self, teacher_embeddings: torch.Tensor) -> torch.Tensor:
        """The run's hook for a student narrower than its teacher: the teacher's (rows, D) embeddings in this
        student's (rows, dim) space, :meth:`project` (a run trains the cosine and MSE losses on them)."""
        return self.project(teacher_embeddings)

    @torch.no_grad()
    def project(self, teacher_embeddings: torch.Tensor) -> torch.Tensor:
        """Teacher-space (rows, D) vectors in the student's space: :math:`(t - \\mu) V^\\top` (rows, dim),
        L2-normalised when the student normalises: the targets for the cosine and MSE losses."""
        mean, components = self._buffer("pca_mean"), self._buffer("pca_components")
        projected = (teacher_embeddings.float() - mean) @ components.T
        return F.normalize(projected, dim=1, eps=1e-12) if self.normalize else projected

    def _buffer(self, name: str) -> torch.Tensor:
        value = getattr(self, name)
        assert isinstance(value, torch.Tensor)
        return value


def _teacher_index(backend: Any, tokenizer: Any) -> torch.Tensor | None:
    """(teacher vocabulary,) int64: each teacher token id's row in the student's ``tokenizer`` (-1: a special token,
    or one the student dropped); None when the student holds words the teacher's tokenizer has no id for."""
    teacher_vocab: dict[str, int] = backend.get_vocab()
    student_vocab: dict[str, int] = tokenizer.get_vocab()
    if any(token not in teacher_vocab for token in student_vocab):
        return None
    special = {entry["content"] for entry in json.loads(backend.to_str()).get("added_tokens", []) if entry["special"]}
    index = torch.full((max(teacher_vocab.values()) + 1,), -1, dtype=torch.long)
    for token, teacher_id in teacher_vocab.items():
        if token not in special and token in student_vocab:
            index[teacher_id] = student_vocab[token]
    return index


def _unk_of(tokenizer: Any) -> str | None:
    model = json.loads(tokenizer.to_str())["model"]
    unk = model.get("unk_token")
    return unk if isinstance(unk, str) else None


def _encode_ids(tokenizer: Any, sentences: list[str], unk: str | None) -> list[list[int]]:
    unk_id = None if unk is None else tokenizer.token_to_id(unk)
    encodings = tokenizer.encode_batch(sentences, add_special_tokens=False)
    return [[i for i in encoding.ids if i != unk_id] for encoding in encodings]


def _check_pca_dims(pca_dims: int | None, size: int, teacher: SentenceTeacher, pruned: bool) -> int | None:
    if pca_dims is None:
        return None
    width = teacher.num_classes
    if isinstance(pca_dims, bool) or not isinstance(pca_dims, int) or pca_dims < 1:
        raise StudentError(f"pca_dims must be a positive whole number or None, got {pca_dims!r}", hint="e.g. 256.")
    if width is not None and pca_dims > width:
        raise StudentError(
            f"pca_dims={pca_dims} is more than the teacher's {width} dimensions",
            hint=f"use pca_dims <= {width}, or None to keep the teacher's width.",
        )
    if pca_dims > size:
        where = "the tokens the corpus uses (prune_to_corpus=True)" if pruned else "the vocabulary"
        raise DataError(
            f"PCA to {pca_dims} dimensions needs at least {pca_dims} token vectors, but {where} holds only {size}",
            hint="use a larger corpus, a smaller pca_dims, or prune_to_corpus=False.",
        )
    return pca_dims


def _student_tokenizer(
    teacher: SentenceTeacher,
    backend: Any,
    vocabulary: Sequence[str],
    texts: list[str] | None,
    prune: bool,
) -> tuple[Any, list[list[int]]]:
    """The student's tokenizer (the teacher's, with extra words and/or pruned) and, for each of its ids, the teacher
    token ids ([CLS] ... [SEP]) to embed for it."""
    tokenizers = require("tokenizers", "static students")
    state = json.loads(backend.to_str())
    model = state["model"]
    original: dict[str, int] = backend.get_vocab()
    prefix, suffix = _special_affixes(backend)

    def wrap(ids: list[int]) -> list[int]:
        return [*prefix, *ids, *suffix]

    words = _checked_words(teacher, backend, vocabulary, model) if vocabulary else []
    if not words and not prune:
        tokenizer = tokenizers.Tokenizer.from_str(backend.to_str())
        tokenizer.no_padding()
        tokenizer.no_truncation()
        by_id = sorted(original.items(), key=lambda item: item[1])
        return tokenizer, [wrap([token_id]) for _, token_id in by_id]
    ordered = [token for token, _ in sorted(original.items(), key=lambda item: item[1])]
    extended = {token: position for position, token in enumerate(ordered + words)}
    if prune:
        assert texts is not None
        probe = _rebuilt(tokenizers, state, extended)
        used = {i for ids in _encode_ids(probe, texts, None) for i in ids}
        special = {entry["content"] for entry in state.get("added_tokens", [])}
        keep = [token for token, position in extended.items() if position in used or token in special]
        if model.get("unk_token") is not None and model["unk_token"] not in keep:
            keep.append(model["unk_token"])
        extended = {token: position for position, token in enumerate(keep)}
    tokenizer = _rebuilt(tokenizers, state, extended)
    teacher_ids = [
        wrap([original[token]]) if token in original else wrap(backend.encode(token, add_special_tokens=False).ids)
        for token in extended
    ]
    return tokenizer, teacher_ids


def _special_affixes(backend: Any) -> tuple[list[int], list[int]]:
    """The special ids the tokenizer puts before and after a text (``[CLS]`` and ``[SEP]`` for BERT)."""
    encoding = backend.encode("a", add_special_tokens=True)
    real = [position for position, special in enumerate(encoding.special_tokens_mask) if not special]
    if not real:
        return list(encoding.ids), []
    return list(encoding.ids[: real[0]]), list(encoding.ids[real[-1] + 1 :])


def _rebuilt(tokenizers: Any, state: dict[str, Any], vocab: dict[str, int]) -> Any:
    """The tokenizer of ``state`` with WordPiece vocabulary ``vocab``; special-token ids re-pointed, no padding or
    truncation."""
    state = json.loads(json.dumps(state))
    state["model"]["vocab"] = vocab
    state["padding"], state["truncation"] = None, None
    for entry in state.get("added_tokens", []):
        entry["id"] = vocab[entry["content"]]
    processor = state.get("post_processor") or {}
    for token, spec in (processor.get("special_tokens") or {}).items():
        spec["ids"] = [vocab[token] for _ in spec.get("ids", [])]
    for key in ("cls", "sep"):  # BertProcessing / RobertaProcessing keep [token, id] pairs
        if isinstance(processor.get(key), list):
            processor[key][1] = vocab[processor[key][0]]
    return tokenizers.Tokenizer.from_str(json.dumps(state))


def _checked_words(
    teacher: SentenceTeacher, backend: Any, vocabulary: Sequence[str], model: dict[str, Any]
) -> list[str]:
    """The extra words, normalised, deduplicated and checked: each one word the teacher's tokenizer encodes to at
    least one known token. Anything else is a :class:`~kdistill.errors.DataError` naming the word."""
    if model.get("type") != "WordPiece":
        raise StudentError(
            f"extra vocabulary words need a WordPiece tokenizer; the teacher's is {model.get('type')}",
            hint="build the student without vocabulary= (the teacher's own tokens).",
        )
    if isinstance(vocabulary, str):
        raise DataError("vocabulary is a list of words, got one string", hint="wrap it in a list.")
    known = backend.get_vocab()
    unk_id = backend.token_to_id(model["unk_token"]) if model.get("unk_token") else None
    words: list[str] = []
    for position, word in enumerate(vocabulary):
        if not isinstance(word, str) or not word.strip():
            raise DataError(f"vocabulary[{position}] is {word!r}: not a word", hint="pass non-empty strings.")
        pieces = _words(backend, [word])
        if len(pieces) != 1:
            raise DataError(
                f"vocabulary[{position}] {word!r} is {len(pieces)} words to the teacher's tokenizer ({pieces})",
                hint="a static token is one word as the tokenizer splits text; pass single words.",
            )
        ids = backend.encode(word, add_special_tokens=False).ids
        if not ids or all(i == unk_id for i in ids):
            raise DataError(
                f"the teacher's tokenizer cannot encode vocabulary[{position}] {word!r} (it gives only "
                f"{model.get('unk_token')})",
                hint="drop words made of characters the teacher's vocabulary lacks.",
            )
        if pieces[0] not in known and pieces[0] not in words:
            words.append(pieces[0])
    return words


@register_student(
    "static",
    "static token vectors of a sentence teacher (Model2Vec-style: teacher on each token, PCA, SIF) [text]",
)
def static(
    in_shape: Sequence[int],
    num_classes: int,
    *,
    pca_dims: int | None = 256,
    pca_center: bool = True,
    sif_coefficient: float | None = SIF_COEFFICIENT,
    weighting: str | None = None,
    vocabulary: str = "teacher",
    normalize: bool = True,
) -> nn.Module:
    """The registry's entry, so that configs validate ``student: {kind: static, params: ...}``. A static student is
    built from a sentence teacher and its corpus (:func:`kdistill.sentences.sentence_student`), which a run does when
    the teacher is a sentence encoder; from rows of features it cannot be built."""
    raise StudentError(
        "a static student is built from a sentence-encoder teacher and sentences, not from rows of features",
        hint="use task 'embedding' with a sentence teacher (teacher kind 'sentence', or a SentenceTeacher) and text.",
    )
