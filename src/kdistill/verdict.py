"""Did the teacher help? The report's verdict line: the student against its no-teacher baseline, on the same rows.

Two paired tests, both on the rows both models were evaluated on:

- :func:`mcnemar_exact` (classification): only the rows where exactly one of the two models is right carry
  information. With ``b`` rows right only for the student and ``c`` rows right only for the baseline, under the null
  hypothesis (the two are equally accurate) ``b ~ Binomial(b + c, 1/2)``; the two-sided exact p-value is
  ``min(1, 2 * P(X <= min(b, c)))`` (McNemar 1947; the exact form of Edwards' continuity-free test).
- :func:`paired_bootstrap` (any per-row metric: a regression error, a per-token log-likelihood): the mean of the
  per-row differences ``d_i = a_i - b_i``, with a percentile interval from resampling rows with replacement
  (Efron & Tibshirani 1993, ch. 13); the difference is significant when the interval excludes 0.

:func:`seed_spread` summarises the difference across seeds when several were run (:func:`verdict_across_seeds`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kdistill.data import rows_in, take_rows
from kdistill.errors import ShapeMismatchError

if TYPE_CHECKING:
    from kdistill.data import Split
    from kdistill.report import Report

__all__ = [
    "BootstrapInterval",
    "McNemar",
    "Verdict",
    "classification_verdict",
    "judge",
    "mcnemar_exact",
    "paired_bootstrap",
    "seed_spread",
    "token_verdict",
    "verdict_across_seeds",
]

ALPHA = 0.05


@dataclass(frozen=True)
class McNemar:
    """McNemar's exact test. ``first_only``: rows right for the first model only (b); ``second_only``: right for the
    second only (c); ``p_value``: two-sided exact binomial p-value (1.0 when b + c = 0)."""

    first_only: int
    second_only: int
    p_value: float


@dataclass(frozen=True)
class BootstrapInterval:
    """The mean per-row difference (first - second) and its percentile interval at ``confidence``."""

    difference: float
    low: float
    high: float
    confidence: float
    resamples: int

    @property
    def significant(self) -> bool:
        """True when the interval excludes 0."""
        return self.low > 0.0 or self.high < 0.0


def _bool_rows(values: Any, name: str) -> np.ndarray:
    array = np.asarray(values.cpu() if isinstance(values, torch.Tensor) else values).reshape(-1)
    if array.dtype != np.bool_ and not np.isin(array, (0, 1)).all():
        raise ShapeMismatchError(f"{name} must hold one True/False (right/wrong) per row; saw values {array[:5]}")
    return array.astype(bool)


def mcnemar_exact(first_correct: Any, second_correct: Any) -> McNemar:
    """McNemar's exact test on two models' per-row correctness (``(rows,)`` booleans, the same rows in the same order).

    ``p = min(1, 2 * sum_{k <= min(b, c)} C(b + c, k) / 2^(b + c))``, computed by
    ``scipy.stats.binomtest(b, b + c, 0.5)``."""
    first = _bool_rows(first_correct, "first_correct")
    second = _bool_rows(second_correct, "second_correct")
    if first.shape != second.shape:
        raise ShapeMismatchError(
            f"McNemar's test pairs rows: got {first.shape[0]} and {second.shape[0]} rows",
            hint="score both models on the same rows, in the same order.",
        )
    b = int(np.sum(first & ~second))
    c = int(np.sum(~first & second))
    if b + c == 0:
        return McNemar(b, c, 1.0)
    from scipy.stats import binomtest

    return McNemar(b, c, float(binomtest(b, b + c, 0.5, alternative="two-sided").pvalue))


def paired_bootstrap(
    first: Any, second: Any, *, resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> BootstrapInterval:
    """Paired bootstrap of ``mean(first - second)`` over rows. ``first``/``second``: ``(rows,)`` per-row values of the
    same metric (e.g. squared error, per-token log-likelihood, 0/1 correctness) on the same rows. The interval is
    the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of ``resamples`` row-resampled means."""
    a = np.asarray(first.cpu() if isinstance(first, torch.Tensor) else first, dtype=np.float64).reshape(-1)
    b = np.asarray(second.cpu() if isinstance(second, torch.Tensor) else second, dtype=np.float64).reshape(-1)
    if a.shape != b.shape or a.size == 0:
        raise ShapeMismatchError(
            f"a paired bootstrap needs the same rows for both: got {a.size} and {b.size} values",
            hint="score both models on the same rows, in the same order.",
        )
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    differences = a - b
    generator = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 256):  # a block of resamples at a time: bounded memory for large row counts
        stop = min(resamples, start + 256)
        picks = generator.integers(0, differences.size, size=(stop - start, differences.size))
        means[start:stop] = differences[picks].mean(axis=1)
    low, high = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    return BootstrapInterval(float(differences.mean()), float(low), float(high), confidence, resamples)


def seed_spread(values: Sequence[float]) -> dict[str, float]:
    """``mean``, ``std`` (sample, ddof=1; 0 for one seed), ``min``, ``max`` and ``seeds`` of per-seed values."""
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        raise ValueError("seed_spread needs at least one value")
    std = float(array.std(ddof=1)) if array.size > 1 else 0.0
    return {
        "mean": float(array.mean()),
        "std": std,
        "min": float(array.min()),
        "max": float(array.max()),
        "seeds": float(array.size),
    }


@dataclass
class Verdict:
    """Whether the distilled student beats its no-teacher baseline on ``rows`` rows of ``split``.

    ``difference``: student - baseline ``metric`` (accuracy: a fraction). ``test``: ``"mcnemar_exact"`` (with
    ``p_value`` and the discordant counts) or ``"paired_bootstrap"`` (with ``interval``). ``seeds``: the difference's
    :func:`seed_spread` when several seeds were run.
    """

    metric: str
    student: float
    baseline: float
    rows: int
    split: str
    test: str
    p_value: float | None = None
    interval: tuple[float, float] | None = None
    student_only: int | None = None
    baseline_only: int | None = None
    alpha: float = ALPHA
    seeds: dict[str, float] | None = None
    per_seed: list[float] = field(default_factory=list)

    @property
    def difference(self) -> float:
        return self.student - self.baseline

    @property
    def significant(self) -> bool:
        if self.p_value is not None:
            return self.p_value < self.alpha
        return self.interval is not None and (self.interval[0] > 0.0 or self.interval[1] < 0.0)

    @property
    def outcome(self) -> str:
        """``"helped"``, ``"hurt"`` (both significant) or ``"no significant difference"``."""
        if not self.significant:
            return "no significant difference"
        return "helped" if self.difference > 0 else "hurt"

    def line(self) -> str:
        """The one-line verdict the console, report.json and the HTML report open with."""
        points = 100 * self.difference
        head = {
            "helped": "the teacher helped",
            "hurt": "the teacher hurt",
            "no significant difference": "no significant difference from the baseline",
        }[self.outcome]
        text = (
            f"verdict: {head}: student {self.metric} {self.student:.4f} vs baseline {self.baseline:.4f} "
            f"({points:+.2f} points) on {self.rows} {self.split} rows"
        )
        if self.test == "mcnemar_exact":
            assert self.p_value is not None
            text += (
                f"; McNemar exact p = {self.p_value:.3g} ({self.student_only} rows right only for the student, "
                f"{self.baseline_only} only for the baseline)"
            )
        elif self.interval is not None:
            text += f"; paired bootstrap 95% interval [{100 * self.interval[0]:+.2f}, {100 * self.interval[1]:+.2f}]"
        text += f", {'significant' if self.significant else 'not significant'} at {self.alpha:g}"
        if self.seeds is not None and self.seeds["seeds"] > 1:
            text += (
                f"; across {self.seeds['seeds']:.0f} seeds {100 * self.seeds['mean']:+.2f} ± "
                f"{100 * self.seeds['std']:.2f} points (min {100 * self.seeds['min']:+.2f}, "
                f"max {100 * self.seeds['max']:+.2f})"
            )
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "line": self.line(),
            "outcome": self.outcome,
            "significant": self.significant,
            "metric": self.metric,
            "student": self.student,
            "baseline": self.baseline,
            "difference": self.difference,
            "rows": self.rows,
            "split": self.split,
            "test": self.test,
            "p_value": self.p_value,
            "interval": None if self.interval is None else list(self.interval),
            "student_only": self.student_only,
            "baseline_only": self.baseline_only,
            "alpha": self.alpha,
            "seeds": self.seeds,
            "per_seed": self.per_seed,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Verdict:
        interval = data.get("interval")
        return cls(
            metric=data["metric"],
            student=data["student"],
            baseline=data["baseline"],
            rows=data["rows"],
            split=data["split"],
            test=data["test"],
            p_value=data.get("p_value"),
            interval=None if interval is None else (float(interval[0]), float(interval[1])),
            student_only=data.get("student_only"),
            baseline_only=data.get("baseline_only"),
            alpha=data.get("alpha", ALPHA),
            seeds=data.get("seeds"),
            per_seed=list(data.get("per_seed", [])),
        )


def classification_verdict(
    student_logits: torch.Tensor,
    baseline_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    split: str = "test",
    alpha: float = ALPHA,
) -> Verdict:
    """The verdict on accuracy with McNemar's exact test. ``*_logits``: (rows, classes); ``target``: (rows,)."""
    if student_logits.shape != baseline_logits.shape or student_logits.shape[0] != target.shape[0]:
        raise ShapeMismatchError(
            f"the verdict pairs rows: student {tuple(student_logits.shape)}, baseline {tuple(baseline_logits.shape)}, "
            f"targets {tuple(target.shape)}",
            hint="score the student and the baseline on the same rows.",
        )
    student_correct = (student_logits.argmax(dim=1) == target).numpy()
    baseline_correct = (baseline_logits.argmax(dim=1) == target).numpy()
    test = mcnemar_exact(student_correct, baseline_correct)
    return Verdict(
        metric="accuracy",
        student=float(student_correct.mean()),
        baseline=float(baseline_correct.mean()),
        rows=int(target.shape[0]),
        split=split,
        test="mcnemar_exact",
        p_value=test.p_value,
        student_only=test.first_only,
        baseline_only=test.second_only,
        alpha=alpha,
    )


