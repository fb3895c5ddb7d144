"""The new teacher adapters return what calling the model directly returns; ensembles combine as documented."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import kdistill
from kdistill.errors import TeacherError
from kdistill.teachers import (
    CallableTeacher,
    EnsembleTeacher,
    FileTeacher,
    OnnxTeacher,
    TorchTeacher,
    as_teacher,
    save_teacher_outputs,
)
from kdistill.teachers._convert import detect_output_kind


@pytest.fixture(autouse=True)
def _restore_global_rng() -> Iterator[None]:
    """These tests seed torch's global generator; later tests (in other files) get it back untouched."""
    with torch.random.fork_rng(devices=[]):
        yield


def _net(seed: int = 0, inputs: int = 6, classes: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(inputs, 16), nn.ReLU(), nn.Linear(16, classes)).eval()


def _numpy_log_softmax(z: np.ndarray) -> np.ndarray:
    shifted = z - z.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def test_detects_probabilities_and_logits() -> None:
    logits = torch.randn(32, 5) * 3
    assert detect_output_kind(logits) == "logits"
    assert detect_output_kind(torch.softmax(logits, 1)) == "probs"
    assert detect_output_kind(torch.sigmoid(logits)) == "logits"  # in [0, 1] but rows do not sum to 1


# ---------------------------------------------------------------------------------------------------------- ONNX
class _TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = _net(1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.body(x)
        return logits, torch.softmax(logits, dim=1)


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    pytest.importorskip("onnxruntime")
    model = _TwoHeads().eval()
    path = tmp_path_factory.mktemp("onnx") / "teacher.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.randn(3, 6),),
            str(path),
            input_names=["x"],
            output_names=["logits", "probs"],
            dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}, "probs": {0: "batch"}},
            dynamo=False,
        )
    return path, model


def test_onnx_teacher_matches_torch_within_1e5(onnx_model: tuple[Path, nn.Module]) -> None:
    path, model = onnx_model
    x = torch.randn(37, 6)
    expected_logits, expected_probs = model(x)
    teacher = OnnxTeacher(path, output_name="logits", output="logits")
    assert torch.allclose(teacher(x).logits, expected_logits.detach(), atol=1e-5)
    # the other output, chosen by name and detected as probabilities: log-probabilities come back
    by_probs = OnnxTeacher(path, output_name="probs")
    assert torch.allclose(by_probs(x).logits, torch.log(expected_probs.detach()), atol=1e-5)
    assert by_probs._kind == "probs"
    # extra outputs as features, and the path shortcut
    out = as_teacher(str(path))(x, features=("probs",))
    assert isinstance(as_teacher(str(path)), OnnxTeacher)
    assert torch.allclose(out.features["probs"], expected_probs.detach(), atol=1e-5)


def test_onnx_teacher_names_the_valid_outputs(onnx_model: tuple[Path, nn.Module]) -> None:
    with pytest.raises(TeacherError, match="logits"):
        OnnxTeacher(onnx_model[0], output_name="scores")


# ---------------------------------------------------------------------------------------------------- transformers
def test_hf_teacher_from_config_and_folder_match_the_model(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=3,
        pad_token_id=0,
    )
    teacher = kdistill.teachers.HFTeacher.from_config(config, seed=0)
    ids = torch.randint(1, 40, (5, 9))
    ids[0, 6:] = 0  # padding, masked by the adapter
    with torch.no_grad():
        expected = teacher.module(input_ids=ids, attention_mask=(ids != 0).long()).logits
    out = teacher(ids.float(), features=("bert.encoder.layer.0",))  # data reach kdistill as float32
    assert torch.allclose(out.logits, expected, atol=1e-6)
    assert out.features["bert.encoder.layer.0"].shape == (5, 9, 16)
    teacher.module.save_pretrained(tmp_path / "bert")
    loaded = kdistill.teachers.HFTeacher.from_pretrained(tmp_path / "bert")
    assert torch.allclose(loaded(ids.float()).logits, expected, atol=1e-6)
    assert loaded.fingerprint() == teacher.fingerprint()
    assert isinstance(as_teacher(teacher.module), kdistill.teachers.HFTeacher)
    with pytest.raises(TeacherError, match=r"config\.json"):
        kdistill.teachers.HFTeacher.from_pretrained(tmp_path / "missing")


# -------------------------------------------------------------------------------------------------------- callable
def test_callable_teacher_returns_the_function_output_batched() -> None:
    model = _net(2)
    seen_batches: list[int] = []

    def remote_probs(batch: np.ndarray) -> np.ndarray:
        seen_batches.append(len(batch))
        with torch.no_grad():
            return torch.softmax(model(torch.as_tensor(batch)), 1).numpy()

    teacher = CallableTeacher(remote_probs, batch_size=16)
    x = torch.randn(40, 6)
    logits = teacher(x).logits
    with torch.no_grad():
        expected = torch.log_softmax(model(x), 1)
    assert torch.allclose(logits, expected, atol=1e-5)  # probabilities detected, returned as log-probabilities
    assert seen_batches == [16, 16, 8]
    assert isinstance(as_teacher(remote_probs), CallableTeacher)


def test_callable_teacher_retries_with_exponential_backoff() -> None:
    failures = {"left": 2}
    sleeps: list[float] = []

    def flaky(batch: np.ndarray) -> np.ndarray:
        if failures["left"]:
            failures["left"] -= 1
            raise ConnectionError("remote busy")
        return np.ones((len(batch), 3), dtype=np.float32)

    teacher = CallableTeacher(flaky, retries=3, backoff_s=0.5, sleep=sleeps.append, output="logits")
    assert teacher(torch.zeros(4, 2)).logits.shape == (4, 3)
    assert sleeps == [0.5, 1.0]

    def always_down(batch: np.ndarray) -> np.ndarray:
        raise ConnectionError("down")

    with pytest.raises(TeacherError, match="failed 3 times"):
        CallableTeacher(always_down, retries=2, sleep=lambda _: None)(torch.zeros(2, 2))


