"""DistilledClassifier is a real scikit-learn classifier."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.ensemble import RandomForestClassifier
from sklearn.exceptions import NotFittedError
from sklearn.frozen import FrozenEstimator
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, KFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from kdistill import DistilledClassifier
from kdistill.sklearn import SmallDataWarning, _hold_out

FAST = {"max_epochs": 8, "random_state": 0}


def test_fit_predict_with_string_labels(digits) -> None:
    names = np.array(list("abcdefghij"))
    x, y = digits["train"]
    forest = RandomForestClassifier(n_estimators=20, random_state=0)
    model = DistilledClassifier(forest, **FAST).fit(x, names[y])
    assert list(model.classes_) == list("abcdefghij")
    predicted = model.predict(digits["test"][0])
    assert predicted.dtype == names.dtype and set(predicted) <= set(names)
    assert model.score(digits["test"][0], names[digits["test"][1]]) > 0.85
    proba = model.predict_proba(digits["test"][0])
    assert proba.shape == (450, 10) and np.allclose(proba.sum(1), 1.0, atol=1e-5)
    assert np.array_equal(model.classes_[proba.argmax(1)], predicted)
    assert model.report_ is not None and set(model.report_.models) == {"teacher", "student", "baseline"}
    assert model.n_features_in_ == 64


def test_clone_refits_an_unfitted_copy_but_keeps_a_frozen_teacher(digits) -> None:
    x, y = digits["train"]
    prefit = RandomForestClassifier(n_estimators=10, random_state=0).fit(x[:100], y[:100])
    cloned = clone(DistilledClassifier(prefit, **FAST))
    assert not hasattr(cloned.teacher, "estimators_")  # scikit-learn clones the teacher unfitted
    cloned.fit(x, y)
    assert len(cloned.teacher_.estimators_[0].tree_.value) > 0 and cloned.teacher_ is not prefit
    assert cloned.teacher_.n_features_in_ == 64

    frozen = clone(DistilledClassifier(FrozenEstimator(prefit), **FAST)).fit(x, y)
    assert frozen.teacher_.estimator is prefit  # kept, not refitted
    direct = DistilledClassifier(prefit, **FAST).fit(x, y)
    assert direct.teacher_ is prefit


def test_pipeline_cross_val_score_and_grid_search(digits) -> None:
    x, y = digits["train"]
    pipe = make_pipeline(
        StandardScaler(), DistilledClassifier(RandomForestClassifier(n_estimators=10), report=False, **FAST)
    )
    scores = cross_val_score(pipe, x, y, cv=KFold(2, shuffle=True, random_state=0))
    assert scores.shape == (2,) and scores.min() > 0.8
    grid = GridSearchCV(
        DistilledClassifier(RandomForestClassifier(n_estimators=10), report=False, **FAST),
        {"temperature": [1.0, 4.0]},
        cv=2,
    ).fit(x, y)
    assert grid.best_params_["temperature"] in (1.0, 4.0)
    assert grid.best_estimator_.score(*digits["test"]) > 0.8


def test_get_set_params_round_trip() -> None:
    model = DistilledClassifier(RandomForestClassifier(), temperature=2.0)
    assert model.get_params()["temperature"] == 2.0
    model.set_params(temperature=6.0, teacher__n_estimators=7)
    assert model.temperature == 6.0 and model.teacher.n_estimators == 7


def test_predict_with_wrong_feature_count_is_refused(digits) -> None:
    from kdistill.errors import DataError

    model = DistilledClassifier(RandomForestClassifier(n_estimators=5), report=False, **FAST).fit(*digits["train"])
    with pytest.raises(DataError, match="fitted with 64"):
        model.predict(digits["test"][0][:, :10])


# -- the rules that make DistilledClassifier pass scikit-learn's checks (tests/test_sklearn_checks.py) -------------

TINY = {"hidden": (8,), "max_epochs": 6, "patience": 1, "random_state": 0}


def _rows(per_class: list[int], features: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs, one per class, with ``per_class[c]`` rows of class ``c``, shuffled."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(len(per_class)), per_class)
    x = rng.normal(size=(len(y), features)) + 3.0 * y[:, None]
    order = rng.permutation(len(y))
    return x[order], y[order]


def _weights(model: DistilledClassifier) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.student_.state_dict().items()}


def _same_weights(a: DistilledClassifier, b: DistilledClassifier) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_too_few_rows_for_a_hold_out_train_on_every_row_for_every_epoch() -> None:
    """15 rows of 3 classes, validation_fraction=0.1: ceil(1.5) = 2 held-out rows < 3 classes, so nothing is held
    out. The student is then exactly the one trained with validation_fraction=0: all rows, all epochs (patience=1
    would have stopped a run with a validation split early), and there is no report."""
    x, y = _rows([5, 5, 5])
    with pytest.warns(SmallDataWarning, match=r"15 rows of 3 classes.*without early stopping, and report_ is None"):
        fallback = DistilledClassifier(LogisticRegression(), **TINY).fit(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SmallDataWarning)
        everything = DistilledClassifier(LogisticRegression(), validation_fraction=0.0, **TINY).fit(x, y)
    assert fallback.report_ is None and everything.report_ is None
    assert len(fallback.history_) == TINY["max_epochs"]
    assert _same_weights(fallback, everything)


def test_the_hold_out_is_stratified_from_one_row_per_class_on_each_side() -> None:
    """The boundary of rule 1: 20 rows of 3 classes hold out ceil(2.0) = 2 rows (too few); 21 rows hold out 3."""
    x, y = _rows([7, 7, 6])
    with pytest.warns(SmallDataWarning, match="20 rows of 3 classes"):
        DistilledClassifier(LogisticRegression(), **TINY).fit(x[:20], y[:20])
    x, y = _rows([7, 7, 7])
    with warnings.catch_warnings():
        warnings.simplefilter("error", SmallDataWarning)
        model = DistilledClassifier(LogisticRegression(), **TINY).fit(x, y)
    assert model.report_ is not None and model.report_.rows == 3
    train, val = _hold_out(x, y, 0.1, seed=0, max_epochs=1)
    assert val is not None and sorted(val[1].tolist()) == [0, 1, 2]  # one row of each class: stratified
    assert len(train[1]) == 18


def test_a_class_with_one_row_holds_out_at_random() -> None:
    """Rule 2: a single-row class rules stratification out, but 6 held-out rows >= 3 classes: a random split."""
    x, y = _rows([30, 29, 1])
    with pytest.warns(SmallDataWarning, match="a class has 1 row.*holding out 6 of 60 rows at random"):
        model = DistilledClassifier(LogisticRegression(), **TINY).fit(x, y)
    assert model.report_ is not None and model.report_.rows == 6
    assert list(model.classes_) == [0, 1, 2]


def test_sparse_input_is_densified_and_gives_the_dense_run(digits) -> None:
    from scipy import sparse

    x, y = digits["train"][0][:300], digits["train"][1][:300]
    assert (x == 0).mean() > 0.4  # digits are half zeros: a natural sparse matrix
    dense = DistilledClassifier(LogisticRegression(max_iter=500), **TINY).fit(x, y)
    for kind in (sparse.csr_matrix, sparse.csc_array):
        model = DistilledClassifier(LogisticRegression(max_iter=500), **TINY).fit(kind(x), y)
        assert _same_weights(model, dense)
        assert np.array_equal(model.predict(kind(digits["test"][0])), dense.predict(digits["test"][0]))


def test_sparse_input_above_the_limit_is_refused_with_scikit_learns_wording(monkeypatch: pytest.MonkeyPatch) -> None:
    from scipy import sparse

    from kdistill import sklearn as kd_sklearn
    from kdistill.errors import DataError

    huge = sparse.csr_matrix(([1.0], ([0], [0])), shape=(40_000, 10_000))  # 3.2 GB dense, one stored value
    with pytest.raises(DataError, match=r"Sparse data was passed for X, but dense data is required.*3,200,000,000"):
        DistilledClassifier(LogisticRegression(), **TINY).fit(huge, np.zeros(40_000))
    x, y = _rows([10, 10, 10])
    exact = x.size * x.dtype.itemsize
    monkeypatch.setattr(kd_sklearn, "SPARSE_DENSE_LIMIT_BYTES", exact)
    DistilledClassifier(LogisticRegression(), **TINY).fit(sparse.csr_matrix(x), y)  # exactly at the limit: densified
    monkeypatch.setattr(kd_sklearn, "SPARSE_DENSE_LIMIT_BYTES", exact - 1)
    with pytest.raises(DataError, match="toarray"):
        DistilledClassifier(LogisticRegression(), **TINY).fit(sparse.csr_matrix(x), y)


def test_predict_before_fit_raises_not_fitted_error() -> None:
    model = DistilledClassifier(LogisticRegression())
    x = np.zeros((3, 4))
    for method in (model.predict, model.predict_proba):
        with pytest.raises(NotFittedError, match="not fitted yet"):
            method(x)
    with pytest.raises(NotFittedError):
        model.score(x, [0, 1, 0])


def test_object_arrays_of_numbers_are_read_as_numbers() -> None:
    x, y = _rows([10, 10, 10])
    numbers = DistilledClassifier(LogisticRegression(), **TINY).fit(x, y)
    objects = DistilledClassifier(LogisticRegression(), **TINY).fit(x.astype(object), y)
    assert _same_weights(objects, numbers)
    assert np.array_equal(objects.predict(x.astype(object)), numbers.predict(x))
    bad = x.astype(object)
    bad[0, 0] = {"not": "a number"}
    with pytest.raises(TypeError, match="must be a string or a real number"):
        DistilledClassifier(LogisticRegression(), **TINY).fit(bad, y)
    bad[0, 0] = "abc"
    with pytest.raises(ValueError, match="could not convert string to float: 'abc'"):
        DistilledClassifier(LogisticRegression(), **TINY).fit(bad, y)


def test_one_dimensional_x_is_refused_with_the_reshape_advice() -> None:
    from kdistill.errors import DataError

    x, y = _rows([10, 10, 10], features=1)
    with pytest.raises(DataError, match=r"(?s)X is 1-D \(shape \(30,\)\).*Reshape your data"):
        DistilledClassifier(LogisticRegression(), **TINY).fit(x[:, 0], y)
    model = DistilledClassifier(LogisticRegression(), validation_fraction=0.0, **TINY).fit(x, y)
    with pytest.raises(DataError, match="Reshape your data"):
        model.predict(x[:3, 0])


def test_dataframe_column_names_are_checked_as_in_scikit_learn() -> None:
    import pandas as pd

    x, y = _rows([10, 10, 10])
    frame = pd.DataFrame(x, columns=["a", "b", "c", "d"])
    model = DistilledClassifier(LogisticRegression(), validation_fraction=0.0, **TINY).fit(frame, y)
    assert list(model.feature_names_in_) == ["a", "b", "c", "d"]
    with pytest.warns(UserWarning, match="X does not have valid feature names"):
        assert np.array_equal(model.predict(frame), model.predict(x))
    with pytest.raises(ValueError, match="The feature names should match those that were passed during fit"):
        model.predict(frame.rename(columns={"a": "z"}))


# -- gradient-boosted teachers through their scikit-learn APIs (optional: skipped when the library is absent) ------


def _boosted(library: str) -> Any:
    module = pytest.importorskip(library)
    if library == "xgboost":
        return module.XGBClassifier(n_estimators=30, max_depth=3, n_jobs=1, random_state=0)
    return module.LGBMClassifier(n_estimators=30, n_jobs=1, random_state=0, verbose=-1)


@pytest.mark.parametrize("library", ["xgboost", "lightgbm"])
def test_gradient_boosted_teacher(library: str, digits) -> None:
    from kdistill import as_teacher

    teacher = _boosted(library)
    x_test, y_test = digits["test"]
    prefit = clone(teacher).fit(*digits["train"])
    logits = as_teacher(prefit)(torch.as_tensor(x_test, dtype=torch.float32)).logits
    assert np.allclose(torch.softmax(logits, dim=1).numpy(), prefit.predict_proba(x_test), atol=1e-6)

    model = DistilledClassifier(teacher, **FAST).fit(*digits["train"])
    assert model.teacher_ is not teacher and model.teacher_.n_features_in_ == 64  # a clone, fitted by fit()
    assert list(model.classes_) == list(range(10))
    assert model.score(x_test, y_test) > 0.85
    assert (model.predict(x_test) == model.teacher_.predict(x_test)).mean() > 0.85
    assert model.report_ is not None and model.report_.models["student"]["agreement"] > 0.85

    frozen = DistilledClassifier(FrozenEstimator(prefit), report=False, **FAST).fit(*digits["train"])
    assert frozen.teacher_.estimator is prefit


def test_random_state_seeds_an_unseeded_teacher_and_keeps_a_set_one(digits) -> None:
    """scikit-learn's checks fix only DistilledClassifier's random_state: it must make the teacher reproducible too."""
    x, y = digits["train"][0][:300], digits["train"][1][:300]
    settings = {"hidden": (8,), "max_epochs": 3, "report": False}
    first, again = (
        DistilledClassifier(RandomForestClassifier(n_estimators=5), random_state=4, **settings).fit(x, y)
        for _ in range(2)
    )
    assert first.teacher.random_state is None  # the parameter itself is left alone (check_dont_overwrite_parameters)
    assert isinstance(first.teacher_.random_state, int) and first.teacher_.random_state == again.teacher_.random_state
    assert np.array_equal(first.teacher_.predict_proba(x), again.teacher_.predict_proba(x))
    assert _same_weights(first, again)
    kept = DistilledClassifier(RandomForestClassifier(n_estimators=5, random_state=7), random_state=4, **settings)
    assert kept.fit(x, y).teacher_.random_state == 7
    unseeded = DistilledClassifier(RandomForestClassifier(n_estimators=5), **settings).fit(x, y)
    assert unseeded.teacher_.random_state is None  # no random_state: nothing is fixed


def test_a_training_part_smaller_than_the_classes_holds_out_at_random() -> None:
    """Rule 2 from the other side: 2 rows per class, validation_fraction=0.6 holds out 4 of 6, leaving 2 < 3."""
    x, y = _rows([2, 2, 2])
    with pytest.warns(SmallDataWarning, match="2 training rows are fewer than the 3 classes.*holding out 4 of 6"):
        model = DistilledClassifier(LogisticRegression(), validation_fraction=0.6, **TINY).fit(x, y)
    assert model.report_ is not None and model.report_.rows == 4
