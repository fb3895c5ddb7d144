"""The in-batch contrastive loss against independent transcriptions: a per-row loop of the formula, and the authors'
CompRess code (``KLD`` on L2-normalised dot products over T) for the form that keeps each row in its own bank."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdistill.errors import MethodError, ShapeMismatchError
from kdistill.losses import SimilarityContrastiveLoss, get_loss, similarity_contrastive_loss
from kdistill.tasks import get_task
from kdistill.teachers import Outputs


def _loop_reference(student: np.ndarray, teacher: np.ndarray, t_s: float, t_t: float) -> float:
    """(1/B) Σ_i Σ_{j≠i} p^t_ij log(p^t_ij / p^s_ij), float64, one row at a time."""
    s = student / np.linalg.norm(student, axis=1, keepdims=True)
    t = teacher / np.linalg.norm(teacher, axis=1, keepdims=True)
    total = 0.0
    for i in range(len(s)):
        others = [j for j in range(len(s)) if j != i]
        zs = np.array([s[i] @ s[j] / t_s for j in others])
        zt = np.array([t[i] @ t[j] / t_t for j in others])
        ps = np.exp(zs - zs.max()) / np.exp(zs - zs.max()).sum()
        pt = np.exp(zt - zt.max()) / np.exp(zt - zt.max()).sum()
        total += float((pt * np.log(pt / ps)).sum())
    return total / len(s)


def _compress_reference(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """The authors' CompReSS.forward with the batch itself as both banks: l2norm, mm, div T, KLD(batchmean)."""
    s = student / student.pow(2).sum(1, keepdim=True).pow(0.5)
    t = teacher / teacher.pow(2).sum(1, keepdim=True).pow(0.5)
    similarities_student = torch.div(torch.mm(s, s.T), temperature)
    similarities_teacher = torch.div(torch.mm(t, t.T), temperature)
    return F.kl_div(
        F.log_softmax(similarities_student, dim=1), F.softmax(similarities_teacher, dim=1), reduction="batchmean"
    )


@pytest.mark.parametrize(("t_s", "t_t"), [(0.04, None), (0.1, 0.05)])
def test_matches_a_per_row_transcription(t_s: float, t_t: float | None) -> None:
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(7, 5, generator=generator, dtype=torch.float64)
    teacher = torch.randn(7, 9, generator=generator, dtype=torch.float64)  # another width
    ours = similarity_contrastive_loss(student, teacher, temperature=t_s, teacher_temperature=t_t)
    expected = _loop_reference(student.numpy(), teacher.numpy(), t_s, t_t or t_s)
    assert math.isclose(float(ours), expected, rel_tol=1e-9)


def test_include_self_is_the_authors_kld_over_the_whole_bank() -> None:
    generator = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(6, 4, generator=generator), torch.randn(6, 4, generator=generator)
    ours = similarity_contrastive_loss(student, teacher, temperature=0.04, include_self=True)
    torch.testing.assert_close(ours, _compress_reference(student, teacher, 0.04), rtol=1e-5, atol=1e-6)


def test_zero_at_equal_similarities_and_rotation_invariant() -> None:
    generator = torch.Generator().manual_seed(2)
    teacher = torch.randn(8, 6, generator=generator)
    rotation, _ = torch.linalg.qr(torch.randn(6, 6, generator=generator))
    assert float(similarity_contrastive_loss(teacher @ rotation, teacher)) < 1e-5
    assert float(similarity_contrastive_loss(torch.randn(8, 6, generator=generator), teacher)) > 0.1


def test_class_form_terms_weight_and_registration() -> None:
    generator = torch.Generator().manual_seed(3)
    student = torch.randn(5, 3, generator=generator, requires_grad=True)
    teacher = torch.randn(5, 8, generator=generator)
    loss = get_loss("contrastive", weight=2.0)
    assert isinstance(loss, SimilarityContrastiveLoss)
    terms = loss(Outputs(student), Outputs(teacher), None)
    torch.testing.assert_close(terms["loss"], 2.0 * terms["contrastive"])
    terms["loss"].backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()
    assert "contrastive" in (get_task("embedding").methods or ())


def test_bad_input_is_refused() -> None:
    with pytest.raises(ShapeMismatchError, match="at least 2 rows"):
        similarity_contrastive_loss(torch.randn(1, 3), torch.randn(1, 3))
    with pytest.raises(ShapeMismatchError, match=r"student outputs \(2, 3, 4\)"):
        similarity_contrastive_loss(torch.randn(2, 3, 4), torch.randn(2, 3))
    with pytest.raises(ShapeMismatchError, match="batch 3 and teacher batch 4"):
        similarity_contrastive_loss(torch.randn(3, 3), torch.randn(4, 3))
    with pytest.raises(MethodError, match="temperatures must be > 0"):
        SimilarityContrastiveLoss(temperature=0.0)
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ShapeMismatchError, match="sequence mask"):
        get_loss("contrastive")(Outputs(torch.randn(2, 3), mask=mask), Outputs(torch.randn(2, 3)), None)
