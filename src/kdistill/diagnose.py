"""Diagnoses with advice: small rules fired from what a run measured, each naming the exact setting to change.

Every rule is one function ``rule(facts) -> Diagnosis | None`` over :class:`RunFacts` (what the report measured:
teacher and student on the training rows and on held-out rows, sizes, calibration, the per-epoch loss terms).
:func:`diagnose` runs them all, in :data:`RULES` order. The thresholds are deliberately coarse: a rule fires when the
problem is plain, and ``benchmarks/diagnosis.py`` measures, for each rule, a case where following its advice improves
the result (docs/report.md lists them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "RULES",
    "Diagnosis",
    "RunFacts",
    "agreement_gap",
    "calibration_worse",
    "capacity_gap",
    "diagnose",
    "memorised_teacher",
    "probability_teacher_hot",
    "soft_term_flat",
    "student_matches_teacher",
]

HOT_TEMPERATURE = 2.0  # above this a probability teacher's targets are flattened towards uniform
MEMORISED_CONFIDENCE = 0.95  # teacher's mean top probability on its own training rows
CONFIDENCE_GAP = 0.10  # ... and this much lower on held-out rows
AGREEMENT_GAP = 0.10  # student-teacher agreement, training rows minus held-out rows
CAPACITY_RATIO = 50.0  # teacher parameters over student parameters
CAPACITY_SHORTFALL = 0.02  # the student this far (accuracy, absolute) below the teacher
MATCH_AGREEMENT = 0.98  # student agrees with the teacher this often on held-out rows ...
MATCH_SHORTFALL = 0.005  # ... and is within this accuracy of it
FLAT_DECREASE = 0.10  # the soft term fell by less than this fraction from the first epoch to the best
ECE_EXCESS = 0.03  # student ECE over the baseline's (absolute)


@dataclass
class RunFacts:
    """What the rules read. Everything is optional: a rule whose inputs are missing stays silent.

    ``teacher_outputs_probs``: the teacher's outputs are probabilities (log-probabilities as logits: every row's
    logsumexp is 0), as scikit-learn trees and forests give. ``temperature``: the kd temperature (None for other
    methods). ``teacher_train_confidence``/``teacher_heldout_confidence``: mean top-class probability of the
    teacher on (a sample of) its training rows / the evaluated rows. ``student_train_agreement``/
    ``student_heldout_agreement``: how often the student predicts the teacher's class there. ``soft_terms``: the
    per-epoch training values of each soft (teacher) term, by history key (``train_kd``, ``train_kd/kd``, ...).
    ``soft_term_uniform``: what kd's soft term would be for a student that predicts uniform probabilities,
    ``T² · mean_rows KL(softmax(z_t / T) || uniform) = T² · mean_rows (log C - H(softmax(z_t / T)))``, on the training
    rows sampled.
    ``student_hidden``: the student's hidden widths when it is a built-in MLP/CNN (for the advice's numbers).
    """

    teacher_outputs_probs: bool | None = None
    temperature: float | None = None
    soft_targets: str = "predict"
    teacher_is_sklearn: bool = False
    teacher_train_confidence: float | None = None
    teacher_heldout_confidence: float | None = None
    student_train_agreement: float | None = None
    student_heldout_agreement: float | None = None
    teacher_parameters: float | None = None
    student_parameters: float | None = None
    teacher_accuracy: float | None = None
    student_accuracy: float | None = None
    baseline_accuracy: float | None = None
    student_ece: float | None = None
    baseline_ece: float | None = None
    soft_terms: dict[str, list[float]] = field(default_factory=dict)
    soft_term_uniform: float | None = None
    lr: float | None = None
    soft_weight: float | None = None
    student_hidden: list[int] | None = None


@dataclass(frozen=True)
class Diagnosis:
    """One fired rule: ``rule`` (its function's name), ``finding`` (what was measured), ``advice`` (what to do) and
    ``setting`` (the exact setting to change, as a ``distill()`` argument)."""

    rule: str
    finding: str
    advice: str
    setting: str

    def line(self) -> str:
        return f"{self.finding} -> {self.advice} ({self.setting})"

    def to_dict(self) -> dict[str, str]:
        return asdict(self) | {"line": self.line()}


def probability_teacher_hot(facts: RunFacts) -> Diagnosis | None:
    """A probability teacher (trees, forests) distilled at a high temperature. Its "logits" are log-probabilities
    with exact zeros floored, so ``softmax(log p / T)`` at T > 2 spreads mass over classes the teacher ruled out."""
    if not facts.teacher_outputs_probs or facts.temperature is None or facts.temperature <= HOT_TEMPERATURE:
        return None
    return Diagnosis(
        "probability_teacher_hot",
        f"the teacher outputs probabilities and was distilled at temperature {facts.temperature:g}",
        "probabilities are already soft: distil at temperature 1",
        "temperature=1 (YAML: method: [{name: kd, params: {temperature: 1}}])",
    )


def memorised_teacher(facts: RunFacts) -> Diagnosis | None:
    """A teacher near one-hot on its own training rows but not on held-out rows: its soft targets on the training
    rows are little more than the labels."""
    train, held = facts.teacher_train_confidence, facts.teacher_heldout_confidence
    if train is None or held is None or facts.soft_targets != "predict":
        return None
    if train < MEMORISED_CONFIDENCE or train - held < CONFIDENCE_GAP:
        return None
    if facts.teacher_is_sklearn:
        advice, setting = "label the training rows out of fold", 'soft_targets="oof"'
    else:
        advice, setting = "distil on rows the teacher did not train on (a transfer set)", "train=(X_transfer, y)"
    return Diagnosis(
        "memorised_teacher",
        f"the teacher is near one-hot on its training rows (mean confidence {train:.3f}) but not on held-out rows "
        f"({held:.3f}): it memorised them",
        advice,
        setting,
    )


def agreement_gap(facts: RunFacts) -> Diagnosis | None:
    """The student copies the teacher on the training rows far better than on held-out rows: it fits the teacher's
    outputs on a few points instead of its function. More (augmented) rows labelled by the teacher help."""
    train, held = facts.student_train_agreement, facts.student_heldout_agreement
    if train is None or held is None or train - held < AGREEMENT_GAP:
        return None
    return Diagnosis(
        "agreement_gap",
        f"the student agrees with the teacher on {train:.1%} of training rows but {held:.1%} of held-out rows",
        "show the student more rows labelled by the teacher: augment the training rows (the teacher runs live)",
        "augment=kdistill.diagnose.gaussian_noise(0.1) (or a larger train= transfer set)",
    )


def capacity_gap(facts: RunFacts) -> Diagnosis | None:
    """A large capacity gap (Mirzadeh et al. 2020): a teacher many times the student's size that the student falls
    well short of. A teacher assistant of intermediate size, distilled first, bridges it."""
    needed = (facts.teacher_parameters, facts.student_parameters, facts.teacher_accuracy, facts.student_accuracy)
    if any(value is None for value in needed):
        return None
    assert facts.teacher_parameters is not None and facts.student_parameters
    assert facts.teacher_accuracy is not None and facts.student_accuracy is not None
    ratio = facts.teacher_parameters / facts.student_parameters
    shortfall = facts.teacher_accuracy - facts.student_accuracy
    if ratio < CAPACITY_RATIO or shortfall < CAPACITY_SHORTFALL:
        return None
    assistant = [8 * width for width in facts.student_hidden] if facts.student_hidden else "[8x the student's]"
    return Diagnosis(
        "capacity_gap",
        f"the teacher has {ratio:.0f}x the student's parameters and the student is {100 * shortfall:.1f} points "
        "below it",
        "distil through a teacher assistant: first a mid-size student, then the small one from it",
        f"assistant = distill(teacher, 'mlp', train, hidden={assistant}).student; distill(assistant, student, train)",
    )


def student_matches_teacher(facts: RunFacts) -> Diagnosis | None:
    """The student already matches the teacher: a smaller one may do as well."""
    if facts.student_heldout_agreement is None or facts.teacher_accuracy is None or facts.student_accuracy is None:
        return None
    if facts.student_heldout_agreement < MATCH_AGREEMENT:
        return None
    if facts.student_accuracy < facts.teacher_accuracy - MATCH_SHORTFALL:
        return None
    smaller = [max(1, width // 2) for width in facts.student_hidden] if facts.student_hidden else None
    setting = f"hidden={smaller}" if smaller else "a smaller student= module"
    return Diagnosis(
        "student_matches_teacher",
        f"the student agrees with the teacher on {facts.student_heldout_agreement:.1%} of held-out rows and is "
        f"within {100 * MATCH_SHORTFALL:.1f} points of its accuracy",
        "try a smaller student (half the width)",
        setting,
    )


def _soft_decrease(values: Sequence[float]) -> float:
    """Relative fall of a term from its first epoch to its lowest: ``(v_0 - min v) / |v_0|``."""
    first = values[0]
    return (first - min(values)) / abs(first) if first else 0.0


def _is_kd(key: str) -> bool:
    return key.split("/")[-1] in ("train_kd", "kd", "train_kd_topk", "kd_topk")


def soft_term_flat(facts: RunFacts) -> Diagnosis | None:
    """A soft (teacher) term that does not decrease over training (it fell by less than 10% from the first epoch
    to its lowest), or, for kd, never got below what a uniform prediction scores: the student is not learning the
    teacher's outputs, most often because the step size is too large for the loss."""
    lower = f"lr={facts.lr / 10:g}" if facts.lr else "a 10x lower lr="
    for key, values in facts.soft_terms.items():
        if len(values) < 3 or any(value != value for value in values):  # NaN: the engine's own error says why
            continue
        name = key.removeprefix("train_")
        if _soft_decrease(values) < FLAT_DECREASE:
            finding = (
                f"the soft term {name} fell only {_soft_decrease(values):.0%} over {len(values)} epochs "
                f"({values[0]:.3g} -> {min(values):.3g})"
            )
        elif _is_kd(key) and facts.soft_term_uniform and min(values) > (1 - FLAT_DECREASE) * facts.soft_term_uniform:
            finding = (
                f"the soft term {name} never got below {min(values):.3g}, where a student predicting uniform "
                f"probabilities scores {facts.soft_term_uniform:.3g}"
            )
        else:
            continue
        return Diagnosis("soft_term_flat", finding, "lower the learning rate tenfold", lower)
    return None


def calibration_worse(facts: RunFacts) -> Diagnosis | None:
    """The student is much worse calibrated than its baseline: it copied a miscalibrated teacher's confidence.
    Weighting the labels more keeps the student's own calibration."""
    if facts.student_ece is None or facts.baseline_ece is None:
        return None
    if facts.student_ece - facts.baseline_ece < ECE_EXCESS:
        return None
    weight = facts.soft_weight if facts.soft_weight is not None else 0.5
    return Diagnosis(
        "calibration_worse",
        f"the student's ECE is {facts.student_ece:.3f} against the baseline's {facts.baseline_ece:.3f}",
        "put more weight on the labels than on the teacher",
        f"soft_weight={weight / 5:g}",
    )


RULES: tuple[Callable[[RunFacts], Diagnosis | None], ...] = (
    probability_teacher_hot,
    memorised_teacher,
    agreement_gap,
    capacity_gap,
    student_matches_teacher,
    soft_term_flat,
    calibration_worse,
)


def diagnose(facts: RunFacts, rules: Sequence[Callable[[RunFacts], Diagnosis | None]] = RULES) -> list[Diagnosis]:
    """Every rule that fires on ``facts``, in order."""
    return [found for rule in rules if (found := rule(facts)) is not None]


def gaussian_noise(scale: float) -> Callable[[Any, Any], Any]:
    """An ``augment`` for :func:`kdistill.distill`: adds ``scale`` x (each feature's batch std) Gaussian noise to
    every training batch, so the (live) teacher labels new points near the training rows."""
    import torch

    def augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        std = batch.float().std(dim=0, keepdim=True).clamp_min(1e-6)
        noise = torch.randn(batch.shape, generator=generator, device=batch.device, dtype=batch.dtype)
        return batch + scale * std * noise

    return augment
