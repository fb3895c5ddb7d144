"""What task ``regression`` needs besides the loss: reading targets, standardising them, and the report's metrics.

A run standardises its targets with the training labels' mean and standard deviation per output
(:class:`TargetScaler`), and the teacher's predictions with the same numbers (:class:`StandardizedTeacher`), so
that the loss, the learning rate and early stopping see unit-scale numbers whatever the user's units (a price in
dollars, a count in thousands). The student trains in those units; the one returned to the user predicts in the
user's units again (:func:`restore_units`): for a built-in MLP the affine map ``z * std + mean`` is folded into its
last ``nn.Linear`` (same architecture, so :func:`kdistill.load` rebuilds it from its spec and ONNX export needs
nothing else); any other module gets a fixed :class:`OutputAffine` layer after it.

The report (:func:`regression_metrics`) reads predictions in standardised units and gives RMSE and MAE back in the
user's units; R² and the correlation with the teacher do not depend on the units.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from kdistill.data import Split, as_split
from kdistill.errors import DataError, ShapeMismatchError
from kdistill.tasks import TaskBase, check_row_outputs, model_logits, register_task, split_batch
from kdistill.teachers.base import Outputs, TeacherBase

__all__ = [
    "OutputAffine",
    "Regression",
    "StandardizedTeacher",
    "TargetScaler",
    "out_of_fold_predictions",
    "read_regression_split",
    "regression_metrics",
    "restore_units",
]


def _targets(y: Any, name: str, rows: int, *, allow_missing: bool) -> torch.Tensor:
    """(rows, outputs) float32 targets from ``y`` (1-D: one output); NaN allowed (missing labels) only with
    ``allow_missing``, inf never."""
    array = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(getattr(y, "to_numpy", lambda: y)())
    if array.dtype == object:
        try:
            array = array.astype(np.float64)
        except (TypeError, ValueError) as exc:
            raise DataError(f"{name} is not numeric ({exc})", hint="regression targets are real numbers.") from exc
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_) or np.iscomplexobj(array):
        raise DataError(f"{name} is not real-valued (dtype {array.dtype})", hint="regression targets are real numbers.")
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2:
        raise DataError(
            f"{name} must be (rows,) or (rows, outputs), got shape {array.shape}", hint="pass y 1-D or 2-D."
        )
    if len(array) != rows:
        raise DataError(
            f"{name} has {len(array)} rows but X has {rows}",
            hint="X and y must describe the same rows; check that they come from the same split.",
        )
    values = torch.as_tensor(array.astype(np.float32))
    if bool(torch.isinf(values).any()):
        raise DataError(f"{name} has inf values", hint="drop or clip those rows before distilling.")
    missing = torch.isnan(values)
    if bool(missing.any()) and not allow_missing:
        first = int(missing.any(dim=1).nonzero()[0])
        raise DataError(
            f"{name} has NaN targets in {int(missing.any(dim=1).sum())} row(s), first at row {first}",
            hint="only the training rows may lack targets (NaN: learnt from the teacher alone); drop them here.",
        )
    return values


def read_regression_split(data: Any, name: str) -> Split:
    """``(X, y)`` as a :class:`~kdistill.data.Split` with ``y`` (rows, outputs) float32 in the user's units; NaN
    targets (rows or entries without a label) are allowed in the training split only. ``X`` alone: no targets."""
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x_raw, y_raw = data
    else:
        x_raw, y_raw = data, None
    features = as_split(x_raw, name=name, labeled=False)
    if y_raw is None:
        return features
    y = _targets(y_raw, f"{name} y", len(features), allow_missing=name == "train")
    return Split(x=features.x, y=y, raw_x=features.raw_x)


@dataclass(frozen=True)
class TargetScaler:
    """Per-output ``mean`` and ``std`` (outputs,) of the training labels (NaN ignored; a constant output gets std 1).

    ``standardize(v) = (v - mean) / std``; ``restore(z) = z * std + mean``."""

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def fit(cls, y: torch.Tensor) -> TargetScaler:
        """From (rows, outputs) labels; every output needs at least one label."""
        observed = torch.isfinite(y)
        counts = observed.sum(dim=0)
        if bool((counts == 0).any()):
            empty = (counts == 0).nonzero().flatten().tolist()
            raise DataError(
                f"the training targets have no label at all for output(s) {empty}",
                hint="every output needs labelled training rows; unlabeled rows only add teacher predictions.",
            )
        values = torch.where(observed, y, 0.0).double()
        mean = values.sum(dim=0) / counts
        variance = (torch.where(observed, values - mean, 0.0) ** 2).sum(dim=0) / counts
        std = variance.sqrt()
        std = torch.where(std > 1e-12 * mean.abs().clamp_min(1.0), std, torch.ones_like(std))
        return cls(mean=mean.float(), std=std.float())

    def standardize(self, values: torch.Tensor) -> torch.Tensor:
        return (values - self.mean) / self.std

    def restore(self, values: torch.Tensor) -> torch.Tensor:
        return values * self.std + self.mean


class StandardizedTeacher(TeacherBase):
    """A regression teacher whose (batch, outputs) predictions are standardised with the run's :class:`TargetScaler`
    (what the loss, validation and the report read). Everything else is the wrapped adapter's."""

    def __init__(self, teacher: Any, scaler: TargetScaler) -> None:
        self.teacher = teacher
        self.scaler = scaler
        self.classes = None

    def __getattr__(self, name: str) -> Any:
        if name == "teacher" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.teacher, name)

    @property
    def num_classes(self) -> int | None:
        return None

    def fingerprint(self) -> str:
        import hashlib

        digest = hashlib.blake2b(digest_size=16)
        digest.update(str(self.teacher.fingerprint()).encode())
        digest.update(self.scaler.mean.numpy().tobytes() + self.scaler.std.numpy().tobytes())
        return digest.hexdigest()

    def __call__(self, x: torch.Tensor, *, features: Sequence[str] = ()) -> Outputs:
        outputs = self.teacher(x, features=features)
        predictions = outputs.logits.float()
        if predictions.ndim == 1:
            predictions = predictions[:, None]
        if predictions.ndim != 2 or predictions.shape[1] != len(self.scaler.mean):
            raise ShapeMismatchError(
                f"the regression teacher predicts {tuple(predictions.shape)} for {len(x)} rows, but the targets have "
                f"{len(self.scaler.mean)} output(s)",
                hint="the teacher must predict (batch, outputs), one column per target column.",
            )
        scaler = self.scaler
        return outputs.replace(logits=(predictions - scaler.mean.to(predictions)) / scaler.std.to(predictions))

    def size_bytes(self) -> int | None:
        own = getattr(self.teacher, "size_bytes", None)
        return None if own is None else own()

    def parameter_count(self) -> int | None:
        own = getattr(self.teacher, "parameter_count", None)
        return None if own is None else own()


