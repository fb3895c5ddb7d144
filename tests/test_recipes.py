"""Born-again generations and teacher-assistant chains, run as a user would (tiny data, two epochs)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from kdistill.errors import StudentError
from kdistill.recipes import born_again, teacher_assistant_chain
from kdistill.students import MLP

KWARGS = {"epochs": 2, "batch_size": 32, "baseline": False, "profile": False, "verbose": False}


@pytest.fixture(scope="module")
def data() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(160, 6)).astype(np.float32)
    y = np.digitize(x[:, 0] + 0.5 * x[:, 1], [-0.5, 0.5])
    return (x[:120], y[:120]), (x[120:], y[120:])


def test_born_again_generation_k_learns_from_generation_k_minus_1(data: tuple) -> None:
    train, test = data
    teacher = LogisticRegression().fit(*train)
    results = born_again(teacher, "mlp", train, generations=3, test=test, **KWARGS)
    assert len(results) == 3
    assert results[0].report is not None
    assert results[0].report.models["teacher"]["accuracy"] == pytest.approx(teacher.score(*test))
    for previous, current in itertools.pairwise(results):
        assert previous.report is not None
        assert current.report is not None
        # the report's teacher row is the previous generation's student, measured on the same rows
        assert current.report.models["teacher"]["accuracy"] == pytest.approx(
            previous.report.models["student"]["accuracy"]
        )
        assert current.student is not previous.student


def test_teacher_assistant_chain_passes_through_each_assistant(data: tuple) -> None:
    train, test = data
    teacher = LogisticRegression().fit(*train)
    big, small = MLP((6,), 3, hidden=(32, 32)), MLP((6,), 3, hidden=(4,))
    for model in (big, small):
        model.standardize.fit(torch.as_tensor(train[0]))
    results = teacher_assistant_chain(teacher, [big], small, train, test=test, **KWARGS)
    assert len(results) == 2
    assert results[0].report is not None
    assert results[1].report is not None
    assert results[0].report.models["student"]["parameters"] == sum(p.numel() for p in big.parameters())
    assert results[1].report.models["teacher"]["parameters"] == results[0].report.models["student"]["parameters"]
    assert results[1].report.models["student"]["parameters"] == sum(p.numel() for p in small.parameters())
    # modules are copied per step: the ones passed in stay untrained
    assert results[0].student is not big


def test_a_factory_that_builds_no_module_is_a_clear_error(data: tuple) -> None:
    train, _ = data
    with pytest.raises(StudentError, match="factory returned int"):
        born_again(LogisticRegression().fit(*train), lambda: 3, train, **KWARGS)  # type: ignore[arg-type, return-value]
