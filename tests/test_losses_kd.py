"""The Hinton KD loss against an independent numpy computation, and its stated properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kdistill.losses.kd as kd_module
from kdistill import KDLoss, Outputs, kd_loss
from kdistill.engine import TrainConfig, TransferSet, fit
from kdistill.errors import ShapeMismatchError
from kdistill.losses import StaticTargets, get_loss
from kdistill.losses.kd import kd_loss_packed, pack_kd_targets


def _numpy_kd(student: np.ndarray, teacher: np.ndarray, y: np.ndarray, temperature: float, soft_weight: float) -> float:
    def log_softmax(z: np.ndarray) -> np.ndarray:
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    log_q = log_softmax(student / temperature)
    log_p = log_softmax(teacher / temperature)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(axis=1).mean()
    ce = -log_softmax(student)[np.arange(len(y)), y].mean()
    return float((1 - soft_weight) * ce + soft_weight * temperature**2 * kl)


@pytest.mark.parametrize(("temperature", "soft_weight"), [(1.0, 0.5), (4.0, 0.9), (8.0, 0.3), (2.5, 1.0)])
def test_matches_numpy(temperature: float, soft_weight: float) -> None:
    rng = np.random.default_rng(0)
    student, teacher = rng.normal(size=(32, 7)) * 3, rng.normal(size=(32, 7)) * 3
    y = rng.integers(0, 7, size=32)
    terms = kd_loss(
        torch.tensor(student), torch.tensor(teacher), torch.tensor(y), temperature=temperature, soft_weight=soft_weight
    )
    expected = _numpy_kd(student, teacher, y, temperature, soft_weight)
    assert float(terms["loss"]) == pytest.approx(expected, rel=1e-6)


def test_kl_is_zero_when_student_equals_teacher() -> None:
    logits = torch.randn(16, 5)
    terms = kd_loss(logits, logits.clone(), torch.zeros(16, dtype=torch.long), temperature=3.0)
    assert float(terms["kd"]) == pytest.approx(0.0, abs=1e-6)
    assert float(kd_loss(logits, logits + 1.0, None)["kd"]) == pytest.approx(0.0, abs=1e-6)  # shift-invariant


def test_soft_weight_zero_is_cross_entropy() -> None:
    student, teacher = torch.randn(20, 4), torch.randn(20, 4)
    y = torch.randint(0, 4, (20,))
    terms = kd_loss(student, teacher, y, soft_weight=0.0)
    assert float(terms["loss"]) == pytest.approx(float(F.cross_entropy(student, y)), rel=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0, 10.0])
def test_gradient_scales_as_stated(temperature: float) -> None:
    """d(T² KL)/dz_s = T (softmax(z_s/T) - softmax(z_t/T)) / batch: the T² factor undoes the 1/T² shrinkage."""
    student = torch.randn(8, 6, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(8, 6, dtype=torch.float64)
    kd_loss(student, teacher, None, temperature=temperature)["loss"].backward()
    expected = temperature * (torch.softmax(student / temperature, 1) - torch.softmax(teacher / temperature, 1)) / 8
    assert student.grad is not None
    assert torch.allclose(student.grad, expected.detach(), atol=1e-12)


def test_high_temperature_gradient_approaches_logit_matching() -> None:
    """Hinton's limit: for large T the soft gradient tends to (z_s - z_t)/(classes·batch) for zero-mean logits."""
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(4, 5, dtype=torch.float64, generator=generator)
    teacher = torch.randn(4, 5, dtype=torch.float64, generator=generator)
    student, teacher = student - student.mean(1, keepdim=True), teacher - teacher.mean(1, keepdim=True)
    student.requires_grad_(True)
    kd_loss(student, teacher, None, temperature=1000.0)["loss"].backward()
    assert student.grad is not None
    # first order in 1/T: the remainder is O(z²/T), about 0.5% of the gradient here
    assert torch.allclose(student.grad, ((student - teacher) / (5 * 4)).detach(), rtol=1e-2, atol=1e-6)


def test_probabilities_with_exact_zeros_stay_finite() -> None:
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    student = torch.randn(3, 3, requires_grad=True)
    terms = kd_loss(student, probs, torch.tensor([0, 1, 2]), teacher_probs=True)
    terms["loss"].backward()
    assert torch.isfinite(terms["loss"])
    assert student.grad is not None and torch.isfinite(student.grad).all()
    # the floored zeros carry almost no mass at T=4: the teacher's soft target matches p^(1/T) renormalised
    soft = torch.softmax(torch.log(probs.clamp_min(1e-12)) / 4.0, dim=1)
    assert float(soft[0, 1]) < 2e-3


