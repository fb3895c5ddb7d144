"""A fitted scikit-learn classifier or regressor as a teacher."""

from __future__ import annotations

import hashlib
import logging
import pickle
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from sklearn.base import is_regressor as _sklearn_is_regressor
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import check_is_fitted

from kdistill.errors import TeacherError
from kdistill.teachers.base import Outputs, TeacherBase, probs_to_logits
from kdistill.teachers.registry import register_adapter

__all__ = ["SklearnTeacher", "is_regressor"]

_log = logging.getLogger(__name__)


def _is_estimator(obj: Any) -> bool:
    """A scikit-learn-style model: ``fit`` and a way to score (a predict-only model gets the adapter's own error)."""
    return hasattr(obj, "fit") and any(hasattr(obj, name) for name in ("predict_proba", "decision_function", "predict"))


def is_regressor(obj: Any) -> bool:
    """scikit-learn's ``is_regressor`` (its tags), or ``_estimator_type == "regressor"`` for models that have no
    tags (scikit-learn 1.9 raises for an object outside its class hierarchy)."""
    try:
        return bool(_sklearn_is_regressor(obj))
    except (AttributeError, TypeError):
        return getattr(obj, "_estimator_type", None) == "regressor"


@register_adapter(
    "sklearn",
    "a fitted scikit-learn classifier (predict_proba, else decision_function; columns follow classes_) or regressor "
    "(predict: (rows, outputs))",
    accepts=_is_estimator,
    order=30,
)
class SklearnTeacher(TeacherBase):
    """Wraps a fitted classifier or regressor.

    A classifier: ``predict_proba`` when it has one, else ``decision_function``. Probabilities become
    log-probabilities (:func:`probs_to_logits`); decision scores are used as logits (a binary score ``d`` becomes
    ``[0, d]``, whose softmax is the logistic ``sigmoid(d)``). Columns follow ``classes_``.

    A regressor (scikit-learn's ``is_regressor``: XGBoost's and LightGBM's ``XGBRegressor``/``LGBMRegressor`` too; or
    any model with ``output="predict"``): ``predict`` gives (rows,) or (rows, outputs) values, returned as (rows,
    outputs) float32 "logits" for task ``regression``; ``classes`` is None.
    """

    def __init__(self, estimator: Any, *, output: str = "auto") -> None:
        has_proba = hasattr(estimator, "predict_proba")
        has_decision = hasattr(estimator, "decision_function")
        regressor = hasattr(estimator, "predict") and (is_regressor(estimator) or output == "predict")
        if not (has_proba or has_decision or regressor):
            raise TeacherError(
                f"{type(estimator).__name__} has neither predict_proba nor decision_function, and is not a regressor",
                hint="use a classifier (for SVC pass probability=True, or rely on its decision_function), or a "
                "regressor (task 'regression'; a model that only predicts numbers: SklearnTeacher(model, "
                "output='predict')), or wrap a model that returns scores with kdistill.as_teacher(torch_module).",
            )
        try:
            check_is_fitted(estimator)
        except NotFittedError as exc:
            raise TeacherError(
                f"the teacher {type(estimator).__name__} is not fitted",
                hint="fit it first, or use DistilledClassifier, which fits an unfitted teacher on the rows of fit().",
            ) from exc
        if output == "auto":
            output = "predict" if regressor else "probs" if has_proba else "decision"
        if output not in ("probs", "decision", "predict"):
            raise TeacherError(
                f"unknown output {output!r} for a scikit-learn teacher", hint="use 'probs', 'decision' or 'predict'."
            )
        self.estimator = estimator
        self.output = output
        known = hasattr(estimator, "classes_") and output != "predict"
        self.classes: np.ndarray | None = np.asarray(estimator.classes_) if known else None
        self._feature_names = getattr(estimator, "feature_names_in_", None)
        _log.info("scikit-learn teacher %s: using %s", type(estimator).__name__, output)

    @property
    def num_classes(self) -> int | None:
        return None if self.classes is None else len(self.classes)

    def size_bytes(self) -> int | None:
        """Bytes of the estimator's pickle (what ``joblib.dump`` writes, uncompressed)."""
        from kdistill.profile import model_size_bytes

        return model_size_bytes(self.estimator)

    def parameter_count(self) -> int | None:
        """Numbers in the fitted estimator's arrays (:func:`kdistill.profile.count_parameters`)."""
        from kdistill.profile import count_parameters

        return count_parameters(self.estimator)

    def fingerprint(self) -> str:
        return hashlib.blake2b(pickle.dumps(self.estimator), digest_size=16).hexdigest()

    def _frame(self, x: torch.Tensor) -> Any:
        array = x.detach().cpu().numpy().reshape(len(x), -1)
        if self._feature_names is None:
            return array
        import pandas as pd  # only for teachers fitted on DataFrames, where sklearn checks column names

        return pd.DataFrame(array, columns=self._feature_names)

    def __call__(self, x: torch.Tensor, *, features: Sequence[str] = ()) -> Outputs:
        if features:
            raise TeacherError(
                "a scikit-learn teacher has no intermediate features",
                hint="use a logit-based method (kd, dkd, dist) with this teacher.",
            )
        frame = self._frame(x)
        if self.output == "predict":
            values = torch.as_tensor(np.asarray(self.estimator.predict(frame), dtype=np.float32))
            return Outputs(logits=values.reshape(len(x), -1))
        if self.output == "probs":
            probs = torch.as_tensor(np.asarray(self.estimator.predict_proba(frame)), dtype=torch.float32)
            return Outputs(logits=probs_to_logits(probs))
        scores = torch.as_tensor(np.asarray(self.estimator.decision_function(frame)), dtype=torch.float32)
        if scores.ndim == 1:
            scores = torch.stack([torch.zeros_like(scores), scores], dim=1)
        return Outputs(logits=scores)
