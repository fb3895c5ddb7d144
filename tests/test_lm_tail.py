"""The token cache's sampled tail (``topk16:K+S``): the layout and its bytes, draws that follow the teacher's tail
and repeat on a refill, forward KL read from it (checked against a transcription of the estimator and, over many
draws, against the full-vocabulary KL), and the clear errors for losses that cannot read it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdistill.cache import CacheError, cached_teacher_outputs, parse_storage, sample_tail, tail_samples
from kdistill.errors import ConfigError, MethodError, ShapeMismatchError
from kdistill.losses.chunked import chunked_token_loss
from kdistill.losses.token import token_distill_loss
from kdistill.teachers import Outputs, TopK, TorchTeacher

ROWS, SEQ, VOCAB = 12, 5, 40


class _TokenModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.table = nn.Embedding(VOCAB, VOCAB)
        nn.init.normal_(self.table.weight, std=1.5)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.table(input_ids)


def _ids(rows: int = ROWS) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, SEQ), generator=torch.Generator().manual_seed(0))


def _fill(folder: Path, storage: str, **kwargs: int):  # type: ignore[no-untyped-def]
    return cached_teacher_outputs(TorchTeacher(_TokenModel()), _ids(), cache_dir=folder, kind="token_logits",
                                  storage=storage, **kwargs)  # fmt: skip


def test_storage_names_parse_and_bad_ones_name_the_form() -> None:
    assert parse_storage("topk16:32+16") == ("topk16", 32) and tail_samples("topk16:32+16") == 16
    assert tail_samples("topk16:32") == 0 and tail_samples("fp16") == 0
    for bad in ("topk16:32+0", "topk16:32+x", "topk16:+4", "topk:4+2"):
        with pytest.raises(CacheError, match="topk16:K\\+S"):
            parse_storage(bad)


def test_layout_bytes_and_the_tail_sum_against_numpy(tmp_path: Path) -> None:
    entry = _fill(tmp_path, "topk16:8+16")
    tail = entry.tail()
    assert tail is not None
    ids, plogp = tail
    assert ids.shape == (ROWS, SEQ, 16) and ids.dtype == torch.int16 and plogp.dtype == torch.float16
    assert entry.bytes_per_token() == 4 * 8 + 2 + 2 * 16 + 2  # the top-k's 4K + 2, then 2 a draw and 2 for the sum
    logits = _TokenModel()(_ids()).detach().double().numpy()
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    top = np.argsort(-logits, axis=-1)[..., :8]
    outside = np.ones_like(logits, dtype=bool)
    np.put_along_axis(outside, top, False, axis=-1)
    expected = (np.exp(log_p) * log_p * outside).sum(-1)
    np.testing.assert_allclose(plogp.float().numpy(), expected, rtol=2e-3, atol=1e-3)
    drawn = ids.long().numpy()
    assert not np.take_along_axis(~outside, drawn, axis=-1).any()  # no draw is one of its token's top k


def test_draws_follow_the_teachers_tail_distribution() -> None:
    logits = torch.randn(1, 2, VOCAB, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2
    top = logits.topk(4, dim=-1).indices
    draws = 40_000
    ids, _ = sample_tail(logits, top, draws, seeds=[7])
    p = logits.softmax(-1).scatter(-1, top, 0.0)
    expected = p / p.sum(-1, keepdim=True)
    seen = F.one_hot(ids, VOCAB).double().mean(-2)
    assert float((seen - expected).abs().max()) < 0.01  # binomial sd at p = 0.25 and 40k draws: 0.002
    assert float(seen.gather(-1, top).sum()) == 0.0


def test_a_refill_in_other_batches_draws_the_same_tail(tmp_path: Path) -> None:
    whole = _fill(tmp_path / "a", "topk16:8+16")
    split = _fill(tmp_path / "b", "topk16:8+16", chunk_rows=5, batch_size=3)
    whole_tail, split_tail = whole.tail(), split.tail()
    assert whole_tail is not None and split_tail is not None
    assert torch.equal(whole_tail[0], split_tail[0]) and torch.equal(whole_tail[1], split_tail[1])
    assert len(torch.unique(whole_tail[0][0, 0])) > 1  # rows draw from a distribution, not one id


def _estimator(student: torch.Tensor, teacher_logits: torch.Tensor, ids: torch.Tensor, k: int) -> torch.Tensor:
    """Per token, transcribed from the formula: sum over the top k of p (log p - log q), plus sum over the tail of
    p log p, minus R / S times the sum of log q at the S draws (all over the full vocabulary, float64)."""
    log_p = teacher_logits.double().log_softmax(-1)
    log_q = student.double().log_softmax(-1)
    top = teacher_logits.topk(k, dim=-1).indices
    in_top = torch.zeros_like(log_p, dtype=torch.bool).scatter(-1, top, True)
    p = log_p.exp()
    top_part = torch.where(in_top, p * (log_p - log_q), 0.0).sum(-1)
    tail_plogp = torch.where(in_top, 0.0, p * log_p).sum(-1)
    mass = torch.where(in_top, 0.0, p).sum(-1)
    return top_part + tail_plogp - mass / ids.shape[-1] * log_q.gather(-1, ids).sum(-1)


def test_forward_kl_from_the_tail_is_the_estimator_under_a_mask_chunked_or_not(tmp_path: Path) -> None:
    entry = _fill(tmp_path, "topk16:8+16")
    teacher = entry.topk_outputs()
    student = torch.randn(ROWS, SEQ, VOCAB, generator=torch.Generator().manual_seed(1), requires_grad=True)
    mask = torch.ones(ROWS, SEQ, dtype=torch.bool)
    mask[:, -2:] = False
    mask[0] = False
    got = token_distill_loss(student, teacher, None, mask=mask)["loss"]
    tail = entry.tail()
    assert tail is not None
    per_token = _estimator(student.detach(), _TokenModel()(_ids()).detach(), tail[0].long(), 8)
    expected = per_token[mask].mean()
    assert float(got.detach()) == pytest.approx(float(expected), abs=2e-3)  # float16 storage of the log-probs
    (grad,) = torch.autograd.grad(got, student)
    chunked = chunked_token_loss(student, teacher, None, mask=mask, chunk_size=7)["loss"]
    (chunked_grad,) = torch.autograd.grad(chunked, student)
    torch.testing.assert_close(chunked, got)
    torch.testing.assert_close(chunked_grad, grad)
    assert float(grad[~mask].abs().max()) == 0.0  # padding never reaches the gradient


def test_over_many_draws_the_tail_gives_the_full_vocabulary_kl_gradient_and_the_rest_bucket_does_not() -> None:
    generator = torch.Generator().manual_seed(5)
    teacher_logits = torch.randn(1, 3, VOCAB, generator=generator) * 1.5
    student = torch.randn(1, 3, VOCAB, generator=generator)
    copies = 400
    logits = teacher_logits.expand(copies, -1, -1)
    full = TopK.from_logits(logits, 4)
    ids, plogp = sample_tail(logits, full.indices, 8, seeds=list(range(copies)))
    sampled = TopK(full.values, full.indices, full.rest, ids, plogp)

    def gradient(teacher: torch.Tensor | TopK, rows: int) -> torch.Tensor:
        leaf = student.expand(rows, -1, -1).clone().requires_grad_()
        (grad,) = torch.autograd.grad(token_distill_loss(leaf, teacher, None)["loss"], leaf)
        return grad.sum(0) * rows  # the mean over copies of each copy's per-token gradient (the loss divides by N)

    reference = F.kl_div(student.log_softmax(-1), teacher_logits.log_softmax(-1), log_target=True, reduction="none")
    leaf = student.clone().requires_grad_()
    (dense,) = torch.autograd.grad(
        F.kl_div(leaf.log_softmax(-1), teacher_logits.log_softmax(-1), log_target=True, reduction="sum") / 3, leaf
    )
    tail_error = float((gradient(sampled, copies) / copies - dense).norm() / dense.norm())
    rest_error = float((gradient(TopK.from_logits(teacher_logits, 4), 1) - dense).norm() / dense.norm())
    assert tail_error < 0.1 < rest_error
    value = token_distill_loss(student.expand(copies, -1, -1), sampled, None)["loss"]
    assert float(value) == pytest.approx(float(reference.sum(-1).mean()), rel=0.05)


def test_losses_that_cannot_read_a_tail_are_clear_errors(tmp_path: Path) -> None:
    from kdistill.config import MethodTerm
    from kdistill.pipeline import build_loss

    teacher = _fill(tmp_path, "topk16:8+4").topk_outputs()
    student = torch.randn(ROWS, SEQ, VOCAB)
    with pytest.raises(MethodError, match="estimates forward KL at temperature 1; got 'reverse_kl'"):
        token_distill_loss(student, teacher, None, kind="reverse_kl")
    with pytest.raises(MethodError, match="at temperature 2"):
        chunked_token_loss(student, teacher, None, temperature=2.0, chunk_size=8)
    with pytest.raises(MethodError, match="'topk16:K'"):
        build_loss([MethodTerm(name="tvd")], storage="topk16:8+4")
    with pytest.raises(ConfigError, match="kd reads a top-k with a rest bucket"):
        build_loss([MethodTerm(name="kd")], storage="topk16:8+4")
    with pytest.raises(ShapeMismatchError, match="tail ids"):
        TopK(teacher.values, teacher.indices, teacher.rest, teacher.tail_ids, teacher.rest[:1])
    with pytest.raises(CacheError, match="needs \\(rows, seq, vocab\\)"):
        cached_teacher_outputs(TorchTeacher(nn.Linear(3, 5)), torch.randn(8, 3), cache_dir=tmp_path / "rows",
                               storage="topk16:2+2")  # fmt: skip


def test_the_pipeline_trains_forward_kl_from_a_tail_cache_reading_it_as_stored(tmp_path: Path) -> None:
    import kdistill
    from kdistill.config import MethodTerm
    from kdistill.engine.batches import Batch
    from kdistill.engine.sources import StaticSource
    from kdistill.pipeline import build_loss
    from kdistill.tasks import get_task

    entry = _fill(tmp_path, "topk16:4+8")
    loss = build_loss([MethodTerm(name="forward_kl", params={"soft_weight": 0.7})], storage="topk16:4+8")
    source = StaticSource.build(loss, entry.teacher_targets())
    rows = torch.tensor([3, 0, 7])
    served = source.outputs(Batch(inputs=_ids()[rows], target=None, index=rows))
    assert served.topk is not None and served.topk.samples == 8
    student = torch.randn(3, SEQ, VOCAB, generator=torch.Generator().manual_seed(1))
    target = get_task("token_lm").encode_targets(_ids()[rows])
    expected = token_distill_loss(student, entry.topk_outputs().index_select(rows), target, soft_weight=0.7)
    torch.testing.assert_close(loss(Outputs(student), served, target)["loss"], expected["loss"])
    result = kdistill.distill(
        TorchTeacher(_TokenModel()), nn.Embedding(VOCAB, VOCAB), _ids(), task="token_lm", method="forward_kl",
        epochs=2, batch_size=4, cache_dir=tmp_path, cache_storage="topk16:4+8", verbose=False, report=False,
        baseline=False,
    )  # fmt: skip
    kd = [row["train_kd"] for row in result.history]
    assert np.isfinite(kd).all() and kd[-1] < kd[0]


def test_the_fused_normaliser_and_picks_has_autograds_gradient_with_repeated_ids() -> None:
    from kdistill.losses.token import normaliser_and_picks

    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(6, VOCAB, generator=generator, dtype=torch.float64)
    ids = torch.randint(0, VOCAB, (6, 9), generator=generator)
    ids[:, 1] = ids[:, 0]  # a repeated id: its gradients add up
    up_normaliser, up_picks = torch.randn(6, 1, dtype=torch.float64), torch.randn(6, 9, dtype=torch.float64)
    leaf = logits.clone().requires_grad_()
    normaliser, picks = normaliser_and_picks(leaf, ids)
    (fused,) = torch.autograd.grad((normaliser * up_normaliser).sum() + (picks * up_picks).sum(), leaf)
    leaf = logits.clone().requires_grad_()
    reference = (leaf.logsumexp(-1, keepdim=True) * up_normaliser).sum() + (leaf.gather(-1, ids) * up_picks).sum()
    (expected,) = torch.autograd.grad(reference, leaf)
    torch.testing.assert_close(fused, expected)
    torch.testing.assert_close(normaliser, logits.logsumexp(-1, keepdim=True))


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "tv"])
def test_rest_bucket_of_a_confident_student_matches_the_masked_sum_by_hand(kind: str) -> None:
    """Half the tokens put over 99.99% of the student's mass on the teacher's top k (the rest bucket is then the
    exact masked log-sum-exp, not 1 - the top's mass); the loss and its gradient match buckets built by hand in
    float64 from the full logits (sum of the top-k probabilities, log-sum-exp of the others)."""
    generator = torch.Generator().manual_seed(4)
    teacher_logits = torch.randn(8, VOCAB, generator=generator) * 2
    topk = TopK.from_logits(teacher_logits, 5)
    student = torch.randn(8, VOCAB, generator=generator)
    student[:4] = student[:4].scatter_add(-1, topk.indices[:4], torch.full((4, 5), 14.0))
    target = torch.randint(0, VOCAB, (8,), generator=generator)
    leaf = student.clone().requires_grad_()
    got = token_distill_loss(leaf, topk, target, kind=kind, soft_weight=0.6)["loss"]
    (grad,) = torch.autograd.grad(got, leaf)

    def by_hand(z: torch.Tensor) -> torch.Tensor:
        in_top = torch.zeros_like(z, dtype=torch.bool).scatter(-1, topk.indices, True)
        student_buckets = torch.cat(
            [z.gather(-1, topk.indices), z.masked_fill(in_top, -torch.inf).logsumexp(-1, True)], -1
        )
        teacher_z = teacher_logits.double()
        teacher_buckets = torch.cat(
            [teacher_z.gather(-1, topk.indices), teacher_z.masked_fill(in_top, -torch.inf).logsumexp(-1, True)], -1
        )
        log_q, log_p = student_buckets.log_softmax(-1), teacher_buckets.log_softmax(-1)
        p, q = log_p.exp(), log_q.exp()
        per_token = {
            "forward_kl": (p * (log_p - log_q)).sum(-1),
            "reverse_kl": (q * (log_q - log_p)).sum(-1),
            "tv": 0.5 * (p - q).abs().sum(-1),
        }[kind]
        ce = F.cross_entropy(z, target, reduction="none")
        return (0.4 * ce + 0.6 * per_token).mean()

    reference_leaf = student.double().requires_grad_()
    expected = by_hand(reference_leaf)
    (expected_grad,) = torch.autograd.grad(expected, reference_leaf)
    share = 1 - student[:4].softmax(-1).gather(-1, topk.indices[:4]).sum(-1)
    assert float(share.max()) < 1e-4  # those tokens are the confident case
    assert float(got.detach()) == pytest.approx(float(expected), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-6)
