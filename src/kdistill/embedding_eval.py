"""How much of the teacher's similarity structure a sentence-encoder student kept, and how fast it runs.

On held-out sentences, with ``teacher`` (rows, D_t) and ``student`` (rows, D_s) embeddings (the widths may differ):

- **Spearman, random pairs**: the rank correlation between :math:`\\cos(t_i, t_j)` and :math:`\\cos(s_i, s_j)` over
  ``pairs`` random pairs :math:`i \\ne j` (seeded): does the student order sentence pairs as the teacher does?
- **Spearman, hard pairs**: the same over each sentence's ``neighbours`` nearest neighbours by the teacher's cosine,
  pairs that are all similar, where a coarse student cannot tell them apart.
- **recall@10**: for each sentence, the share of the teacher's 10 nearest neighbours (itself excluded) found among
  the student's 10 nearest, averaged over sentences.
- **sentences/s** (:func:`throughput`) at batch 1 and 64 on one thread, tokenisation included.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from kdistill.errors import DataError, ShapeMismatchError

__all__ = [
    "hard_pairs",
    "nearest_neighbours",
    "random_pairs",
    "recall_at_k",
    "sentence_speeds",
    "similarity_report",
    "spearman_on_pairs",
    "throughput",
]


def _check(teacher: torch.Tensor, student: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    teacher, student = torch.as_tensor(teacher).float(), torch.as_tensor(student).float()
    if teacher.ndim != 2 or student.ndim != 2 or len(teacher) != len(student):
        raise ShapeMismatchError(
            f"teacher {tuple(teacher.shape)} and student {tuple(student.shape)} embeddings must be (rows, dim) with "
            "the same rows",
            hint="embed the same held-out sentences with both models.",
        )
    if len(teacher) < 3:
        raise DataError(f"similarity metrics need at least 3 sentences, got {len(teacher)}", hint="use more rows.")
    return F.normalize(teacher, dim=1, eps=1e-12), F.normalize(student, dim=1, eps=1e-12)


def random_pairs(rows: int, pairs: int, *, seed: int = 0) -> np.ndarray:
    """(pairs, 2) int64 index pairs :math:`i \\ne j` drawn uniformly (seeded)."""
    generator = np.random.default_rng(seed)
    first = generator.integers(0, rows, size=pairs)
    second = (first + generator.integers(1, rows, size=pairs)) % rows  # never equal to first
    return np.stack([first, second], axis=1)


def nearest_neighbours(embeddings: torch.Tensor, k: int) -> torch.Tensor:
    """(rows, k) indices of each row's k most cosine-similar other rows, most similar first."""
    unit = F.normalize(torch.as_tensor(embeddings).float(), dim=1, eps=1e-12)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(float("-inf"))
    return similarity.topk(min(k, len(unit) - 1), dim=1).indices


def hard_pairs(teacher: torch.Tensor, neighbours: int = 10) -> np.ndarray:
    """(rows · neighbours, 2) pairs of each row with its ``neighbours`` nearest rows by the teacher's cosine."""
    indices = nearest_neighbours(teacher, neighbours).numpy()
    first = np.repeat(np.arange(len(indices)), indices.shape[1])
    return np.stack([first, indices.reshape(-1)], axis=1)


def spearman_on_pairs(teacher: torch.Tensor, student: torch.Tensor, pairs: np.ndarray) -> float:
    """Spearman's rho between the teacher's and the student's cosine similarity over ``pairs`` (n, 2)."""
    t, s = _check(teacher, student)
    left, right = torch.as_tensor(pairs[:, 0]), torch.as_tensor(pairs[:, 1])
    teacher_cos = (t[left] * t[right]).sum(dim=1).numpy()
    student_cos = (s[left] * s[right]).sum(dim=1).numpy()
    return float(spearmanr(teacher_cos, student_cos).statistic)


def recall_at_k(teacher: torch.Tensor, student: torch.Tensor, k: int = 10) -> float:
    """Mean over rows of |teacher's k nearest ∩ student's k nearest| / k (each row itself excluded)."""
    t, s = _check(teacher, student)
    teacher_nn, student_nn = nearest_neighbours(t, k), nearest_neighbours(s, k)
    hits = (teacher_nn.unsqueeze(2) == student_nn.unsqueeze(1)).any(dim=2).float().sum(dim=1)
    return float((hits / teacher_nn.shape[1]).mean())


def similarity_report(
    teacher: torch.Tensor,
    student: torch.Tensor,
    *,
    pairs: int = 20_000,
    neighbours: int = 10,
    k: int = 10,
    seed: int = 0,
) -> dict[str, float]:
    """``{"spearman_random", "spearman_hard", "recall_at_10"}`` (the last named for ``k``) of ``student`` against
    ``teacher`` embeddings of the same sentences."""
    t, s = _check(teacher, student)
    return {
        "spearman_random": spearman_on_pairs(t, s, random_pairs(len(t), pairs, seed=seed)),
        "spearman_hard": spearman_on_pairs(t, s, hard_pairs(t, neighbours)),
        f"recall_at_{k}": recall_at_k(t, s, k),
    }


def throughput(
    encode: Callable[[list[str]], Any],
    sentences: Sequence[str],
    *,
    batch_size: int,
    seconds: float = 5.0,
    threads: int = 1,
    max_sentences: int | None = None,
) -> float:
    """Sentences per second of ``encode(batch) -> embeddings`` over consecutive batches of ``sentences`` (cycled),
    on ``threads`` torch threads, for about ``seconds`` (at least one batch; at most ``max_sentences``). One warm-up
    batch is not timed."""
    texts = list(sentences)
    if not texts:
        raise DataError("throughput needs sentences", hint="pass the held-out sentences.")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        encode(texts[:batch_size])
        done, position, started = 0, 0, time.perf_counter()
        while True:
            batch = [texts[(position + i) % len(texts)] for i in range(batch_size)]
            encode(batch)
            done += len(batch)
            position = (position + batch_size) % len(texts)
            elapsed = time.perf_counter() - started
            if elapsed >= seconds or (max_sentences is not None and done >= max_sentences):
                return done / elapsed
    finally:
        torch.set_num_threads(previous)


SPEED_SECONDS = 3.0
"""How long :func:`sentence_speeds` times each model at each batch size."""


def sentence_speeds(
    encoders: Mapping[str, Callable[[list[str]], Any]],
    sentences: Sequence[str],
    *,
    seconds: float = SPEED_SECONDS,
    batch_sizes: Sequence[int] = (1, 64),
    reference: str = "teacher",
) -> dict[str, dict[str, float]]:
    """Per model: ``sentences_per_s_batch_<b>`` (:func:`throughput`, one thread) for each batch size, and
    ``speedup_batch_<last>``, its sentences/s at the last batch size over ``reference``'s."""
    speeds = {
        name: {
            f"sentences_per_s_batch_{size}": throughput(encode, sentences, batch_size=size, seconds=seconds)
            for size in batch_sizes
        }
        for name, encode in encoders.items()
    }
    key = f"sentences_per_s_batch_{batch_sizes[-1]}"
    if reference in speeds:
        for entry in speeds.values():
            entry[f"speedup_batch_{batch_sizes[-1]}"] = entry[key] / speeds[reference][key]
    return speeds
