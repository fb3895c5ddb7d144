"""The cache's token-level layout (``topk16:K``: float16 top-k log-probabilities, ids and a rest bucket), bytes per
token, `kdistill cache ls` for token entries, a fill resumed after it died, and a fill split across two ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kdistill.cache import cache_entries, cached_teacher_outputs
from kdistill.cli import main
from kdistill.losses.token import token_distill_loss
from kdistill.teachers import Outputs, TopK, TorchTeacher

SRC = str(Path(__file__).resolve().parents[1] / "src")
ROWS, SEQ, VOCAB = 30, 6, 40


class _TokenModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.table = nn.Embedding(VOCAB, VOCAB)
        nn.init.normal_(self.table.weight, std=3.0)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.table(input_ids) + 50.0  # an offset that float16 logits would pay for; log-probs do not


class _Counting(TorchTeacher):
    def __init__(self, module: nn.Module, fail_after: int | None = None) -> None:
        super().__init__(module)
        self.rows, self.calls, self.fail_after = 0, 0, fail_after

    def __call__(self, batch: torch.Tensor, *, features: Sequence[str] = ()) -> Outputs:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("killed")
        self.calls += 1
        self.rows += len(batch)
        return super().__call__(batch, features=features)


def _ids(rows: int = ROWS) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, SEQ), generator=torch.Generator().manual_seed(0))


def test_topk16_stores_float16_log_probs_at_4k_plus_2_bytes_a_token(tmp_path: Path) -> None:
    model, ids = _TokenModel(), _ids()
    entry = cached_teacher_outputs(TorchTeacher(model), ids, cache_dir=tmp_path, kind="token_logits",
                                   storage="topk16:8")  # fmt: skip
    values, indices, rest = entry.topk()
    assert values.dtype == torch.float16 and rest.dtype == torch.float16 and indices.dtype == torch.int16
    assert entry.tokens == ROWS * SEQ
    assert entry.bytes_per_token() == 8 * 2 + 8 * 2 + 2
    with torch.no_grad():
        logits = model(ids).double()
    log_probs = logits.log_softmax(-1)
    top, top_ids = log_probs.topk(8, dim=-1)
    assert torch.equal(indices.long(), top_ids)
    torch.testing.assert_close(values.double(), top, atol=2e-2, rtol=1e-3)  # float16 spacing of log-probs
    rest_mass = 1 - top.exp().sum(-1)
    torch.testing.assert_close(rest.double().exp(), rest_mass, atol=2e-3, rtol=1e-2)
    # the losses read it as bucket logits: the same value as from the float32 topk:8 entry, to float16 precision
    exact = cached_teacher_outputs(TorchTeacher(model), ids, cache_dir=tmp_path, kind="token_logits",
                                   storage="topk:8")  # fmt: skip
    student = torch.randn(ROWS, SEQ, VOCAB, generator=torch.Generator().manual_seed(1))
    from_16 = token_distill_loss(student, TopK(*entry.topk()), None)["kd"]
    from_32 = token_distill_loss(student, TopK(*exact.topk()), None)["kd"]
    assert float(from_16) == pytest.approx(float(from_32), rel=5e-3)
    assert exact.bytes_per_token() == 8 * 4 + 8 * 2 + 4
    dense = cached_teacher_outputs(TorchTeacher(model), ids, cache_dir=tmp_path, kind="token_logits", storage="fp16")
    assert dense.bytes_per_token() == 2 * VOCAB


def test_a_fill_holds_one_batch_of_dense_logits_not_a_chunk(tmp_path: Path, monkeypatch) -> None:
    """Dense (rows, seq, vocab) logits are reduced to the stored form batch by batch: a chunk of 4,096 blocks of 64
    tokens at vocabulary 8,192 would otherwise be 8.6 GB of float32 at once (twice that while concatenated). The
    chunk written is the same bytes as the whole chunk encoded at once."""
    import kdistill.cache as cache

    seen: list[int] = []
    encode = cache._encode

    def recording(outputs: torch.Tensor, storage: str) -> dict[str, np.ndarray]:
        seen.append(len(outputs))
        return encode(outputs, storage)

    monkeypatch.setattr(cache, "_encode", recording)
    model, ids = _TokenModel(), _ids()
    entry = cached_teacher_outputs(TorchTeacher(model), ids, cache_dir=tmp_path, kind="token_logits",
                                   storage="topk16:8", chunk_rows=ROWS, batch_size=7)  # fmt: skip
    assert seen == [7, 7, 7, 7, 2]  # one chunk of 30 rows, encoded 7 rows at a time
    with torch.no_grad():
        whole = encode(model(ids), "topk16:8")
    stored = entry.topk()
    for name, array in zip(("values", "indices", "rest"), stored, strict=True):
        assert np.array_equal(np.asarray(array), whole[name]), name


def test_cache_ls_shows_token_entries_with_tokens_and_bytes_per_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = _ids()
    cached_teacher_outputs(TorchTeacher(_TokenModel()), ids, cache_dir=tmp_path, kind="token_logits",
                           storage="topk16:4")  # fmt: skip
    infos = [info for info in cache_entries(tmp_path) if info.status == "complete"]
    assert len(infos) == 1 and infos[0].tokens == ROWS * SEQ
    assert infos[0].bytes_per_token is not None and infos[0].bytes_per_token >= 4 * 4 + 2  # + npy headers
    assert main(["cache", "ls", "--dir", str(tmp_path)]) == 0
    listing = capsys.readouterr().out
    assert "B/token" in listing and "topk16:4" in listing and str(ROWS * SEQ) in listing


def test_a_fill_that_died_resumes_with_only_the_missing_rows(tmp_path: Path) -> None:
    model, ids = _TokenModel(), _ids(40)
    dying = _Counting(model, fail_after=2)  # dies on its third batch, after two whole chunks were written
    with pytest.raises(RuntimeError, match="killed"):
        cached_teacher_outputs(dying, ids, cache_dir=tmp_path, kind="token_logits", storage="topk16:4",
                               chunk_rows=10, batch_size=10)  # fmt: skip
    assert dying.rows == 20
    resumed = _Counting(model)
    entry = cached_teacher_outputs(resumed, ids, cache_dir=tmp_path, kind="token_logits", storage="topk16:4",
                                   chunk_rows=10, batch_size=10)  # fmt: skip
    assert resumed.rows == 20  # only the rows no chunk held
    fresh = cached_teacher_outputs(TorchTeacher(model), ids, cache_dir=tmp_path / "fresh", kind="token_logits",
                                   storage="topk16:4")  # fmt: skip
    for got, want in zip(entry.topk(), fresh.topk(), strict=True):
        assert torch.equal(got, want)


_SPLIT = textwrap.dedent(
    """
    import json, os, sys
    import torch, torch.distributed as dist
    sys.path.insert(0, {src!r})
    from torch import nn
    from kdistill.cache import cached_teacher_outputs
    from kdistill.teachers import TorchTeacher

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    module = nn.Embedding(40, 40)
    ids = torch.randint(0, 40, (64, 6), generator=torch.Generator().manual_seed(0))

    class Counting(TorchTeacher):
        rows = 0
        def __call__(self, batch, *, features=()):
            Counting.rows += len(batch)
            return super().__call__(batch, features=features)

    entry = cached_teacher_outputs(Counting(module), ids, cache_dir=sys.argv[1], kind="token_logits",
                                   storage="topk16:4", chunk_rows=8, batch_size=8, collective=True)
    values = entry.topk()[0].float()
    with open(os.path.join(sys.argv[2], f"rank{{rank}}.json"), "w") as handle:
        json.dump({{"rows": Counting.rows, "folder": str(entry.folder), "sum": float(values.sum())}}, handle)
    dist.barrier()
    dist.destroy_process_group()
    """
)


def test_a_fill_under_torchrun_is_split_across_the_ranks(tmp_path: Path) -> None:
    script = tmp_path / "split.py"
    script.write_text(_SPLIT.format(src=SRC))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run([*torchrun, str(script), str(tmp_path / "cache"), str(tmp_path)], capture_output=True,
                          text=True, timeout=300, env=env)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["rows"] for r in ranks] == [32, 32]  # each rank ran the teacher on half the rows, none twice
    assert ranks[0]["folder"] == ranks[1]["folder"] and ranks[0]["sum"] == ranks[1]["sum"]
    torch.manual_seed(0)
    module = nn.Embedding(40, 40)
    ids = torch.randint(0, 40, (64, 6), generator=torch.Generator().manual_seed(0))
    alone = cached_teacher_outputs(TorchTeacher(module), ids, cache_dir=tmp_path / "alone", kind="token_logits",
                                   storage="topk16:4")  # fmt: skip
    assert float(alone.topk()[0].float().sum()) == pytest.approx(ranks[0]["sum"], abs=0.0)
    assert np.isfinite(ranks[0]["sum"])


@pytest.mark.parametrize("method", ["forward_kl", "reverse_kl", "gjsd", "skew_kl", "skew_reverse_kl", "tvd"])
def test_every_token_divergence_trains_from_a_topk_cache_reading_it_exactly(tmp_path: Path, method: str) -> None:
    """The pipeline routes each token divergence to the top-k cache; the loss the engine computes on a batch is the
    divergence over the cached K + 1 buckets (what the same function gives on the entry's TopK)."""
    import kdistill
    from kdistill.config import MethodTerm
    from kdistill.engine.sources import StaticSource
    from kdistill.pipeline import build_loss
    from kdistill.tasks import get_task

    ids = _ids()
    entry = cached_teacher_outputs(TorchTeacher(_TokenModel()), ids, cache_dir=tmp_path, kind="token_logits",
                                   storage="topk16:4")  # fmt: skip
    loss = build_loss([MethodTerm(name=method, params={"soft_weight": 0.7})], storage="topk16:4")
    source = StaticSource.build(loss, entry.teacher_targets())
    from kdistill.engine.batches import Batch

    rows = torch.tensor([3, 0, 7])
    served = source.outputs(Batch(inputs=ids[rows], target=None, index=rows))
    assert served.topk is not None and served.topk.k == 4
    student = torch.randn(3, SEQ, VOCAB, generator=torch.Generator().manual_seed(1))
    target = get_task("token_lm").encode_targets(ids[rows])
    values, indices, rest = entry.topk()
    expected = token_distill_loss(student, TopK(values[rows].float(), indices[rows], rest[rows].float()), target,
                                  kind=loss.divergence, soft_weight=0.7)  # fmt: skip
    got = loss(Outputs(student), served, target)
    torch.testing.assert_close(got["loss"], expected["loss"])
    result = kdistill.distill(
        TorchTeacher(_TokenModel()), nn.Embedding(VOCAB, VOCAB), ids, task="token_lm", method=method, epochs=1,
        batch_size=10, cache_dir=tmp_path, cache_storage="topk16:4", verbose=False, report=False, baseline=False,
    )  # fmt: skip
    assert np.isfinite(result.history[-1]["train_kd"])


def test_a_topk_cache_with_two_methods_is_a_clear_error() -> None:
    from kdistill.config import MethodTerm
    from kdistill.errors import ConfigError
    from kdistill.pipeline import build_loss

    with pytest.raises(ConfigError, match="one method of kd, kd_topk, forward_kl"):
        build_loss([MethodTerm(name="forward_kl"), MethodTerm(name="ce", weight=0.5)], storage="topk:4")
