"""Membership inference: can an attacker tell a model's training rows from rows it never saw?

A student trained on a teacher's outputs can carry what the teacher memorised about its training rows. The report
estimates this for both with two threshold attacks (Yeom et al. 2018, "Privacy risk in machine learning"; Salem et
al. 2019, "ML-Leaks"), each scored by the area under its ROC curve separating members (training rows) from
non-members (held-out rows):

- loss attack: a row is called a member when its loss ``-log softmax(z)_y`` is low; the score is ``-loss``;
- confidence attack: a member when the top probability ``max softmax(z)`` is high (needs no label).

The AUC over every threshold is the Mann-Whitney statistic ``P(score(member) > score(non-member))``, ties counting
1/2. 0.5 means the attack learns nothing; 1.0 means every training row is told apart. It is a lower bound on the
leak: stronger attacks (shadow models, LiRA) can do better.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kdistill.errors import ShapeMismatchError

__all__ = ["attack_auc", "membership_inference", "privacy_reading"]


def attack_auc(member_scores: Any, nonmember_scores: Any) -> float:
    """``P(member > non-member) + P(tie) / 2`` over all pairs: the ROC AUC of calling high scores members.
    ``member_scores``: (members,); ``nonmember_scores``: (non-members,). Computed from ranks in O(n log n)."""
    members = np.asarray(member_scores, dtype=np.float64).reshape(-1)
    others = np.asarray(nonmember_scores, dtype=np.float64).reshape(-1)
    if members.size == 0 or others.size == 0:
        raise ShapeMismatchError(
            f"an attack AUC needs members and non-members: got {members.size} and {others.size} rows",
            hint="give both training rows and held-out rows.",
        )
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([members, others]))  # average ranks: ties count 1/2
    member_rank_sum = float(ranks[: members.size].sum())
    return (member_rank_sum - members.size * (members.size + 1) / 2) / (members.size * others.size)


def _row_scores(logits: torch.Tensor, target: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    log_probs = F.log_softmax(logits.float(), dim=1)
    loss = -log_probs.gather(1, target.long().view(-1, 1)).squeeze(1)
    return (-loss).numpy(), log_probs.exp().max(dim=1).values.numpy()


def membership_inference(
    member_logits: torch.Tensor,
    member_target: torch.Tensor,
    nonmember_logits: torch.Tensor,
    nonmember_target: torch.Tensor,
) -> dict[str, float]:
    """``loss_auc`` and ``confidence_auc`` of the two threshold attacks, and the row counts used.
    ``*_logits``: (rows, classes) of one model on its training rows (members) and on held-out rows (non-members)."""
    if member_logits.shape[0] != member_target.shape[0] or nonmember_logits.shape[0] != nonmember_target.shape[0]:
        raise ShapeMismatchError(
            f"logits and labels disagree in rows: members {member_logits.shape[0]} vs {member_target.shape[0]}, "
            f"non-members {nonmember_logits.shape[0]} vs {nonmember_target.shape[0]}"
        )
    member_loss, member_confidence = _row_scores(member_logits, member_target)
    other_loss, other_confidence = _row_scores(nonmember_logits, nonmember_target)
    return {
        "loss_auc": attack_auc(member_loss, other_loss),
        "confidence_auc": attack_auc(member_confidence, other_confidence),
        "member_rows": float(member_logits.shape[0]),
        "nonmember_rows": float(nonmember_logits.shape[0]),
    }


def privacy_reading(auc: float) -> str:
    """A one-line reading of an attack AUC (0.5 = no signal)."""
    if auc < 0.55:
        return "no measurable signal (0.5 = none)"
    if auc < 0.65:
        return "a weak signal: training rows are somewhat easier to spot"
    if auc < 0.8:
        return "a clear signal: the model leaks which rows it trained on"
    return "a strong signal: most training rows can be told apart"
