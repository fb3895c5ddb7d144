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
