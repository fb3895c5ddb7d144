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


# ---- per token and per embedding -------------------------------------------------------------------------------------


def _token_loops(logits: np.ndarray, target: np.ndarray, mask: np.ndarray, teacher: np.ndarray) -> dict[str, float]:
    nll, correct, agree, tokens = 0.0, 0, 0, 0
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            if not mask[b, t] or target[b, t] == -100:
                continue
            z = logits[b, t] - logits[b, t].max()
            nll -= float(z[target[b, t]] - np.log(np.exp(z).sum()))
            correct += int(logits[b, t].argmax() == target[b, t])
            agree += int(logits[b, t].argmax() == teacher[b, t].argmax())
            tokens += 1
    return {"nll": nll / tokens, "token_accuracy": correct / tokens, "agreement": agree / tokens}


def test_token_metrics_match_loops_over_real_tokens() -> None:
    from kdistill.evaluate import perplexity, token_accuracy, token_metrics, token_nll

    rng = np.random.default_rng(2)
    logits, teacher = rng.normal(size=(3, 6, 9)) * 2, rng.normal(size=(3, 6, 9))
    target = rng.integers(0, 9, size=(3, 6))
    target[0, 2] = -100
    mask = np.arange(6)[None, :] < np.array([[6], [3], [1]])
    expected = _token_loops(logits, target, mask, teacher)
    args = (torch.tensor(logits, dtype=torch.float32), torch.tensor(target))
    got = token_metrics(*args, torch.tensor(teacher, dtype=torch.float32), torch.tensor(mask))
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-5)
    assert got["perplexity"] == pytest.approx(np.exp(expected["nll"]), rel=1e-5)
    assert perplexity(*args, torch.tensor(mask)) == pytest.approx(got["perplexity"])
    assert token_nll(*args, torch.tensor(mask)) == pytest.approx(got["nll"])
    assert token_accuracy(*args, torch.tensor(mask)) == pytest.approx(got["token_accuracy"])


def test_embedding_metrics_match_numpy() -> None:
    from kdistill.evaluate import embedding_metrics, mean_cosine_similarity

    rng = np.random.default_rng(3)
    student, teacher = rng.normal(size=(7, 5)), rng.normal(size=(7, 5))
    cosine = ((student * teacher).sum(1) / (np.linalg.norm(student, axis=1) * np.linalg.norm(teacher, axis=1))).mean()
    got = embedding_metrics(torch.tensor(student), torch.tensor(teacher))
    # computed in float32, as every metric here
    assert got["cosine"] == pytest.approx(cosine, abs=1e-6)
    assert got["mse"] == pytest.approx(((student - teacher) ** 2).mean(), rel=1e-6)
    assert mean_cosine_similarity(torch.tensor(student), torch.tensor(teacher)) == pytest.approx(cosine, abs=1e-6)


def test_token_metrics_refuse_row_logits() -> None:
    from kdistill.errors import ShapeMismatchError
    from kdistill.evaluate import perplexity

    with pytest.raises(ShapeMismatchError, match="encode_targets"):
        perplexity(torch.randn(4, 5), torch.zeros(4, dtype=torch.long))
