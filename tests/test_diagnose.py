"""Each diagnosis rule fires on the measurements it is about, stays silent just short of them, and names the exact
setting to change; a real run feeds the rules what it measured."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer
from sklearn.ensemble import RandomForestClassifier
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from kdistill import distill
from kdistill.diagnose import (
    RULES,
    RunFacts,
    agreement_gap,
    calibration_worse,
    capacity_gap,
    diagnose,
    gaussian_noise,
    memorised_teacher,
    probability_teacher_hot,
    soft_term_flat,
    student_matches_teacher,
)


def test_probability_teacher_at_a_high_temperature():
    found = probability_teacher_hot(RunFacts(teacher_outputs_probs=True, temperature=4.0))
    assert found is not None and found.setting.startswith("temperature=1")
    assert probability_teacher_hot(RunFacts(teacher_outputs_probs=True, temperature=2.0)) is None
    assert probability_teacher_hot(RunFacts(teacher_outputs_probs=False, temperature=8.0)) is None
    assert probability_teacher_hot(RunFacts(teacher_outputs_probs=True, temperature=None)) is None


def test_memorised_teacher_suggests_oof_for_sklearn_and_a_transfer_set_otherwise():
    facts = RunFacts(teacher_train_confidence=0.99, teacher_heldout_confidence=0.80, teacher_is_sklearn=True)
    found = memorised_teacher(facts)
    assert found is not None and found.setting == 'soft_targets="oof"'
    facts.teacher_is_sklearn = False
    found = memorised_teacher(facts)
    assert found is not None and "transfer set" in found.advice
    assert memorised_teacher(RunFacts(teacher_train_confidence=0.99, teacher_heldout_confidence=0.90)) is None
    assert memorised_teacher(RunFacts(teacher_train_confidence=0.93, teacher_heldout_confidence=0.70)) is None
    oof = RunFacts(teacher_train_confidence=0.99, teacher_heldout_confidence=0.7, soft_targets="oof")
    assert memorised_teacher(oof) is None  # already following the advice


def test_agreement_gap():
    found = agreement_gap(RunFacts(student_train_agreement=1.0, student_heldout_agreement=0.85))
    assert found is not None and "augment=" in found.setting
    assert agreement_gap(RunFacts(student_train_agreement=1.0, student_heldout_agreement=0.91)) is None


def test_capacity_gap_names_an_assistant_eight_times_the_student():
    facts = RunFacts(
        teacher_parameters=100_000, student_parameters=1_000, teacher_accuracy=0.95, student_accuracy=0.90,
        student_hidden=[8],
    )  # fmt: skip
    found = capacity_gap(facts)
    assert found is not None and "hidden=[64]" in found.setting and "100x" in found.finding
    facts.student_accuracy = 0.94  # within 2 points: no gap worth bridging
    assert capacity_gap(facts) is None
    facts.student_accuracy, facts.teacher_parameters = 0.90, 20_000  # only 20x
    assert capacity_gap(facts) is None


def test_student_matching_the_teacher_suggests_half_the_width():
    facts = RunFacts(student_heldout_agreement=0.99, teacher_accuracy=0.95, student_accuracy=0.948, student_hidden=[64])
    found = student_matches_teacher(facts)
    assert found is not None and found.setting == "hidden=[32]"
    facts.student_accuracy = 0.94
    assert student_matches_teacher(facts) is None
    facts.student_accuracy, facts.student_heldout_agreement = 0.95, 0.97
    assert student_matches_teacher(facts) is None


def test_a_soft_term_that_does_not_decrease():
    flat = RunFacts(soft_terms={"train_kd": [1.00, 0.97, 0.95, 0.99]}, lr=0.3)
    found = soft_term_flat(flat)
    assert found is not None and found.setting == "lr=0.03" and "kd fell only 5%" in found.finding
    assert soft_term_flat(RunFacts(soft_terms={"train_kd": [1.0, 0.7, 0.5]}, lr=0.3)) is None
    assert soft_term_flat(RunFacts(soft_terms={"train_kd": [1.0, 1.0]})) is None  # too few epochs to tell
    # kd fell by a third but stayed where a uniform prediction scores: the student learned nothing from the teacher
    stuck = RunFacts(soft_terms={"train_kd": [3.4, 3.7, 2.33, 2.34]}, soft_term_uniform=2.2, lr=3.0)
    found = soft_term_flat(stuck)
    assert found is not None and found.setting == "lr=0.3" and "uniform" in found.finding
    stuck.soft_term_uniform = 2.8
    assert soft_term_flat(stuck) is None
    stuck.soft_terms = {"train_fitnet/fitnet": [3.4, 3.7, 2.33, 2.34]}  # the uniform level is kd's alone
    stuck.soft_term_uniform = 2.2
    assert soft_term_flat(stuck) is None


def test_calibration_much_worse_than_the_baseline():
    found = calibration_worse(RunFacts(student_ece=0.12, baseline_ece=0.04, soft_weight=0.5))
    assert found is not None and found.setting == "soft_weight=0.1"
    assert calibration_worse(RunFacts(student_ece=0.06, baseline_ece=0.04)) is None


def test_no_facts_no_advice_and_every_rule_listed():
    assert diagnose(RunFacts()) == []
    assert len(RULES) == 7 and len({rule.__name__ for rule in RULES}) == 7


def test_gaussian_noise_is_seeded_and_scaled_by_each_feature():
    batch = torch.randn(512, 3) * torch.tensor([1.0, 10.0, 0.1])
    augment = gaussian_noise(0.1)
    first = augment(batch, torch.Generator().manual_seed(0))
    again = augment(batch, torch.Generator().manual_seed(0))
    assert torch.equal(first, again)
    ratio = (first - batch).std(dim=0) / batch.std(dim=0)
    assert ratio == pytest.approx(torch.full((3,), 0.1), rel=0.15)


def test_a_forest_distilled_at_t4_is_told_to_use_t1():
    x, y = load_breast_cancer(return_X_y=True)
    x = StandardScaler().fit_transform(x).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.4, random_state=0, stratify=y)
    forest = RandomForestClassifier(50, random_state=0).fit(x_train, y_train)
    result = distill(forest, "mlp", (x_train, y_train), test=(x_test, y_test), epochs=4, profile=False, verbose=False)
    report = result.report
    assert report is not None
    assert report.measured["teacher_outputs_probs"] is True
    fired = {item["rule"]: item for item in report.advice}
    assert "probability_teacher_hot" in fired
    assert fired["probability_teacher_hot"]["setting"].startswith("temperature=1")
    assert any(line == f"advice: {fired['probability_teacher_hot']['line']}" for line in report.lines())
    # what the rules read was measured on the run's own rows: the forest is surer on its training rows
    assert report.measured["teacher_train_confidence"] > report.measured["teacher_heldout_confidence"]
    assert report.measured["train_rows_sampled"] == len(y_train)
    # kd's uniform-prediction level, transcribed: T² · mean KL(q || uniform), q = p^(1/T) renormalised, p floored
    probs = np.clip(forest.predict_proba(x_train), 1e-12, None)
    sharpened = probs**0.25 / (probs**0.25).sum(axis=1, keepdims=True)
    uniform = 16 * np.mean(np.sum(sharpened * np.log(sharpened * probs.shape[1]), axis=1))
    assert report.measured["soft_term_uniform"] == pytest.approx(uniform, rel=1e-4)
    quiet = distill(
        forest, "mlp", (x_train, y_train), test=(x_test, y_test), epochs=4, temperature=1.0, profile=False,
        verbose=False,
    )  # fmt: skip
    assert quiet.report is not None
    assert "probability_teacher_hot" not in {item["rule"] for item in quiet.report.advice}
