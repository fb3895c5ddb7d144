"""Unlabeled rows: the teacher labels them (through the cache), the soft term uses every row, the hard term only the
labelled ones, each row weighing 1/B in both (the per-batch mix), the baseline never sees them; bad unlabeled rows
fail with clear errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

import kdistill
from kdistill import defaults
from kdistill.cache import cache_key, open_entry
from kdistill.engine import InMemorySource, TrainConfig, TransferSet, fit
from kdistill.engine.loop import effective_weight_decay
from kdistill.errors import DataError
from kdistill.losses.kd import KDLoss
from kdistill.pipeline import RunSpec, _student_rows, prepare
from kdistill.sklearn import DistilledClassifier
from kdistill.teachers import Outputs, as_teacher, teacher_logits
from kdistill.transfer import Munge, Transfer


class CountingTeacher(nn.Module):
    """A fixed linear teacher over 64 features that records the number of rows of every call."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.layer = nn.Linear(64, 10)
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(len(x))
        return self.layer(x / 16.0) * 3.0


@pytest.fixture(scope="module")
def digits() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order].astype(np.float32), y[order]
    return {
        "x": x[:150],
        "y": y[:150],
        "u": x[150:850],
        "xv": x[850:1150],
        "yv": y[850:1150],
        "xt": x[1150:],
        "yt": y[1150:],
    }


def _small(**extra: object) -> dict[str, object]:
    return {"epochs": 2, "hidden": [16], "verbose": False, "profile": False, "seed": 0} | extra


def test_the_hard_term_sums_the_labelled_rows_over_the_whole_batch_and_the_soft_term_averages_all_rows() -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(8, 5), torch.randn(8, 5)
    labels = torch.tensor([1, 0, 4, 2, 3, 0, 1, 2])
    mask = torch.tensor([True, False, True, False, False, False, True, False])
    source = InMemorySource(torch.zeros(8, 1), labels, label_mask=mask)
    batch = source.gather(torch.arange(8))
    terms = KDLoss(temperature=2.0, soft_weight=0.3)(Outputs(student), Outputs(teacher), batch.target)
    # independent: CE summed over the 3 labelled rows / all 8 rows, T^2 KL(teacher || student) averaged over all 8
    log_q = np.log(np.exp(student.numpy()) / np.exp(student.numpy()).sum(1, keepdims=True))
    ce = -sum(log_q[i, labels[i]] for i in range(8) if mask[i]) / 8
    p = np.exp(teacher.numpy() / 2) / np.exp(teacher.numpy() / 2).sum(1, keepdims=True)
    q = np.exp(student.numpy() / 2) / np.exp(student.numpy() / 2).sum(1, keepdims=True)
    kl = 4.0 * np.mean((p * (np.log(p) - np.log(q))).sum(1))
    assert float(terms["ce"]) == pytest.approx(ce, rel=1e-5)
    assert float(terms["kd"]) == pytest.approx(kl, rel=1e-5)
    assert float(terms["loss"]) == pytest.approx(0.7 * ce + 0.3 * kl, rel=1e-5)


@pytest.mark.parametrize("unlabelled", [1, 12, 60])
def test_a_labelled_rows_weight_does_not_grow_with_the_unlabelled_rows_beside_it(unlabelled: int) -> None:
    """Each row weighs 1/B: unlabeled rows on which the student already matches the teacher (KL 0) dilute the
    batch's loss by L/(L+U) and the labelled rows' gradient by the same factor. A mean over the labelled rows alone
    (kdistill before this rule) kept their hard term whole, so 4 labelled rows among 60 unlabeled weighed 16x a row of
    a labelled batch: on MNIST-1D with a 50k pool that cost the student 13 points (docs/scarce_labels.md)."""
    torch.manual_seed(2)
    labelled_logits = torch.randn(4, 10, requires_grad=True)
    labels = torch.tensor([3, 1, 7, 0])
    teacher_rows = torch.randn(4, 10)
    matched = torch.randn(unlabelled, 10)  # student == teacher on these: no soft term
    loss = KDLoss(temperature=4.0, soft_weight=0.5)
    alone = loss(Outputs(labelled_logits), Outputs(teacher_rows), labels)["loss"]
    (alone_grad,) = torch.autograd.grad(alone, labelled_logits)
    student = torch.cat([labelled_logits, matched])
    target = torch.cat([labels, torch.full((unlabelled,), -100)])
    mixed = loss(Outputs(student), Outputs(torch.cat([teacher_rows, matched])), target)["loss"]
    (mixed_grad,) = torch.autograd.grad(mixed, labelled_logits)
    share = 4 / (4 + unlabelled)
    assert float(mixed.detach()) == pytest.approx(share * float(alone.detach()), rel=1e-5)
    torch.testing.assert_close(mixed_grad, share * alone_grad)


