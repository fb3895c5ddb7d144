"""``DistilledClassifier``: distillation as a scikit-learn classifier (Pipeline, cross_val_score, GridSearchCV)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import train_test_split
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted
from torch import nn

from kdistill import defaults
from kdistill.api import distill
from kdistill.data import as_split
from kdistill.engine import predict_logits
from kdistill.errors import DataError

__all__ = ["DistilledClassifier"]


def _is_fitted(estimator: Any) -> bool:
    if isinstance(estimator, nn.Module):
        return True
    try:
        check_is_fitted(estimator)
    except NotFittedError:
        return False
    return True


class DistilledClassifier(ClassifierMixin, BaseEstimator):
    """A small PyTorch student distilled from ``teacher``, behaving as a scikit-learn classifier.

    ``fit(X, y)`` holds out ``validation_fraction`` of the rows (stratified) for early stopping and the report, and
    distils the teacher into the student on the rest. Teacher handling follows scikit-learn's cloning rules: a cloned
    DistilledClassifier holds an *unfitted* copy of its teacher, and an unfitted teacher is fitted on the rows given
    to ``fit`` (so cross-validation never lets the teacher see the test fold). To keep a prefit teacher across clones,
    wrap it: ``DistilledClassifier(FrozenEstimator(forest))`` (``sklearn.frozen``). A fitted teacher passed directly
    is used as is. The training parameters are :func:`kdistill.distill`'s, with the same defaults
    (:mod:`kdistill.defaults`).

    Attributes after fit: ``classes_`` (the teacher's order; any labels sklearn accepts), ``teacher_``, ``student_``
    (the trained ``nn.Module``), ``history_``, ``report_`` (teacher, student and the no-teacher baseline on the
    held-out rows; None with ``report=False``), ``n_features_in_``.
    """

    def __init__(
        self,
        teacher: Any,
        student: str | nn.Module = "mlp",
        *,
        hidden: Sequence[int] | None = None,
        method: str = "kd",
        temperature: float = 4.0,
        soft_weight: float = 0.5,
        soft_targets: str = "predict",
        max_epochs: int = defaults.EPOCHS,
        batch_size: int = defaults.BATCH_SIZE,
        lr: float = defaults.LR,
        weight_decay: float = defaults.WEIGHT_DECAY,
        validation_fraction: float = 0.1,
        patience: int | None = defaults.PATIENCE,
        report: bool = True,
        num_threads: int | str = "auto",
        random_state: int | None = None,
        verbose: bool = False,
    ) -> None:
        self.teacher = teacher
        self.student = student
        self.hidden = hidden
        self.method = method
        self.temperature = temperature
        self.soft_weight = soft_weight
        self.soft_targets = soft_targets
        self.max_epochs = max_epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.validation_fraction = validation_fraction
        self.patience = patience
        self.report = report
        self.num_threads = num_threads
        self.random_state = random_state
        self.verbose = verbose

    def fit(self, X: Any, y: Any) -> DistilledClassifier:
        """Fit the teacher if it is unfitted, then distil it into the student on ``X``, ``y``."""
        seed = int(check_random_state(self.random_state).randint(0, 2**31 - 1))
        teacher = self.teacher if _is_fitted(self.teacher) else clone(self.teacher).fit(X, y)
        x_all = as_split(X, name="X", labeled=False)
        y_array = np.asarray(y.to_numpy() if hasattr(y, "to_numpy") else y)
        if len(y_array) != len(x_all):
            raise DataError(f"X has {len(x_all)} rows but y has {len(y_array)}", hint="pass X and y of the same rows.")
        val = None
        train: tuple[Any, Any] = (X, y_array)
        if self.validation_fraction and self.validation_fraction > 0:
            _, counts = np.unique(y_array, return_counts=True)
            stratify = y_array if counts.min() >= 2 else None
            x_train, x_val, y_train, y_val = train_test_split(
                X, y_array, test_size=self.validation_fraction, random_state=seed, stratify=stratify
            )
            train, val = (x_train, y_train), (x_val, y_val)
        student = copy.deepcopy(self.student) if isinstance(self.student, nn.Module) else self.student
        result = distill(
            teacher,
            student,
            train,
            val=val,
            method=self.method,
            temperature=self.temperature,
            soft_weight=self.soft_weight,
            soft_targets=self.soft_targets,
            epochs=self.max_epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            weight_decay=self.weight_decay,
            patience=self.patience,
            seed=seed,
            hidden=self.hidden,
            baseline=self.report,
            report=self.report,
            profile=False,
            num_threads=self.num_threads,
            verbose=self.verbose,
        )
        self.teacher_ = teacher
        self.student_ = result.student
        self.history_ = result.history
        self.report_ = result.report
        self.n_features_in_ = int(np.prod(x_all.x.shape[1:]))
        classes = getattr(teacher, "classes_", None)
        self.classes_ = np.asarray(classes) if classes is not None else np.arange(result.student(x_all.x[:1]).shape[1])
        return self

    def _logits(self, X: Any) -> torch.Tensor:
        check_is_fitted(self, "student_")
        x = as_split(X, name="X", labeled=False).x
        features = int(np.prod(x.shape[1:]))
        if features != self.n_features_in_:
            raise DataError(
                f"X has {features} features, but this DistilledClassifier was fitted with {self.n_features_in_}",
                hint="pass rows with the same columns as in fit.",
            )
        return predict_logits(self.student_, x)

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities, (rows, classes) in ``classes_`` order."""
        return torch.softmax(self._logits(X), dim=1).numpy()

    def predict(self, X: Any) -> np.ndarray:
        """Predicted labels, drawn from ``classes_``."""
        return self.classes_[self._logits(X).argmax(dim=1).numpy()]
