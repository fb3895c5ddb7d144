"""DistilledRegressor: scikit-learn's own estimator checks (``parametrize_with_checks``), and the behaviour a user
of the estimator relies on (units, multi-output, unlabeled rows, small data, cloning).

The instances the checks clone fit in milliseconds: a ``Ridge`` teacher (deterministic, multi-output) and a 5-tree
forest without a ``random_state`` of its own (the outer ``random_state`` seeds it), a one-hidden-layer student of 16
units, 20 epochs. No check is listed as expected to fail and none is skipped here: the tags say what the estimator
accepts (sparse input densified, several outputs). ``check_array_api_input`` needs ``SCIPY_ARRAY_API=1`` before scipy
is imported (as for DistilledClassifier, tests/test_sklearn_checks.py), so it runs in a fresh process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.ensemble import RandomForestRegressor
from sklearn.linear_model import LinearRegression, Ridge
from sklearn.utils.estimator_checks import parametrize_with_checks

from kdistill import DistilledRegressor
from kdistill.sklearn import SmallDataWarning

ROOT = Path(__file__).resolve().parents[1]

CHECKED = DistilledRegressor(Ridge(alpha=1e-3), hidden=(16,), max_epochs=20, report=False)
CHECKED_RANDOM_TEACHER = DistilledRegressor(RandomForestRegressor(n_estimators=5), hidden=(16,), max_epochs=20)

EXPECTED_FAILURES: dict[str, str] = {}
"""Check name -> reason, for checks that cannot apply. Empty: every check applies and passes."""


def _expected_failures(estimator: Any) -> dict[str, str]:
    return EXPECTED_FAILURES


def _check_name(check: Any) -> str:
    return getattr(check, "func", check).__name__


@parametrize_with_checks([CHECKED, CHECKED_RANDOM_TEACHER], expected_failed_checks=_expected_failures)
def test_scikit_learn_estimator_check(estimator: DistilledRegressor, check: Any) -> None:
    if _check_name(check) == "check_array_api_input" and not os.environ.get("SCIPY_ARRAY_API"):
        pytest.skip("needs SCIPY_ARRAY_API=1 before scipy is imported: run by test_array_api_check_in_a_fresh_process")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallDataWarning)
        check(estimator)


def test_array_api_check_in_a_fresh_process() -> None:
    """``check_array_api_input`` with ``SCIPY_ARRAY_API=1`` set before scipy is imported."""
    script = textwrap.dedent(
        """
        import warnings
        from sklearn.linear_model import Ridge
        from sklearn.utils.estimator_checks import check_array_api_input
        from kdistill import DistilledRegressor

        warnings.simplefilter("ignore")
        estimator = DistilledRegressor(Ridge(alpha=1e-3), hidden=(16,), max_epochs=20, report=False)
        check_array_api_input(
            "DistilledRegressor", estimator, array_namespace="numpy", expect_only_array_outputs=False
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


def test_tags_say_sparse_and_multi_output() -> None:
    from sklearn.base import RegressorMixin
    from sklearn.utils import get_tags

    tags = get_tags(CHECKED)
    assert tags.estimator_type == "regressor" and isinstance(CHECKED, RegressorMixin)
    assert tags.input_tags.sparse is True and tags.target_tags.multi_output is True
    assert tags.regressor_tags is not None and tags.regressor_tags.poor_score is False  # held to R² > 0.5
    assert tags.input_tags.allow_nan is False and tags.non_deterministic is False


def _friedman(rows: int, seed: int = 0, outputs: int = 1) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import make_friedman1

    x, y = make_friedman1(n_samples=rows, noise=0.5, random_state=seed)
    if outputs == 2:
        y = np.stack([y * 1000.0 + 5000.0, -0.01 * y], axis=1)  # two outputs on very different scales
    return x, y


def test_predictions_are_in_the_targets_units_and_shape() -> None:
    """A target around 20000 (std ~5000) and one around -0.15 are learnt together: R² on held-out rows is good for
    both, and predict gives their units (standardisation is internal)."""
    from sklearn.metrics import r2_score

    x, y = _friedman(1500, outputs=2)
    model = DistilledRegressor(Ridge(), hidden=(32,), max_epochs=40, random_state=0, report=False).fit(
        x[:1200], y[:1200]
    )
    predicted = model.predict(x[1200:])
    assert predicted.shape == (300, 2) and predicted.dtype == np.float64 and model.n_outputs_ == 2
    assert abs(predicted[:, 0].mean() - y[1200:, 0].mean()) < 0.1 * y[:, 0].std()
    assert abs(predicted[:, 1].mean() - y[1200:, 1].mean()) < 0.1 * y[:, 1].std()
    teacher = Ridge().fit(x[:1200], y[:1200]).predict(x[1200:])
    for column in range(2):  # at least the linear teacher's R² (0.73 here) minus a little
        assert r2_score(y[1200:, column], predicted[:, column]) > r2_score(y[1200:, column], teacher[:, column]) - 0.05
    one = DistilledRegressor(Ridge(), hidden=(8,), max_epochs=5, random_state=0, report=False).fit(x[:200], y[:200, 0])
    assert one.predict(x[:7]).shape == (7,)


def test_rows_without_targets_learn_from_a_prefit_teacher() -> None:
    """NaN targets mark rows without labels: the teacher (fitted on the labelled rows only) labels them, and with 30
    labels and 970 teacher-labelled rows the student beats the same student trained on the 30 labels alone."""
    from sklearn.ensemble import HistGradientBoostingRegressor
    from sklearn.metrics import r2_score

    x, y = _friedman(3000, seed=1)
    teacher = HistGradientBoostingRegressor(max_iter=200, random_state=0).fit(x[:2000], y[:2000])
    scarce = y[2000:2600].copy()
    scarce[30:] = np.nan
    settings: dict[str, Any] = {"hidden": (64,), "max_epochs": 60, "random_state": 0, "validation_fraction": 0}
    distilled = DistilledRegressor(teacher, **settings).fit(x[2000:2600], scarce)
    alone = DistilledRegressor(teacher, soft_weight=0.0, **settings).fit(x[2030:2060], y[2030:2060])
    test_x, test_y = x[2600:], y[2600:]
    assert r2_score(test_y, distilled.predict(test_x)) > r2_score(test_y, alone.predict(test_x)) + 0.1


def test_an_unfitted_teacher_is_fitted_on_the_labelled_rows_only() -> None:
    x, y = _friedman(200)
    y = y.copy()
    y[::2] = np.nan
    model = DistilledRegressor(LinearRegression(), hidden=(8,), max_epochs=3, random_state=0, report=False).fit(x, y)
    expected = LinearRegression().fit(x[1::2], y[1::2])
    np.testing.assert_allclose(model.teacher_.coef_, expected.coef_)
    with pytest.raises(ValueError, match="no labelled row"):
        DistilledRegressor(LinearRegression(), max_epochs=1).fit(x, np.full(200, np.nan))


def test_small_data_trains_on_every_row_with_a_warning() -> None:
    x, y = _friedman(12)
    with pytest.warns(SmallDataWarning, match="too few for validation_fraction=0.1"):
        model = DistilledRegressor(LinearRegression(), hidden=(4,), max_epochs=3, validation_fraction=0.1).fit(
            x[:3], y[:3]
        )
    assert model.report_ is None and len(model.history_) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error", SmallDataWarning)  # enough rows: a hold-out, no warning
        held = DistilledRegressor(LinearRegression(), hidden=(4,), max_epochs=3, validation_fraction=0.25).fit(x, y)
    assert held.report_ is not None and held.report_.rows == 3
    assert {"r2", "rmse", "mae", "retention", "rmse_retention", "agreement"} <= set(held.report_.models["student"])


def test_clone_keeps_the_huber_option_and_cross_validation_runs() -> None:
    from sklearn.model_selection import cross_val_score

    model = DistilledRegressor(Ridge(), teacher_loss="huber", huber_delta=0.5, hidden=(8,), max_epochs=5)
    copied = clone(model)
    assert copied.get_params()["teacher_loss"] == "huber" and copied.get_params()["huber_delta"] == 0.5
    x, y = _friedman(300)
    scores = cross_val_score(copied, x, y, cv=3)
    assert scores.shape == (3,) and np.all(np.isfinite(scores))
    with pytest.raises(ValueError, match="teacher_loss must be one of"):
        DistilledRegressor(Ridge(), teacher_loss="l1", max_epochs=1).fit(x, y)