def test_a_batch_without_labelled_rows_has_a_zero_hard_term_not_nan() -> None:
    student = torch.randn(4, 3, requires_grad=True)
    target = torch.full((4,), -100)
    terms = KDLoss(temperature=4.0, soft_weight=0.5)(Outputs(student), Outputs(torch.randn(4, 3)), target)
    assert float(terms["ce"].detach()) == 0.0
    assert float(terms["loss"].detach()) == pytest.approx(0.5 * float(terms["kd"].detach()))
    terms["loss"].backward()
    assert student.grad is not None and bool(torch.isfinite(student.grad).all())


def test_kd_packs_partly_labelled_rows_to_the_textbook_forms_value_and_gradient() -> None:
    """The engine's fast packed form (KDLoss.precompute) now serves partly labelled transfer sets, with the same
    per-row rule: an unlabeled row's packed one-hot is zeros."""
    from kdistill.losses.kd import kd_loss, kd_loss_packed

    torch.manual_seed(4)
    teacher, target = torch.randn(6, 5), torch.tensor([0, -100, 2, -100, -100, 4])
    loss = KDLoss(temperature=3.0, soft_weight=0.4)
    packed = loss.precompute(teacher, target)
    assert packed is not None
    student = torch.randn(6, 5, requires_grad=True)
    fast = kd_loss_packed(student, packed, temperature=3.0, soft_weight=0.4)
    textbook = kd_loss(student, teacher, target, temperature=3.0, soft_weight=0.4)
    for name in ("loss", "ce", "kd"):
        assert float(fast[name]) == pytest.approx(float(textbook[name]), rel=1e-5, abs=1e-6)
    (fast_grad,) = torch.autograd.grad(fast["loss"], student)
    (textbook_grad,) = torch.autograd.grad(textbook["loss"], student)
    torch.testing.assert_close(fast_grad, textbook_grad, rtol=1e-5, atol=1e-6)


def test_unlabeled_rows_join_the_students_rows_with_the_teachers_outputs(digits: dict[str, np.ndarray]) -> None:
    teacher = as_teacher(CountingTeacher())
    spec = RunSpec(
        settings=kdistill.config.validate_settings({"device": {"type": "cpu"}}),
        train=(digits["x"], digits["y"]),
        teacher=teacher,
        unlabeled=digits["u"],
        transfer=Transfer(Munge(), rows=300),
        student_params={"hidden": [8]},
    )
    prepared = prepare(spec)
    train = prepared.splits["train"]
    assert train is not None and len(train) == 150  # the labelled split (what the baseline trains on) is unchanged
    transfer, source = _student_rows(spec, prepared, train)
    assert source is None and transfer.label_mask is not None and transfer.teacher_logits is not None
    assert len(transfer.label_mask) == 150 + 700 + 300 and int(transfer.label_mask.sum()) == 150
    assert bool(transfer.label_mask[:150].all())
    extra_rows = torch.as_tensor(transfer.x)[150:]
    torch.testing.assert_close(transfer.teacher_logits[150:], teacher_logits(teacher, extra_rows))
    torch.testing.assert_close(extra_rows[:700], torch.from_numpy(digits["u"]))


