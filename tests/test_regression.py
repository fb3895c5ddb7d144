"""Task ``regression``: the losses against transcriptions of their formulas, the target scaler and the units the user
gets back, the report's metrics against scikit-learn's, and runs through distill() with scikit-learn, torch, XGBoost
and LightGBM teachers (the last two skipped when absent)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import make_friedman1
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.linear_model import LinearRegression, Ridge
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score
from torch import nn

import kdistill
from kdistill.engine.batches import InMemorySource
from kdistill.errors import ConfigError, DataError, MethodError, ShapeMismatchError, TeacherError
from kdistill.losses import get_loss
from kdistill.losses.regression import label_mse, regression_kd_loss
from kdistill.regression import OutputAffine, StandardizedTeacher, TargetScaler, regression_metrics, restore_units
from kdistill.tasks import get_task
from kdistill.teachers import Outputs, SklearnTeacher, as_teacher

QUICK = {"epochs": 30, "verbose": False, "profile": False}


def _data(rows: int = 900, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    x, y = make_friedman1(n_samples=rows, noise=1.0, random_state=seed)
    return x.astype(np.float32), y


# ---- the losses, against numpy transcriptions ----------------------------------------------------------------------


def _numpy_huber(residual: np.ndarray, delta: float) -> np.ndarray:
    """Huber (1964): r²/2 inside ±delta, delta·(|r| - delta/2) outside."""
    absolute = np.abs(residual)
    return np.where(absolute <= delta, 0.5 * residual**2, delta * (absolute - 0.5 * delta))


@pytest.mark.parametrize("teacher_loss", ["mse", "huber"])
def test_regression_kd_matches_its_formula_in_float64(teacher_loss: str) -> None:
    rng = np.random.default_rng(0)
    s, t, y = rng.normal(size=(7, 3)), 3 * rng.normal(size=(7, 3)), rng.normal(size=(7, 3))
    y[2] = np.nan  # a row without labels
    y[4, 1] = np.nan  # one missing output
    weight, delta = 0.3, 0.7
    soft = np.mean((s - t) ** 2) if teacher_loss == "mse" else np.mean(_numpy_huber(s - t, delta))
    observed = ~np.isnan(y)
    hard = np.sum((s - np.nan_to_num(y))[observed] ** 2) / y.size  # every entry weighs 1/(B*outputs); NaN ones 0
    terms = regression_kd_loss(
        torch.tensor(s),
        torch.tensor(t),
        torch.tensor(y),
        soft_weight=weight,
        teacher_loss=teacher_loss,
        delta=delta,
    )
    assert math.isclose(float(terms["teacher"]), soft, rel_tol=1e-12)
    assert math.isclose(float(terms["labels"]), hard, rel_tol=1e-12)
    assert math.isclose(float(terms["loss"]), weight * soft + (1 - weight) * hard, rel_tol=1e-12)


def test_unlabeled_rows_dilute_the_label_term_instead_of_reweighting_it() -> None:
    """L labelled rows beside U unlabeled ones: each labelled entry keeps its 1/(B*outputs) share of a full batch,
    so the label term (and its gradient) is the labelled batch's times L/(L+U); the mean over the present labels
    alone would make it independent of U, each labelled row weighing (L+U)/L times more."""
    rng = np.random.default_rng(1)
    s, y = rng.normal(size=(4, 2)), rng.normal(size=(4, 2))
    labelled = torch.tensor(s, requires_grad=True)
    label_mse(labelled, torch.tensor(y)).backward()
    padded = torch.tensor(np.concatenate([s, rng.normal(size=(12, 2))]), requires_grad=True)
    term = label_mse(padded, torch.tensor(np.concatenate([y, np.full((12, 2), np.nan)])))
    term.backward()
    assert math.isclose(float(term), float(np.mean((s - y) ** 2)) * 4 / 16, rel_tol=1e-12)
    assert labelled.grad is not None and padded.grad is not None
    assert torch.allclose(padded.grad[:4], labelled.grad * 4 / 16, rtol=1e-12)
    assert float(padded.grad[4:].abs().max()) == 0.0
    nothing = label_mse(padded, torch.full((16, 2), float("nan"), dtype=torch.float64))
    assert float(nothing) == 0.0 and nothing.requires_grad


def test_huber_is_half_the_mse_inside_delta_and_linear_outside() -> None:
    small = torch.tensor([[0.1, -0.2]])
    zero = torch.zeros_like(small)
    huber = regression_kd_loss(small, zero, None, soft_weight=1.0, teacher_loss="huber", delta=1.0)["teacher"]
    assert math.isclose(float(huber), 0.5 * float(small.pow(2).mean()), rel_tol=1e-6)
    far = torch.tensor([[10.0]], requires_grad=True)
    regression_kd_loss(far, torch.zeros(1, 1), None, soft_weight=1.0, teacher_loss="huber", delta=0.5)[
        "loss"
    ].backward()
    assert far.grad is not None and math.isclose(float(far.grad), 0.5)  # the pull is capped at delta


def test_unlabeled_rows_get_only_the_teacher_term_and_their_labels_no_gradient() -> None:
    student = torch.randn(6, 2, requires_grad=True)
    teacher, y = torch.randn(6, 2), torch.randn(6, 2)
    y[3:] = float("nan")
    terms = regression_kd_loss(student, teacher, y, soft_weight=0.5)
    terms["loss"].backward()
    assert student.grad is not None
    expected_unlabeled = 0.5 * 2 * (student[3:] - teacher[3:]).detach() / student.numel()
    torch.testing.assert_close(student.grad[3:], expected_unlabeled)
    nothing = torch.full((6, 2), float("nan"))
    all_unlabeled = regression_kd_loss(student.detach(), teacher, nothing, soft_weight=0.5)
    assert float(all_unlabeled["labels"]) == 0.0
    assert math.isclose(float(all_unlabeled["loss"]), 0.5 * float(F_mse(student.detach(), teacher)), rel_tol=1e-6)


def F_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).pow(2).mean()


def test_label_mask_rows_become_nan_targets_in_the_engine() -> None:
    """The engine's partly labelled source (label_mask, the scarce-labels path) marks real-valued targets NaN on
    unlabeled rows, every output of the row, so regression_kd counts them in the teacher term only."""
    target = torch.arange(8.0).reshape(4, 2)
    source = InMemorySource(torch.zeros(4, 3), target, label_mask=torch.tensor([True, False, True, False]))
    assert source.target is not None
    assert torch.isnan(source.target[1]).all() and torch.isnan(source.target[3]).all()
    torch.testing.assert_close(source.target[[0, 2]], target[[0, 2]])
    classes = InMemorySource(torch.zeros(2, 3), torch.tensor([1, 2]), label_mask=torch.tensor([True, False]))
    assert classes.target is not None and classes.target.tolist() == [1, -100]  # class labels unchanged


def test_loss_options_and_shapes_are_checked() -> None:
    with pytest.raises(MethodError, match="teacher_loss must be one of"):
        get_loss("regression_kd", teacher_loss="l1")
    with pytest.raises(MethodError, match="soft_weight must be in"):
        get_loss("regression_kd", soft_weight=1.5)
    loss = get_loss("regression_kd")
    with pytest.raises(ShapeMismatchError, match=r"targets \(4, 3\) do not fit"):
        loss(Outputs(torch.zeros(4, 2)), Outputs(torch.zeros(4, 2)), torch.zeros(4, 3))
    with pytest.raises(ShapeMismatchError, match="must be real numbers"):
        label_mse(torch.zeros(4, 1), torch.zeros(4, dtype=torch.long))
    one_output = loss(Outputs(torch.ones(4, 1)), Outputs(torch.ones(4, 1)), torch.zeros(4))  # (batch,) for 1 output
    assert math.isclose(float(one_output["labels"]), 1.0)


# ---- scaler, teacher wrapper, units --------------------------------------------------------------------------------


def test_scaler_ignores_missing_labels_and_keeps_constant_outputs_finite() -> None:
    y = torch.tensor([[1.0, 5.0], [3.0, 5.0], [float("nan"), 5.0]])
    scaler = TargetScaler.fit(y)
    torch.testing.assert_close(scaler.mean, torch.tensor([2.0, 5.0]))
    torch.testing.assert_close(scaler.std, torch.tensor([1.0, 1.0]))  # population std 1; the constant one: 1
    torch.testing.assert_close(scaler.restore(scaler.standardize(y[:2])), y[:2])
    with pytest.raises(DataError, match=r"no label at all for output\(s\) \[0\]"):
        TargetScaler.fit(torch.tensor([[float("nan")], [float("nan")]]))


def test_folding_into_the_last_linear_is_exact_and_keeps_the_architecture() -> None:
    torch.manual_seed(0)
    mlp = kdistill.students.build_student("mlp", torch.randn(20, 4), 2, hidden=[8])[0]
    scaler = TargetScaler(torch.tensor([100.0, -3.0]), torch.tensor([25.0, 0.01]))
    x = torch.randn(5, 4)
    with torch.no_grad():
        expected = scaler.restore(mlp(x))
    keys = set(mlp.state_dict())
    folded = restore_units(mlp, scaler, fold=True)
    assert folded is mlp and set(folded.state_dict()) == keys
    with torch.no_grad():
        torch.testing.assert_close(folded(x), expected, rtol=1e-6, atol=1e-5)
    custom = nn.Sequential(nn.Linear(4, 2))
    wrapped = restore_units(custom, scaler, fold=False)
    assert isinstance(wrapped, OutputAffine)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), scaler.restore(custom(x)))


def test_standardized_teacher_and_its_fingerprint() -> None:
    x, y = _data(200)
    adapter = as_teacher(LinearRegression().fit(x, y))
    assert isinstance(adapter, SklearnTeacher) and adapter.output == "predict" and adapter.classes is None
    scaler = TargetScaler(torch.tensor([10.0]), torch.tensor([2.0]))
    wrapped = StandardizedTeacher(adapter, scaler)
    raw = adapter(torch.as_tensor(x[:5])).logits
    assert raw.shape == (5, 1)
    torch.testing.assert_close(wrapped(torch.as_tensor(x[:5])).logits, (raw - 10.0) / 2.0)
    other = StandardizedTeacher(adapter, TargetScaler(torch.tensor([10.0]), torch.tensor([3.0])))
    assert wrapped.fingerprint() != other.fingerprint() != adapter.fingerprint()
    with pytest.raises(ShapeMismatchError, match=r"predicts \(3, 1\) for 3 rows, but the targets have 2 output"):
        StandardizedTeacher(adapter, TargetScaler(torch.zeros(2), torch.ones(2)))(torch.as_tensor(x[:3]))


def test_report_metrics_match_scikit_learn_in_the_users_units() -> None:
    rng = np.random.default_rng(1)
    truth = rng.normal(50, 10, size=(40, 2))
    predicted = truth + rng.normal(0, 4, size=truth.shape)
    teacher = truth + rng.normal(0, 2, size=truth.shape)
    scaler = TargetScaler(torch.tensor([50.0, 40.0]), torch.tensor([10.0, 5.0]))

    def scaled(values: np.ndarray) -> torch.Tensor:
        return scaler.standardize(torch.tensor(values, dtype=torch.float64)).float()

    metrics = regression_metrics(scaled(predicted), scaled(truth), scaler, scaled(teacher))
    assert math.isclose(metrics["r2"], r2_score(truth, predicted), rel_tol=1e-5)
    assert math.isclose(metrics["rmse"], math.sqrt(mean_squared_error(truth, predicted)), rel_tol=1e-5)
    assert math.isclose(metrics["mae"], mean_absolute_error(truth, predicted), rel_tol=1e-5)
    pearson = np.mean([np.corrcoef(predicted[:, j], teacher[:, j])[0, 1] for j in range(2)])
    assert math.isclose(metrics["agreement"], pearson, rel_tol=1e-5)


def test_retention_is_undefined_for_a_teacher_without_skill() -> None:
    task = get_task("regression")
    ratios = task.retentions({"r2": 0.5, "rmse": 2.0}, {"r2": 0.0, "rmse": 1.0})
    assert math.isnan(ratios["retention"]) and ratios["rmse_retention"] == 0.5
    assert task.retentions({"r2": 0.4, "rmse": 2.0}, {"r2": 0.8, "rmse": 1.0}) == {
        "retention": 0.5,
        "rmse_retention": 0.5,
    }


# ---- runs ----------------------------------------------------------------------------------------------------------


def _splits(x: np.ndarray, y: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {"train": (x[:600], y[:600]), "val": (x[600:750], y[600:750]), "test": (x[750:], y[750:])}


def test_distill_picks_the_task_for_a_regressor_and_the_student_predicts_in_the_users_units(tmp_path: Path) -> None:
    x, y = _data()
    y = 1000.0 * y + 20000.0  # a price: the student must give it back in these units
    data = _splits(x, y)
    teacher = HistGradientBoostingRegressor(max_iter=100, random_state=0).fit(*data["train"])
    result = kdistill.distill(teacher, "mlp", data["train"], val=data["val"], test=data["test"], out=tmp_path, **QUICK)
    assert result.report is not None and result.report.settings["task"] == "regression"
    assert result.report.settings["method"] == "regression_kd"
    models = result.report.models
    assert {"r2", "rmse", "mae", "agreement", "retention", "rmse_retention"} <= set(models["student"])
    test_x, test_y = data["test"]
    with torch.no_grad():
        predicted = result.student(torch.as_tensor(test_x)).numpy().ravel()
    assert math.isclose(r2_score(test_y, predicted), models["student"]["r2"], rel_tol=1e-4)
    assert math.isclose(math.sqrt(mean_squared_error(test_y, predicted)), models["student"]["rmse"], rel_tol=1e-4)
    assert math.isclose(r2_score(test_y, teacher.predict(test_x)), models["teacher"]["r2"], rel_tol=1e-4)
    assert models["student"]["r2"] > 0.7 and models["baseline"]["r2"] > 0.5
    assert math.isclose(models["student"]["retention"], models["student"]["r2"] / models["teacher"]["r2"])
    np.testing.assert_allclose(result.predict(test_x).ravel(), predicted, rtol=1e-6)
    reloaded = kdistill.load(tmp_path)  # the built-in student is rebuilt from its spec, units included
    with torch.no_grad():
        np.testing.assert_allclose(reloaded(torch.as_tensor(test_x)).numpy().ravel(), predicted, rtol=1e-6)
    assert "R²" in str(result.report) and "RMSE" in str(result.report)


def test_multi_output_torch_teacher_with_task_regression() -> None:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 3))
    x = torch.randn(700, 6)
    with torch.no_grad():
        y = (teacher(x) * torch.tensor([1.0, 100.0, 0.01]) + torch.tensor([0.0, 500.0, -2.0])).numpy()
    scale = nn.Linear(3, 3)  # the teacher predicts in y's units too
    with torch.no_grad():
        scale.weight.copy_(torch.diag(torch.tensor([1.0, 100.0, 0.01])))
        scale.bias.copy_(torch.tensor([0.0, 500.0, -2.0]))
    full = nn.Sequential(teacher, scale)
    result = kdistill.distill(
        full,
        "mlp",
        (x[:500], y[:500]),
        val=(x[500:600], y[500:600]),
        test=(x[600:], y[600:]),
        task="regression",
        hidden=(64,),
        **QUICK,
    )
    assert result.report is not None
    student = result.report.models["student"]
    assert student["r2"] > 0.9 and student["agreement"] > 0.95
    with torch.no_grad():
        out = result.student(x[600:]).numpy()
    assert out.shape == (100, 3)
    for column in range(3):  # every output in its own units
        assert r2_score(y[600:, column], out[:, column]) > 0.85


def test_training_rows_without_targets_learn_from_the_teacher() -> None:
    x, y = _data(2400, seed=3)
    teacher = HistGradientBoostingRegressor(max_iter=200, random_state=0).fit(x[:1200], y[:1200])
    scarce = y[1200:2000].copy()
    scarce[40:] = np.nan
    settings = {"val": (x[2000:2200], y[2000:2200]), "test": (x[2200:], y[2200:]), "hidden": (64,), **QUICK}
    result = kdistill.distill(teacher, "mlp", (x[1200:2000], scarce), **settings)
    assert result.report is not None
    models = result.report.models
    assert models["student"]["r2"] > models["baseline"]["r2"] + 0.1  # the baseline sees the 40 labels only
    with pytest.raises(DataError, match="val y has NaN targets"):
        kdistill.distill(teacher, "mlp", (x[:100], y[:100]), val=(x[:10], scarce[50:60]), **QUICK)


def test_out_of_fold_targets_for_a_regressor() -> None:
    x, y = _data(700)
    teacher = Ridge().fit(x[:500], y[:500])
    result = kdistill.distill(
        teacher, "mlp", (x[:500], y[:500]), test=(x[500:], y[500:]), soft_targets="oof", oof_folds=3, **QUICK
    )
    assert result.report is not None and result.report.models["student"]["r2"] > 0.5


def test_classification_methods_and_a_classifier_are_refused_for_regression() -> None:
    x, y = _data(200)
    teacher = LinearRegression().fit(x, y)
    with pytest.raises(ConfigError, match="method 'dkd' does not fit task 'regression'"):
        kdistill.distill(teacher, "mlp", (x, y), method="dkd", **QUICK)
    with pytest.raises(TeacherError, match="not a regressor"):
        SklearnTeacher(object.__new__(type("Predictor", (), {"predict": lambda self, x: x, "fit": None})))


def test_huber_through_distill_and_the_settings() -> None:
    x, y = _data(500)
    teacher = Ridge().fit(x, y)
    result = kdistill.distill(
        teacher,
        "mlp",
        (x[:400], y[:400]),
        test=(x[400:], y[400:]),
        method_params={"teacher_loss": "huber", "delta": 0.5},
        soft_weight=0.8,
        **QUICK,
    )
    assert "train_teacher" in result.history[-1] and result.report is not None
    assert result.report.models["student"]["r2"] > 0.5


# ---- popular teachers: XGBoost and LightGBM through their scikit-learn APIs ----------------------------------------


@pytest.mark.parametrize("library", ["xgboost", "lightgbm"])
def test_gradient_boosted_regressors_as_teachers(library: str) -> None:
    module = pytest.importorskip(library)
    x, y = _data()
    data = _splits(x, y)
    if library == "xgboost":
        teacher = module.XGBRegressor(n_estimators=100, max_depth=4, n_jobs=1, random_state=0)
    else:
        teacher = module.LGBMRegressor(n_estimators=100, n_jobs=1, random_state=0, verbose=-1)
    teacher.fit(*data["train"])
    result = kdistill.distill(teacher, "mlp", data["train"], val=data["val"], test=data["test"], **QUICK)
    assert result.report is not None and result.report.settings["task"] == "regression"
    models = result.report.models
    assert models["teacher"]["r2"] > 0.8 and models["student"]["r2"] > 0.7 and models["student"]["agreement"] > 0.85
    estimator = kdistill.DistilledRegressor(teacher, hidden=(32,), max_epochs=20, random_state=0, report=False)
    estimator.fit(*data["train"])
    assert r2_score(data["test"][1], estimator.predict(data["test"][0])) > 0.6


@pytest.mark.parametrize("library", ["xgboost", "lightgbm"])
def test_gradient_boosted_classifiers_as_teachers(library: str) -> None:
    module = pytest.importorskip(library)
    from sklearn.datasets import make_classification

    x, labels = make_classification(n_samples=800, n_features=10, n_informative=6, n_classes=3, random_state=0)
    if library == "xgboost":
        teacher = module.XGBClassifier(n_estimators=60, max_depth=3, n_jobs=1, random_state=0)
    else:
        teacher = module.LGBMClassifier(n_estimators=60, n_jobs=1, random_state=0, verbose=-1)
    teacher.fit(x[:600], labels[:600])
    result = kdistill.distill(teacher, "mlp", (x[:600], labels[:600]), test=(x[600:], labels[600:]), **QUICK)
    assert result.report is not None and result.report.settings["task"] == "classification"
    assert result.report.models["student"]["accuracy"] > 0.7
    model = kdistill.DistilledClassifier(teacher, hidden=(32,), max_epochs=20, random_state=0, report=False)
    assert model.fit(x[:600], labels[:600]).score(x[600:], labels[600:]) > 0.7


def test_a_custom_student_comes_back_behind_a_fixed_affine_layer(tmp_path: Path) -> None:
    x, y = _data(600)
    y = 50.0 * y - 300.0
    teacher = Ridge().fit(x[:400], y[:400])
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 1))
    result = kdistill.distill(teacher, net, (x[:400], y[:400]), test=(x[400:], y[400:]), out=tmp_path, **QUICK)
    assert isinstance(result.student, OutputAffine) and result.student.model is net
    assert float(result.student.output_std) == pytest.approx(float(np.std(y[:400])), rel=1e-5)
    assert r2_score(y[400:], result.predict(x[400:]).ravel()) > 0.5
    shell = OutputAffine(nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 1)), torch.zeros(1), torch.ones(1))
    reloaded = kdistill.load(tmp_path, student=shell)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(torch.as_tensor(x[400:])), result.student(torch.as_tensor(x[400:])))


def test_the_teacher_cache_keys_on_the_scaled_teacher(tmp_path: Path) -> None:
    """With a cache folder the standardised predictions are cached (keyed by teacher and scaler) and reused: a
    second identical run trains the same student without calling the teacher on the training rows."""
    x, y = _data(400)
    teacher = Ridge().fit(x, y)
    settings = {"cache_dir": tmp_path, "test": (x[300:], y[300:]), "baseline": False, **QUICK}
    first = kdistill.distill(teacher, "mlp", (x[:300], y[:300]), **settings)
    entries = sorted(str(path) for path in tmp_path.rglob("*"))
    assert entries
    second = kdistill.distill(teacher, "mlp", (x[:300], y[:300]), **settings)
    assert sorted(str(path) for path in tmp_path.rglob("*")) == entries
    for a, b in zip(first.student.state_dict().values(), second.student.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    kdistill.distill(teacher, "mlp", (x[:300], 2.0 * y[:300]), **settings)  # another scaler: another entry
    assert len(list(tmp_path.rglob("*"))) > len(entries)