def out_of_fold_predictions(teacher: StandardizedTeacher, train: Split, folds: int, seed: int) -> torch.Tensor:
    """Out-of-fold teacher predictions (rows, outputs) in standardised units: ``KFold(folds, shuffle, seed)``; each
    fold is predicted by a clone of the wrapped scikit-learn regressor fitted on the other folds' labelled rows (their
    standardised targets, so its predictions are already standardised; NaN-target rows are predicted, never fitted)."""
    from sklearn.base import clone
    from sklearn.model_selection import KFold

    from kdistill.errors import TeacherError

    estimator = getattr(teacher.teacher, "estimator", None)
    if estimator is None or getattr(teacher.teacher, "output", None) != "predict":
        raise TeacherError(
            "soft_targets='oof' refits clones of the teacher, so it needs a scikit-learn regressor",
            hint="use soft_targets='predict' for this teacher.",
        )
    assert train.y is not None
    x = train.x.reshape(len(train.x), -1).numpy()
    y = train.y.numpy()
    out = np.zeros(y.shape, dtype=np.float32)
    for fit_rows, predict_rows in KFold(n_splits=folds, shuffle=True, random_state=seed).split(x):
        labelled = fit_rows[np.isfinite(y[fit_rows]).all(axis=1)]
        target = y[labelled, 0] if y.shape[1] == 1 else y[labelled]
        fitted = clone(estimator).fit(x[labelled], target)
        out[predict_rows] = np.asarray(fitted.predict(x[predict_rows]), dtype=np.float32).reshape(len(predict_rows), -1)
    return torch.as_tensor(out)


