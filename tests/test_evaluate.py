"""Metrics against independent numpy computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdistill.evaluate import accuracy, agreement, classification_metrics, expected_calibration_error, nll


def _numpy_ece(probs: np.ndarray, y: np.ndarray, bins: int) -> float:
    confidence, predicted = probs.max(1), probs.argmax(1)
    total = 0.0
    for low, high in zip(np.linspace(0, 1, bins + 1)[:-1], np.linspace(0, 1, bins + 1)[1:], strict=True):
        members = (confidence > low) & (confidence <= high)
        if members.any():
            total += members.mean() * abs((predicted[members] == y[members]).mean() - confidence[members].mean())
    return float(total)


def test_ece_matches_numpy() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(500, 6)) * 2
    y = rng.integers(0, 6, size=500)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    got = expected_calibration_error(torch.tensor(logits, dtype=torch.float32), torch.tensor(y))
    assert got == pytest.approx(_numpy_ece(probs, y, 15), abs=1e-5)


def test_ece_is_zero_for_a_confident_correct_model_and_large_for_a_wrong_one() -> None:
    y = torch.arange(10) % 3
    perfect = torch.nn.functional.one_hot(y, 3).float() * 50
    assert expected_calibration_error(perfect, y) == pytest.approx(0.0, abs=1e-6)
    assert expected_calibration_error(perfect, (y + 1) % 3) == pytest.approx(1.0, abs=1e-6)


def test_accuracy_agreement_nll() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 0.0]])
    y = torch.tensor([0, 0, 0])
    assert accuracy(logits, y) == pytest.approx(2 / 3)
    assert agreement(logits, torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])) == pytest.approx(1 / 3)
    expected_nll = -np.mean(np.log(np.exp(logits.numpy())[:, 0] / np.exp(logits.numpy()).sum(1)))
    assert nll(logits, y) == pytest.approx(expected_nll, rel=1e-6)
    assert set(classification_metrics(logits, y, logits)) == {"accuracy", "nll", "ece", "agreement"}