def test_distill_with_unlabeled_rows_reports_them_and_leaves_the_baseline_alone(
    digits: dict[str, np.ndarray],
) -> None:
    rf = CountingTeacher()
    args = ((digits["x"], digits["y"]),)
    common = _small(val=(digits["xv"], digits["yv"]), test=(digits["xt"], digits["yt"]))
    plain = kdistill.distill(rf, "mlp", *args, **common)  # type: ignore[arg-type]
    more = kdistill.distill(rf, "mlp", *args, unlabeled=digits["u"], **common)  # type: ignore[arg-type]
    assert plain.baseline is not None and more.baseline is not None
    for before, after in zip(plain.baseline.state_dict().values(), more.baseline.state_dict().values(), strict=True):
        torch.testing.assert_close(before, after, rtol=0, atol=0)  # the baseline trains on the labelled rows only
    assert more.report is not None
    rows = more.report.settings["transfer_rows"]
    assert rows["labelled"]["rows"] == 150 and rows["unlabeled"]["rows"] == 700
    assert 0.0 <= rows["unlabeled"]["student_teacher_agreement"] <= 1.0
    assert any(line.startswith("training rows: labelled 150") for line in more.report.lines())
    assert more.history[-1]["train_loss"] != plain.history[-1]["train_loss"]
    # 150 labelled of 850 rows: the student's AdamW decays by 0.1 * sqrt(150 / 850), and the report says so
    assert more.report.settings["weight_decay"] == pytest.approx(defaults.WEIGHT_DECAY * (150 / 850) ** 0.5)


def test_the_reported_agreements_are_the_students_and_teachers_top_classes_on_each_kind_of_row(
    digits: dict[str, np.ndarray],
) -> None:
    """Issue 15, point 4: rows per kind, and on each the student's agreement with the teacher, recomputed here from
    the returned student and the teacher (and the teacher's accuracy on the labelled rows' labels)."""
    module = CountingTeacher()
    common = _small(val=(digits["xv"], digits["yv"]), test=(digits["xt"], digits["yt"]))
    pool = Transfer(Munge(), rows=300)
    result = kdistill.distill(module, "mlp", (digits["x"], digits["y"]), unlabeled=digits["u"], transfer=pool, **common)  # type: ignore[arg-type]
    assert result.report is not None
    rows = result.report.settings["transfer_rows"]
    assert (rows["labelled"]["rows"], rows["unlabeled"]["rows"], rows["generated"]["rows"]) == (150, 700, 300)
    result.student.eval()
    with torch.inference_mode():
        for name, x in (("labelled", digits["x"]), ("unlabeled", digits["u"])):
            rows_x = torch.as_tensor(x)
            student_top = result.student(rows_x).argmax(1)
            teacher_top = module(rows_x).argmax(1)
            expected = float((student_top == teacher_top).float().mean())
            assert rows[name]["student_teacher_agreement"] == pytest.approx(expected, abs=1e-6)
        teacher_top = module(torch.as_tensor(digits["x"])).argmax(1).numpy()
    assert rows["labelled"]["teacher_accuracy"] == pytest.approx(float(np.mean(teacher_top == digits["y"])))
    assert 0.0 <= rows["generated"]["student_teacher_agreement"] <= 1.0
    line = next(line for line in result.report.lines() if line.startswith("training rows:"))
    assert "labelled 150" in line and "unlabeled 700" in line and "generated 300" in line


def test_weight_decay_scales_with_the_labelled_share_of_the_transfer_set_unless_turned_off() -> None:
    """The engine's rule (TrainConfig.scale_weight_decay): N rows of which L labelled decay by wd * sqrt(L / N),
    fully labelled or streamed rows by wd; scale_weight_decay=False keeps wd."""
    torch.manual_seed(0)
    x, y = torch.randn(40, 3), torch.randint(0, 2, (40,))
    mask = torch.arange(40) < 10
    teacher_logits = torch.randn(40, 2)
    decays = {}
    for name, label_mask, scale in (("partly", mask, True), ("off", mask, False), ("full", None, True)):
        config = TrainConfig(epochs=1, batch_size=8, weight_decay=0.2, verbose=False, scale_weight_decay=scale)
        state = fit(nn.Linear(3, 2), KDLoss(), TransferSet(x, y, teacher_logits, label_mask=label_mask), config=config)
        decays[name] = state.optimizer.param_groups[0]["weight_decay"]
    assert decays["partly"] == pytest.approx(0.2 * (10 / 40) ** 0.5)
    assert decays["off"] == decays["full"] == 0.2
    assert effective_weight_decay(TrainConfig(weight_decay=0.1), 3_600, 53_600) == pytest.approx(
        0.1 * 0.259160, rel=1e-5
    )
    assert effective_weight_decay(TrainConfig(weight_decay=0.1), 0, 100) == 0.1  # teacher-only rows: as given


