"""``DistilledClassifier`` and ``DistilledRegressor``: distillation as scikit-learn estimators (Pipeline,
cross_val_score, GridSearchCV).

It passes scikit-learn's own estimator checks (``sklearn.utils.estimator_checks``; see docs/sklearn.md). Four rules
make that possible, and each is a rule a user with real data meets too:

- **Small data** (:func:`_hold_out`): the validation rows are drawn stratified when every class has two rows and
  both parts can hold one row per class; otherwise at random when the held-out part still has at least one row per
  class; otherwise nothing is held out (all rows train, every epoch runs, no early stopping, ``report_`` is None).
  Each fallback warns with :class:`SmallDataWarning`.
- **Sparse input** (:func:`_densify`): densified when the dense array takes at most :data:`SPARSE_DENSE_LIMIT_BYTES`
  (1 GiB), refused with scikit-learn's wording above that.
- **Object arrays of numbers** are read as float64 (``check_array(dtype="numeric")``); a non-number in one is a
  ``TypeError`` from numpy, as in scikit-learn.
- **Reproducibility** (:func:`_unfitted_copy`): a fixed ``random_state`` seeds an unfitted teacher's unset
  ``random_state`` parameters too, so the same settings give the same teacher and student.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy import sparse
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin, clone
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import train_test_split
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_array, check_is_fitted, column_or_1d, validate_data
from torch import nn

from kdistill import defaults
from kdistill.api import distill
from kdistill.data import as_split
from kdistill.engine import predict_logits
from kdistill.errors import DataError, SmallDataWarning

__all__ = ["SPARSE_DENSE_LIMIT_BYTES", "DistilledClassifier", "DistilledRegressor", "SmallDataWarning"]

SPARSE_DENSE_LIMIT_BYTES = 1 << 30
"""The largest sparse input (as its dense array: rows x columns x the matrix's bytes per value) that is densified."""


def _is_fitted(estimator: Any) -> bool:
    if isinstance(estimator, nn.Module):
        return True
    try:
        check_is_fitted(estimator)
    except NotFittedError:
        return False
    return True


def _unfitted_copy(teacher: Any, seed: int | None) -> Any:
    """``clone(teacher)``, with its unset ``random_state`` parameters (its own and nested ones) drawn from ``seed``.

    scikit-learn's checks (and users) fix only the outer estimator's ``random_state``; seeding the teacher from it
    makes a fixed ``random_state`` give the same teacher and so the same student. Parameters the user set are kept;
    with ``seed`` None nothing is set.
    """
    copied = clone(teacher)
    if seed is None:
        return copied
    rng = np.random.RandomState(seed)
    params = copied.get_params(deep=True)
    unset = sorted(k for k, v in params.items() if v is None and (k == "random_state" or k.endswith("__random_state")))
    if unset:
        copied.set_params(**{key: int(rng.randint(np.iinfo(np.int32).max)) for key in unset})
    return copied


def _densify(X: Any) -> Any:
    """A scipy sparse matrix or array as a dense numpy array, if that takes at most :data:`SPARSE_DENSE_LIMIT_BYTES`.

    The student is a dense network, so sparse rows are densified whole (not per batch): the check is on
    ``rows * columns * itemsize`` before anything is allocated. Anything that is not sparse is returned as is.
    """
    if not sparse.issparse(X):
        return X
    limit = SPARSE_DENSE_LIMIT_BYTES
    needed = math.prod(X.shape) * X.dtype.itemsize
    if needed > limit:
        raise DataError(
            f"Sparse data was passed for X, but dense data is required: DistilledClassifier densifies sparse input "
            f"of at most {limit:,} bytes, and this {' x '.join(map(str, X.shape))} {X.dtype} matrix would take "
            f"{needed:,}",
            hint="reduce the columns first (sklearn.decomposition.TruncatedSVD, or fewer one-hot categories), or, if "
            "it fits in memory, use '.toarray()' to convert to a dense numpy array yourself.",
        )
    return X.toarray()


def _numeric(X: Any) -> Any:
    """Sparse input densified (:func:`_densify`); numpy arrays and lists checked by scikit-learn's ``check_array``.

    ``dtype="numeric"`` turns an object array of numbers into float64 (a non-number raises numpy's ``TypeError``) and
    refuses complex and string arrays with scikit-learn's messages. DataFrames and torch tensors are left to
    :func:`kdistill.data.as_split`, whose messages name the non-numeric columns; so are NaN/inf (``as_split`` names
    the first bad row) and N-D shapes (images for a CNN student). 1-D input is refused here with scikit-learn's
    advice ("Reshape your data").
    """
    X = _densify(X)
    if not (isinstance(X, torch.Tensor) or hasattr(X, "dtypes")):
        X = check_array(X, dtype="numeric", ensure_all_finite=False, ensure_2d=False, allow_nd=True, input_name="X")
    if X.ndim == 1:
        raise DataError(
            f"X is 1-D (shape {tuple(X.shape)}); expected (rows, features)",
            hint="Reshape your data: X.reshape(-1, 1) for a single feature, X.reshape(1, -1) for a single row.",
        )
    return X


def _hold_out(
    X: Any, y: np.ndarray, fraction: float, seed: int, max_epochs: int
) -> tuple[tuple[Any, np.ndarray], tuple[Any, np.ndarray] | None]:
    """Split off ``fraction`` of the rows for early stopping and the report, by the small-data rule.

    With ``n`` rows, ``k`` classes and ``held = ceil(fraction * n)`` (scikit-learn's own rounding):

    1. stratified, when every class has at least 2 rows, ``held >= k`` and ``n - held >= k`` (what a stratified
       ``train_test_split`` needs);
    2. else at random (unstratified), with a :class:`SmallDataWarning`, when ``held >= k`` and ``n - held >= 1``
       (a class with a single row, or a training part smaller than ``k``, but enough held-out rows);
    3. else no hold-out, with a :class:`SmallDataWarning`: all rows train, all ``max_epochs`` run, no early
       stopping, and there is no report.

    Returns ``(train, val)``; ``val`` is None in case 3 and when ``fraction`` is 0 (which never warns).
    """
    if not fraction or fraction <= 0:
        return (X, y), None
    rows = len(y)
    _, counts = np.unique(y, return_counts=True)
    classes = len(counts)
    held = math.ceil(fraction * rows)
    if counts.min() >= 2 and held >= classes and rows - held >= classes:
        stratify: np.ndarray | None = y
    elif held >= classes and rows - held >= 1:
        stratify = None
        reason = (
            f"a class has {counts.min()} row(s)"
            if counts.min() < 2
            else f"{rows - held} training rows are fewer than the {classes} classes"
        )
        warnings.warn(
            f"DistilledClassifier: {reason}, too few for a stratified validation split; holding out {held} of "
            f"{rows} rows at random instead (validation_fraction={fraction}). Give every class at least 2 rows, "
            "and keep at least one row per class on each side, for a stratified split.",
            SmallDataWarning,
            stacklevel=3,
        )
    else:
        warnings.warn(
            f"DistilledClassifier: {rows} rows of {classes} classes are too few for validation_fraction={fraction} "
            f"({held} held-out rows, fewer than one per class); training on all {rows} rows for max_epochs="
            f"{max_epochs} without early stopping, and report_ is None. Pass more rows, a larger "
            "validation_fraction, or validation_fraction=0 to train on all rows without this warning.",
            SmallDataWarning,
            stacklevel=3,
        )
        return (X, y), None
    x_train, x_val, y_train, y_val = train_test_split(X, y, test_size=fraction, random_state=seed, stratify=stratify)
    return (x_train, y_train), (x_val, y_val)


class DistilledClassifier(ClassifierMixin, BaseEstimator):
    """A small PyTorch student distilled from ``teacher``, behaving as a scikit-learn classifier.

    ``fit(X, y)`` holds out ``validation_fraction`` of the rows (stratified) for early stopping and the report, and
    distils the teacher into the student on the rest; with too few rows for that, it follows the small-data rule of
    :func:`_hold_out` and warns (:class:`SmallDataWarning`). Teacher handling follows scikit-learn's cloning rules: a
    cloned DistilledClassifier holds an *unfitted* copy of its teacher, and an unfitted teacher is fitted on the rows
    given to ``fit`` (so cross-validation never lets the teacher see the test fold). To keep a prefit teacher across
    clones, wrap it: ``DistilledClassifier(FrozenEstimator(forest))`` (``sklearn.frozen``). A fitted teacher passed
    directly is used as is. A fixed ``random_state`` also seeds the unfitted teacher's unset ``random_state``
    parameters, so it gives the same teacher and the same student every time. The training parameters are
    :func:`kdistill.distill`'s, with the same defaults (:mod:`kdistill.defaults`).

    ``X``: (rows, features) numpy, pandas, torch, a list, an object array of numbers, or a scipy sparse matrix up to
    :data:`SPARSE_DENSE_LIMIT_BYTES` as a dense array (densified; the teacher sees the dense rows too); (rows,
    *shape) arrays for a CNN student. ``y``: any labels scikit-learn accepts for a classifier (a column vector warns
    and is flattened, as in scikit-learn).

    Scarce labels (``docs/scarce_labels.md``): ``fit(X, y, unlabeled=X_u)`` hands rows without labels to the
    teacher and the student (a fit parameter, so ``Pipeline.fit(X, y, distilledclassifier__unlabeled=X_u)`` passes
    it; the Pipeline's transformers do not transform it); or ``unlabeled_marker=-1`` marks the rows of ``X`` whose
    label is -1 as unlabeled (scikit-learn's semi-supervised convention, ``SelfTrainingClassifier``), which works
    through every Pipeline step because those rows travel in ``X``. An unfitted teacher is fitted on the labelled
    rows only, and only labelled rows are held out. ``transfer``: generated rows for the teacher to label
    (:mod:`kdistill.transfer`, as ``distill(transfer=...)``).

    Attributes after fit: ``classes_`` (the teacher's order; any labels sklearn accepts), ``teacher_``, ``student_``
    (the trained ``nn.Module``), ``history_``, ``report_`` (teacher, student and the no-teacher baseline on the
    held-out rows; None with ``report=False`` or when nothing was held out), ``n_features_in_`` (features per row,
    the product of the per-row shape), ``feature_names_in_`` (fitted on a DataFrame with string column names).
    """

    def __init__(
        self,
        teacher: Any,
        student: str | nn.Module = "mlp",
        *,
        hidden: Sequence[int] | None = None,
        method: str = "kd",
        temperature: float | None = None,
        soft_weight: float | None = None,
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
        transfer: Any = None,
        unlabeled_marker: Any = None,
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
        self.transfer = transfer
        self.unlabeled_marker = unlabeled_marker

    def __sklearn_tags__(self) -> Any:
        """scikit-learn's tags: what input the estimator takes, so its checks test the right things.

        ``input_tags.sparse = True``: sparse input is densified up to :data:`SPARSE_DENSE_LIMIT_BYTES` (the checks'
        sparse matrices are tiny). Every other tag is scikit-learn's classifier default: no NaN (refused by
        :func:`kdistill.data.as_split`), no strings, deterministic for a fixed ``random_state``, must be fitted
        before ``predict``. No check is expected to fail, so none is listed as such (tests/test_sklearn_checks.py).
        """
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        return tags

    def fit(self, X: Any, y: Any, unlabeled: Any = None) -> DistilledClassifier:
        """Fit the teacher if it is unfitted, then distil it into the student on ``X``, ``y``; ``unlabeled``:
        rows without labels (the columns of ``X``), labelled by the teacher for the student."""
        X = _numeric(X)
        if self.unlabeled_marker is not None:
            X, y, marked = _split_marked(X, y, self.unlabeled_marker)
            if marked is not None:
                unlabeled = marked if unlabeled is None else _stack_rows(unlabeled, marked)
        if unlabeled is not None:
            unlabeled = _numeric(unlabeled)
        validate_data(self, X, skip_check_array=True, ensure_2d=False, reset=True)  # feature_names_in_ only
        seed = int(check_random_state(self.random_state).randint(0, 2**31 - 1))
        x_all = as_split(X, name="X", labeled=False)
        y_array = column_or_1d(y.to_numpy() if hasattr(y, "to_numpy") else np.asarray(y), warn=True)
        if len(y_array) != len(x_all):
            raise DataError(f"X has {len(x_all)} rows but y has {len(y_array)}", hint="pass X and y of the same rows.")
        check_classification_targets(y_array)
        if _is_fitted(self.teacher):
            teacher = self.teacher
        else:
            teacher = _unfitted_copy(self.teacher, None if self.random_state is None else seed).fit(X, y_array)
        train, val = _hold_out(X, y_array, self.validation_fraction, seed, self.max_epochs)
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
            **_training_arguments(self, seed, has_val=val is not None),
            unlabeled=unlabeled,
            transfer=copy.deepcopy(self.transfer),
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
        """The student's logits, (rows, classes), after the same input checks as ``fit``."""
        check_is_fitted(self, "student_")
        X = _numeric(X)
        x = as_split(X, name="X", labeled=False).x
        features = int(np.prod(x.shape[1:]))
        if features != self.n_features_in_:
            raise DataError(
                f"X has {features} features, but {type(self).__name__} is expecting {self.n_features_in_} features "
                f"as input (it was fitted with {self.n_features_in_})",
                hint="pass rows with the same columns as in fit.",
            )
        validate_data(self, X, skip_check_array=True, ensure_2d=False, reset=False)  # column names match fit's
        return predict_logits(self.student_, x)

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities, (rows, classes) in ``classes_`` order."""
        return torch.softmax(self._logits(X), dim=1).numpy()

    def predict(self, X: Any) -> np.ndarray:
        """Predicted labels, drawn from ``classes_``."""
        logits = self._logits(X)
        return self.classes_[logits.argmax(dim=1).numpy()]


def _training_arguments(estimator: Any, seed: int, *, has_val: bool) -> dict[str, Any]:
    """The :func:`~kdistill.distill` arguments both estimators pass from their own parameters: training, the student's
    widths, the report (with a baseline when there are held-out rows; no timing) and threads."""
    return {
        "epochs": estimator.max_epochs,
        "batch_size": estimator.batch_size,
        "lr": estimator.lr,
        "weight_decay": estimator.weight_decay,
        "patience": estimator.patience,
        "seed": seed,
        "hidden": estimator.hidden,
        "baseline": estimator.report and has_val,
        "report": estimator.report,
        "profile": False,
        "num_threads": estimator.num_threads,
        "verbose": estimator.verbose,
    }


def _regression_targets(y: Any, rows: int) -> np.ndarray:
    """``y`` as a float64 (rows,) or (rows, outputs) array, by scikit-learn's rules for a regressor: numeric (an
    object array of numbers is read as float64), inf refused with scikit-learn's wording; NaN kept (rows without a
    label: learnt from the teacher alone)."""
    if y is None:
        raise DataError("DistilledRegressor requires y to be passed, but the target y is None", hint="call fit(X, y).")
    array = check_array(
        y.to_numpy() if hasattr(y, "to_numpy") else np.asarray(y),
        ensure_2d=False,
        dtype=np.float64,
        ensure_all_finite="allow-nan",
        input_name="y",
    )
    if array.ndim not in (1, 2):
        raise DataError(f"y must be (rows,) or (rows, outputs), got shape {array.shape}", hint="pass y 1-D or 2-D.")
    if len(array) != rows:
        raise DataError(f"X has {rows} rows but y has {len(array)}", hint="pass X and y of the same rows.")
    return array


def _rows(data: Any, index: np.ndarray) -> Any:
    """The rows ``index`` of ``data`` (numpy, pandas, torch or a list), in its own type."""
    from sklearn.utils import _safe_indexing

    if isinstance(data, torch.Tensor):
        return data[torch.as_tensor(index, dtype=torch.long)]
    return _safe_indexing(data, index)


def _regression_hold_out(labelled: np.ndarray, fraction: float, seed: int, max_epochs: int) -> np.ndarray | None:
    """The positions held out for early stopping and the report, drawn at random among the labelled rows: ``held =
    ceil(fraction * labelled rows)`` when both parts keep at least 2 labelled rows (an R² needs two); otherwise none
    (every epoch runs, no early stopping, ``report_`` is None) with a :class:`SmallDataWarning`. None when
    ``fraction`` is 0."""
    if not fraction or fraction <= 0:
        return None
    rows = len(labelled)
    held = math.ceil(fraction * rows)
    if held >= 2 and rows - held >= 2:
        _, val = train_test_split(labelled, test_size=held, random_state=seed)
        return np.sort(val)
    warnings.warn(
        f"DistilledRegressor: {rows} labelled rows are too few for validation_fraction={fraction} ({held} held-out "
        f"rows; each side needs 2); training on all rows for max_epochs={max_epochs} without early stopping, and "
        "report_ is None. Pass more rows, or validation_fraction=0 to train on all rows without this warning.",
        SmallDataWarning,
        stacklevel=3,
    )
    return None


class DistilledRegressor(RegressorMixin, BaseEstimator):
    """A small PyTorch student distilled from a regressor ``teacher``, behaving as a scikit-learn regressor.

    ``fit(X, y)`` fits an unfitted teacher on the labelled rows (cloned as :class:`DistilledClassifier` does, its
    unset ``random_state`` seeded from ``random_state``), holds out ``validation_fraction`` of the labelled rows at
    random for early stopping and the report (too few rows: none, with a :class:`SmallDataWarning`), and distils
    with task ``regression`` (:mod:`kdistill.regression`): targets standardised with the training labels' mean and
    std, the student restored to the targets' units, loss ``regression_kd`` (``soft_weight`` on MSE, or Huber with
    ``teacher_loss="huber"`` and threshold ``huber_delta`` in standard deviations, to the teacher's predictions, the
    rest on MSE to the labels). Rows whose ``y`` is NaN have no label: they learn from the teacher alone (a prefit
    teacher labels them; an unfitted one is fitted without them).

    ``X``: as :class:`DistilledClassifier` (sparse densified up to :data:`SPARSE_DENSE_LIMIT_BYTES`, object arrays of
    numbers read as float64). ``y``: (rows,) or (rows, outputs) numbers; ``predict`` returns float64 of the same
    shape per row ((rows,) for a 1-D ``y``).

    Attributes after fit: ``teacher_``, ``student_`` (predicts in ``y``'s units), ``history_``, ``report_`` (R²,
    RMSE, MAE, retention, correlation with the teacher, on the held-out rows; None without them or with
    ``report=False``), ``n_outputs_``, ``n_features_in_``, ``feature_names_in_``.
    """

    def __init__(
        self,
        teacher: Any,
        student: str | nn.Module = "mlp",
        *,
        hidden: Sequence[int] | None = None,
        method: str = "regression_kd",
        soft_weight: float | None = None,
        teacher_loss: str = "mse",
        huber_delta: float = 1.0,
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
        self.soft_weight = soft_weight
        self.teacher_loss = teacher_loss
        self.huber_delta = huber_delta
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

    def __sklearn_tags__(self) -> Any:
        """scikit-learn's tags: sparse input is densified (as :class:`DistilledClassifier`), and ``y`` may have
        several outputs (``target_tags.multi_output``). No check is expected to fail (tests/test_regression_sklearn.py).
        """
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        tags.target_tags.multi_output = True
        return tags

    def fit(self, X: Any, y: Any) -> DistilledRegressor:
        """Fit the teacher if it is unfitted (on the labelled rows), then distil it into the student."""
        X = _numeric(X)
        validate_data(self, X, skip_check_array=True, ensure_2d=False, reset=True)  # feature_names_in_ only
        seed = int(check_random_state(self.random_state).randint(0, 2**31 - 1))
        x_all = as_split(X, name="X", labeled=False)
        y_array = _regression_targets(y, len(x_all))
        labelled = np.flatnonzero(np.isfinite(y_array.reshape(len(y_array), -1)).all(axis=1))
        if not len(labelled):
            raise DataError("y has no labelled row: every row holds NaN", hint="pass real-valued targets.")
        if _is_fitted(self.teacher):
            teacher = self.teacher
        else:
            unfitted = _unfitted_copy(self.teacher, None if self.random_state is None else seed)
            everything = len(labelled) == len(y_array)
            teacher = unfitted.fit(X if everything else _rows(X, labelled), y_array[labelled])
        held = _regression_hold_out(labelled, self.validation_fraction, seed, self.max_epochs)
        kept = np.arange(len(y_array)) if held is None else np.setdiff1d(np.arange(len(y_array)), held)
        train = (_rows(X, kept), y_array[kept])
        val = None if held is None else (_rows(X, held), y_array[held])
        student = copy.deepcopy(self.student) if isinstance(self.student, nn.Module) else self.student
        options = (
            {"teacher_loss": self.teacher_loss, "delta": self.huber_delta} if self.method == "regression_kd" else {}
        )
        result = distill(
            teacher,
            student,
            train,
            val=val,
            task="regression",
            method=self.method,
            soft_weight=self.soft_weight,
            method_params=options,
            **_training_arguments(self, seed, has_val=val is not None),
        )
        self.teacher_ = teacher
        self.student_ = result.student
        self.history_ = result.history
        self.report_ = result.report
        self.n_features_in_ = int(np.prod(x_all.x.shape[1:]))
        self.n_outputs_ = 1 if y_array.ndim == 1 else int(y_array.shape[1])
        self._one_dimensional_y = y_array.ndim == 1
        self._float64_student = copy.deepcopy(result.student).double().eval()  # what predict runs (its docstring)
        return self

    def predict(self, X: Any) -> np.ndarray:
        """Predictions in ``y``'s units, float64: (rows,) for a 1-D ``y``, else (rows, outputs).

        They are computed by a float64 copy of ``student_``, so a row's prediction does not depend on the rows
        predicted with it (float32 matrix products round differently per batch size, by up to ~1e-7 relative, which
        scikit-learn's subset-invariance check rejects); they match ``student_``'s float32 outputs to float32
        precision."""
        check_is_fitted(self, "student_")
        X = _numeric(X)
        x = as_split(X, name="X", labeled=False).x
        features = int(np.prod(x.shape[1:]))
        if features != self.n_features_in_:
            raise DataError(
                f"X has {features} features, but {type(self).__name__} is expecting {self.n_features_in_} features "
                f"as input (it was fitted with {self.n_features_in_})",
                hint="pass rows with the same columns as in fit.",
            )
        validate_data(self, X, skip_check_array=True, ensure_2d=False, reset=False)  # column names match fit's
        with torch.no_grad():
            parts = [self._float64_student(x[i : i + 1024].double()) for i in range(0, len(x), 1024)]
        predictions = torch.cat(parts).numpy()
        return predictions.ravel() if self._one_dimensional_y else predictions


def _split_marked(X: Any, y: Any, marker: Any) -> tuple[Any, Any, Any]:
    """``X`` and ``y`` split into the labelled rows and the rows whose label is ``marker`` (None when none are)."""
    y_array = column_or_1d(y.to_numpy() if hasattr(y, "to_numpy") else np.asarray(y), warn=True)
    marked = y_array == marker
    if not marked.any():
        return X, y_array, None
    if marked.all():
        raise DataError(
            f"every label is the unlabeled marker {marker!r}: nothing is labelled",
            hint="label some rows; the teacher and the student's hard term need them.",
        )
    return _take_rows(X, ~marked), y_array[~marked], _take_rows(X, marked)


def _take_rows(X: Any, mask: np.ndarray) -> Any:
    if hasattr(X, "iloc"):
        return X.iloc[np.flatnonzero(mask)]
    return X[np.flatnonzero(mask)] if sparse.issparse(X) else np.asarray(X)[mask]


def _stack_rows(first: Any, second: Any) -> Any:
    return np.concatenate([np.asarray(_densify(first)), np.asarray(_densify(second))])
