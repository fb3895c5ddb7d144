"""Methods as a user runs them: through ``kdistill.distill`` and the engine, with live teachers, learned projectors,
composition, the CLI listing, and the errors a user sees."""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from torch import nn

import kdistill
from kdistill.engine import Callback, TrainConfig, TransferSet, fit
from kdistill.errors import KdistillError, MethodError, StudentError
from kdistill.losses import LOSSES, CRDLoss, DeepSupervision, FitNet, Projector, TeacherBank, compose_methods, get_loss
from kdistill.students import CNN
from kdistill.teachers import Outputs

ROWS, LENGTH, CLASSES = 96, 16, 3


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(ROWS, LENGTH)).astype(np.float32)
    y = (x[:, :4].sum(axis=1) > 0).astype(np.int64) + (x[:, 8:].sum(axis=1) > 1).astype(np.int64)
    return x, y


@pytest.fixture(scope="module")
def teacher() -> CNN:
    torch.manual_seed(0)
    return CNN((LENGTH,), CLASSES, channels=(8, 8, 8)).eval()


def _distill(teacher: nn.Module, data: tuple[np.ndarray, np.ndarray], **kwargs: object) -> kdistill.DistillResult:
    settings: dict[str, object] = {
        "val": data,
        "epochs": 2,
        "batch_size": 32,
        "baseline": False,
        "profile": False,
        "verbose": False,
        "student_params": {"channels": (4, 4, 4)},
    }
    return kdistill.distill(teacher, "cnn", data, **(settings | kwargs))  # type: ignore[arg-type]


def test_composed_kd_and_fitnet_report_every_term_and_sum_them(teacher: CNN, data: tuple) -> None:
    result = _distill(teacher, data, method={"kd": 1.0, "fitnet": 0.5}, soft_weight=0.3)
    last = result.history[-1]
    assert {"train_kd/ce", "train_kd/kd", "train_fitnet/hint"} <= set(last)
    assert "train_fitnet/ce" not in last, "the hard-label term must be counted once"
    # per-epoch means are linear, so the total's mean is the weighted sum of the terms' means
    expected = 0.7 * last["train_kd/ce"] + 0.3 * last["train_kd/kd"] + 0.5 * last["train_fitnet/hint"]
    assert last["train_loss"] == pytest.approx(expected, rel=1e-4)
    assert result.report is not None
    assert set(result.report.settings["loss_terms"]) >= {"kd/kd", "fitnet/hint", "loss"}


class _Snapshot(Callback):
    def on_train_begin(self, state: object) -> None:
        groups = state.optimizer.param_groups  # type: ignore[attr-defined]
        self.optimizer_ids = {id(p) for group in groups for p in group["params"]}


def test_learned_projector_is_built_before_the_optimizer_and_trained(teacher: CNN, data: tuple) -> None:
    x, y = (torch.as_tensor(a) for a in data)
    torch.manual_seed(1)
    student = CNN((LENGTH,), CLASSES, channels=(4, 4, 4))
    loss = FitNet(student_layers=["features.2", "features"], teacher_layers=["features.2", "features"])
    snapshot = _Snapshot()
    initial: dict[str, torch.Tensor] = {}

    class Remember(Callback):
        def on_train_begin(self, state: object) -> None:
            initial.update({k: v.clone() for k, v in loss.state_dict().items()})

    adapter = kdistill.as_teacher(teacher)
    fit(
        student,
        loss,
        TransferSet(x, y, None),
        config=TrainConfig(epochs=2, batch_size=32, verbose=False),
        callbacks=[snapshot, Remember()],
        teacher=adapter,
    )
    assert [p.mode for p in loss.projectors] == ["conv", "conv"]  # (4 ch, 8) -> (8 ch, 8); (4, 2) -> (8, 2)
    assert all(id(p) in snapshot.optimizer_ids for p in loss.parameters())
    changed = [not torch.equal(initial[k], v) for k, v in loss.state_dict().items()]
    assert initial
    assert all(changed), "every projector weight must move during training"


def test_wrong_layer_name_lists_the_valid_ones(teacher: CNN, data: tuple) -> None:
    with pytest.raises(StudentError, match=r"features\.2") as caught:
        _distill(teacher, data, method="fitnet", method_params={"student_layers": "layer3"})
    assert "layer3" in str(caught.value)
    with pytest.raises(StudentError, match="valid names"):
        _distill(teacher, data, method="at", method_params={"teacher_layers": "encoder.blocks.2"})


def test_crd_memory_bank_covers_the_transfer_set_and_moves(teacher: CNN, data: tuple) -> None:
    loss = CRDLoss(negatives=16, embed_dim=8)
    result = _distill(teacher, data, method=loss)
    assert loss.student_memory.shape == (ROWS, 8)
    assert torch.allclose(loss.teacher_memory.norm(dim=1), torch.ones(ROWS), atol=1e-5)
    assert np.isfinite(result.history[-1]["train_crd"])


def test_byot_heads_train_but_the_student_stays_plain(data: tuple) -> None:
    x, y = data
    loss = DeepSupervision()
    result = kdistill.distill(
        CNN((LENGTH,), CLASSES, channels=(8, 8, 8)).eval(),
        "cnn",
        data,
        method=loss,
        epochs=2,
        baseline=False,
        report=False,
        verbose=False,
    )
    assert len(loss.heads) == 2
    assert {"train_heads_kd", "train_heads_hint"} <= set(result.history[-1])
    assert not any("heads" in key for key in result.student.state_dict())
    assert result.predict(x).shape == y.shape