def test_scale_weight_decay_can_be_turned_off_from_the_settings(digits: dict[str, np.ndarray]) -> None:
    off = {"train": {"optimizer": {"scale_weight_decay": False}}}
    common = _small(epochs=1, test=(digits["xt"], digits["yt"]))
    result = kdistill.distill(
        CountingTeacher(), "mlp", (digits["x"], digits["y"]), unlabeled=digits["u"], settings=off, **common
    )
    assert result.report is not None and result.report.settings["weight_decay"] == defaults.WEIGHT_DECAY


def test_unlabeled_rows_go_through_the_cache(digits: dict[str, np.ndarray], tmp_path: object) -> None:
    module = CountingTeacher()
    common = _small(cache_dir=tmp_path, report=False, baseline=False)
    kdistill.distill(module, "mlp", (digits["x"], digits["y"]), unlabeled=digits["u"], **common)  # type: ignore[arg-type]
    assert 700 in module.calls
    key = cache_key(as_teacher(module), torch.from_numpy(digits["u"]), storage="fp32")
    entry = open_entry(tmp_path, key)  # type: ignore[arg-type]
    assert entry is not None and tuple(entry.shape) == (10,)
    module.calls.clear()
    kdistill.distill(module, "mlp", (digits["x"], digits["y"]), unlabeled=digits["u"], **common)  # type: ignore[arg-type]
    assert 700 not in module.calls  # read back, not recomputed


def test_bad_unlabeled_rows_are_named(digits: dict[str, np.ndarray]) -> None:
    rf = CountingTeacher()
    train = (digits["x"], digits["y"])
    with pytest.raises(
        DataError, match=r"unlabeled rows have shape \(63,\) per row but the training rows have \(64,\)"
    ):
        kdistill.distill(rf, "mlp", train, unlabeled=digits["u"][:, :63], **_small())  # type: ignore[arg-type]
    bad = digits["u"].copy()
    bad[5, 3] = np.nan
    with pytest.raises(DataError, match=r"unlabeled has NaN or inf in 1 row\(s\), first at row 5"):
        kdistill.distill(rf, "mlp", train, unlabeled=bad, **_small())  # type: ignore[arg-type]
    bad[5, 3], bad[9, 0] = 0.0, np.inf
    with pytest.raises(DataError, match=r"unlabeled has NaN or inf in 1 row\(s\), first at row 9"):
        kdistill.distill(rf, "mlp", train, unlabeled=bad, **_small())  # type: ignore[arg-type]
    with pytest.raises(DataError, match="takes the rows alone"):
        kdistill.distill(rf, "mlp", train, unlabeled=(digits["u"], None), **_small())  # type: ignore[arg-type]


def test_bad_generator_settings_fail_before_training(digits: dict[str, np.ndarray]) -> None:
    rf = CountingTeacher()
    few = (digits["x"][:4], digits["y"][:4])
    with pytest.raises(DataError, match="asks for 4 neighbours per row, but there are only 4 rows"):
        kdistill.distill(rf, "mlp", few, transfer=Munge(neighbours=4), **_small())  # type: ignore[arg-type]
    frame = pd.DataFrame(digits["x"], columns=[f"pixel{i}" for i in range(64)])
    with pytest.raises(DataError, match="categorical column 'colour' does not exist"):
        kdistill.distill(rf, "mlp", (frame, digits["y"]), transfer=Munge(categorical=["colour"]), **_small())  # type: ignore[arg-type]


