"""The teacher-output cache: exact round trips, content-keyed chunks (rows added to a set reuse the rest), mapping
inputs and token / embedding outputs, whole-set outputs, invalidation, corruption, resumable fills, two processes
filling at once, torchrun, the CLI, and the losses that read cached targets (the precomputed ``kd`` path and
``kd_topk``)."""

from __future__ import annotations

import json
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
from kdistill.cache import (
    CacheKey,
    cache_entries,
    cache_key,
    cached_teacher_outputs,
    open_entry,
    read_entry,
    row_fingerprints,
    set_fingerprint,
)
from kdistill.cli import main
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


class Counting(TorchTeacher):
    """A torch teacher that counts the rows it is run on (per instance) and the calls."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        self.rows = 0
        self.calls = 0

    def __call__(self, batch: torch.Tensor, *, features: tuple[str, ...] = ()) -> Outputs:
        self.rows += len(batch)
        self.calls += 1
        return super().__call__(batch, features=features)


def _teacher(seed: int = 0, classes: int = 10) -> Counting:
    torch.manual_seed(seed)
    return Counting(nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, classes)))


def _data(rows: int = 300, seed: int = 0) -> torch.Tensor:
    return torch.as_tensor(np.random.default_rng(seed).normal(size=(rows, 8)).astype(np.float32))


def _true_logits(teacher: TorchTeacher, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return teacher.module(x).numpy()


def _numpy_topk(dense: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k along the last axis, largest first, and the log-sum-exp of the other classes, in numpy."""
    order = np.argsort(-dense, axis=-1, kind="stable")
    top, other = order[..., :k], order[..., k:]
    rest = np.take_along_axis(dense, other, -1).astype(np.float64)
    peak = rest.max(-1, keepdims=True)
    lse = np.log(np.exp(rest - peak).sum(-1)) + peak[..., 0]
    return np.take_along_axis(dense, top, -1), top, lse


def test_fp32_fp16_topk_round_trips(tmp_path: Path) -> None:
    teacher, x = _teacher(), _data()
    truth = _true_logits(teacher, x)
    fp32 = cached_teacher_outputs(teacher, x, cache_dir=tmp_path, storage="fp32", chunk_rows=128)
    assert isinstance(fp32.arrays["logits"], np.memmap)  # read memory-mapped, not loaded
    assert np.allclose(np.asarray(fp32.arrays["logits"]), truth, atol=1e-6)
    assert fp32.shape == (10,) and fp32.classes == 10 and fp32.rows == 300
    fp16 = cached_teacher_outputs(teacher, x, cache_dir=tmp_path, storage="fp16", chunk_rows=128)
    assert np.array_equal(np.asarray(fp16.arrays["logits"]), truth.astype(np.float16))
    topk = cached_teacher_outputs(teacher, x, cache_dir=tmp_path, storage="topk:3", chunk_rows=128)
    values, indices, rest = _numpy_topk(truth, 3)
    got_values, got_indices, got_rest = topk.topk()
    assert got_indices.dtype == torch.int16
    assert np.array_equal(got_indices.numpy(), indices)
    assert np.allclose(got_values.numpy(), values, atol=1e-6)
    assert np.allclose(got_rest.numpy(), rest, atol=1e-5)
    packed = topk.teacher_targets()  # what kd_topk reads today: [values | indices | rest]
    assert torch.equal(packed, pack_topk(got_values, got_indices.long(), got_rest))
    assert topk.classes == 10
    assert fp16.nbytes() * 2 == fp32.nbytes()
    assert topk.nbytes() == 300 * (3 * 4 + 3 * 2 + 4)  # float32 values, int16 indices, float32 rest
    with pytest.raises(CacheError, match="not top-k"):
        fp32.topk()