def token_verdict(
    student_logits: torch.Tensor, baseline_logits: torch.Tensor, target: torch.Tensor, *, split: str = "test"
) -> Verdict:
    """Student vs baseline for token-level language modelling: each row's token accuracy (argmax = next token, over
    the positions whose target is not -100), compared row for row with a :func:`paired_bootstrap` interval.
    ``*_logits``: (rows, seq, vocab); ``target``: (rows, seq) next-token ids with -100 where nothing is predicted."""
    counted = target != -100
    per_row_count = counted.sum(dim=1).clamp_min(1)

    def per_row(logits: torch.Tensor) -> torch.Tensor:
        return ((logits.argmax(dim=-1) == target) & counted).sum(dim=1) / per_row_count

    student, baseline = per_row(student_logits), per_row(baseline_logits)
    interval = paired_bootstrap(student, baseline)
    return Verdict(
        metric="token accuracy (row mean)",
        student=float(student.mean()),
        baseline=float(baseline.mean()),
        rows=len(target),
        split=split,
        test="paired_bootstrap",
        interval=(interval.low, interval.high),
    )


def verdict_across_seeds(verdicts: Sequence[Verdict]) -> Verdict:
    """The first seed's verdict with the spread of ``difference`` across all of ``verdicts`` (one per seed)."""
    if not verdicts:
        raise ValueError("verdict_across_seeds needs at least one verdict")
    differences = [verdict.difference for verdict in verdicts]
    first = verdicts[0]
    return Verdict(**{**first.__dict__, "seeds": seed_spread(differences), "per_seed": differences})


