"""Each method against an independent numpy implementation of its paper's formula, on fixed inputs, plus
hand-derived identities (DKD's decomposition of KD)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdistill.losses import (
    ATLoss,
    DISTLoss,
    DKDLoss,
    KDLoss,
    PKTLoss,
    RKDLoss,
    SPLoss,
    contrastive_loss,
    get_loss,
    multi_teacher_loss,
    standardize_logits,
)
from kdistill.teachers import Outputs

RNG = np.random.default_rng(1234)
B, C = 7, 6
STUDENT = RNG.normal(size=(B, C)) * 2
TEACHER = RNG.normal(size=(B, C)) * 3
TARGET = RNG.integers(0, C, size=B)
FEAT_S = RNG.normal(size=(B, 4, 5))
FEAT_T = RNG.normal(size=(B, 9, 5))


def _t(array: np.ndarray) -> torch.Tensor:
    return torch.tensor(array, dtype=torch.float64)


def _softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _kl_rows(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return (p * (np.log(p) - np.log(q))).sum(axis=-1)


def _ce(z: np.ndarray, y: np.ndarray) -> float:
    return float(-np.log(_softmax(z)[np.arange(len(y)), y]).mean())


def _logit_outputs(student: np.ndarray = STUDENT, teacher: np.ndarray = TEACHER) -> tuple[Outputs, Outputs]:
    return Outputs(_t(student)), Outputs(_t(teacher))


def test_kd_matches_numpy() -> None:
    T, w = 3.0, 0.7
    expected_soft = T**2 * _kl_rows(_softmax(TEACHER / T), _softmax(STUDENT / T)).mean()
    expected = (1 - w) * _ce(STUDENT, TARGET) + w * expected_soft
    terms = KDLoss(temperature=T, soft_weight=w)(*_logit_outputs(), torch.tensor(TARGET))
    assert terms["kd"].item() == pytest.approx(expected_soft, rel=1e-9)
    assert terms["loss"].item() == pytest.approx(expected, rel=1e-9)


def _dkd_numpy(student: np.ndarray, teacher: np.ndarray, target: np.ndarray, T: float) -> tuple[float, float]:
    tckd, nckd = [], []
    for s, t, y in zip(student, teacher, target, strict=True):
        ps, pt = _softmax(s / T), _softmax(t / T)
        bs, bt = np.array([ps[y], 1 - ps[y]]), np.array([pt[y], 1 - pt[y]])
        tckd.append(_kl_rows(bt, bs))
        rest = np.arange(len(s)) != y
        nckd.append(_kl_rows(_softmax(t[rest] / T), _softmax(s[rest] / T)))
    return T**2 * float(np.mean(tckd)), T**2 * float(np.mean(nckd))


def test_dkd_matches_numpy() -> None:
    T, alpha, beta, ce_weight = 4.0, 1.5, 6.0, 0.8
    tckd, nckd = _dkd_numpy(STUDENT, TEACHER, TARGET, T)
    loss = DKDLoss(temperature=T, target_weight=alpha, nontarget_weight=beta, ce_weight=ce_weight)
    terms = loss(*_logit_outputs(), torch.tensor(TARGET))
    assert terms["tckd"].item() == pytest.approx(tckd, rel=1e-9)
    assert terms["nckd"].item() == pytest.approx(nckd, rel=1e-9)
    expected = ce_weight * _ce(STUDENT, TARGET) + alpha * tckd + beta * nckd
    assert terms["loss"].item() == pytest.approx(expected, rel=1e-9)


def test_dkd_decomposes_kd_exactly() -> None:
    """Zhao et al.'s identity: KL(p_t || p_s) = TCKD + (1 - p_t[y]) · NCKD, row by row."""
    T = 2.0
    for row in range(B):
        s, t, y = STUDENT[row : row + 1], TEACHER[row : row + 1], TARGET[row : row + 1]
        tckd, nckd = _dkd_numpy(s, t, y, T)
        kd = KDLoss(temperature=T, soft_weight=1.0)(*_logit_outputs(s, t), None)["kd"].item()
        teacher_target_prob = _softmax(t[0] / T)[y[0]]
        assert kd == pytest.approx(tckd + (1 - teacher_target_prob) * nckd, rel=1e-9)