def test_appended_rows_compute_only_the_new_rows(tmp_path: Path) -> None:
    teacher, x = _teacher(), _data(500)
    cached_teacher_outputs(teacher, x, cache_dir=tmp_path, chunk_rows=64)
    assert teacher.rows == 500
    larger = torch.cat([x, _data(100, seed=1)])  # 20% more rows, appended
    entry = cached_teacher_outputs(teacher, larger, cache_dir=tmp_path, chunk_rows=64)
    assert teacher.rows == 600  # only the 100 new rows were computed
    assert np.allclose(np.asarray(entry.arrays["logits"]), _true_logits(teacher, larger), atol=1e-6)


def test_shuffled_superset_and_duplicates_reuse_the_rest(tmp_path: Path) -> None:
    teacher, x = _teacher(), _data(500)
    cached_teacher_outputs(teacher, x, cache_dir=tmp_path, chunk_rows=64)
    new_rows = _data(100, seed=2)
    pool = torch.cat([x, new_rows, new_rows[:10]])  # ten new rows twice: each distinct row is computed once
    shuffled = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(0))]
    entry = cached_teacher_outputs(teacher, shuffled, cache_dir=tmp_path, chunk_rows=64)
    assert teacher.rows == 600
    view = entry.teacher_targets()
    assert view.shape == (610, 10)
    assert np.allclose(view.numpy(), _true_logits(teacher, shuffled), atol=1e-6)  # aligned row for row
    subset = shuffled[50:150]  # every row seen before: the teacher does not run at all
    again = cached_teacher_outputs(teacher, subset.numpy(), cache_dir=tmp_path, chunk_rows=64)  # numpy: the same rows
    assert teacher.rows == 600
    assert np.array_equal(np.asarray(again.arrays["logits"]), view.numpy()[50:150])


def test_row_fingerprints_hash_bytes_dtypes_and_fields() -> None:
    ids = torch.tensor([[1, 2, 3], [1, 2, 3], [1, 2, 4]])
    rows = row_fingerprints(ids)
    assert rows.shape == (3, 16) and rows.dtype == np.uint8
    assert np.array_equal(rows[0], rows[1]) and not np.array_equal(rows[0], rows[2])
    assert not np.array_equal(row_fingerprints(ids.int())[0], rows[0])  # the same numbers as int32: another row
    mask = torch.ones_like(ids)
    both = row_fingerprints({"input_ids": ids, "attention_mask": mask})
    assert not np.array_equal(both[0], rows[0])
    renamed = row_fingerprints({"token_ids": ids, "attention_mask": mask})
    assert not np.array_equal(renamed[0], both[0])
    assert set_fingerprint(both) != set_fingerprint(both[::-1].copy())  # the set's order is part of its key
    with pytest.raises(CacheError, match="same number of rows"):
        row_fingerprints({"input_ids": ids, "attention_mask": mask[:2]})
    with pytest.raises(CacheError, match="not a tensor"):
        row_fingerprints({"input_ids": [[1, 2]]})  # type: ignore[dict-item]


