"""Similarity evaluation: Spearman on random and hard pairs, recall@10, and throughput, against brute-force
computations and their invariances."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import rankdata

from kdistill.embedding_eval import (
    hard_pairs,
    nearest_neighbours,
    random_pairs,
    recall_at_k,
    similarity_report,
    spearman_on_pairs,
    throughput,
)
from kdistill.errors import DataError, ShapeMismatchError


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_spearman_is_the_pearson_of_ranks_of_pairwise_cosines() -> None:
    generator = np.random.default_rng(0)
    teacher, student = generator.normal(size=(30, 8)), generator.normal(size=(30, 3))
    student[:, 0] += teacher[:, 0]  # some shared structure
    pairs = random_pairs(30, 200, seed=1)
    assert np.all(pairs[:, 0] != pairs[:, 1]) and pairs.max() < 30
    t = np.array([_cos(teacher[i], teacher[j]) for i, j in pairs])
    s = np.array([_cos(student[i], student[j]) for i, j in pairs])
    expected = np.corrcoef(rankdata(t), rankdata(s))[0, 1]
    ours = spearman_on_pairs(torch.from_numpy(teacher), torch.from_numpy(student), pairs)
    assert ours == pytest.approx(expected, abs=1e-4)  # cosines in float32: a few near-ties may swap


def test_a_rotated_student_keeps_everything_and_a_random_one_does_not() -> None:
    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(60, 12, generator=generator)
    rotation, _ = torch.linalg.qr(torch.randn(12, 12, generator=generator))
    kept = similarity_report(teacher, 3.0 * teacher @ rotation, pairs=2000)
    assert kept == pytest.approx({"spearman_random": 1.0, "spearman_hard": 1.0, "recall_at_10": 1.0}, abs=1e-5)
    lost = similarity_report(teacher, torch.randn(60, 5, generator=generator), pairs=2000)
    assert abs(lost["spearman_random"]) < 0.15 and lost["recall_at_10"] < 0.4


def test_hard_pairs_are_the_teachers_nearest_neighbours_and_recall_counts_overlap() -> None:
    generator = np.random.default_rng(2)
    teacher = generator.normal(size=(20, 4))
    pairs = hard_pairs(torch.from_numpy(teacher), neighbours=3)
    for i in range(20):
        similarities = [(_cos(teacher[i], teacher[j]), j) for j in range(20) if j != i]
        best = [j for _, j in sorted(similarities, reverse=True)[:3]]
        assert pairs[pairs[:, 0] == i, 1].tolist() == best
    neighbours = nearest_neighbours(torch.from_numpy(teacher), 3)
    student = torch.from_numpy(teacher).clone()
    student[:, 0] = -student[:, 0]  # changes some neighbour sets
    student_neighbours = nearest_neighbours(student, 3)
    expected = np.mean([len(set(neighbours[i].tolist()) & set(student_neighbours[i].tolist())) / 3 for i in range(20)])
    assert recall_at_k(torch.from_numpy(teacher), student, k=3) == pytest.approx(expected)


def test_bad_shapes_and_throughput() -> None:
    with pytest.raises(ShapeMismatchError, match="same rows"):
        similarity_report(torch.randn(5, 3), torch.randn(4, 3))
    with pytest.raises(DataError, match="at least 3 sentences"):
        similarity_report(torch.randn(2, 3), torch.randn(2, 3))
    seen: list[int] = []
    before = torch.get_num_threads()

    def encode(batch: list[str]) -> torch.Tensor:
        seen.append(torch.get_num_threads())
        return torch.zeros(len(batch), 2)

    rate = throughput(encode, ["a", "b", "c"], batch_size=2, seconds=0.01, max_sentences=4)
    assert rate > 0 and set(seen) == {1} and torch.get_num_threads() == before


def test_the_embedding_tasks_report_entry_carries_the_similarity_scores() -> None:
    from kdistill.tasks import get_task

    task = get_task("embedding")
    generator = torch.Generator().manual_seed(4)
    teacher = torch.randn(40, 6, generator=generator)
    rotation, _ = torch.linalg.qr(torch.randn(6, 6, generator=generator))
    kept = task.metrics(teacher @ rotation, None, teacher)
    assert kept["spearman"] == pytest.approx(1.0, abs=1e-5) and kept["recall_at_10"] == pytest.approx(1.0)
    assert set(task.report_columns) - {"retention"} <= set(kept)
    lost = task.metrics(torch.randn(40, 6, generator=generator), None, teacher)
    assert lost["spearman"] < 0.3 and lost["recall_at_10"] < 0.5
    assert np.isnan(task.metrics(teacher[:2], None, teacher[:2])["spearman"])
