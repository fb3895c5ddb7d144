"""Token-level divergences against independent numpy transcriptions of TRL's ``generalized_jsd_loss`` and
DistiLLM's ``skewed_forward_kl`` / ``skewed_reverse_kl`` (their formulas, reductions and conventions, written out
here in float64 loops), the masked mean over real tokens, micro-batch invariance (in the functional form and in the
engine), and the chunked form's value, gradient and memory bound."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from kdistill.engine import TrainConfig, TransferSet, fit
from kdistill.errors import MethodError, ShapeMismatchError
from kdistill.losses import LOSSES, get_loss
from kdistill.losses.chunked import chunk_size_for, chunked_head_loss, chunked_token_loss
from kdistill.losses.token import DIVERGENCES, divergence, token_distill_loss
from kdistill.teachers import Outputs, TopK

VOCAB = 11


# ---- independent references (float64 numpy, one position at a time) ------------------------------------------------
def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def _np_kl(a: np.ndarray, b: np.ndarray) -> float:
    keep = a > 0
    return float((a[keep] * (np.log(a[keep]) - np.log(b[keep]))).sum())


def _trl_gjsd(p: np.ndarray, q: np.ndarray, beta: float) -> float:
    """TRL GKDTrainer.generalized_jsd_loss per token: beta == 0 -> KL(teacher || student), beta == 1 ->
    KL(student || teacher), else beta KL(p || m) + (1 - beta) KL(q || m) with m = beta p + (1 - beta) q."""
    if beta == 0:
        return _np_kl(p, q)
    if beta == 1:
        return _np_kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * _np_kl(p, m) + (1 - beta) * _np_kl(q, m)


def _distillm_skew_forward(p: np.ndarray, q: np.ndarray, lam: float) -> float:
    """DistiLLM skewed_forward_kl per token: -sum p log(lam p + (1 - lam) q) (a cross-entropy)."""
    return float(-(p * np.log(lam * p + (1 - lam) * q)).sum())


def _distillm_skew_reverse(p: np.ndarray, q: np.ndarray, lam: float) -> float:
    """DistiLLM skewed_reverse_kl per token: -sum q (log((1 - lam) p + lam q) - log q)."""
    return float(-(q * (np.log((1 - lam) * p + lam * q) - np.log(q))).sum())


def _entropy(p: np.ndarray) -> float:
    return float(-(p * np.log(p)).sum())


def _reference(kind: str, p: np.ndarray, q: np.ndarray, beta: float, skew: float) -> float:
    if kind == "forward_kl":
        return _np_kl(p, q)
    if kind == "reverse_kl":
        return _np_kl(q, p)
    if kind == "jsd":
        return _trl_gjsd(p, q, beta)
    if kind == "skew_forward_kl":  # ours is the KL: DistiLLM's cross-entropy minus the teacher's entropy
        return _distillm_skew_forward(p, q, skew) - _entropy(p)
    if kind == "skew_reverse_kl":
        return _distillm_skew_reverse(p, q, skew)
    return 0.5 * float(np.abs(p - q).sum())


def _masked_mean_reference(
    student: np.ndarray,
    teacher: np.ndarray,
    target: np.ndarray,
    mask: np.ndarray,
    *,
    kind: str,
    temperature: float,
    soft_weight: float,
    beta: float = 0.5,
    skew: float = 0.1,
) -> tuple[float, float]:
    """(loss, kd): TRL's reduction with labels (sum over tokens with label != -100 and mask, divided by their count),
    times T² for the soft term, mixed with the token CE at T = 1."""
    soft, hard, count = 0.0, 0.0, 0
    for b in range(student.shape[0]):
        for t in range(student.shape[1]):
            if not mask[b, t] or target[b, t] == -100:
                continue
            p = _softmax(teacher[b, t] / temperature)
            q = _softmax(student[b, t] / temperature)
            soft += _reference(kind, p, q, beta, skew)
            hard += -math.log(_softmax(student[b, t])[target[b, t]])
            count += 1
    soft = soft / count * temperature**2
    hard /= count
    return (1 - soft_weight) * hard + soft_weight * soft, soft


def _padded_batch(seed: int = 0, rows: int = 4, seq: int = 7) -> dict[str, torch.Tensor]:
    """Logits, next-token targets and a mask with uneven lengths; padded logits hold NaN (they must never count)."""
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(rows, seq, VOCAB, generator=generator, dtype=torch.float64) * 2
    teacher = torch.randn(rows, seq, VOCAB, generator=generator, dtype=torch.float64) * 2
    lengths = torch.tensor([seq, seq - 1, 3, 2][:rows] + [seq] * max(0, rows - 4))
    mask = torch.arange(seq).unsqueeze(0) < lengths.unsqueeze(1)
    target = torch.randint(0, VOCAB, (rows, seq), generator=generator)
    target[:, -1] = -100
    target[~mask] = -100
    target[0, 2] = -100  # a prompt token: in the mask, but not counted
    student = torch.where(mask.unsqueeze(-1), student, torch.nan)
    teacher = torch.where(mask.unsqueeze(-1), teacher, torch.nan)
    return {"student": student, "teacher": teacher, "target": target, "mask": mask}


CASES = [
    ("forward_kl", 1.0, 0.5, 0.5),
    ("reverse_kl", 2.0, 1.0, 0.5),
    ("jsd", 1.0, 1.0, 0.0),
    ("jsd", 1.0, 1.0, 1.0),
    ("jsd", 2.0, 0.7, 0.5),
    ("jsd", 1.0, 0.5, 0.1),
    ("jsd", 3.0, 0.5, 0.9),
    ("skew_forward_kl", 1.0, 0.5, 0.5),
    ("skew_reverse_kl", 2.0, 0.5, 0.5),
    ("tv", 1.0, 0.3, 0.5),
]


@pytest.mark.parametrize(("kind", "temperature", "soft_weight", "beta"), CASES)
def test_each_divergence_matches_its_reference_under_a_mask(
    kind: str, temperature: float, soft_weight: float, beta: float
) -> None:
    data = _padded_batch()
    terms = token_distill_loss(
        data["student"], data["teacher"], data["target"], kind=kind, temperature=temperature,
        soft_weight=soft_weight, beta=beta, skew=0.1, mask=data["mask"],
    )  # fmt: skip
    loss, soft = _masked_mean_reference(
        *(data[name].numpy() for name in ("student", "teacher", "target", "mask")),
        kind=kind, temperature=temperature, soft_weight=soft_weight, beta=beta, skew=0.1,
    )  # fmt: skip
    assert float(terms["kd"]) == pytest.approx(soft, rel=1e-9)
    assert float(terms["loss"]) == pytest.approx(loss, rel=1e-9)


def test_jsd_beta_ends_are_forward_and_reverse_kl_and_the_interior_interpolates() -> None:
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(50, VOCAB, generator=generator, dtype=torch.float64).log_softmax(-1)
    p = torch.randn(50, VOCAB, generator=generator, dtype=torch.float64).log_softmax(-1)
    forward, reverse = divergence(q, p, "forward_kl"), divergence(q, p, "reverse_kl")
    assert torch.equal(divergence(q, p, "jsd", beta=0.0), forward)
    assert torch.equal(divergence(q, p, "jsd", beta=1.0), reverse)
    assert not torch.allclose(forward, reverse)  # so the two ends are told apart (TRL's reversed-beta bug)
    # the ends are the limits of JSD_beta / beta and JSD_beta / (1 - beta): beta near 0 is forward KL, not reverse
    small = 1e-5
    torch.testing.assert_close(divergence(q, p, "jsd", beta=small) / small, forward, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(divergence(q, p, "jsd", beta=1 - small) / small, reverse, rtol=1e-3, atol=1e-6)
    half = divergence(q, p, "jsd", beta=0.5)  # the symmetric JSD: bounded by ln 2, symmetric in p and q
    torch.testing.assert_close(half, divergence(p, q, "jsd", beta=0.5))
    assert float(half.max()) <= math.log(2)
    torch.testing.assert_close(divergence(q, p, "jsd", beta=0.3), divergence(p, q, "jsd", beta=0.7))


def test_skew_zero_is_plain_kl_and_distillm_values_differ_by_the_teacher_entropy() -> None:
    generator = torch.Generator().manual_seed(4)
    q = torch.randn(20, VOCAB, generator=generator, dtype=torch.float64).log_softmax(-1)
    p = torch.randn(20, VOCAB, generator=generator, dtype=torch.float64).log_softmax(-1)
    assert torch.equal(divergence(q, p, "skew_forward_kl", skew=0.0), divergence(q, p, "forward_kl"))
    assert torch.equal(divergence(q, p, "skew_reverse_kl", skew=0.0), divergence(q, p, "reverse_kl"))
    ours = divergence(q, p, "skew_forward_kl", skew=0.1).numpy()
    distillm = np.array(
        [_distillm_skew_forward(a, b, 0.1) for a, b in zip(p.exp().numpy(), q.exp().numpy(), strict=True)]
    )
    entropy = -(p.exp() * p).sum(-1).numpy()
    np.testing.assert_allclose(ours + entropy, distillm, rtol=1e-10)
    # skewing bounds the forward KL where the student puts almost no mass: KL(p || 0.1 p + 0.9 q) <= -log 0.1
    assert float(divergence(q, p, "skew_forward_kl", skew=0.1).max()) <= -math.log(0.1) + 1e-9


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_the_t_squared_factor_is_applied_to_every_divergence(kind: str) -> None:
    data = _padded_batch(seed=1)
    args = (data["student"], data["teacher"], None)
    at_three = token_distill_loss(*args, kind=kind, temperature=3.0, mask=data["mask"])["kd"]
    raw = divergence(
        (data["student"][data["mask"]] / 3.0).log_softmax(-1),
        (data["teacher"][data["mask"]] / 3.0).log_softmax(-1),
        kind,
    )
    assert float(at_three) == pytest.approx(9.0 * float(raw.mean()), rel=1e-12)


def test_padding_never_reaches_value_or_gradient_and_the_mean_ignores_sequence_length() -> None:
    data = _padded_batch()
    student = data["student"].clone().requires_grad_()
    terms = token_distill_loss(student, data["teacher"], data["target"], kind="jsd", mask=data["mask"])
    terms["loss"].backward()
    assert student.grad is not None and torch.isfinite(terms["loss"])
    assert float(student.grad[~data["mask"]].abs().max()) == 0.0 and torch.isfinite(student.grad).all()
    # padding the batch to a longer sequence changes nothing: the mean is over real tokens, never over batch x seq
    # (nor batch x seq x vocab, TRL's old batchmean)
    extra = 5

    def pad(tensor: torch.Tensor, value: Any) -> torch.Tensor:
        shape = (tensor.shape[0], extra, *tensor.shape[2:])
        return torch.cat([tensor, torch.full(shape, value, dtype=tensor.dtype)], dim=1)

    longer = token_distill_loss(
        pad(data["student"], 0.0), pad(data["teacher"], 0.0), pad(data["target"], -100), kind="jsd",
        mask=pad(data["mask"], False),
    )  # fmt: skip
    assert float(longer["loss"]) == pytest.approx(float(terms["loss"]), rel=1e-12)


def _grad(fn: Callable[[torch.Tensor], torch.Tensor], student: torch.Tensor) -> torch.Tensor:
    leaf = student.clone().requires_grad_()
    fn(leaf).backward()
    assert leaf.grad is not None
    return leaf.grad


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_micro_batches_with_uneven_padding_sum_to_the_whole_batch(kind: str) -> None:
    data = _padded_batch(rows=4)
    student, teacher, target, mask = (data[name] for name in ("student", "teacher", "target", "mask"))
    counted = mask & (target != -100)
    total = int(counted.sum())
    first_half, second_half = int(counted[:2].sum()), int(counted[2:].sum())
    assert first_half != second_half  # uneven: the case where a per-micro-batch mean goes wrong

    def whole(s: torch.Tensor) -> torch.Tensor:
        return token_distill_loss(s, teacher, target, kind=kind, mask=mask)["loss"]

    def split(s: torch.Tensor, normalizer: int | None) -> torch.Tensor:
        parts = [slice(0, 2), slice(2, 4)]
        losses = [
            token_distill_loss(s[p], teacher[p], target[p], kind=kind, mask=mask[p], normalizer=normalizer)["loss"]
            for p in parts
        ]
        if normalizer is None:  # what TRL did: each micro-batch's own mean, averaged over micro-batches
            return (losses[0] + losses[1]) / 2
        return losses[0] + losses[1]

    expected = _grad(whole, student)
    torch.testing.assert_close(_grad(lambda s: split(s, total), student), expected, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(_grad(lambda s: split(s, None), student), expected)  # the bug this pins


class _TokenStudent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.table = nn.Embedding(VOCAB, VOCAB)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.table(input_ids)


def _engine_run(accumulation: int, method: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    rows, seq = 8, 6
    ids = torch.randint(0, VOCAB, (rows, seq), generator=generator)
    lengths = torch.tensor([6, 6, 6, 6, 2, 2, 3, 2])  # the second half of every batch is mostly padding
    mask = (torch.arange(seq).unsqueeze(0) < lengths.unsqueeze(1)).long()
    teacher = torch.randn(rows, seq, VOCAB, generator=generator)
    student = _TokenStudent()
    config = TrainConfig(
        epochs=2, batch_size=8, lr=0.5, weight_decay=0.0, optimizer="sgd", momentum=0.0, warmup_fraction=0.0,
        schedule="constant", grad_accumulation=accumulation, verbose=False,
    )  # fmt: skip
    from kdistill.tasks import get_task

    target = get_task("token_lm").encode_targets({"input_ids": ids, "attention_mask": mask})
    loss = get_loss(method, temperature=2.0) if method != "ce" else get_loss(method)
    fit(student, loss, TransferSet({"input_ids": ids, "attention_mask": mask}, target, teacher), config=config)
    return student.table.weight.detach().clone()


@pytest.mark.parametrize("method", ["forward_kl", "gjsd", "kd", "ce"])
def test_engine_gradient_accumulation_with_uneven_padding_trains_the_same_weights(method: str) -> None:
    """The engine weights token-level micro-batches by their real tokens: two micro-batches of very different token
    counts train the weights that one whole batch trains (weighted by rows they would not)."""
    whole = _engine_run(1, method)
    torch.testing.assert_close(_engine_run(2, method), whole, rtol=1e-5, atol=1e-6)
    assert not torch.equal(whole, _TokenStudent().table.weight.detach())


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_a_topk_teacher_with_every_token_but_one_is_the_dense_loss(kind: str) -> None:
    data = _padded_batch(seed=2)
    teacher = torch.nan_to_num(data["teacher"])
    topk = TopK.from_logits(teacher, VOCAB - 1)  # the rest bucket holds exactly one token: nothing is lost
    args = {"kind": kind, "temperature": 2.0, "mask": data["mask"]}
    dense = token_distill_loss(data["student"], teacher, data["target"], **args)
    bucketed = token_distill_loss(data["student"], TopK(topk.values.double(), topk.indices, topk.rest.double()),
                                  data["target"], **args)  # fmt: skip
    torch.testing.assert_close(bucketed["loss"], dense["loss"], rtol=1e-6, atol=1e-9)


def test_a_topk_teacher_reads_the_rest_bucket_exactly() -> None:
    """k = 3 of 11: the loss is the divergence between the k + 1 bucket distributions, computed here by hand."""
    generator = torch.Generator().manual_seed(5)
    student = torch.randn(1, 1, VOCAB, generator=generator, dtype=torch.float64)
    teacher = torch.randn(1, 1, VOCAB, generator=generator, dtype=torch.float64)
    values, indices = teacher.topk(3, dim=-1)
    topk = TopK(values, indices, teacher.scatter(-1, indices, -torch.inf).logsumexp(-1))  # float64 throughout
    kept = indices[0, 0].tolist()
    others = [v for v in range(VOCAB) if v not in kept]
    p_full, q_full = teacher[0, 0].softmax(-1).numpy(), student[0, 0].softmax(-1).numpy()
    p = np.array([*p_full[kept], p_full[others].sum()])
    q = np.array([*q_full[kept], q_full[others].sum()])
    got = token_distill_loss(student, topk, None, kind="tv")
    assert float(got["kd"]) == pytest.approx(0.5 * np.abs(p - q).sum(), rel=1e-9)
    got = token_distill_loss(student, topk, None)
    assert float(got["kd"]) == pytest.approx(_np_kl(p, q), rel=1e-9)


def test_registered_classes_read_outputs_and_match_the_function() -> None:
    data = _padded_batch()
    names = {"forward_kl": "forward_kl", "reverse_kl": "reverse_kl", "gjsd": "jsd", "skew_kl": "skew_forward_kl"}
    names |= {"skew_reverse_kl": "skew_reverse_kl", "tvd": "tv"}
    for name, kind in names.items():
        assert name in LOSSES
        loss = get_loss(name, temperature=2.0, soft_weight=0.7)
        student = Outputs(data["student"], mask=data["mask"])
        got = loss(student, Outputs(data["teacher"]), data["target"])
        expected = token_distill_loss(
            data["student"], data["teacher"], data["target"], kind=kind, temperature=2.0, soft_weight=0.7,
            mask=data["mask"],
        )  # fmt: skip
        assert float(got["loss"]) == float(expected["loss"])
        chunked = get_loss(name, temperature=2.0, soft_weight=0.7, chunk_size=3)(student, Outputs(data["teacher"]),
                                                                                   data["target"])  # fmt: skip
        assert float(chunked["loss"]) == pytest.approx(float(expected["loss"]), rel=1e-12)


def test_bad_settings_and_shapes_are_clear_errors() -> None:
    with pytest.raises(MethodError, match="beta must be in"):
        get_loss("gjsd", beta=1.5)
    with pytest.raises(MethodError, match="skew must be in"):
        get_loss("skew_kl", skew=1.0)
    with pytest.raises(MethodError, match="unknown divergence 'kl'"):
        get_loss("token_divergence", kind="kl")
    with pytest.raises(MethodError, match="chunk_size must be >= 1"):
        get_loss("forward_kl", chunk_size=0)
    with pytest.raises(ShapeMismatchError, match=r"\(2, 3, 8\) and teacher logits \(2, 3, 9\)"):
        token_distill_loss(torch.zeros(2, 3, 8), torch.zeros(2, 3, 9), None)


# ---- chunked --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_chunked_value_and_gradient_equal_the_unchunked_loss(kind: str, chunk: int) -> None:
    data = _padded_batch(seed=6)
    student, teacher, target, mask = (data[name] for name in ("student", "teacher", "target", "mask"))
    args: dict[str, Any] = {"kind": kind, "temperature": 2.0, "soft_weight": 0.6, "beta": 0.3, "mask": mask}

    def plain(s: torch.Tensor) -> torch.Tensor:
        return token_distill_loss(s, teacher, target, **args)["loss"]

    def chunked(s: torch.Tensor) -> torch.Tensor:
        return chunked_token_loss(s, teacher, target, chunk_size=chunk, **args)["loss"]

    assert float(chunked(student)) == pytest.approx(float(plain(student)), rel=1e-12)
    torch.testing.assert_close(_grad(chunked, student), _grad(plain, student), rtol=1e-10, atol=1e-12)
    topk = TopK.from_logits(torch.nan_to_num(teacher), 4)
    values = token_distill_loss(student, topk, target, **args)["loss"]
    assert float(chunked_token_loss(student, topk, target, chunk_size=chunk, **args)["loss"]) == pytest.approx(
        float(values), rel=1e-6
    )


def test_chunked_head_loss_equals_the_loss_on_materialised_logits() -> None:
    generator = torch.Generator().manual_seed(7)
    data = _padded_batch(seed=7)
    hidden = torch.randn(4, 7, 5, generator=generator, dtype=torch.float64)
    weight = torch.randn(VOCAB, 5, generator=generator, dtype=torch.float64)
    bias = torch.randn(VOCAB, generator=generator, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    expected = token_distill_loss(
        leaves[0] @ leaves[1].T + leaves[2], data["teacher"], data["target"], kind="reverse_kl", mask=data["mask"]
    )["loss"]
    expected_grads = torch.autograd.grad(expected, leaves)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    got = chunked_head_loss(leaves[0], leaves[1], data["teacher"], data["target"], head_bias=leaves[2],
                            kind="reverse_kl", mask=data["mask"], chunk_size=2)["loss"]  # fmt: skip
    assert float(got) == pytest.approx(float(expected), rel=1e-12)
    for a, b in zip(torch.autograd.grad(got, leaves), expected_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


class _LargestFloat32(TorchDispatchMode):
    """Records the most elements of any float32 tensor an op creates."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32:
                self.largest = max(self.largest, tensor.numel())
        return out


