"""Metrics on logits: accuracy, agreement with the teacher, negative log-likelihood, expected calibration error."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["accuracy", "agreement", "classification_metrics", "expected_calibration_error", "nll"]


def accuracy(logits: torch.Tensor, target: torch.Tensor) -> float:
    """Fraction of rows whose arg-max class is ``target``. ``logits``: (rows, classes); ``target``: (rows,)."""
    return float((logits.argmax(dim=1) == target).float().mean())


def agreement(logits: torch.Tensor, teacher_logits: torch.Tensor) -> float:
    """Fraction of rows where the model predicts the same class as the teacher."""
    return float((logits.argmax(dim=1) == teacher_logits.argmax(dim=1)).float().mean())


def nll(logits: torch.Tensor, target: torch.Tensor) -> float:
    """Mean negative log-likelihood of the true class under ``softmax(logits)`` (cross-entropy, in nats)."""
    return float(F.cross_entropy(logits.float(), target))


def expected_calibration_error(logits: torch.Tensor, target: torch.Tensor, *, bins: int = 15) -> float:
    r"""ECE with ``bins`` equal-width confidence bins (Guo et al. 2017):

    .. math:: \mathrm{ECE} = \sum_b \frac{|B_b|}{n}\,\big|\mathrm{acc}(B_b) - \mathrm{conf}(B_b)\big|

    where a row's confidence is its top softmax probability and bin b holds confidences in ((b-1)/bins, b/bins].
    """
    probs = torch.softmax(logits.float(), dim=1)
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == target).float()
    edges = torch.linspace(0.0, 1.0, bins + 1)
    which = torch.bucketize(confidence, edges[1:-1], right=False)  # bin b holds (edges[b], edges[b+1]]
    total = torch.zeros(())
    for b in range(bins):
        members = which == b
        if members.any():
            total += members.float().mean() * (correct[members].mean() - confidence[members].mean()).abs()
    return float(total)


def classification_metrics(
    logits: torch.Tensor, target: torch.Tensor, teacher_logits: torch.Tensor | None = None
) -> dict[str, float]:
    """accuracy, nll, ece (15 bins) and, given the teacher's logits, agreement with the teacher."""
    metrics = {
        "accuracy": accuracy(logits, target),
        "nll": nll(logits, target),
        "ece": expected_calibration_error(logits, target),
    }
    if teacher_logits is not None:
        metrics["agreement"] = agreement(logits, teacher_logits)
    return metrics
