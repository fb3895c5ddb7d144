"""The teacher-output cache: exact round trips, invalidation, corruption, resumable fills, the CLI, and the losses
that read cached targets (the precomputed ``kd`` path and ``kd_topk``)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import kdistill
from kdistill.cache import CacheKey, cache_entries, cached_teacher_outputs, fill_cache, open_entry
from kdistill.cli import main
from kdistill.data import fingerprint_arrays
from kdistill.errors import CacheError
from kdistill.losses.kd import kd_loss
from kdistill.losses.kd_topk import encode_topk, kd_topk_loss, pack_topk
from kdistill.teachers import Outputs, TorchTeacher


@pytest.fixture(autouse=True)
def _restore_global_rng() -> Iterator[None]:
    """These tests seed torch's global generator; later tests (in other files) get it back untouched."""
    with torch.random.fork_rng(devices=[]):
        yield


SRC = str(Path(kdistill.__file__).resolve().parents[1])


def _teacher(seed: int = 0, classes: int = 10) -> TorchTeacher:
    torch.manual_seed(seed)
    return TorchTeacher(nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, classes)))


def _data(rows: int = 300, seed: int = 0) -> torch.Tensor:
    return torch.as_tensor(np.random.default_rng(seed).normal(size=(rows, 8)).astype(np.float32))


