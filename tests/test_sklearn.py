"""DistilledClassifier is a real scikit-learn classifier."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.ensemble import RandomForestClassifier
from sklearn.frozen import FrozenEstimator
from sklearn.model_selection import GridSearchCV, KFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from kdistill import DistilledClassifier

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
