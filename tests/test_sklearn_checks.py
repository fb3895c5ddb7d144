"""DistilledClassifier passes scikit-learn's own estimator checks (``sklearn.utils.estimator_checks``, all of them,
legacy ones included), through ``parametrize_with_checks``, for two instances: a deterministic teacher, and a random
forest with no ``random_state`` of its own and the report (and its baseline student) on.

What makes the set fast (55 checks per instance; about 30 s of CPU for both, 80 s of wall time measured under load
on the shared 2 cores): teachers that fit in milliseconds (``LogisticRegression``, a 5-tree forest), a
one-hidden-layer student of 8 units (``hidden=(8,)``), ``max_epochs=10`` (5 is too few for
``check_classifiers_train``'s 0.83 accuracy on its blobs at every seed), and ``report=False`` on the first instance
(no baseline student, which doubles a fit). The checks' data sets have 10-300 rows, so most fits go through the
small-data rule (no hold-out, every epoch runs; see tests/test_sklearn.py).

No check is listed as expected to fail, and none is skipped by this file: the estimator's tags
(``DistilledClassifier.__sklearn_tags__``) say what it accepts (sparse input: yes, densified) and the checks adapt.
scikit-learn itself skips ``check_array_api_input`` unless ``SCIPY_ARRAY_API=1`` was set before scipy was imported,
which pytest's process cannot do any more; that check runs in a fresh process below.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.utils.estimator_checks import parametrize_with_checks

from kdistill import DistilledClassifier
from kdistill.sklearn import SmallDataWarning

ROOT = Path(__file__).resolve().parents[1]

CHECKED = DistilledClassifier(LogisticRegression(), hidden=(8,), max_epochs=10, report=False)
"""The instance the checks clone; the module docstring says why these settings."""

CHECKED_RANDOM_TEACHER = DistilledClassifier(RandomForestClassifier(n_estimators=5), hidden=(8,), max_epochs=10)
"""A teacher with randomness of its own and no random_state (the checks fix only the outer one), with the report
(and so the baseline) on: the reproducibility checks hold because ``random_state`` seeds the teacher too."""

EXPECTED_FAILURES: dict[str, str] = {}
"""Check name -> reason, for checks that cannot apply. Empty: every check applies and passes."""


def _expected_failures(estimator: Any) -> dict[str, str]:
    return EXPECTED_FAILURES


def _check_name(check: Any) -> str:
    return getattr(check, "func", check).__name__


@parametrize_with_checks([CHECKED, CHECKED_RANDOM_TEACHER], expected_failed_checks=_expected_failures)
def test_scikit_learn_estimator_check(estimator: DistilledClassifier, check: Any) -> None:
    if _check_name(check) == "check_array_api_input" and not os.environ.get("SCIPY_ARRAY_API"):
        pytest.skip("needs SCIPY_ARRAY_API=1 before scipy is imported: run by test_array_api_check_in_a_fresh_process")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallDataWarning)  # the checks' tiny data sets; the rule is tested elsewhere
        check(estimator)


def test_array_api_check_in_a_fresh_process() -> None:
    """``check_array_api_input`` (array API dispatch on, numpy inputs: same results) with ``SCIPY_ARRAY_API=1``."""
    script = textwrap.dedent(
        """
        import warnings
        from sklearn.linear_model import LogisticRegression
        from sklearn.utils.estimator_checks import check_array_api_input
        from kdistill import DistilledClassifier

        warnings.simplefilter("ignore")
        estimator = DistilledClassifier(LogisticRegression(), hidden=(8,), max_epochs=10, report=False)
        # the arguments scikit-learn's check list uses for an estimator without array API support of its own
        check_array_api_input(
            "DistilledClassifier", estimator, array_namespace="numpy", expect_only_array_outputs=False
        )
        print("passed")
        """
    )
    env = os.environ | {"SCIPY_ARRAY_API": "1", "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "passed", done.stdout + done.stderr[-2000:]


def test_tags_say_sparse_is_accepted_and_nothing_else_changes() -> None:
    from sklearn.base import ClassifierMixin
    from sklearn.utils import get_tags

    tags = get_tags(CHECKED)
    assert tags.input_tags.sparse is True
    assert tags.estimator_type == "classifier" and isinstance(CHECKED, ClassifierMixin)
    assert tags.input_tags.allow_nan is False and tags.non_deterministic is False and tags.requires_fit is True
    assert tags.classifier_tags is not None and tags.classifier_tags.poor_score is False  # held to 0.83 accuracy


def _doc_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "sklearn.md").read_text(), flags=re.DOTALL)


@pytest.mark.parametrize("index", range(len(_doc_blocks())))
def test_docs_sklearn_example_runs(index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/sklearn.md's examples run as written (the XGBoost/LightGBM one skips without them)."""
    code = _doc_blocks()[index]
    if "check_estimator(" in code and not os.environ.get("KDISTILL_SLOW"):
        pytest.skip("the same checks as test_scikit_learn_estimator_check, run again (~10 s): KDISTILL_SLOW=1")
    for library in ("xgboost", "lightgbm"):
        if f"from {library} import" in code:
            pytest.importorskip(library)
    monkeypatch.chdir(tmp_path)
    with torch.random.fork_rng(devices=[]):
        exec(compile(code, f"docs/sklearn.md python block {index}", "exec"), {"__name__": "__doc_example__"})