def _true_logits(teacher: TorchTeacher, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return teacher.module(x).numpy()


def test_fp32_fp16_topk_round_trips(tmp_path: Path) -> None:
    teacher, x = _teacher(), _data()
    truth = _true_logits(teacher, x)
    fp32 = cached_teacher_outputs(teacher, x, cache_dir=tmp_path, storage="fp32", chunk_rows=128)
    assert isinstance(fp32.arrays["logits"], np.memmap)  # read memory-mapped, not loaded
    assert np.allclose(np.asarray(fp32.arrays["logits"]), truth, atol=1e-6)
    fp16 = cached_teacher_outputs(teacher, x, cache_dir=tmp_path, storage="fp16", chunk_rows=128)
    assert np.array_equal(np.asarray(fp16.arrays["logits"]), truth.astype(np.float16))
    topk = cached_teacher_outputs(teacher, x, cache_dir=tmp_path, storage="topk:3", chunk_rows=128)
    order = np.argsort(-truth, axis=1)
    assert np.array_equal(np.asarray(topk.arrays["indices"]), order[:, :3])
    assert np.allclose(np.asarray(topk.arrays["values"]), np.take_along_axis(truth, order[:, :3], 1), atol=1e-6)
    rest = np.take_along_axis(truth, order[:, 3:], 1)
    rest_lse = np.log(np.exp(rest - rest.max(1, keepdims=True)).sum(1)) + rest.max(1)
    assert np.allclose(np.asarray(topk.arrays["rest"]), rest_lse, atol=1e-5)
    assert topk.classes == 10
    assert fp16.nbytes() * 2 == fp32.nbytes()
    assert topk.nbytes() == 300 * (3 * 4 + 3 * 2 + 4)  # float32 values, int16 indices, float32 rest


def test_changed_teacher_or_data_gets_a_new_entry(tmp_path: Path) -> None:
    teacher, x = _teacher(), _data()
    first = cached_teacher_outputs(teacher, x, cache_dir=tmp_path)
    again = cached_teacher_outputs(_teacher(), x, cache_dir=tmp_path)  # same weights rebuilt: reused
    assert again.folder == first.folder
    changed = _teacher()
    with torch.no_grad():
        changed.module[0].bias[0] += 1e-3
    new_teacher = cached_teacher_outputs(changed, x, cache_dir=tmp_path)
    x2 = x.clone()
    x2[5, 3] += 1e-3
    new_data = cached_teacher_outputs(teacher, x2, cache_dir=tmp_path)
    assert len({first.folder, new_teacher.folder, new_data.folder}) == 3
    assert np.allclose(np.asarray(new_teacher.arrays["logits"]), _true_logits(changed, x), atol=1e-6)
    assert np.allclose(np.asarray(new_data.arrays["logits"])[5], _true_logits(teacher, x2)[5], atol=1e-6)
    assert len(cache_entries(tmp_path)) == 3


def test_corrupt_entry_is_reported_and_recomputed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    teacher, x = _teacher(), _data()
    entry = cached_teacher_outputs(teacher, x, cache_dir=tmp_path)
    path = entry.folder / "logits.npy"
    del entry
    raw = bytearray(path.read_bytes())
    raw[-7] ^= 0xFF  # one flipped byte in the last row
    path.write_bytes(bytes(raw))
    key = CacheKey(teacher.fingerprint(), fingerprint_arrays(x), "logits", "fp32")
    with pytest.raises(CacheError, match="corrupt"):
        open_entry(tmp_path, key)
    with caplog.at_level(logging.WARNING, logger="kdistill.cache"):
        repaired = cached_teacher_outputs(teacher, x, cache_dir=tmp_path)
    assert "corrupt" in caplog.text
    assert np.allclose(np.asarray(repaired.arrays["logits"]), _true_logits(teacher, x), atol=1e-6)


_KILLED_FILL = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np, torch
    sys.path.insert(0, {src!r})
    from torch import nn
    from kdistill.cache import cached_teacher_outputs
    from kdistill.teachers import TorchTeacher

    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 10))
    x = torch.as_tensor(np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32))

    class DiesOnThirdChunk(TorchTeacher):
        calls = 0
        def __call__(self, batch, *, features=()):
            DiesOnThirdChunk.calls += 1
            if DiesOnThirdChunk.calls == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            return super().__call__(batch, features=features)

    teacher = DiesOnThirdChunk(module)
    teacher.fingerprint = TorchTeacher(module).fingerprint
    cached_teacher_outputs(teacher, x, cache_dir=sys.argv[1], chunk_rows=64, batch_size=64)
    """
)


def test_killed_fill_resumes_and_matches_an_uninterrupted_fill(tmp_path: Path) -> None:
    script = tmp_path / "fill.py"
    script.write_text(_KILLED_FILL.format(src=SRC))
    killed = subprocess.run([sys.executable, str(script), str(tmp_path / "cache")], capture_output=True, timeout=120)
    assert killed.returncode == -9, killed.stderr.decode()
    (partial,) = cache_entries(tmp_path / "cache")
    assert not partial.complete
    assert len(list((tmp_path / "cache" / partial.name).glob("part-*.safetensors"))) == 2

    class Counting(TorchTeacher):
        rows = 0

        def __call__(self, batch: torch.Tensor, *, features: tuple[str, ...] = ()) -> Outputs:
            Counting.rows += len(batch)
            return super().__call__(batch, features=features)

    teacher, x = _teacher(), _data()
    resumed = cached_teacher_outputs(Counting(teacher.module), x, cache_dir=tmp_path / "cache", chunk_rows=64)
    assert Counting.rows == 300 - 2 * 64  # only the chunks the killed fill had not written
    fresh = cached_teacher_outputs(teacher, x, cache_dir=tmp_path / "fresh", chunk_rows=64)
    assert (resumed.folder / "logits.npy").read_bytes() == (fresh.folder / "logits.npy").read_bytes()
    assert not list(resumed.folder.glob("part-*"))


def test_cli_cache_ls_and_clear(tmp_path: Path) -> None:
    teacher, x = _teacher(), _data(50)
    key = CacheKey(teacher.fingerprint(), fingerprint_arrays(x), "logits", "fp16")
    fill_cache(tmp_path, key, teacher, x)
    env = os.environ | {"PYTHONPATH": SRC}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "kdistill.cli", "cache", *args, "--dir", str(tmp_path)]
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)

    listing = cli("ls")
    assert listing.returncode == 0
    assert key.digest() in listing.stdout
    assert "fp16" in listing.stdout
    assert "complete" in listing.stdout
    # the same entry point in-process (each subprocess pays the whole import of torch again)
    assert main(["cache", "clear", "nonexistent", "--dir", str(tmp_path)]) == 2  # names no entry: an error
    assert main(["cache", "clear", key.digest()[:6], "--dir", str(tmp_path)]) == 0
    assert cache_entries(tmp_path) == []


# ------------------------------------------------------------------------------------------------------- losses
def _numpy_kl_t2(teacher: np.ndarray, student: np.ndarray, temperature: float) -> float:
    def log_softmax(z: np.ndarray) -> np.ndarray:
        z = z / temperature
        z = z - z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))

    lp, lq = log_softmax(teacher), log_softmax(student)
    return float((np.exp(lp) * (lp - lq)).sum(1).mean() * temperature**2)


def test_kd_topk_matches_numpy_buckets_and_full_kd_when_k_covers_all() -> None:
    torch.manual_seed(1)
    student = torch.randn(12, 9)
    teacher = torch.randn(12, 9) * 2
    k, temperature = 3, 2.0
    out = kd_topk_loss(student, pack_topk(*encode_topk(teacher, k)), None, temperature=temperature)
    t, s = teacher.numpy(), student.numpy()
    order = np.argsort(-t, axis=1)
    top, rest = order[:, :k], order[:, k:]

    def buckets(z: np.ndarray) -> np.ndarray:
        tail = np.take_along_axis(z, rest, 1)
        lse = np.log(np.exp(tail - tail.max(1, keepdims=True)).sum(1)) + tail.max(1)
        return np.concatenate([np.take_along_axis(z, top, 1), lse[:, None]], axis=1)

    assert abs(float(out["kd"]) - _numpy_kl_t2(buckets(t), buckets(s), temperature)) < 1e-5
    for k_all in (8, 9):  # at most one class left in the bucket: exactly full KD
        target = torch.randint(0, 9, (12,))
        exact = kd_loss(student, teacher, target, temperature=temperature)["loss"]
        student_grad = student.clone().requires_grad_(True)
        packed = pack_topk(*encode_topk(teacher, k_all))
        via_topk = kd_topk_loss(student_grad, packed, target, temperature=temperature)["loss"]
        assert torch.allclose(via_topk, exact, atol=1e-5)
        (grad,) = torch.autograd.grad(via_topk, student_grad)
        assert bool(torch.isfinite(grad).all())


def test_distill_with_cache_reuses_entry_and_matches_uncached(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(240, 8)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))

    class Counting(TorchTeacher):
        rows = 0

        def __call__(self, batch: torch.Tensor, *, features: tuple[str, ...] = ()) -> Outputs:
            Counting.rows += len(batch)
            return super().__call__(batch, features=features)

    settings = {"epochs": 3, "verbose": False, "baseline": False, "profile": False, "report": False}
    plain = kdistill.distill(Counting(module), "mlp", (x, y), **settings)
    first = kdistill.distill(Counting(module), "mlp", (x, y), cache_dir=tmp_path, **settings)
    rows_before = Counting.rows
    second = kdistill.distill(Counting(module), "mlp", (x, y), cache_dir=tmp_path, **settings)
    assert Counting.rows == rows_before  # the teacher never ran: targets came from the cache
    losses = [[epoch["train_loss"] for epoch in run.history] for run in (plain, first, second)]
    assert losses[0] == losses[1] == losses[2]
    topk = kdistill.distill(module, "mlp", (x, y), cache_dir=tmp_path, cache_storage="topk:1", **settings)
    assert np.allclose([e["train_loss"] for e in topk.history], losses[0], atol=1e-5)  # 2 classes: top-1 is exact