def test_callable_teacher_never_asks_again_for_answered_rows(tmp_path: Path) -> None:
    model = _net(3)
    asked: list[np.ndarray] = []

    def remote(batch: np.ndarray) -> np.ndarray:
        asked.append(batch.copy())
        with torch.no_grad():
            return model(torch.as_tensor(batch)).numpy()

    x = torch.randn(100, 6)
    first = CallableTeacher(remote, journal=tmp_path / "answers", batch_size=32)
    first(x[:50])  # the run is interrupted after half the rows
    resumed = CallableTeacher(remote, journal=tmp_path / "answers", batch_size=32)  # a new process, same journal
    asked.clear()
    logits = resumed(x).logits
    assert resumed.rows_requested == 50
    assert np.array_equal(np.concatenate(asked), x[50:].numpy())
    with torch.no_grad():
        assert torch.allclose(logits, model(x), atol=1e-6)
    resumed(x)  # a second epoch: nothing asked
    assert resumed.rows_requested == 50


# ------------------------------------------------------------------------------------------------------------ file
@pytest.mark.parametrize("suffix", [".npy", ".safetensors", ".parquet"])
def test_file_teacher_serves_precomputed_rows_by_content(tmp_path: Path, suffix: str) -> None:
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    rng = np.random.default_rng(0)
    inputs = rng.normal(size=(30, 5)).astype(np.float32)
    logits = rng.normal(size=(30, 4)).astype(np.float32) * 2
    path = tmp_path / f"outputs{suffix}"
    if suffix == ".npy":
        save_teacher_outputs(path, logits)
    else:  # rows stored shuffled, with their ids
        order = rng.permutation(30)
        save_teacher_outputs(path, logits[order], row_ids=order)
    teacher = FileTeacher(path, inputs=inputs)
    batch = rng.permutation(30)[:12]
    assert np.allclose(teacher(torch.as_tensor(inputs[batch])).logits.numpy(), logits[batch])
    with pytest.raises(TeacherError, match="not in"):
        teacher(torch.as_tensor(inputs[:3] + 1.0))


def test_file_teacher_reads_probabilities_by_name(tmp_path: Path) -> None:
    inputs = np.eye(3, dtype=np.float32)
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]], dtype=np.float32)
    save_teacher_outputs(tmp_path / "p.safetensors", probs, kind="probs")
    teacher = FileTeacher(tmp_path / "p.safetensors", inputs=inputs)
    assert np.allclose(torch.softmax(teacher(torch.as_tensor(inputs)).logits, 1).numpy(), probs, atol=1e-6)


# -------------------------------------------------------------------------------------------------------- ensemble
def test_ensemble_arithmetic_against_numpy() -> None:
    members = [_net(10), _net(11), _net(12)]
    weights = [1.0, 2.0, 1.0]
    x = torch.randn(9, 6)
    with torch.no_grad():
        z = np.stack([m(x).numpy() for m in members], axis=1)  # (batch, members, classes)
    w = np.asarray(weights) / sum(weights)

    by_logits = EnsembleTeacher(members, weights=weights, combine="logits")(x, features=("members",))
    assert np.allclose(by_logits.logits.numpy(), (w[None, :, None] * z).sum(1), atol=1e-5)
    assert np.allclose(by_logits.features["members"].numpy(), z, atol=1e-6)

    by_probs = EnsembleTeacher(members, weights=weights, combine="probs")(x)
    mixture = (w[None, :, None] * np.exp(_numpy_log_softmax_3d(z))).sum(1)
    assert np.allclose(torch.softmax(by_probs.logits, 1).numpy(), mixture, atol=1e-6)
    assert np.allclose(by_probs.logits.numpy(), np.log(mixture), atol=1e-5)
    assert "members" not in by_probs.features


def _numpy_log_softmax_3d(z: np.ndarray) -> np.ndarray:
    return np.stack([_numpy_log_softmax(z[:, i]) for i in range(z.shape[1])], axis=1)


def test_ensemble_fingerprint_and_mixed_members(tmp_path: Path) -> None:
    torch_member = _net(20)
    x = torch.randn(8, 6)
    with torch.no_grad():
        direct = torch_member(x).numpy()

    def remote(batch: np.ndarray) -> np.ndarray:
        return direct[: len(batch)] * 0 + np.asarray(torch_member(torch.as_tensor(batch)).detach().numpy())

    ensemble = as_teacher([torch_member, CallableTeacher(remote, output="logits")])
    assert isinstance(ensemble, EnsembleTeacher)
    # two identical members: the mixture of their probabilities is their probabilities
    assert np.allclose(ensemble(x).logits.numpy(), _numpy_log_softmax(direct), atol=1e-5)
    a = EnsembleTeacher([TorchTeacher(_net(1)), TorchTeacher(_net(2))], weights=[1, 1]).fingerprint()
    b = EnsembleTeacher([TorchTeacher(_net(1)), TorchTeacher(_net(2))], weights=[1, 2]).fingerprint()
    assert a != b
    with pytest.raises(TeacherError, match="weights"):
        EnsembleTeacher([_net(1)], weights=[1.0, 2.0])


def test_list_teachers_names_every_adapter(capsys: pytest.CaptureFixture[str]) -> None:
    from kdistill.cli import main

    assert main(["list", "teachers"]) == 0
    listed = capsys.readouterr().out
    for name in ("sklearn", "torch", "hf", "onnx", "callable", "file", "ensemble"):
        assert f"\n{name} " in f"\n{listed}"