def test_class_wraps_function_and_checks_shapes() -> None:
    loss = KDLoss(temperature=2.0, soft_weight=0.7)
    student, teacher, y = torch.randn(5, 3), torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1])
    expected = kd_loss(student, teacher, y, temperature=2.0, soft_weight=0.7)["loss"]
    assert torch.equal(loss(Outputs(student), Outputs(teacher), y)["loss"], expected)
    with pytest.raises(ShapeMismatchError, match="differ"):
        loss(Outputs(student), Outputs(torch.randn(5, 4)), y)
    with pytest.raises(ValueError, match="temperature"):
        KDLoss(temperature=0.0)
    with pytest.raises(ValueError, match="soft_weight"):
        KDLoss(soft_weight=1.5)


# ---- the packed form the engine uses for a teacher whose outputs never change ---------------------------------------


@pytest.mark.parametrize(("temperature", "soft_weight", "rows"), [(4.0, 0.5, 64), (1.0, 0.1, 1), (8.0, 0.9, 33)])
def test_packed_form_matches_textbook_value_terms_and_gradient(
    temperature: float, soft_weight: float, rows: int
) -> None:
    torch.manual_seed(0)
    teacher_logits, y = torch.randn(200, 7) * 3, torch.randint(0, 7, (200,))
    loss = KDLoss(temperature, soft_weight)
    static = StaticTargets.build(loss, teacher_logits, y)
    assert static.packed
    index = torch.randperm(200)[:rows]
    served = static.select(index)  # strided views of one gathered table, as the engine hands them over
    assert served.precomputed is not None and (rows == 1 or not served.precomputed.is_contiguous())
    torch.testing.assert_close(served.logits, teacher_logits[index])
    student = (torch.randn(rows, 7) * 2).requires_grad_()
    packed_terms = loss(Outputs(student), served, y[index])
    textbook = kd_loss(student, teacher_logits[index], y[index], temperature=temperature, soft_weight=soft_weight)
    assert set(packed_terms) == set(textbook) == {"loss", "ce", "kd"}
    for name in textbook:
        torch.testing.assert_close(packed_terms[name], textbook[name], rtol=1e-5, atol=1e-6)
    (packed_grad,) = torch.autograd.grad(packed_terms["loss"], student)
    (textbook_grad,) = torch.autograd.grad(textbook["loss"], student)
    torch.testing.assert_close(packed_grad, textbook_grad, rtol=1e-5, atol=1e-8)


def test_packed_form_is_used_only_where_it_is_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    teacher_logits, y = torch.randn(50, 4), torch.randint(0, 4, (50,))
    assert KDLoss(4.0, 0.5).precompute(teacher_logits, None) is None  # unlabeled: the soft term alone
    assert KDLoss(4.0, 0.0).precompute(teacher_logits, y) is None
    assert KDLoss(4.0, 1.0).precompute(teacher_logits, y) is None
    assert get_loss("kd_topk").precompute(teacher_logits, y) is None  # type: ignore[attr-defined]
    monkeypatch.setattr(kd_module, "PACK_MAX_NUMBERS", 50 * 9 - 1)  # too large: the memory-mapped cache is read
    assert KDLoss(4.0, 0.5).precompute(teacher_logits, y) is None
    assert not StaticTargets.build(KDLoss(4.0, 0.5), teacher_logits, y).packed


def test_changed_hyper_parameters_after_packing_fall_back_to_the_textbook_form() -> None:
    torch.manual_seed(1)
    teacher_logits, y, student = torch.randn(20, 5), torch.randint(0, 5, (20,)), torch.randn(20, 5)
    loss = KDLoss(4.0, 0.5)
    served = StaticTargets.build(loss, teacher_logits, y).select(torch.arange(20))
    loss.temperature, loss.soft_weight = 2.0, 0.7  # a schedule changed them: the packed table is stale
    expected = kd_loss(student, teacher_logits, y, temperature=2.0, soft_weight=0.7)["loss"]
    torch.testing.assert_close(loss(Outputs(student), served, y)["loss"], expected)


def test_packed_targets_with_other_class_count_are_refused() -> None:
    packed = pack_kd_targets(torch.randn(8, 5), torch.randint(0, 5, (8,)), temperature=2.0, soft_weight=0.5)
    with pytest.raises(ShapeMismatchError, match="do not fit"):
        kd_loss_packed(torch.randn(8, 6), packed, temperature=2.0, soft_weight=0.5)