def test_dkd_warmup_ramps_linearly() -> None:
    loss = DKDLoss(warmup_epochs=4, ce_weight=0.0)
    full = loss(*_logit_outputs(), torch.tensor(TARGET))["loss"].item()
    loss.start_epoch(0, 10)
    assert loss(*_logit_outputs(), torch.tensor(TARGET))["loss"].item() == pytest.approx(full / 4)
    loss.start_epoch(1, 10)
    assert loss(*_logit_outputs(), torch.tensor(TARGET))["loss"].item() == pytest.approx(full / 2)
    loss.start_epoch(7, 10)
    assert loss(*_logit_outputs(), torch.tensor(TARGET))["loss"].item() == pytest.approx(full)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1])


def test_dist_matches_numpy() -> None:
    T, beta, gamma = 2.0, 1.5, 0.5
    ps, pt = _softmax(STUDENT / T), _softmax(TEACHER / T)
    inter = T**2 * (1 - np.mean([_pearson(ps[i], pt[i]) for i in range(B)]))
    intra = T**2 * (1 - np.mean([_pearson(ps[:, c], pt[:, c]) for c in range(C)]))
    terms = DISTLoss(temperature=T, inter_weight=beta, intra_weight=gamma)(*_logit_outputs(), torch.tensor(TARGET))
    assert terms["inter"].item() == pytest.approx(inter, rel=1e-6)
    assert terms["intra"].item() == pytest.approx(intra, rel=1e-6)
    assert terms["loss"].item() == pytest.approx(_ce(STUDENT, TARGET) + beta * inter + gamma * intra, rel=1e-6)


def test_dist_ignores_affine_rescaling_of_probabilities() -> None:
    """Pearson correlation is invariant to a positive affine map: a student whose softened probabilities are
    a·p_t + b has zero DIST loss, although its KL to the teacher is not zero."""
    pt = _softmax(TEACHER)
    ps = 0.5 * pt + 0.5 / C  # rows still sum to 1
    terms = DISTLoss(ce_weight=0.0)(*_logit_outputs(np.log(ps), TEACHER), None)
    assert terms["loss"].item() == pytest.approx(0.0, abs=1e-5)  # 1e-8 in Pearson's denominator
    assert KDLoss(temperature=1.0)(*_logit_outputs(np.log(ps), TEACHER), None)["kd"].item() > 1e-3


def _huber(x: np.ndarray) -> np.ndarray:
    return np.where(np.abs(x) < 1, 0.5 * x**2, np.abs(x) - 0.5)


def _rkd_numpy(s: np.ndarray, t: np.ndarray) -> tuple[float, float]:
    def psi(e: np.ndarray) -> np.ndarray:
        d = np.sqrt(((e[:, None] - e[None]) ** 2).sum(-1))
        return d / d[~np.eye(len(e), dtype=bool)].mean()

    ds, dt = psi(s), psi(t)
    distance = np.mean([_huber(ds[i, j] - dt[i, j]) for i in range(B) for j in range(B) if i != j])

    def cos(e: np.ndarray, i: int, j: int, k: int) -> float:
        u, v = e[i] - e[j], e[k] - e[j]
        return float(u @ v / np.linalg.norm(u) / np.linalg.norm(v))

    angle = np.mean(
        [
            _huber(cos(s, i, j, k) - cos(t, i, j, k))
            for i in range(B)
            for j in range(B)
            for k in range(B)
            if i != j and k != j
        ]
    )
    return float(distance), float(angle)


def test_rkd_distinct_matches_numpy() -> None:
    """``reduction="distinct"``: means over distinct pairs and valid triplets (the reference form is checked in
    tests/test_losses_fidelity.py)."""
    s, t = FEAT_S.reshape(B, -1), FEAT_T.reshape(B, -1)
    distance, angle = _rkd_numpy(s, t)
    loss = RKDLoss(student_layer="s", teacher_layer="t", distance_weight=2.0, angle_weight=3.0, reduction="distinct")
    terms = loss(Outputs(_t(STUDENT), {"s": _t(FEAT_S)}), Outputs(_t(TEACHER), {"t": _t(FEAT_T)}), None)
    assert terms["distance"].item() == pytest.approx(distance, rel=1e-9)
    assert terms["angle"].item() == pytest.approx(angle, rel=1e-9)
    assert terms["loss"].item() == pytest.approx(2 * distance + 3 * angle, rel=1e-9)


