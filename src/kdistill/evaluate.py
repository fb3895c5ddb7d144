"""Metrics on outputs: per row (accuracy, agreement with the teacher, negative log-likelihood, expected calibration
error), per token (perplexity, token accuracy and agreement over real tokens), and per embedding (cosine similarity
to the teacher's, MSE).

Token metrics take (batch, seq, vocab) logits and (batch, seq) targets aligned with them (``target[b, t]`` is what
``logits[b, t]`` predicts; -100 is ignored) and an optional (batch, seq) mask of real tokens; a position counts when
it is real and its target is not -100. Means are over counted positions (micro-averaged: every token weighs the
same, whatever its sequence's length), as Hugging Face's and torchmetrics' perplexity.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kdistill.errors import ShapeMismatchError

__all__ = [
    "IGNORE_INDEX",
    "accuracy",
    "agreement",
    "classification_metrics",
    "embedding_metrics",
    "embedding_sums",
    "expected_calibration_error",
    "mean_cosine_similarity",
    "nll",
    "perplexity",
    "token_accuracy",
    "token_agreement",
    "token_metrics",
    "token_nll",
    "token_sums",
]

IGNORE_INDEX = -100
"""A target that counts for no metric (as in the losses)."""


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


# ---- per token: (batch, seq, vocab) logits -------------------------------------------------------------------------


def _counted(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if logits.ndim != 3 or tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ShapeMismatchError(
            f"token metrics need (batch, seq, vocab) logits and (batch, seq) targets; got {tuple(logits.shape)} and "
            f"{tuple(target.shape)}",
            hint="shift input_ids into next-token targets with kdistill.tasks.get_task('token_lm').encode_targets.",
        )
    counted = target != IGNORE_INDEX
    if mask is not None:
        if tuple(mask.shape) != tuple(target.shape):
            raise ShapeMismatchError(f"mask {tuple(mask.shape)} does not fit targets {tuple(target.shape)}")
        counted = counted & mask.bool()
    return counted


def token_sums(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, float]:
    """What the token metrics are made of, summed over one batch's counted positions (so batches add up exactly):
    ``nll_sum`` (nats), ``correct`` (arg-max == target) and ``tokens``."""
    counted = _counted(logits, target, mask)
    picked_logits, picked_target = logits[counted].float(), target[counted]
    if not len(picked_target):
        return {"nll_sum": 0.0, "correct": 0.0, "tokens": 0.0}
    return {
        "nll_sum": float(F.cross_entropy(picked_logits, picked_target, reduction="sum")),
        "correct": float((picked_logits.argmax(dim=1) == picked_target).sum()),
        "tokens": float(len(picked_target)),
    }


def token_nll(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Mean negative log-likelihood per counted token, in nats (NaN when no token counts)."""
    sums = token_sums(logits, target, mask)
    return sums["nll_sum"] / sums["tokens"] if sums["tokens"] else math.nan


def perplexity(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    r""":math:`\exp\big(\frac{1}{N}\sum_{i \in C} -\log q(y_i)\big)` over the N counted tokens."""
    return math.exp(token_nll(logits, target, mask))


def token_accuracy(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Fraction of counted tokens whose arg-max is the target token."""
    sums = token_sums(logits, target, mask)
    return sums["correct"] / sums["tokens"] if sums["tokens"] else math.nan


def token_agreement(
    logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
) -> float:
    """Fraction of counted tokens where the model's arg-max token is the teacher's."""
    counted = _counted(logits, target, mask)
    if logits.shape != teacher_logits.shape:
        raise ShapeMismatchError(
            f"logits {tuple(logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ"
        )
    same = logits.argmax(dim=-1) == teacher_logits.argmax(dim=-1)
    return float(same[counted].float().mean()) if bool(counted.any()) else math.nan


def token_metrics(
    logits: torch.Tensor,
    target: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> dict[str, float]:
    """perplexity, nll (nats per token), token_accuracy and, given the teacher's logits, agreement with it."""
    sums = token_sums(logits, target, mask)
    mean_nll = sums["nll_sum"] / sums["tokens"] if sums["tokens"] else math.nan
    metrics = {
        "perplexity": math.exp(mean_nll),
        "nll": mean_nll,
        "token_accuracy": sums["correct"] / sums["tokens"] if sums["tokens"] else math.nan,
    }
    if teacher_logits is not None:
        metrics["agreement"] = token_agreement(logits, teacher_logits, target, mask)
    return metrics


# ---- per embedding: (batch, dim) -----------------------------------------------------------------------------------


def embedding_sums(embeddings: torch.Tensor, teacher_embeddings: torch.Tensor) -> dict[str, float]:
    """Summed over one batch: ``cosine_sum`` (cosine similarity of each row to the teacher's), ``squared_error``
    (over every number), ``rows`` and ``numbers``."""
    if embeddings.ndim != 2 or embeddings.shape != teacher_embeddings.shape:
        raise ShapeMismatchError(
            f"embedding metrics need two (batch, dim) tensors of one shape; got {tuple(embeddings.shape)} and "
            f"{tuple(teacher_embeddings.shape)}",
            hint="the student must output the teacher's embedding size, one vector per example.",
        )
    student, teacher = embeddings.float(), teacher_embeddings.float()
    cosine = (F.normalize(student, dim=1, eps=1e-12) * F.normalize(teacher, dim=1, eps=1e-12)).sum(dim=1)
    return {
        "cosine_sum": float(cosine.sum()),
        "squared_error": float((student - teacher).pow(2).sum()),
        "rows": float(len(student)),
        "numbers": float(student.numel()),
    }


def mean_cosine_similarity(embeddings: torch.Tensor, teacher_embeddings: torch.Tensor) -> float:
    """Mean over rows of cos(embedding, teacher's embedding) (norms clamped at 1e-12)."""
    sums = embedding_sums(embeddings, teacher_embeddings)
    return sums["cosine_sum"] / sums["rows"] if sums["rows"] else math.nan


def embedding_metrics(embeddings: torch.Tensor, teacher_embeddings: torch.Tensor) -> dict[str, float]:
    """cosine (mean cosine similarity to the teacher's embeddings) and mse (mean over every number)."""
    sums = embedding_sums(embeddings, teacher_embeddings)
    if not sums["rows"]:
        return {"cosine": math.nan, "mse": math.nan}
    return {"cosine": sums["cosine_sum"] / sums["rows"], "mse": sums["squared_error"] / sums["numbers"]}