class OutputAffine(nn.Module):
    """``model(x) * std + mean``, with ``mean`` and ``std`` (outputs,) fixed buffers (saved, never trained): a
    student trained on standardised targets, predicting in the user's units."""

    def __init__(self, model: nn.Module, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("output_mean", mean.detach().clone().float())
        self.register_buffer("output_std", std.detach().clone().float())

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.model(*args, **kwargs) * self.output_std + self.output_mean


def _last_linear(module: nn.Module) -> nn.Linear | None:
    """The final layer of a built-in MLP (``module.layers[-1]``) when it is an ``nn.Linear``, else None."""
    layers = getattr(module, "layers", None)
    if isinstance(layers, nn.Sequential) and len(layers) and isinstance(layers[-1], nn.Linear):
        return layers[-1]
    return None


def restore_units(module: nn.Module, scaler: TargetScaler, *, fold: bool) -> nn.Module:
    """``module`` predicting in the user's units: with ``fold`` (a built-in student) the affine map is folded into
    the final Linear, ``W' = diag(std) W`` and ``b' = std * b + mean`` (in place; exact up to float32 rounding);
    otherwise (or when there is no such layer) the module is wrapped in :class:`OutputAffine`."""
    last = _last_linear(module) if fold else None
    if last is None:
        return OutputAffine(module, scaler.mean, scaler.std)
    with torch.no_grad():
        std = scaler.std.to(last.weight)
        last.weight.mul_(std[:, None])
        if last.bias is not None:
            last.bias.mul_(std).add_(scaler.mean.to(last.bias))
        else:
            last.bias = nn.Parameter(scaler.mean.to(last.weight).clone())
    return module


def _r2(prediction: torch.Tensor, target: torch.Tensor) -> float:
    """scikit-learn's ``r2_score`` (``multioutput="uniform_average"``): ``1 - SS_res / SS_tot`` per output, averaged
    (an output with constant targets scores 1 when predicted exactly, else 0, as scikit-learn does)."""
    residual = ((target - prediction) ** 2).sum(dim=0)
    total = ((target - target.mean(dim=0)) ** 2).sum(dim=0)
    scores = torch.where(total > 0, 1 - residual / total.clamp_min(1e-300), (residual == 0).double())
    return float(scores.mean())


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson's correlation per output, averaged (1.0 for an output where both are constant and equal)."""
    a, b = a - a.mean(dim=0), b - b.mean(dim=0)
    denominator = (a.pow(2).sum(dim=0) * b.pow(2).sum(dim=0)).sqrt()
    scores = torch.where(denominator > 0, (a * b).sum(dim=0) / denominator.clamp_min(1e-300), (a - b).abs().sum(0) == 0)
    return float(scores.double().mean())


def regression_metrics(
    predictions: torch.Tensor,
    target: torch.Tensor,
    scaler: TargetScaler,
    teacher_predictions: torch.Tensor | None = None,
) -> dict[str, float]:
    """One model's report entry: ``r2`` (:func:`_r2`), ``rmse`` and ``mae`` in the user's units (over every number),
    and ``agreement``, the correlation with ``teacher_predictions`` (:func:`_correlation`) when given. Every input
    is (rows, outputs) in standardised units; computed in float64."""
    if predictions.ndim == 1:
        predictions = predictions[:, None]
    if tuple(predictions.shape) != tuple(target.shape):
        raise ShapeMismatchError(f"predictions {tuple(predictions.shape)} do not fit targets {tuple(target.shape)}")
    prediction = scaler.restore(predictions.double().cpu())
    truth = scaler.restore(target.double().cpu())
    error = prediction - truth
    metrics = {
        "r2": _r2(prediction, truth),
        "rmse": float(error.pow(2).mean().sqrt()),
        "mae": float(error.abs().mean()),
    }
    if teacher_predictions is not None:
        metrics["agreement"] = _correlation(prediction, scaler.restore(teacher_predictions.double().cpu()))
    return metrics


# ---- the task ------------------------------------------------------------------------------------------------------


@register_task
class Regression(TaskBase):
    """(batch, outputs) real-valued predictions against (rows, outputs) targets (a 1-D ``y`` is one output).

    The targets are standardised with the training labels' mean and standard deviation per output, and the teacher's
    predictions with the same numbers (:meth:`prepare_targets`, :mod:`kdistill.regression`); the student trains in
    those units and the one returned predicts in the user's again (:meth:`finish_model`). Training rows may lack
    targets (NaN, or ``label_mask`` False): they learn from the teacher alone (``regression_kd``).

    ``validate`` batches: ``(x, y)`` with ``y`` (batch, outputs) standardised targets. Gives ``val_rmse`` (the RMSE in
    standardised units, i.e. over the targets' standard deviation; lower is better: the monitor) and ``val_r2``.
    """

    name = "regression"
    description = "(batch, outputs) predictions, real targets (standardised inside); R², RMSE, MAE, correlation"
    monitor = "val_rmse"
    higher_is_better = False
    report_columns = ("r2", "retention", "rmse_retention", "agreement", "rmse", "mae")
    methods = ("regression_kd", "label_mse")
    baseline_method = "label_mse"

    def __init__(self) -> None:
        self.scaler: Any = None

    def read_split(self, data: Any, name: str, classes: Any = None) -> Split:
        """``(X, y)``: rows of features and (rows,) or (rows, outputs) real targets, in the user's units (NaN
        targets: training rows only)."""
        return read_regression_split(data, name)

    def prepare_targets(self, splits: Mapping[str, Split | None], teacher: Any) -> tuple[dict[str, Split | None], Any]:
        """Fit the target scaler on the training labels; every split's targets and the teacher's predictions are
        then standardised with it (the teacher through :class:`~kdistill.regression.StandardizedTeacher`)."""
        train = splits["train"]
        if train is None or train.y is None:
            raise DataError("task 'regression' needs training targets", hint="pass train=(X, y).")
        self.scaler = scaler = TargetScaler.fit(train.y)
        scaled = {
            name: None if split is None or split.y is None else Split(split.x, scaler.standardize(split.y), split.raw_x)
            for name, split in splits.items()
        }
        scaled = {name: scaled[name] if scaled[name] is not None else split for name, split in splits.items()}
        return scaled, None if teacher is None else StandardizedTeacher(teacher, scaler)

    def finish_model(self, module: nn.Module, *, builtin: bool) -> nn.Module:
        """The trained ``module`` predicting in the user's units (:func:`kdistill.regression.restore_units`)."""
        return restore_units(module, self.scaler, fold=builtin)

    def check_outputs(self, student: Outputs, teacher: Outputs) -> None:
        """Both (batch, outputs) with the same outputs."""
        check_row_outputs(
            student,
            teacher,
            needs="regression needs (batch, outputs)",
            noun="predictions",
            columns="outputs",
            shape_hint="return one row of predictions per example (a single output: shape (batch, 1)).",
            width_hint="make the student's last layer output one value per teacher output.",
        )

    def encode_targets(self, y: Any, classes: Any = None) -> torch.Tensor:
        """Targets (rows,) or (rows, outputs) -> (rows, outputs) float32, in the units given."""
        rows = len(y)
        target = read_regression_split((np.zeros((rows, 1)), y), "train").y
        assert target is not None
        return target

    def _validate(self, model: nn.Module, batches: Iterable[Any]) -> dict[str, float]:
        predictions, targets = [], []
        for batch in batches:
            inputs, target, _ = split_batch(batch)
            if target is None:
                raise DataError("regression validation needs targets", hint="pass (x, y) batches with targets.")
            predictions.append(model_logits(model, inputs))
            targets.append(target.float().cpu())
        if not predictions:
            raise DataError("no validation batches", hint="pass at least one (x, y) batch, or no validation set.")
        prediction, y = torch.cat(predictions).double(), torch.cat(targets).double()
        y = y.reshape(prediction.shape)
        residual = ((y - prediction) ** 2).sum(dim=0)
        total = ((y - y.mean(dim=0)) ** 2).sum(dim=0).clamp_min(1e-12)
        return {
            "val_rmse": float(((y - prediction) ** 2).mean().sqrt()),
            "val_r2": float((1 - residual / total).mean()),
        }

    def metrics(
        self,
        outputs: torch.Tensor,
        target: torch.Tensor | None,
        teacher_outputs: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """One model's report entry: :func:`kdistill.regression.regression_metrics` (r2, rmse and mae in the user's
        units, agreement: the correlation with the teacher's predictions when given)."""
        if target is None:
            raise DataError("regression metrics need targets", hint="report on a split with targets.")
        scaler = self.scaler
        if scaler is None:  # targets already in the user's units (no run standardised them)
            width = outputs.shape[1] if outputs.ndim == 2 else 1
            scaler = TargetScaler(torch.zeros(width), torch.ones(width))
        return regression_metrics(outputs, target, scaler, teacher_outputs)

    def retention(self, student: Mapping[str, float], teacher: Mapping[str, float]) -> float:
        """Student R² / teacher R² (NaN when the teacher's R² is not positive: the ratio then means nothing)."""
        return student["r2"] / teacher["r2"] if teacher["r2"] > 0 else float("nan")

    def retentions(self, student: Mapping[str, float], teacher: Mapping[str, float]) -> dict[str, float]:
        """``retention`` (R² ratio) and ``rmse_retention``: teacher RMSE / student RMSE (1.0: as close to the labels
        as the teacher; lower is worse)."""
        rmse = teacher["rmse"] / student["rmse"] if student["rmse"] > 0 else float("inf" if teacher["rmse"] else 1.0)
        return {"retention": self.retention(student, teacher), "rmse_retention": rmse}