def test_training_from_packed_targets_follows_the_textbook_run() -> None:
    """The engine packs kd's targets for precomputed logits; a loss without the hook gets the textbook form. The two
    runs take the same steps, up to float rounding."""

    class TextbookKD(KDLoss):
        def precompute(self, teacher_logits: torch.Tensor, target: torch.Tensor | None) -> None:
            return None

    torch.manual_seed(0)
    x, y = torch.randn(300, 6), torch.randint(0, 3, (300,))
    logits = torch.randn(300, 3) * 2
    weights = []
    for loss in (KDLoss(3.0, 0.6), TextbookKD(3.0, 0.6)):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        state = fit(model, loss, TransferSet(x, y, logits), config=TrainConfig(epochs=3, batch_size=32, verbose=False))
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        history = state.history
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-4, atol=1e-5)
    assert {"train_loss", "train_ce", "train_kd"} <= set(history[-1])


# ---- token-level (batch, seq, vocab) logits under a mask ------------------------------------------------------------


def _log_softmax_np(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _trl_forward_kl(student: np.ndarray, teacher: np.ndarray, labels: np.ndarray) -> float:
    """TRL's GKDTrainer.generalized_jsd_loss at beta=0 (forward KL), temperature 1, reduction "batchmean" with labels:
    the element-wise KL(teacher || student) kept where labels != -100, summed, divided by the number of those tokens.
    Transcribed as plain loops over (batch, seq)."""
    total, tokens = 0.0, 0
    for b in range(student.shape[0]):
        for t in range(student.shape[1]):
            if labels[b, t] == -100:
                continue
            log_q, log_p = _log_softmax_np(student[b, t]), _log_softmax_np(teacher[b, t])
            total += float((np.exp(log_p) * (log_p - log_q)).sum())
            tokens += 1
    return total / tokens


def _distillkit_kd(student: np.ndarray, teacher: np.ndarray, mask: np.ndarray, temperature: float) -> float:
    """DistillKit's dense KL loss: T² · Σ_tokens mask · Σ_vocab KL(softmax(t/T) || softmax(s/T)) / Σ mask."""
    log_q, log_p = _log_softmax_np(student / temperature), _log_softmax_np(teacher / temperature)
    per_token = (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)
    return float(temperature**2 * (per_token * mask).sum() / mask.sum())


def _token_ce(student: np.ndarray, target: np.ndarray, counted: np.ndarray) -> float:
    total, tokens = 0.0, 0
    for b, t in zip(*np.nonzero(counted), strict=True):
        total -= float(_log_softmax_np(student[b, t])[target[b, t]])
        tokens += 1
    return total / tokens


def _sequences(seed: int = 0, batch: int = 3, seq: int = 5, vocab: int = 11) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    student, teacher = rng.normal(size=(batch, seq, vocab)) * 2, rng.normal(size=(batch, seq, vocab)) * 2
    lengths = rng.integers(2, seq + 1, size=batch)
    mask = np.arange(seq)[None, :] < lengths[:, None]
    target = rng.integers(0, vocab, size=(batch, seq))
    return student, teacher, mask, target


def test_sequence_kd_is_per_token_not_summed_over_the_sequence() -> None:
    """Issue 11's bug: on (batch, seq, vocab) logits, kd_loss took the softmax over dim 1 (the sequence) and divided by
    the batch only, giving ~seq times the per-token value (4.61 against 0.61). It now matches the per-token value."""
    student, teacher, _, _ = _sequences(batch=4, seq=8, vocab=50)
    terms = kd_loss(torch.tensor(student), torch.tensor(teacher), None, temperature=1.0)
    per_token = _trl_forward_kl(student, teacher, np.zeros(student.shape[:2], dtype=np.int64))
    old_value = float(
        F.kl_div(
            F.log_softmax(torch.tensor(student), 1),
            F.log_softmax(torch.tensor(teacher), 1),
            reduction="batchmean",
            log_target=True,
        )
    )
    assert float(terms["kd"]) == pytest.approx(per_token, rel=1e-6)
    assert old_value > 5 * per_token  # the old reduction: a different number, silently


def test_sequence_kd_matches_trl_with_labels_ignored_at_minus_100() -> None:
    student, teacher, _, target = _sequences(seed=1)
    target[0, 3:] = -100
    target[2, 0] = -100
    terms = kd_loss(
        torch.tensor(student), torch.tensor(teacher), None, temperature=1.0, mask=torch.tensor(target != -100)
    )
    assert float(terms["kd"]) == pytest.approx(_trl_forward_kl(student, teacher, target), rel=1e-6)


@pytest.mark.parametrize(("temperature", "soft_weight"), [(1.0, 0.5), (4.0, 0.3), (2.0, 1.0)])
def test_sequence_kd_matches_distillkit_and_token_ce_under_a_mask(temperature: float, soft_weight: float) -> None:
    student, teacher, mask, target = _sequences(seed=2)
    target[1, 0] = -100  # a real token that takes no loss (a prompt token): out of both terms
    terms = kd_loss(
        torch.tensor(student),
        torch.tensor(teacher),
        torch.tensor(target),
        temperature=temperature,
        soft_weight=soft_weight,
        mask=torch.tensor(mask),
    )
    counted = mask & (target != -100)
    soft = _distillkit_kd(student, teacher, counted.astype(float), temperature)
    hard = _token_ce(student, target, counted)
    assert float(terms["kd"]) == pytest.approx(soft, rel=1e-6)
    assert float(terms["ce"]) == pytest.approx(hard, rel=1e-6)
    assert float(terms["loss"]) == pytest.approx((1 - soft_weight) * hard + soft_weight * soft, rel=1e-6)


def test_padding_changes_nothing_and_gets_no_gradient() -> None:
    student, teacher, mask, target = _sequences(seed=3)
    padded = torch.tensor(~mask)
    garbage_student = torch.tensor(student).masked_fill(padded[..., None], 1e4).requires_grad_()
    garbage_teacher = torch.tensor(teacher).masked_fill(padded[..., None], float("nan"))
    clean = kd_loss(torch.tensor(student), torch.tensor(teacher), torch.tensor(target), mask=torch.tensor(mask))
    dirty = kd_loss(garbage_student, garbage_teacher, torch.tensor(target), mask=torch.tensor(mask))
    for name in clean:
        torch.testing.assert_close(dirty[name], clean[name])
    dirty["loss"].backward()
    assert garbage_student.grad is not None
    assert float(garbage_student.grad[padded].abs().max()) == 0.0


def test_normalizer_makes_micro_batches_sum_to_the_full_batch_mean() -> None:
    """Gradient accumulation: with normalizer = the whole batch's count of real tokens, the micro-batch losses add up
    to the full batch's per-token mean; each micro-batch's own mean (the default) does not when counts differ."""
    student, teacher, mask, target = _sequences(seed=4, batch=4)
    mask[:2, 1:] = False  # the first micro-batch holds far fewer real tokens
    s, t, m, y = (torch.tensor(a) for a in (student, teacher, mask, target))
    full = kd_loss(s, t, y, mask=m)["loss"]
    total = int(m.sum())
    halves = [slice(0, 2), slice(2, 4)]
    summed = sum(kd_loss(s[h], t[h], y[h], mask=m[h], normalizer=total)["loss"] for h in halves)
    averaged = sum(kd_loss(s[h], t[h], y[h], mask=m[h])["loss"] for h in halves) / 2
    torch.testing.assert_close(summed, full)
    assert abs(float(averaged) - float(full)) > 1e-3


def test_a_batch_with_no_real_token_gives_zero_not_nan() -> None:
    student, teacher, _, target = _sequences(seed=5)
    nothing = torch.zeros(student.shape[:2], dtype=torch.bool)
    terms = kd_loss(torch.tensor(student), torch.tensor(teacher), torch.tensor(target), mask=nothing)
    assert all(float(value) == 0.0 for value in terms.values())


def test_class_form_reads_the_mask_from_the_outputs_and_matches_the_function() -> None:
    student, teacher, mask, target = _sequences(seed=6)
    s, t, m, y = (torch.tensor(a) for a in (student, teacher, mask, target))
    expected = kd_loss(s, t, y, temperature=2.0, soft_weight=0.4, mask=m)
    loss = KDLoss(2.0, 0.4)
    for student_out, teacher_out in ((Outputs(s, mask=m), Outputs(t)), (Outputs(s), Outputs(t, mask=m))):
        got = loss(student_out, teacher_out, y)
        for name in expected:
            torch.testing.assert_close(got[name], expected[name])
    with pytest.raises(ShapeMismatchError, match="masks differ"):
        loss(Outputs(s, mask=m), Outputs(t, mask=~m), y)


def test_token_cross_entropy_class_form() -> None:
    student, _, mask, target = _sequences(seed=7)
    got = get_loss("ce")(Outputs(torch.tensor(student), mask=torch.tensor(mask)), None, torch.tensor(target))
    assert float(got["ce"]) == pytest.approx(_token_ce(student, target, mask), rel=1e-6)


def test_sequence_shapes_that_do_not_fit_are_refused() -> None:
    s, t = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    with pytest.raises(ShapeMismatchError, match=r"target \(2,\) does not fit logits \(2, 4, 6\)"):
        kd_loss(s, t, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ShapeMismatchError, match=r"mask \(2, 3\) does not fit"):
        kd_loss(s, t, None, mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ShapeMismatchError, match="differ"):
        kd_loss(s, torch.randn(2, 4, 7), None)
    with pytest.raises(ShapeMismatchError, match=r"\(batch, seq, vocab\) logits; got \(2, 4, 6, 1\)"):
        kd_loss(s[..., None], t[..., None], None)


def test_row_path_is_unchanged_and_an_all_true_mask_agrees_with_it() -> None:
    torch.manual_seed(3)
    s, t, y = torch.randn(9, 5), torch.randn(9, 5), torch.randint(0, 5, (9,))
    rows = kd_loss(s, t, y, temperature=3.0, soft_weight=0.7)
    reference = _numpy_kd(s.double().numpy(), t.double().numpy(), y.numpy(), 3.0, 0.7)
    assert float(rows["loss"]) == pytest.approx(reference, rel=1e-6)
    masked = kd_loss(s, t, y, temperature=3.0, soft_weight=0.7, mask=torch.ones(9, dtype=torch.bool))
    for name in rows:
        torch.testing.assert_close(masked[name], rows[name])


# ---- typed top-k ----------------------------------------------------------------------------------------------------


def _numpy_topk_kd(student: np.ndarray, teacher: np.ndarray, k: int, temperature: float, counted: np.ndarray) -> float:
    """kd_topk's formula per position, in loops: buckets [top-k logits, LSE of the rest] for both, then
    T² · KL(softmax(a_t / T) || softmax(a_s / T)), averaged over the counted positions."""
    total, positions = 0.0, 0
    for index in zip(*np.nonzero(counted), strict=True):
        z_s, z_t = student[index], teacher[index]
        top = np.argsort(-z_t, kind="stable")[:k]
        others = np.setdiff1d(np.arange(len(z_t)), top)

        def lse(v: np.ndarray) -> float:
            return float(np.log(np.exp(v - v.max()).sum()) + v.max())

        a_t = np.append(z_t[top], lse(z_t[others])) / temperature
        a_s = np.append(z_s[top], lse(z_s[others])) / temperature
        log_p, log_q = _log_softmax_np(a_t), _log_softmax_np(a_s)
        total += float((np.exp(log_p) * (log_p - log_q)).sum())
        positions += 1
    return temperature**2 * total / positions


def test_topk_per_token_matches_numpy_buckets_under_a_mask() -> None:
    from kdistill.losses.kd_topk import kd_topk_loss
    from kdistill.teachers import TopK

    student, teacher, mask, _ = _sequences(seed=8, vocab=9)
    topk = TopK.from_logits(torch.tensor(teacher), 3)
    assert topk.values.shape == (3, 5, 3) and topk.rest.shape == (3, 5)
    got = kd_topk_loss(torch.tensor(student), topk, None, temperature=2.0, mask=torch.tensor(mask))
    assert float(got["kd"]) == pytest.approx(_numpy_topk_kd(student, teacher, 3, 2.0, mask), rel=1e-5)
    # with k = vocab - 1 the rest bucket holds one token: exactly kd per token
    full = kd_topk_loss(
        torch.tensor(student), TopK.from_logits(torch.tensor(teacher), 8), None, mask=torch.tensor(mask)
    )
    dense = kd_loss(torch.tensor(student), torch.tensor(teacher), None, mask=torch.tensor(mask))
    torch.testing.assert_close(full["kd"], dense["kd"])


def test_topk_field_and_packed_table_give_bit_identical_rows() -> None:
    from kdistill.losses import KDTopKLoss
    from kdistill.losses.kd_topk import kd_topk_loss, pack_topk, unpack_topk
    from kdistill.teachers import TopK

    torch.manual_seed(4)
    student, teacher, y = torch.randn(20, 7), torch.randn(20, 7) * 2, torch.randint(0, 7, (20,))
    topk = TopK.from_logits(teacher, 3)
    table = topk.packed()
    assert torch.equal(table, pack_topk(*unpack_topk(table)))
    via_table = kd_topk_loss(student, table, y, temperature=4.0)
    via_field = KDTopKLoss(4.0)(Outputs(student), Outputs(topk=topk), y)
    legacy = KDTopKLoss(4.0)(Outputs(student), Outputs(table), y)  # kdistill 0.1's packed logits
    for name in via_table:
        assert torch.equal(via_field[name], via_table[name])
        assert torch.equal(legacy[name], via_table[name])


def test_static_targets_serve_topk_rows_from_a_topk_or_a_packed_table() -> None:
    from kdistill.losses import KDTopKLoss
    from kdistill.teachers import TopK

    torch.manual_seed(5)
    teacher, y = torch.randn(40, 6), torch.randint(0, 6, (40,))
    topk = TopK.from_logits(teacher, 2)
    index = torch.tensor([3, 17, 0, 39, 17])
    loss = KDTopKLoss(2.0)
    for given in (topk, topk.packed()):  # the packed form is what today's api.py hands the engine
        served = StaticTargets.build(loss, given, y).select(index)
        assert not served.has_logits and served.topk is not None
        assert torch.equal(served.topk.values, topk.values[index])
        assert torch.equal(served.topk.indices, topk.indices[index])
        assert torch.equal(served.topk.rest, topk.rest[index])
        assert torch.equal(served.index, index)
    with pytest.raises(Exception, match="only the teacher's top-k"):
        _ = served.logits


def test_topk_shapes_that_do_not_fit_are_refused() -> None:
    from kdistill.losses.kd_topk import kd_topk_loss
    from kdistill.teachers import TopK

    topk = TopK.from_logits(torch.randn(4, 8), 3)
    with pytest.raises(ShapeMismatchError, match="does not fit student logits"):
        kd_topk_loss(torch.randn(4, 5), topk, None)  # ids up to 7 for 5 classes
    with pytest.raises(ShapeMismatchError, match="do not fit together"):
        TopK(torch.randn(4, 3), torch.zeros(4, 2, dtype=torch.long), torch.randn(4))
    with pytest.raises(ShapeMismatchError, match="must be integers"):
        TopK(torch.randn(4, 3), torch.zeros(4, 3), torch.randn(4))
    with pytest.raises(ShapeMismatchError, match=r"\(rows, 2k \+ 1\)"):
        TopK.from_packed(torch.randn(4, 6))
    assert TopK(torch.randn(2, 1), torch.zeros(2, 1, dtype=torch.int16), torch.randn(2)).indices.dtype == torch.int64


# ---- embeddings -----------------------------------------------------------------------------------------------------


def test_cosine_and_mse_match_sentence_transformers_formulas() -> None:
    """cosine: 1 - cos with both vectors normalised (sentence-transformers' pairwise_cos_sim), mean over rows; mse:
    nn.MSELoss() between student and teacher embeddings (sentence-transformers' MSELoss), a mean over every number."""
    rng = np.random.default_rng(9)
    student, teacher = rng.normal(size=(6, 4)), rng.normal(size=(6, 4)) * 3
    cosines = [float(s @ t / (np.linalg.norm(s) * np.linalg.norm(t))) for s, t in zip(student, teacher, strict=True)]
    s_out, t_out = Outputs(torch.tensor(student)), Outputs(torch.tensor(teacher))
    cosine = get_loss("cosine")(s_out, t_out, None)
    mse = get_loss("mse")(s_out, t_out, None)
    assert float(cosine["cosine"]) == pytest.approx(np.mean([1 - c for c in cosines]), rel=1e-9)
    assert float(mse["mse"]) == pytest.approx(((student - teacher) ** 2).mean(), rel=1e-9)
    scaled = get_loss("cosine")(Outputs(torch.tensor(student) * 5), t_out, None)  # blind to the norm
    torch.testing.assert_close(scaled["loss"], cosine["loss"])


def test_embedding_losses_refuse_shapes_they_do_not_support() -> None:
    for name in ("cosine", "mse"):
        with pytest.raises(ShapeMismatchError, match=r"\(4, 8\) and teacher embeddings \(4, 6\) differ"):
            get_loss(name)(Outputs(torch.randn(4, 8)), Outputs(torch.randn(4, 6)), None)
        with pytest.raises(ShapeMismatchError, match="pool token embeddings"):
            get_loss(name)(Outputs(torch.randn(4, 3, 6)), Outputs(torch.randn(4, 3, 6)), None)