def judge(
    built: Report,
    predictors: Mapping[str, Callable[[Any], Any]],
    logits: Mapping[str, torch.Tensor],
    split: Split,
    sampled: tuple[Split | None, torch.Tensor | None, int, int],
    *,
    facts: dict[str, Any],
    privacy: bool = True,
) -> None:
    """Fill ``built``'s verdict, ``measured``, ``privacy`` and ``advice`` (as :func:`kdistill.pipeline.build_report`
    does). ``predictors``: each model's ``predict(x) -> logits or Outputs`` (``"teacher"``, ``"student"``, optional
    ``"baseline"``); ``logits``: their (rows, classes) logits on ``split``, the evaluated rows. ``sampled``: the
    training rows, the teacher's logits on all of them (or None: the teacher runs on the sample), how many rows to
    sample and the sampling seed. ``facts``: what the run knows besides the models (:class:`RunFacts` fields)."""
    from kdistill.diagnose import RunFacts, diagnose
    from kdistill.privacy import membership_inference
    from kdistill.teachers import Outputs

    train_split, known_train_logits, sample_rows, seed = sampled
    assert split.y is not None
    models = built.models
    if "baseline" in logits:
        built.verdict = classification_verdict(logits["student"], logits["baseline"], split.y, split=built.split)
    reference = logits["teacher"]
    measured: dict[str, Any] = {
        "teacher_outputs_probs": bool(torch.logsumexp(reference, dim=1).abs().max() < 1e-3),
        "teacher_heldout_confidence": float(torch.softmax(reference, dim=1).max(dim=1).values.mean()),
        "student_heldout_agreement": models["student"].get("agreement"),
        "teacher_accuracy": models["teacher"]["accuracy"],
        "student_accuracy": models["student"]["accuracy"],
        "teacher_parameters": models["teacher"].get("parameters"),
        "student_parameters": models["student"].get("parameters"),
        "student_ece": models["student"]["ece"],
    }
    if "baseline" in models:
        measured |= {"baseline_accuracy": models["baseline"]["accuracy"], "baseline_ece": models["baseline"]["ece"]}
    if train_split is not None and train_split.y is not None:
        generator = torch.Generator().manual_seed(seed)
        rows = torch.randperm(rows_in(train_split.x), generator=generator)[:sample_rows]  # a stream: its sample
        sample_x, sample_y = take_rows(train_split.x, rows), train_split.y[rows]
        on_train: dict[str, torch.Tensor] = {}
        if known_train_logits is not None:
            on_train["teacher"] = known_train_logits[rows].float().cpu()
        with torch.inference_mode():
            for name, predict in predictors.items():
                if name not in on_train:
                    output = predict(sample_x)
                    on_train[name] = (output.logits if isinstance(output, Outputs) else output).float().cpu()
        teacher_train = on_train["teacher"]
        measured |= {
            "teacher_train_confidence": float(torch.softmax(teacher_train, dim=1).max(dim=1).values.mean()),
            "student_train_agreement": float((on_train["student"].argmax(1) == teacher_train.argmax(1)).float().mean()),
            "train_rows_sampled": len(rows),
        }
        temperature = facts.get("temperature")
        if temperature:  # kd's soft term for a uniform prediction: T² · mean KL(p_t^T || uniform)
            log_probs = torch.log_softmax(teacher_train / temperature, dim=1)
            entropy = -(log_probs.exp() * log_probs).sum(dim=1)
            uniform = temperature**2 * float((math.log(teacher_train.shape[1]) - entropy).mean())
            measured["soft_term_uniform"] = uniform
        if privacy:
            built.privacy = {
                name: membership_inference(on_train[name], sample_y, logits[name], split.y) for name in on_train
            }
    known = {name for name in RunFacts.__dataclass_fields__}
    run_facts = RunFacts(**{key: value for key, value in (measured | facts).items() if key in known})
    built.measured = {key: value for key, value in measured.items() if value is not None}
    built.advice = [found.to_dict() for found in diagnose(run_facts)]
