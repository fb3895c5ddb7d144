"""The verdict: McNemar's exact test and the paired bootstrap against independent computations, and the verdict a
real run writes into its report."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from kdistill import distill
from kdistill.errors import ShapeMismatchError
from kdistill.report import Report
from kdistill.verdict import (
    Verdict,
    classification_verdict,
    mcnemar_exact,
    paired_bootstrap,
    seed_spread,
    verdict_across_seeds,
)


def _exact_two_sided(b: int, c: int) -> float:
    """McNemar's exact p-value transcribed from its definition: twice the smaller binomial tail at 1/2, capped at 1."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def _correctness(both: int, first_only: int, second_only: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    first = [True] * both + [True] * first_only + [False] * second_only + [False] * neither
    second = [True] * both + [False] * first_only + [True] * second_only + [False] * neither
    order = np.random.default_rng(0).permutation(len(first))
    return np.array(first)[order], np.array(second)[order]


@pytest.mark.parametrize(("b", "c"), [(0, 0), (1, 0), (5, 5), (12, 3), (3, 12), (40, 22), (0, 9)])
def test_mcnemar_matches_the_binomial_definition(b, c):
    first, second = _correctness(100, b, c, 7)
    test = mcnemar_exact(first, second)
    assert (test.first_only, test.second_only) == (b, c)
    assert test.p_value == pytest.approx(_exact_two_sided(b, c), rel=1e-9)


def test_mcnemar_known_value():
    # b=10, c=2: 2 * (1 + 12 + 66) / 4096 = 0.03857..., the textbook example value
    first, second = _correctness(50, 10, 2, 3)
    assert mcnemar_exact(first, second).p_value == pytest.approx(158 / 4096)


def test_mcnemar_refuses_unpaired_rows():
    with pytest.raises(ShapeMismatchError, match="pairs rows"):
        mcnemar_exact(np.ones(5, bool), np.ones(6, bool))
    with pytest.raises(ShapeMismatchError, match="True/False"):
        mcnemar_exact(np.array([0.5, 1.0]), np.array([1, 0]))


def test_paired_bootstrap_centre_and_width_follow_the_normal_approximation():
    generator = np.random.default_rng(1)
    first = generator.normal(1.0, 1.0, 4000)
    second = first - 0.1 + generator.normal(0.0, 0.5, 4000)
    interval = paired_bootstrap(first, second, resamples=2000, seed=3)
    differences = first - second
    assert interval.difference == pytest.approx(differences.mean())
    standard_error = differences.std(ddof=1) / math.sqrt(differences.size)
    assert interval.high - interval.low == pytest.approx(2 * 1.959964 * standard_error, rel=0.1)
    assert interval.low < differences.mean() < interval.high
    assert interval.significant  # a 0.1 shift with a standard error of ~0.008


def test_paired_bootstrap_no_shift_is_not_significant_and_a_constant_shift_has_no_width():
    generator = np.random.default_rng(2)
    values = generator.normal(0.0, 1.0, 500)
    assert not paired_bootstrap(values, values[::-1].copy(), seed=0).significant
    shifted = paired_bootstrap(values + 0.25, values)
    assert (shifted.low, shifted.high) == pytest.approx((0.25, 0.25))
    with pytest.raises(ShapeMismatchError, match="same rows"):
        paired_bootstrap(values, values[:10])


def test_seed_spread_matches_statistics():
    values = [0.012, -0.004, 0.02]
    spread = seed_spread(values)
    assert spread["mean"] == pytest.approx(statistics.mean(values))
    assert spread["std"] == pytest.approx(statistics.stdev(values))
    assert (spread["min"], spread["max"], spread["seeds"]) == (-0.004, 0.02, 3)
    assert seed_spread([0.5])["std"] == 0.0


def _logits_from(correct: np.ndarray, target: torch.Tensor) -> torch.Tensor:
    wrong = (target + 1) % 3
    chosen = torch.where(torch.as_tensor(correct), target, wrong)
    return torch.nn.functional.one_hot(chosen, 3).float()


@pytest.mark.parametrize(
    ("b", "c", "outcome"), [(30, 5, "helped"), (5, 30, "hurt"), (8, 6, "no significant difference")]
)
def test_classification_verdict_outcome_and_line(b, c, outcome):
    student_correct, baseline_correct = _correctness(200, b, c, 10)
    target = torch.arange(len(student_correct)) % 3
    verdict = classification_verdict(
        _logits_from(student_correct, target), _logits_from(baseline_correct, target), target
    )
    assert verdict.outcome == outcome
    assert verdict.student == pytest.approx(student_correct.mean())
    assert verdict.difference == pytest.approx((b - c) / len(target))
    assert verdict.p_value == pytest.approx(_exact_two_sided(b, c))
    line = verdict.line()
    assert line.startswith("verdict: ")
    assert f"p = {verdict.p_value:.3g}" in line
    assert f"{b} rows right only for the student, {c} only for the baseline" in line
    assert Verdict.from_dict(verdict.to_dict()).line() == line