def test_rkd_is_zero_for_a_scaled_and_rotated_copy() -> None:
    """Distances normalised by their mean and angles do not change under scaling, rotation and translation."""
    s = FEAT_S.reshape(B, -1)
    rotation, _ = np.linalg.qr(RNG.normal(size=(s.shape[1], s.shape[1])))
    t = 3.0 * s @ rotation + 1.0
    distance, angle = _rkd_numpy(s, t)
    assert angle == pytest.approx(0.0, abs=1e-12)
    assert angle == pytest.approx(0.0, abs=1e-12)
    loss = RKDLoss(student_layer="s", teacher_layer="t")
    terms = loss(Outputs(_t(STUDENT), {"s": _t(s)}), Outputs(_t(TEACHER), {"t": _t(t)}), None)
    assert distance == pytest.approx(0.0, abs=1e-12)
    assert terms["loss"].item() == pytest.approx(0.0, abs=1e-9)


def test_pkt_batchmean_matches_numpy() -> None:
    """``reduction="batchmean"``: the per-row KL summed over j, averaged over rows."""

    def cond(e: np.ndarray) -> np.ndarray:
        u = e / (np.linalg.norm(e, axis=1, keepdims=True) + 1e-7)
        k = (u @ u.T + 1) / 2
        return k / k.sum(axis=1, keepdims=True)

    ps, pt = cond(FEAT_S.reshape(B, -1)), cond(FEAT_T.reshape(B, -1))
    eps = 1e-7
    expected = float((pt * np.log((pt + eps) / (ps + eps))).sum(axis=1).mean())
    loss = PKTLoss(student_layer="s", teacher_layer="t", weight=10.0, reduction="batchmean")
    terms = loss(Outputs(_t(STUDENT), {"s": _t(FEAT_S)}), Outputs(_t(TEACHER), {"t": _t(FEAT_T)}), torch.tensor(TARGET))
    assert terms["pkt"].item() == pytest.approx(expected, rel=1e-9)
    assert terms["loss"].item() == pytest.approx(_ce(STUDENT, TARGET) + 10 * expected, rel=1e-9)


def test_sp_matches_numpy() -> None:
    def g(f: np.ndarray) -> np.ndarray:
        a = f.reshape(len(f), -1)
        gram = a @ a.T
        return gram / np.linalg.norm(gram, axis=1, keepdims=True)

    expected = float(((g(FEAT_T) - g(FEAT_S)) ** 2).sum() / B**2)
    loss = SPLoss(student_layers=["s"], teacher_layers=["t"], weight=5.0)
    terms = loss(Outputs(_t(STUDENT), {"s": _t(FEAT_S)}), Outputs(_t(TEACHER), {"t": _t(FEAT_T)}), None)
    assert terms["sp"].item() == pytest.approx(expected, rel=1e-9)
    assert terms["loss"].item() == pytest.approx(5 * expected, rel=1e-9)


def test_at_matches_numpy_with_different_channels() -> None:
    def attention(f: np.ndarray) -> np.ndarray:
        a = (f**2).mean(axis=1).reshape(len(f), -1)
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    expected = float(((attention(FEAT_S) - attention(FEAT_T)) ** 2).mean())
    loss = ATLoss(student_layers="s", teacher_layers="t", weight=1000.0)
    terms = loss(Outputs(_t(STUDENT), {"s": _t(FEAT_S)}), Outputs(_t(TEACHER), {"t": _t(FEAT_T)}), None)
    assert terms["at"].item() == pytest.approx(expected, rel=1e-9)
    assert terms["loss"].item() == pytest.approx(500 * expected, rel=1e-9)