def test_sklearn_fit_takes_unlabeled_rows_directly_and_through_a_pipeline(digits: dict[str, np.ndarray]) -> None:
    from sklearn.ensemble import RandomForestClassifier

    params = {"hidden": [16], "max_epochs": 2, "random_state": 0}
    clf = DistilledClassifier(RandomForestClassifier(20, random_state=0), **params)  # type: ignore[arg-type]
    clf.fit(digits["x"], digits["y"], unlabeled=digits["u"])
    assert clf.report_ is not None and clf.report_.settings["transfer_rows"]["unlabeled"]["rows"] == 700
    pipe = make_pipeline(StandardScaler(), DistilledClassifier(RandomForestClassifier(20, random_state=0), **params))  # type: ignore[arg-type]
    pipe.fit(digits["x"], digits["y"], distilledclassifier__unlabeled=digits["u"])
    assert pipe[-1].report_.settings["transfer_rows"]["unlabeled"]["rows"] == 700
    # scikit-learn's semi-supervised convention: label -1 marks an unlabeled row, and those rows travel in X
    marked = DistilledClassifier(RandomForestClassifier(20, random_state=0), unlabeled_marker=-1, **params)  # type: ignore[arg-type]
    x = np.vstack([digits["x"], digits["u"]])
    y = np.concatenate([digits["y"], np.full(700, -1)])
    scaled = make_pipeline(StandardScaler(), marked).fit(x, y)
    model = scaled[-1]
    assert model.report_.settings["transfer_rows"]["unlabeled"]["rows"] == 700
    assert -1 not in model.classes_ and len(model.classes_) == 10
    assert scaled.predict(digits["xt"][:5]).shape == (5,)


def test_unlabeled_rows_with_a_top_k_cache_train_kd_topk_and_report_agreement(
    digits: dict[str, np.ndarray], tmp_path: object
) -> None:
    result = kdistill.distill(
        CountingTeacher(),
        "mlp",
        (digits["x"], digits["y"]),
        test=(digits["xt"], digits["yt"]),
        unlabeled=digits["u"],
        cache_dir=tmp_path,
        cache_storage="topk:3",
        **_small(baseline=False),  # type: ignore[arg-type]
    )
    assert result.report is not None and result.report.settings["method"] == "kd"
    assert np.isfinite(result.history[-1]["train_loss"])
    rows = result.report.settings["transfer_rows"]
    assert 0.0 <= rows["unlabeled"]["student_teacher_agreement"] <= 1.0  # the teacher ran: top-k rows hold no logits


def test_dkd_takes_the_teachers_class_for_unlabelled_rows_and_ce_only_from_labelled_ones() -> None:
    from kdistill.losses.dkd import dkd_loss

    torch.manual_seed(1)
    student, teacher = torch.randn(6, 4), torch.randn(6, 4)
    target = torch.tensor([2, -100, 0, -100, 3, 1])
    filled = torch.where(target == -100, teacher.argmax(1), target)  # DKD's own rule without labels, per row
    terms = dkd_loss(student, teacher, target, temperature=2.0, ce_weight=1.0)
    reference = dkd_loss(student, teacher, filled, temperature=2.0, ce_weight=0.0)
    torch.testing.assert_close(terms["tckd"], reference["tckd"])
    torch.testing.assert_close(terms["nckd"], reference["nckd"])
    labelled = target != -100  # CE over the 4 labelled rows, each weighing 1/6 (the batch's rows)
    expected_ce = float(torch.nn.functional.cross_entropy(student[labelled], target[labelled], reduction="sum")) / 6
    assert float(terms["ce"]) == pytest.approx(expected_ce, rel=1e-6)


def test_unlabeled_rows_teach_a_regression_student_through_the_teacher_alone() -> None:
    """Issue 17 with issue 15: extra rows of a regressor's transfer set get the teacher's predictions as targets, and
    the label term never sees them (their filler is NaN for real-valued targets)."""
    from sklearn.datasets import make_friedman1
    from sklearn.ensemble import HistGradientBoostingRegressor

    import kdistill

    x, y = make_friedman1(n_samples=700, noise=0.5, random_state=0)
    x, y = x.astype(np.float32), y.astype(np.float32)
    teacher = HistGradientBoostingRegressor(max_iter=60, random_state=0).fit(x[:500], y[:500])
    common = {"epochs": 4, "batch_size": 64, "verbose": False, "profile": False, "baseline": False}
    with_rows = kdistill.distill(
        teacher, "mlp", (x[:100], y[:100]), unlabeled=x[100:500], test=(x[500:], y[500:]), **common
    )
    assert with_rows.report is not None and with_rows.report.settings["transfer_rows"]["unlabeled"]["rows"] == 400
    assert with_rows.report.settings["task"] == "regression"
    history = with_rows.history[-1]
    assert np.isfinite(history["train_loss"])  # NaN fillers never reach the loss