def test_verdict_across_seeds_states_the_spread():
    target = torch.arange(300) % 3
    verdicts = []
    for b, c in ((20, 10), (15, 12), (25, 8)):
        first, second = _correctness(250, b, c, 300 - 250 - b - c)
        verdicts.append(classification_verdict(_logits_from(first, target), _logits_from(second, target), target))
    combined = verdict_across_seeds(verdicts)
    differences = [(20 - 10) / 300, (15 - 12) / 300, (25 - 8) / 300]
    assert combined.per_seed == pytest.approx(differences)
    assert combined.seeds is not None
    assert combined.seeds["std"] == pytest.approx(statistics.stdev(differences))
    assert f"across 3 seeds {100 * statistics.mean(differences):+.2f} ± " in combined.line()


@pytest.fixture(scope="module")
def breast_cancer_run():
    x, y = load_breast_cancer(return_X_y=True)
    x = StandardScaler().fit_transform(x).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.4, random_state=0, stratify=y)
    teacher = LogisticRegression(max_iter=2000).fit(x_train, y_train)
    result = distill(teacher, "mlp", (x_train, y_train), test=(x_test, y_test), epochs=5, profile=False, verbose=False)
    return result, x_test, y_test


def test_a_run_reports_the_mcnemar_verdict_of_its_own_models(breast_cancer_run, tmp_path):
    result, x_test, y_test = breast_cancer_run
    report = result.report
    with torch.no_grad():
        student_right = result.student(torch.as_tensor(x_test)).argmax(1).numpy() == y_test
        baseline_right = result.baseline.eval()(torch.as_tensor(x_test)).argmax(1).numpy() == y_test
    b, c = int(np.sum(student_right & ~baseline_right)), int(np.sum(~student_right & baseline_right))
    assert report.verdict is not None
    assert (report.verdict.student_only, report.verdict.baseline_only) == (b, c)
    assert report.verdict.p_value == pytest.approx(_exact_two_sided(b, c))
    assert report.verdict.rows == len(y_test)
    saved = Report.load(report.save(tmp_path / "report.json"))
    assert saved.lines() == report.lines()
    assert saved.to_dict()["lines"][0] == report.verdict.line()
    assert report.table().title.splitlines()[1] == report.verdict.line()  # the console table opens with it


def test_no_baseline_means_no_verdict():
    x, y = load_breast_cancer(return_X_y=True)
    x = StandardScaler().fit_transform(x).astype(np.float32)
    teacher = LogisticRegression(max_iter=2000).fit(x, y)
    result = distill(teacher, "mlp", (x, y), test=(x, y), epochs=1, baseline=False, profile=False, verbose=False)
    assert result.report is not None
    assert result.report.verdict is None
    assert not any(line.startswith("verdict") for line in result.report.lines())


def test_the_report_page_examples_run_and_print_what_they_say():
    import contextlib
    import io
    import re
    from pathlib import Path

    doc = Path(__file__).resolve().parents[1] / "docs" / "report.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.DOTALL)
    assert len(blocks) == 3
    namespace: dict[str, object] = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        for block in blocks:
            exec(compile(block, str(doc), "exec"), namespace)
    lines = printed.getvalue().splitlines()
    assert lines[0].startswith("verdict: ")
    assert any(line.startswith("advice: the teacher outputs probabilities") for line in lines)
    assert any(line.startswith("privacy: membership-inference AUC") for line in lines)
    settings_line = next(line for line in lines if line.startswith("['"))
    assert settings_line.startswith("['temperature=1")
    assert re.fullmatch(r"0\.\d+ \[0\.\d+, 0\.\d+\] significant=True", lines[-2])
    assert re.search(r"; across 3 seeds [+-]\d+\.\d\d ± \d+\.\d\d points", lines[-1])


def test_kdistill_profile_prints_and_saves_the_same_lines_as_the_run_that_made_the_student(tmp_path):
    """As a user runs it: a saved run folder, then `kdistill profile` on it in a subprocess."""
    import json
    import subprocess
    import sys

    from sklearn.ensemble import RandomForestClassifier

    from kdistill.datasets import load_digits

    data = load_digits(0)
    forest = RandomForestClassifier(30, random_state=0).fit(*data.train)
    result = distill(forest, "mlp", data.train, test=data.test, epochs=3, profile=False, verbose=False)
    assert result.report is not None
    result.save(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "kdistill.cli", "profile", str(tmp_path), "--dataset", "digits"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    printed = " ".join(done.stdout.split())  # the console wraps long lines
    for line in result.report.lines():
        assert " ".join(line.split()) in printed
    profiled = json.loads((tmp_path / "profile.json").read_text())
    assert profiled["lines"] == result.report.lines()


def test_kdistill_export_prints_and_saves_the_distillation_verdict(tmp_path, capsys):
    import json

    from kdistill.cli import main

    out = tmp_path / "pipe"
    args = ["export", "--dataset", "digits", "--out", str(out), "--epochs", "3", "--finetune-epochs", "1"]
    assert main([*args, "--no-html", "--quiet", "--quantize", "none"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    report = json.loads((out / "report.json").read_text())
    assert report["verdict"]["test"] == "mcnemar_exact"
    assert report["lines"][0] == report["verdict"]["line"]
    for line in report["lines"]:
        assert " ".join(line.split()) in printed