class _Ensemble:
    """A minimal multi-teacher adapter following the ensemble convention: features=("members",) gives
    (batch, members, classes)."""

    classes = None

    def __init__(self, members: Sequence[nn.Module]) -> None:
        self.members = [kdistill.as_teacher(m) for m in members]

    @property
    def num_classes(self) -> int:
        return CLASSES

    def fingerprint(self) -> str:
        return "ensemble"

    def __call__(self, x: torch.Tensor, *, features: Sequence[str] = ()) -> Outputs:
        logits = torch.stack([m(x).logits for m in self.members], dim=1)
        mean = torch.log(torch.softmax(logits, dim=2).mean(dim=1))
        return Outputs(mean, {"members": logits} if "members" in features else {})


@pytest.mark.parametrize("name", ["multi_avg", "multi_conf"])
def test_multi_teacher_methods_train_from_an_ensemble(name: str, data: tuple) -> None:
    torch.manual_seed(2)
    members = [CNN((LENGTH,), CLASSES, channels=(8, 8, 8)).eval() for _ in range(3)]
    result = _distill(_Ensemble(members), data, method=name)  # type: ignore[arg-type]
    assert np.isfinite(result.history[-1]["train_kd"])


def test_projector_shapes() -> None:
    cases = [
        ((4, 8), (4, 8), "identity", 0),
        ((16,), (32,), "linear", 16 * 32 + 32),
        ((4, 10), (8, 5), "conv", 4 * 8 + 8),
        ((4, 3), (4, 6), "conv", 0),
        ((4, 6, 6), (8, 3, 3), "conv", 4 * 8 + 8),
        ((4, 5), (12,), "flatten", 20 * 12 + 12),
    ]
    for student_shape, teacher_shape, mode, parameters in cases:
        projector = Projector(student_shape, teacher_shape)
        assert projector.mode == mode
        assert sum(p.numel() for p in projector.parameters()) == parameters
        assert projector(torch.randn(2, *student_shape)).shape == (2, *teacher_shape)


def test_unknown_names_and_bad_params_are_clear_errors() -> None:
    with pytest.raises(KdistillError, match="did you mean 'dkd'"):
        get_loss("dkdd")
    with pytest.raises(KdistillError, match="valid names"):
        compose_methods(["kd", "fitnets"])
    with pytest.raises(MethodError, match="not among the methods"):
        compose_methods(["kd"], {"fitnet": {}})
    with pytest.raises(MethodError, match="temperature must be > 0, got -1"):
        get_loss("dkd", temperature=-1)


def test_compose_sets_ce_weight_zero_after_the_first_method() -> None:
    composed = compose_methods(["dkd", "fitnet", "rkd"], {"rkd": {"ce_weight": 0.5}})
    components = composed.components
    assert components["dkd"].ce_weight == 1.0  # type: ignore[attr-defined]
    assert components["fitnet"].ce_weight == 0.0  # type: ignore[attr-defined]
    assert components["rkd"].ce_weight == 0.5  # type: ignore[attr-defined]
    assert composed.student_features == ("features",)


def test_cli_lists_every_method() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "kdistill.cli", "list", "methods"], capture_output=True, text=True, check=True
    )
    listed = {line.split()[0] for line in done.stdout.splitlines() if line.strip()}
    assert set(LOSSES) <= listed


def test_loss_objects_are_not_shared_between_runs_by_accident(teacher: CNN, data: tuple) -> None:
    """Running the same FitNet object twice rebuilds its projectors for the new run (no stale shapes)."""
    loss = FitNet()
    _distill(teacher, data, method=loss)
    first = copy.deepcopy(loss.projectors)
    _distill(teacher, data, method=loss, student_params={"channels": (2, 2, 2)})
    assert first[0].student_shape == (4, 2)
    assert loss.projectors[0].student_shape == (2, 2)


def test_teacher_bank_serves_the_live_teachers_rows(teacher: CNN, data: tuple) -> None:

    x = torch.as_tensor(data[0])
    adapter = kdistill.as_teacher(teacher)
    bank = TeacherBank.build(adapter, x, ("features", "features.2"), batch_size=40)
    assert bank is not None
    index = torch.tensor([5, 77, 0, 41])
    live = adapter(x[index], features=("features", "features.2"))
    served = bank.select(index)
    torch.testing.assert_close(served.logits, live.logits)
    for name in ("features", "features.2"):
        torch.testing.assert_close(served.features[name], live.features[name])
    assert torch.equal(served.index, index)
    assert TeacherBank.build(adapter, x, ("features",), max_numbers=100) is None  # too big: run live
    assert TeacherBank.build(adapter, x, ()) is None


def test_live_teacher_path_when_features_do_not_fit_in_memory(
    teacher: CNN, data: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Beyond the bank's size limit the engine runs the teacher on each batch; its inference-mode outputs must
    still be usable as targets (cloned out of inference mode)."""
    monkeypatch.setattr(TeacherBank, "build", classmethod(lambda cls, *args, **kwargs: None))
    result = _distill(teacher, data, method=["kd", "fitnet", "crd"], method_params={"crd": {"negatives": 8}})
    assert np.isfinite(result.history[-1]["train_fitnet/hint"])
    assert np.isfinite(result.history[-1]["train_crd/crd"])


def test_a_teacher_without_features_is_a_clear_error(data: tuple) -> None:
    from sklearn.linear_model import LogisticRegression

    forest = LogisticRegression().fit(*data)
    with pytest.raises(KdistillError, match="no intermediate features"):
        kdistill.distill(forest, "cnn", data, method="fitnet", epochs=1, baseline=False, report=False, verbose=False)