def test_at_resize_energy_pools_a_longer_students_energy_map() -> None:
    """``size_mismatch="resize_energy"`` (kdistill 0.1): the student's squared map is pooled to the teacher's length."""
    student_map = RNG.normal(size=(B, 3, 10))
    energy = (student_map**2).mean(axis=1)
    pooled = energy.reshape(B, 5, 2).mean(axis=2)  # length 10 -> 5: each output averages 2 inputs
    a_s = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    energy_t = (FEAT_T**2).mean(axis=1)
    a_t = energy_t / np.linalg.norm(energy_t, axis=1, keepdims=True)
    loss = ATLoss(student_layers="s", teacher_layers="t", size_mismatch="resize_energy")
    terms = loss(Outputs(_t(STUDENT), {"s": _t(student_map)}), Outputs(_t(TEACHER), {"t": _t(FEAT_T)}), None)
    assert terms["at"].item() == pytest.approx(float(((a_s - a_t) ** 2).mean()), rel=1e-9)


def test_logit_standardization_matches_numpy_and_ignores_logit_scale() -> None:
    """With ``std="population"`` and 0.1's ``soft_weight`` mix (the authors' form: tests/test_losses_fidelity.py)."""
    T, w = 2.0, 0.9

    def z(x: np.ndarray) -> np.ndarray:
        return (x - x.mean(axis=1, keepdims=True)) / x.std(axis=1, keepdims=True)

    soft = T**2 * _kl_rows(_softmax(z(TEACHER) / T), _softmax(z(STUDENT) / T)).mean()
    expected = (1 - w) * _ce(STUDENT, TARGET) + w * soft
    loss = get_loss("kd_ls", temperature=T, soft_weight=w, std="population")
    terms = loss(*_logit_outputs(), torch.tensor(TARGET))
    assert terms["kd"].item() == pytest.approx(soft, rel=1e-6)
    assert terms["loss"].item() == pytest.approx(expected, rel=1e-6)
    rescaled = loss(*_logit_outputs(STUDENT, 10 * TEACHER + 3), torch.tensor(TARGET))
    assert rescaled["kd"].item() == pytest.approx(soft, rel=1e-5)
    assert standardize_logits(_t(TEACHER)).std(dim=1).numpy() == pytest.approx(np.ones(B))
    population = standardize_logits(_t(TEACHER), std="population")
    assert population.std(dim=1, unbiased=False).numpy() == pytest.approx(np.ones(B))


def test_multi_teacher_average_and_confidence_match_numpy() -> None:
    T, w, members = 2.0, 0.6, 3
    member_logits = RNG.normal(size=(B, members, C)) * 2
    q = _softmax(STUDENT / T)
    p = _softmax(member_logits / T, axis=2)
    average = T**2 * _kl_rows(p.mean(axis=1), q).mean()
    terms = multi_teacher_loss(_t(STUDENT), _t(member_logits), torch.tensor(TARGET), temperature=T, soft_weight=w)
    assert terms["kd"].item() == pytest.approx(average, rel=1e-9)
    assert terms["loss"].item() == pytest.approx((1 - w) * _ce(STUDENT, TARGET) + w * average, rel=1e-9)

    log_p1 = np.log(_softmax(member_logits, axis=2))[np.arange(B), :, TARGET]  # (B, members): -CE per member
    weights = _softmax(log_p1, axis=1)
    per_member = np.stack([_kl_rows(p[:, m], q) for m in range(members)], axis=1)
    confident = T**2 * (weights * per_member).sum(axis=1).mean()
    terms = multi_teacher_loss(
        _t(STUDENT), _t(member_logits), torch.tensor(TARGET), weighting="confidence", temperature=T
    )
    assert terms["kd"].item() == pytest.approx(confident, rel=1e-9)


def test_contrastive_loss_matches_numpy() -> None:
    anchors = RNG.normal(size=(B, 4))
    anchors /= np.linalg.norm(anchors, axis=1, keepdims=True)
    positives = RNG.normal(size=(B, 4))
    positives /= np.linalg.norm(positives, axis=1, keepdims=True)
    negatives = RNG.normal(size=(B, 5, 4))
    negatives /= np.linalg.norm(negatives, axis=2, keepdims=True)
    tau = 0.1
    scores = np.concatenate([(anchors * positives).sum(1)[:, None], np.einsum("bd,bkd->bk", anchors, negatives)], 1)
    expected = float(-np.log(_softmax(scores / tau)[:, 0]).mean())
    got = contrastive_loss(_t(anchors), _t(positives), _t(negatives), tau).item()
    assert got == pytest.approx(expected, rel=1e-9)