class _TokenModel(nn.Module):
    """(rows, seq) int64 ids and a mask -> (rows, seq, vocab) token logits (masked positions zeroed)."""

    def __init__(self, vocab: int = 40, dim: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        assert input_ids.dtype == torch.int64  # integer dtypes reach the teacher as they are
        return self.head(self.embed(input_ids)) * attention_mask.unsqueeze(-1)


class _TokenTeacher(TorchTeacher):
    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        self.rows = 0

    def __call__(self, batch: dict[str, torch.Tensor], *, features: tuple[str, ...] = ()) -> Outputs:  # type: ignore[override]
        self.rows += len(batch["input_ids"])
        with torch.inference_mode():
            return Outputs(self.module(**batch))


def _tokens(rows: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 40, (rows, 7), generator=generator)
    lengths = torch.randint(3, 8, (rows,), generator=generator)
    return {"input_ids": ids, "attention_mask": (torch.arange(7) < lengths[:, None]).long()}


def test_token_logits_from_a_mapping_dense_and_topk_per_token(tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher = _TokenTeacher(_TokenModel())
    inputs = _tokens(50, seed=0)
    with torch.no_grad():
        truth = teacher.module(**inputs).numpy()
    dense = cached_teacher_outputs(teacher, inputs, cache_dir=tmp_path, kind="token_logits", chunk_rows=16)
    assert dense.shape == (7, 40) and dense.classes == 40
    assert np.allclose(np.asarray(dense.arrays["logits"]), truth, atol=1e-6)
    topk = cached_teacher_outputs(teacher, inputs, cache_dir=tmp_path, kind="token_logits", storage="topk:4")
    values, indices, rest = (t.numpy() for t in topk.topk())
    assert values.shape == (50, 7, 4) and indices.shape == (50, 7, 4) and rest.shape == (50, 7)
    want_values, _, want_rest = _numpy_topk(truth, 4)
    assert np.allclose(values, want_values, atol=1e-6)
    assert np.allclose(np.take_along_axis(truth, indices.astype(np.int64), -1), want_values, atol=1e-6)  # ties
    assert np.allclose(rest, want_rest, atol=1e-4)
    assert topk.teacher_targets().shape == (50, 7, 9)  # packed per token: [values | indices | rest]
    rows_before = teacher.rows
    more = {name: torch.cat([value, _tokens(10, seed=1)[name]]) for name, value in inputs.items()}
    bigger = cached_teacher_outputs(teacher, more, cache_dir=tmp_path, kind="token_logits", chunk_rows=16)
    assert teacher.rows - rows_before == 10
    with torch.no_grad():
        assert np.allclose(np.asarray(bigger.arrays["logits"]), teacher.module(**more).numpy(), atol=1e-6)


def test_embeddings_fp16_and_topk_refused(tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher = TorchTeacher(nn.Linear(8, 5))  # (rows, 5) embeddings
    x = _data(40)
    entry = cached_teacher_outputs(teacher, x, cache_dir=tmp_path, kind="embeddings", storage="fp16")
    assert entry.shape == (5,)
    assert np.array_equal(np.asarray(entry.arrays["logits"]), _true_logits(teacher, x).astype(np.float16))
    with pytest.raises(CacheError, match="embeddings"):
        cached_teacher_outputs(teacher, x, cache_dir=tmp_path, kind="embeddings", storage="topk:2")
    with pytest.raises(CacheError, match="keeps 9 of 5"):
        cached_teacher_outputs(teacher, x, cache_dir=tmp_path, storage="topk:9")


def test_whole_set_compute_is_keyed_by_set_labels_and_kind(tmp_path: Path) -> None:
    teacher, x = _teacher(), _data(60)
    y = torch.arange(60) % 3
    calls: list[int] = []

    def out_of_fold(inputs: torch.Tensor) -> torch.Tensor:  # stands in for refitting clones on folds
        calls.append(len(inputs))
        return torch.as_tensor(_true_logits(teacher, inputs)) * 2.0

    settings = {"cache_dir": tmp_path, "compute": out_of_fold, "labels": y, "meta": {"classes": [0, 1, 2]}}
    first = cached_teacher_outputs(teacher, x, kind="oof:folds=5:seed=0", **settings)
    again = cached_teacher_outputs(teacher, x, kind="oof:folds=5:seed=0", **settings)
    assert calls == [60] and teacher.rows == 0  # computed once, as one whole set; the teacher never ran per chunk
    assert again.folder == first.folder and again.meta == {"classes": [0, 1, 2]}
    assert np.allclose(np.asarray(first.arrays["logits"]), 2.0 * _true_logits(teacher, x), atol=1e-6)
    cached_teacher_outputs(teacher, x, kind="oof:folds=3:seed=0", **settings)
    cached_teacher_outputs(teacher, x, kind="oof:folds=5:seed=0", **settings | {"labels": y.flip(0)})
    assert calls == [60, 60, 60]
    larger = torch.cat([x, _data(12, seed=1)])
    cached_teacher_outputs(teacher, larger, kind="oof:folds=5:seed=0", **settings | {"labels": torch.arange(72) % 3})
    assert calls == [60, 60, 60, 72]  # a whole-set output is recomputed for the whole larger set
    with pytest.raises(CacheError, match="compute returned"):
        cached_teacher_outputs(teacher, x[:5], cache_dir=tmp_path, kind="oof", compute=lambda inputs: torch.zeros(3, 2))
    with pytest.raises(CacheError, match="labels key a whole-set compute only"):
        cached_teacher_outputs(teacher, x, cache_dir=tmp_path, labels=y)


def test_reuse_false_runs_the_teacher_again_and_rebuilds_the_entry(tmp_path: Path) -> None:
    teacher, x = _teacher(), _data(100)
    first = cached_teacher_outputs(teacher, x, cache_dir=tmp_path, chunk_rows=32)
    with torch.no_grad():  # the same fingerprint, other outputs: what reuse=False is for
        teacher.module[2].bias += 1.0
    teacher.fingerprint = lambda: first.key.teacher  # type: ignore[method-assign]
    assert cached_teacher_outputs(teacher, x, cache_dir=tmp_path, chunk_rows=32).folder == first.folder
    assert teacher.rows == 100  # reused, stale by construction
    fresh = cached_teacher_outputs(teacher, x, cache_dir=tmp_path, chunk_rows=32, reuse=False)
    assert teacher.rows == 200
    assert np.allclose(np.asarray(fresh.arrays["logits"]), _true_logits(teacher, x), atol=1e-6)
    again = cached_teacher_outputs(teacher, x[:50], cache_dir=tmp_path, chunk_rows=32)  # from the rewritten chunks
    assert teacher.rows == 200
    assert np.allclose(np.asarray(again.arrays["logits"]), _true_logits(teacher, x[:50]), atol=1e-6)


def test_changed_teacher_or_data_gets_a_new_entry(tmp_path: Path) -> None:
    teacher, x = _teacher(), _data()
    first = cached_teacher_outputs(teacher, x, cache_dir=tmp_path)
    again = cached_teacher_outputs(_teacher(), x, cache_dir=tmp_path)  # same weights rebuilt: reused
    assert again.folder == first.folder
    changed = _teacher()
    with torch.no_grad():
        changed.module[0].bias[0] += 1e-3
    new_teacher = cached_teacher_outputs(changed, x, cache_dir=tmp_path)
    assert changed.rows == 300  # another teacher: another store, nothing reused
    x2 = x.clone()
    x2[5, 3] += 1e-3
    rows_before = teacher.rows
    new_data = cached_teacher_outputs(teacher, x2, cache_dir=tmp_path)
    assert teacher.rows - rows_before == 1  # only the changed row is new
    assert len({first.folder, new_teacher.folder, new_data.folder}) == 3
    assert np.allclose(np.asarray(new_teacher.arrays["logits"]), _true_logits(changed, x), atol=1e-6)
    assert np.allclose(np.asarray(new_data.arrays["logits"]), _true_logits(teacher, x2), atol=1e-6)
    statuses = sorted(info.status for info in cache_entries(tmp_path))
    assert statuses == ["chunks", "chunks", "complete", "complete", "complete"]


def test_corrupt_entry_is_rebuilt_from_chunks_and_corrupt_chunk_recomputed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    teacher, x = _teacher(), _data()
    entry = cached_teacher_outputs(teacher, x, cache_dir=tmp_path, chunk_rows=128)
    path, key = entry.folder / "logits.npy", entry.key
    del entry
    raw = bytearray(path.read_bytes())
    raw[-7] ^= 0xFF  # one flipped byte in the last row
    path.write_bytes(bytes(raw))
    with pytest.raises(CacheError, match="corrupt"):
        open_entry(tmp_path, key)
    with caplog.at_level(logging.WARNING, logger="kdistill.cache"):
        repaired = cached_teacher_outputs(teacher, x, cache_dir=tmp_path, chunk_rows=128)
    assert "corrupt" in caplog.text
    assert teacher.rows == 300  # rebuilt from the chunks: the teacher did not run again
    assert np.allclose(np.asarray(repaired.arrays["logits"]), _true_logits(teacher, x), atol=1e-6)

    (store,) = (tmp_path / "chunks").iterdir()
    chunk = max(store.glob("*.safetensors"), key=lambda p: p.stat().st_size)  # a whole chunk of 128 rows
    raw = bytearray(chunk.read_bytes())
    raw[-3] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kdistill.cache"):
        superset = cached_teacher_outputs(teacher, torch.cat([x, _data(5, seed=3)]), cache_dir=tmp_path, chunk_rows=128)
    assert "fails its checksum" in caplog.text
    assert teacher.rows == 300 + 128 + 5  # the bad chunk's rows and the new rows
    assert np.allclose(np.asarray(superset.arrays["logits"])[:300], _true_logits(teacher, x), atol=1e-6)


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
    (store,) = cache_entries(tmp_path / "cache")
    assert store.status == "chunks" and not store.complete and store.rows == 128  # two whole chunks, no entry
    assert not (tmp_path / "cache" / "sets").exists() or not list((tmp_path / "cache" / "sets").iterdir())

    teacher, x = _teacher(), _data()
    resumed = cached_teacher_outputs(teacher, x, cache_dir=tmp_path / "cache", chunk_rows=64)
    assert teacher.rows == 300 - 2 * 64  # only the chunks the killed fill had not written
    fresh = cached_teacher_outputs(_teacher(), x, cache_dir=tmp_path / "fresh", chunk_rows=64)
    assert (resumed.folder / "logits.npy").read_bytes() == (fresh.folder / "logits.npy").read_bytes()


_SLOW_FILL = textwrap.dedent(
    """
    import json, logging, os, sys, time
    import numpy as np, torch
    sys.path.insert(0, {src!r})
    from torch import nn
    from kdistill.cache import cached_teacher_outputs
    from kdistill.teachers import TorchTeacher

    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 10))
    x = torch.as_tensor(np.random.default_rng(0).normal(size=(400, 8)).astype(np.float32))

    class Slow(TorchTeacher):
        rows = 0
        def __call__(self, batch, *, features=()):
            Slow.rows += len(batch)
            time.sleep(0.05)  # 25 calls: the fill takes over a second, so the other process arrives during it
            return super().__call__(batch, features=features)

    class Seen(logging.Handler):
        messages = []
        def emit(self, record):
            Seen.messages.append(record.getMessage())

    logging.getLogger("kdistill.cache").addHandler(Seen())
    logging.getLogger("kdistill.cache").setLevel(logging.INFO)
    ready = sys.argv[2]
    open(os.path.join(ready, str(os.getpid())), "w").close()
    while len(os.listdir(ready)) < 2:  # both processes have imported torch: start together
        time.sleep(0.005)
    entry = cached_teacher_outputs(Slow(module), x, cache_dir=sys.argv[1], chunk_rows=32, batch_size=16)
    with torch.no_grad():
        exact = bool(np.allclose(np.asarray(entry.arrays["logits"]), module(x).numpy(), atol=1e-6))
    waited = any("waiting" in message for message in Seen.messages)
    print(json.dumps({{"rows": Slow.rows, "exact": exact, "folder": str(entry.folder), "waited": waited}}))
    """
)


def test_two_processes_filling_at_once_share_the_work_and_never_corrupt(tmp_path: Path) -> None:
    script = tmp_path / "slow.py"
    script.write_text(_SLOW_FILL.format(src=SRC))
    (tmp_path / "ready").mkdir()
    command = [sys.executable, str(script), str(tmp_path / "cache"), str(tmp_path / "ready")]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in "ab"]
    results = []
    for process in processes:
        out, err = process.communicate(timeout=180)
        assert process.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert all(result["exact"] for result in results)
    assert results[0]["folder"] == results[1]["folder"]
    by_rows = sorted(results, key=lambda result: result["rows"])
    assert [result["rows"] for result in by_rows] == [0, 400]  # one filled; the other computed nothing
    assert by_rows[0]["waited"] and not by_rows[1]["waited"]  # ... because it waited on the lock, then read
    entry = read_entry(results[0]["folder"])  # verifies every checksum
    assert entry.rows == 400
    assert not list((tmp_path / "cache" / "sets").glob(".tmp-*"))


_TORCHRUN = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np, torch, torch.distributed as dist
    sys.path.insert(0, {src!r})
    from torch import nn
    from kdistill.cache import cached_teacher_outputs, open_entry
    from kdistill.teachers import TorchTeacher

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 10))
    x = torch.as_tensor(np.random.default_rng(0).normal(size=(200, 8)).astype(np.float32))

    class Counting(TorchTeacher):
        rows = 0
        def __call__(self, batch, *, features=()):
            Counting.rows += len(batch)
            return super().__call__(batch, features=features)

    teacher = Counting(module) if rank == 0 else None  # the other ranks never build the teacher
    meta = {{"classes": list(range(10))}}
    entry = cached_teacher_outputs(teacher, x, cache_dir=sys.argv[1], meta=meta, collective=True)
    with torch.no_grad():
        exact = bool(np.allclose(np.asarray(entry.arrays["logits"]), module(x).numpy(), atol=1e-6))
    # the other way: rank 0 alone fills (collective=False, the default) and sends the key; the others open it
    box = [cached_teacher_outputs(teacher, x[:50], cache_dir=sys.argv[1]).key if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    alone = open_entry(sys.argv[1], box[0])
    exact = exact and bool(np.array_equal(np.asarray(alone.arrays["logits"]), np.asarray(entry.arrays["logits"])[:50]))
    result = {{"rank": rank, "rows": Counting.rows, "exact": exact, "folder": str(entry.folder), "meta": entry.meta}}
    with open(os.path.join(sys.argv[2], f"rank{{rank}}.json"), "w") as handle:
        json.dump(result, handle)
    dist.destroy_process_group()
    """
)


def test_torchrun_rank_zero_fills_and_the_other_rank_reads(tmp_path: Path) -> None:
    script = tmp_path / "ranks.py"
    script.write_text(_TORCHRUN.format(src=SRC))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run(
        [*torchrun, str(script), str(tmp_path / "cache"), str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["rows"] for r in ranks] == [200, 0]
    assert ranks[0]["folder"] == ranks[1]["folder"] and all(r["exact"] for r in ranks)
    assert ranks[1]["meta"] == {"classes": list(range(10))}
    assert len(list((tmp_path / "cache" / "chunks").iterdir())) == 1  # both sets' rows: one store, filled by rank 0


def test_cli_cache_ls_and_clear(tmp_path: Path) -> None:
    teacher, x = _teacher(), _data(50)
    entry = cached_teacher_outputs(teacher, x, cache_dir=tmp_path, storage="fp16")
    env = os.environ | {"PYTHONPATH": SRC}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "kdistill.cli", "cache", *args, "--dir", str(tmp_path)]
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)

    listing = cli("ls")
    assert listing.returncode == 0
    assert entry.key.digest() in listing.stdout and entry.key.store() in listing.stdout
    assert "fp16" in listing.stdout
    assert "complete" in listing.stdout and "chunks" in listing.stdout
    # the same entry point in-process (each subprocess pays the whole import of torch again)
    assert main(["cache", "clear", "nonexistent", "--dir", str(tmp_path)]) == 2  # names no entry: an error
    assert main(["cache", "clear", entry.key.digest()[:6], "--dir", str(tmp_path)]) == 0
    assert [info.status for info in cache_entries(tmp_path)] == ["chunks"]  # the chunks stay: rebuilding is free
    rebuilt = cached_teacher_outputs(teacher, x, cache_dir=tmp_path, storage="fp16")
    assert teacher.rows == 50 and rebuilt.rows == 50
    old = tmp_path / ("0123456789abcdef" * 2)  # kdistill 0.1's flat layout: listed (to clear), never read
    old.mkdir()
    (old / "key.json").write_text("{}")
    (tmp_path / "benchmark-teachers").mkdir()  # not the cache's: neither listed nor cleared
    assert sorted(info.status for info in cache_entries(tmp_path)) == ["chunks", "complete", "old"]
    assert main(["cache", "clear", "--dir", str(tmp_path)]) == 0
    assert cache_entries(tmp_path) == []
    assert (tmp_path / "benchmark-teachers").is_dir()


def test_cache_key_finds_an_entry_without_filling(tmp_path: Path) -> None:
    teacher, x = _teacher(), _data(40)
    assert open_entry(tmp_path, cache_key(teacher, x, storage="fp16")) is None
    entry = cached_teacher_outputs(teacher, x, cache_dir=tmp_path, storage="fp16")
    found = open_entry(tmp_path, cache_key(teacher, x, storage="fp16"))
    assert found is not None and found.folder == entry.folder and teacher.rows == 40


def test_bad_arguments_are_clear_errors(tmp_path: Path) -> None:
    teacher, x = _teacher(), _data(10)
    with pytest.raises(CacheError, match="unknown cache storage 'fp8'"):
        cached_teacher_outputs(teacher, x, cache_dir=tmp_path, storage="fp8")
    with pytest.raises(CacheError, match="needs a teacher"):
        cached_teacher_outputs(None, x, cache_dir=tmp_path)
    with pytest.raises(CacheError, match="no rows"):
        cached_teacher_outputs(teacher, x[:0], cache_dir=tmp_path)
    huge = TorchTeacher(nn.Linear(8, 2))
    with torch.no_grad():
        huge.module.weight.fill_(1e5)
    with pytest.raises(CacheError, match="float16's range"):
        cached_teacher_outputs(huge, x, cache_dir=tmp_path, storage="fp16")
    assert CacheKey("t", "d", "logits", "fp32").digest() != CacheKey("t", "d", "logits", "fp16").digest()


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

    counting = Counting(module)
    settings = {"epochs": 3, "verbose": False, "baseline": False, "profile": False, "report": False}
    plain = kdistill.distill(counting, "mlp", (x, y), **settings)
    first = kdistill.distill(counting, "mlp", (x, y), cache_dir=tmp_path, **settings)
    rows_before = counting.rows
    second = kdistill.distill(counting, "mlp", (x, y), cache_dir=tmp_path, **settings)
    assert counting.rows == rows_before  # the teacher never ran: targets came from the cache
    losses = [[epoch["train_loss"] for epoch in run.history] for run in (plain, first, second)]
    assert losses[0] == losses[1] == losses[2]
    topk = kdistill.distill(module, "mlp", (x, y), cache_dir=tmp_path, cache_storage="topk:1", **settings)
    assert np.allclose([e["train_loss"] for e in topk.history], losses[0], atol=1e-5)  # 2 classes: top-1 is exact


def test_row_fingerprints_are_hashed_once_per_tensor_and_again_after_a_change(monkeypatch: pytest.MonkeyPatch) -> None:
    from kdistill import cache

    calls = []
    real = cache._row_fingerprints
    monkeypatch.setattr(cache, "_row_fingerprints", lambda inputs: calls.append(1) or real(inputs))
    x = torch.randn(50, 4)
    first = cache.row_fingerprints(x)
    assert np.array_equal(cache.row_fingerprints(x), first) and len(calls) == 1  # a key, then a fill: one pass
    x[3, 0] += 1.0  # in place: row 3 changes, and only row 3
    changed = cache.row_fingerprints(x)
    assert len(calls) == 2 and (changed != first).any(axis=1).nonzero()[0].tolist() == [3]
    assert np.array_equal(cache.row_fingerprints(x.clone()), changed) and len(calls) == 3  # another tensor