def test_chunked_loss_never_creates_more_than_a_chunk_of_float32_logits() -> None:
    """bf16 logits (as a mixed-precision model returns them): the naive loss upcasts all tokens x vocab to float32,
    the chunked one never more than chunk x vocab (forward and backward)."""
    tokens, vocab, chunk = 64, 50, 8
    generator = torch.Generator().manual_seed(8)
    student = torch.randn(2, tokens // 2, vocab, generator=generator).bfloat16().requires_grad_()
    teacher = torch.randn(2, tokens // 2, vocab, generator=generator).bfloat16()
    target = torch.randint(0, vocab, (2, tokens // 2), generator=generator)
    for loss_fn, bound in [
        (lambda: chunked_token_loss(student, teacher, target, chunk_size=chunk, kind="jsd"), chunk * vocab),
        (lambda: token_distill_loss(student, teacher, target, kind="jsd"), None),
    ]:
        with _LargestFloat32() as seen:
            loss_fn()["loss"].backward()
        if bound is not None:
            assert seen.largest <= bound
        else:
            assert seen.largest >= tokens * vocab  # the naive form: the measurement sees the full upcast
    assert chunk_size_for(32_000, budget_bytes=24 * 32_000 * 100) == 100


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_every_divergence_reads_a_topk_teacher_as_its_k_plus_1_buckets(kind: str, temperature: float) -> None:
    """k = 3 of 11 per token, under a mask: each divergence equals the reference formula between the bucket
    distributions built by hand from the full logits (the k kept ids, and one bucket for all the others), both
    sides at temperature T (the rest bucket's logit is the log-sum-exp of the other logits, then divided by T)."""
    data = _padded_batch(seed=7)
    student, teacher = data["student"].double(), torch.nan_to_num(data["teacher"]).double()
    values, indices = teacher.topk(3, dim=-1)
    topk = TopK(values, indices, teacher.scatter(-1, indices, -torch.inf).logsumexp(-1))
    beta, skew = 0.3, 0.2
    got = token_distill_loss(student, topk, data["target"], kind=kind, temperature=temperature, beta=beta,
                             skew=skew, mask=data["mask"], soft_weight=1.0)  # fmt: skip
    total, count = 0.0, 0
    for b, t in zip(*np.nonzero((data["mask"].numpy() > 0) & (data["target"].numpy() != -100)), strict=True):
        kept = indices[b, t].tolist()
        others = [v for v in range(VOCAB) if v not in kept]
        z_t, z_s = teacher[b, t].numpy(), student[b, t].numpy()

        def buckets(z: np.ndarray, kept: list[int] = kept, others: list[int] = others) -> np.ndarray:
            rest = np.log(np.exp(z[others] - z[others].max()).sum()) + z[others].max()
            return _softmax(np.array([*z[kept], rest]) / temperature)

        total += _reference(kind, buckets(z_t), buckets(z_s), beta, skew)
        count += 1
    assert float(got["kd"]) == pytest.approx(temperature**2 * total / count, rel=1e-9)


def test_the_default_auto_chunk_leaves_small_batches_whole_and_cuts_large_ones_into_sixteenths() -> None:
    from kdistill.losses.chunked import auto_chunk_size

    assert auto_chunk_size(1024, 1024) is None  # 28 MiB naive working set: not chunked
    assert auto_chunk_size(1024, 32_000) == 64  # a sixteenth of the tokens
    assert auto_chunk_size(100_000, 32_000) == chunk_size_for(32_000)  # capped by the 256 MiB budget
    tokens, vocab = 640, 4096  # 70 MiB naive: chunks of 40 tokens
    generator = torch.Generator().manual_seed(9)
    student = torch.randn(2, tokens // 2, vocab, generator=generator).bfloat16().requires_grad_()
    teacher = torch.randn(2, tokens // 2, vocab, generator=generator).bfloat16()
    target = torch.randint(0, vocab, (2, tokens // 2), generator=generator)
    loss = get_loss("gjsd")
    assert loss.chunk_size == "auto"
    with _LargestFloat32() as seen:
        terms = loss(Outputs(student), Outputs(teacher), target)
        terms["loss"].backward()
    assert seen.largest <= 40 * vocab
    whole = get_loss("gjsd", chunk_size=None)(Outputs(student.detach()), Outputs(teacher), target)
    torch.testing.assert_close(terms["loss"].detach(), whole["loss"], rtol=1e-5, atol=1e-6)
    with pytest.raises(MethodError, match="chunk_size"):
        get_loss("forward_kl", chunk_size="big")
