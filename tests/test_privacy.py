"""Membership inference: the attack AUC against a brute-force pair count, and the estimate on a memorising teacher
against a regularised one, as a run reports them."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer
from sklearn.ensemble import ExtraTreesClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from kdistill import distill
from kdistill.errors import ShapeMismatchError
from kdistill.privacy import attack_auc, membership_inference, privacy_reading


def _pairwise_auc(members, others) -> float:
    """P(member > other) + P(tie)/2 over every pair, counted one pair at a time."""
    total = 0.0
    for member, other in itertools.product(members, others):
        total += 1.0 if member > other else 0.5 if member == other else 0.0
    return total / (len(members) * len(others))


def test_attack_auc_counts_pairs_with_ties_as_half():
    generator = np.random.default_rng(0)
    members = generator.integers(0, 6, 40).astype(float)  # many ties
    others = generator.integers(0, 5, 55).astype(float)
    assert attack_auc(members, others) == pytest.approx(_pairwise_auc(members, others))
    assert attack_auc([3.0, 4.0], [1.0, 2.0]) == 1.0
    assert attack_auc([1.0], [1.0]) == 0.5
    with pytest.raises(ShapeMismatchError, match="members and non-members"):
        attack_auc([], [1.0])


def test_membership_inference_scores_loss_and_confidence():
    target = torch.tensor([0, 1, 2, 0])
    confident = torch.nn.functional.one_hot(target, 3).float() * 8
    hesitant = torch.nn.functional.one_hot(target, 3).float() * 0.5
    found = membership_inference(confident, target, hesitant, target)
    assert found["loss_auc"] == 1.0 and found["confidence_auc"] == 1.0
    # confidence ignores the label, loss does not: a confident wrong answer is a high-loss (non-member-like) row
    wrong = (target + 1) % 3
    found = membership_inference(confident, wrong, hesitant, target)
    assert found["loss_auc"] == 0.0
    assert found["confidence_auc"] == 1.0
    assert (found["member_rows"], found["nonmember_rows"]) == (4, 4)


def test_reading_says_what_half_means():
    assert "0.5 = none" in privacy_reading(0.51)
    assert privacy_reading(0.6).startswith("a weak signal")
    assert privacy_reading(0.7).startswith("a clear signal")
    assert privacy_reading(0.95).startswith("a strong signal")


def _data():
    x, y = load_breast_cancer(return_X_y=True)
    x = StandardScaler().fit_transform(x).astype(np.float32)
    return train_test_split(x, y, test_size=0.5, random_state=0, stratify=y)


def test_a_memorising_teacher_leaks_more_than_a_regularised_one():
    x_train, x_test, y_train, y_test = _data()
    memorising = ExtraTreesClassifier(200, random_state=0).fit(x_train, y_train)  # one-hot on its own rows
    regular = LogisticRegression(C=0.05, max_iter=2000).fit(x_train, y_train)
    found, lines = {}, {}
    for name, teacher in (("memorising", memorising), ("regular", regular)):
        result = distill(
            teacher, "mlp", (x_train, y_train), test=(x_test, y_test), epochs=3, profile=False, verbose=False
        )
        assert result.report is not None
        found[name], lines[name] = result.report.privacy, result.report.lines()
        assert set(found[name]) == {"teacher", "student", "baseline"}
    assert found["memorising"]["teacher"]["loss_auc"] > 0.8
    assert found["regular"]["teacher"]["loss_auc"] < 0.6
    # the report's privacy line names the leakiest model and reads its AUC
    assert lines["memorising"][-1].startswith("privacy: membership-inference AUC")
    assert lines["memorising"][-1].endswith("teacher: a strong signal: most training rows can be told apart")


def test_the_privacy_estimate_can_be_turned_off():
    from kdistill.data import as_split
    from kdistill.pipeline import build_report
    from kdistill.teachers import as_teacher

    x_train, x_test, y_train, y_test = _data()
    teacher = as_teacher(LogisticRegression(max_iter=2000).fit(x_train, y_train))
    student = torch.nn.Linear(x_train.shape[1], 2)
    test, train = as_split((x_test, y_test), name="test"), as_split((x_train, y_train), name="train")
    on = build_report(teacher, student, None, test, "test", {}, False, train_split=train)
    off = build_report(teacher, student, None, test, "test", {}, False, train_split=train, privacy=False)
    assert set(on.privacy) == {"teacher", "student"}
    assert off.privacy == {}
    assert on.measured["teacher_train_confidence"] == pytest.approx(off.measured["teacher_train_confidence"])
    # the run's own soft targets stand in for the teacher's outputs on the training rows: the same numbers
    from kdistill.teachers import teacher_logits

    known = teacher_logits(teacher, train.x)
    reused = build_report(
        teacher, student, None, test, "test", {}, False, train_split=train, train_teacher_logits=known
    )
    assert reused.measured == pytest.approx(on.measured)
    assert reused.privacy["teacher"] == pytest.approx(on.privacy["teacher"])
