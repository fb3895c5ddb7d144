"""Each method against an independent transcription of its authors' released code, in float64: the value and the
gradient with respect to every student input, with the reference's reduction, normalisation and weights.

The transcriptions below follow the reference code's operations (mdistiller's ``cat_mask`` and −1000 mask for DKD,
RepDistiller's ``pdist`` and normalised differences for RKD, the pooling of the larger raw map for AT, ...), not
kdistill's implementation. Where kdistill keeps a departure behind an option, the test checks the exact conversion
stated in the option's docstring.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import pytest
import torch
import torch.nn.functional as F

from kdistill.losses import (
    ATLoss,
    CRDLoss,
    DeepSupervision,
    DISTLoss,
    DKDLoss,
    FitNet,
    KDLoss,
    PKTLoss,
    RKDLoss,
    SPLoss,
    get_loss,
    multi_teacher_loss,
)
from kdistill.teachers import Outputs

B, C = 9, 7
TOL = {"rtol": 1e-10, "atol": 1e-12}


def _randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=generator, dtype=torch.float64)


def _leaf(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.clone().requires_grad_()


def _assert_same_value_and_gradient(
    ours: Callable[[Sequence[torch.Tensor]], torch.Tensor],
    reference: Callable[[Sequence[torch.Tensor]], torch.Tensor],
    inputs: Sequence[torch.Tensor],
) -> None:
    """Both losses on fresh leaves of the same inputs: equal values and equal gradients for every input."""
    ours_leaves = [_leaf(x) for x in inputs]
    reference_leaves = [_leaf(x) for x in inputs]
    ours_value = ours(ours_leaves)
    reference_value = reference(reference_leaves)
    torch.testing.assert_close(ours_value, reference_value, **TOL)
    ours_grads = torch.autograd.grad(ours_value, ours_leaves)
    reference_grads = torch.autograd.grad(reference_value, reference_leaves)
    for mine, theirs in zip(ours_grads, reference_grads, strict=True):
        assert theirs.abs().max() > 0, "the reference gradient is zero: the comparison would prove nothing"
        torch.testing.assert_close(mine, theirs, **TOL)


STUDENT = _randn(B, C, seed=1, scale=2.0)
TEACHER = _randn(B, C, seed=2, scale=3.0)
TARGET = torch.randint(0, C, (B,), generator=torch.Generator().manual_seed(3))


def _logits(student: torch.Tensor, teacher: torch.Tensor = TEACHER) -> tuple[Outputs, Outputs]:
    return Outputs(student), Outputs(teacher)


# --- mdistiller's kd_loss and DKD (mdistiller/distillers/KD.py, DKD.py), transcribed -------------------------------


def _ref_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    log_pred_student = F.log_softmax(student / temperature, dim=1)
    pred_teacher = F.softmax(teacher / temperature, dim=1)
    return F.kl_div(log_pred_student, pred_teacher, reduction="none").sum(1).mean() * temperature**2


def _ref_dkd(
    student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, alpha: float, beta: float, temperature: float
) -> torch.Tensor:
    gt_mask = torch.zeros_like(student).scatter_(1, target.unsqueeze(1), 1).bool()
    other_mask = torch.ones_like(student).scatter_(1, target.unsqueeze(1), 0).bool()

    def cat_mask(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([(t * gt_mask).sum(1, keepdim=True), (t * other_mask).sum(1, keepdim=True)], dim=1)

    pred_student = cat_mask(F.softmax(student / temperature, dim=1))
    pred_teacher = cat_mask(F.softmax(teacher / temperature, dim=1))
    tckd = F.kl_div(torch.log(pred_student), pred_teacher, reduction="sum") * temperature**2 / target.shape[0]
    teacher_part2 = F.softmax(teacher / temperature - 1000.0 * gt_mask, dim=1)
    log_student_part2 = F.log_softmax(student / temperature - 1000.0 * gt_mask, dim=1)
    nckd = F.kl_div(log_student_part2, teacher_part2, reduction="sum") * temperature**2 / target.shape[0]
    return alpha * tckd + beta * nckd


def test_kd_equals_mdistillers_kd_at_its_cifar_weights() -> None:
    """mdistiller's KD: CE 0.1 + KD 0.9 at T = 4, i.e. kdistill's soft_weight 0.9."""
    loss = KDLoss(temperature=4.0, soft_weight=0.9)
    _assert_same_value_and_gradient(
        lambda x: loss(*_logits(x[0]), TARGET)["loss"],
        lambda x: 0.1 * F.cross_entropy(x[0], TARGET) + 0.9 * _ref_kd(x[0], TEACHER, 4.0),
        [STUDENT],
    )


def test_dkd_equals_mdistillers_dkd_with_its_warmup() -> None:
    """CE 1 + min(epoch / 20, 1)·(α·TCKD + β·NCKD), α = 1, β = 8, T = 4, mdistiller's epochs counted from 1."""
    loss = DKDLoss()
    assert loss.warmup_epochs == 20
    for mdistiller_epoch in (1, 7, 20, 31):
        loss.start_epoch(mdistiller_epoch - 1, 40)  # kdistill counts epochs from 0
        warm = min(mdistiller_epoch / 20, 1.0)
        _assert_same_value_and_gradient(
            lambda x: loss(*_logits(x[0]), TARGET)["loss"],
            lambda x, warm=warm: F.cross_entropy(x[0], TARGET) + warm * _ref_dkd(x[0], TEACHER, TARGET, 1.0, 8.0, 4.0),
            [STUDENT],
        )


# --- logit standardisation (sunshangquan/logit-standardization-KD), transcribed ------------------------------------


def _ref_normalize(logit: torch.Tensor) -> torch.Tensor:
    mean = logit.mean(dim=-1, keepdim=True)
    stdv = logit.std(dim=-1, keepdim=True)  # torch's default: the unbiased estimate
    return (logit - mean) / (1e-7 + stdv)


def test_kd_ls_equals_the_authors_kd_with_logit_standardisation() -> None:
    """README: ``--logit-stand --base-temp 2 --kd-weight 9`` on mdistiller's KD (CE weight 0.1)."""
    loss = get_loss("kd_ls")
    _assert_same_value_and_gradient(
        lambda x: loss(*_logits(x[0]), TARGET)["loss"],
        lambda x: 0.1 * F.cross_entropy(x[0], TARGET) + 9 * _ref_kd(_ref_normalize(x[0]), _ref_normalize(TEACHER), 2),
        [STUDENT],
    )


def test_dkd_ls_equals_the_authors_dkd_with_logit_standardisation() -> None:
    """DKD's α and β scaled by the kd-weight 9 at base temperature 2, CE 1, the same 20-epoch warm-up."""
    loss = get_loss("dkd_ls")
    loss.start_epoch(9, 40)  # mdistiller epoch 10: half weight
    _assert_same_value_and_gradient(
        lambda x: loss(*_logits(x[0]), TARGET)["loss"],
        lambda x: (
            F.cross_entropy(x[0], TARGET)
            + 0.5 * _ref_dkd(_ref_normalize(x[0]), _ref_normalize(TEACHER), TARGET, 9.0, 72.0, 2.0)
        ),
        [STUDENT],
    )


def test_population_std_option_is_the_reference_at_a_lower_temperature_scaled_by_c_over_c_minus_1() -> None:
    """The conversion in ``standardize_logits``' docstring: population z-scores at T = the authors' unbiased ones
    at T·√((C−1)/C), times C/(C−1); exact up to the 1e-7 added to the standard deviation."""
    temperature = 2.0
    ours = get_loss("kd_ls", std="population", ce_weight=0.0, kd_weight=1.0, temperature=temperature)
    value = ours(*_logits(STUDENT), TARGET)["loss"]
    effective = temperature * math.sqrt((C - 1) / C)
    reference = _ref_kd(_ref_normalize(STUDENT), _ref_normalize(TEACHER), effective) * (temperature / effective) ** 2
    assert value.item() == pytest.approx(reference.item(), rel=1e-6)
    assert (temperature / effective) ** 2 == pytest.approx(C / (C - 1))
    default = get_loss("kd_ls", ce_weight=0.0, kd_weight=1.0, temperature=temperature)(*_logits(STUDENT), TARGET)
    assert value.item() != pytest.approx(default["loss"].item(), rel=1e-3), "the option must change the loss"


def test_logit_standardisation_warns_once_with_two_classes_and_says_what_to_use() -> None:
    student, teacher = _leaf(STUDENT[:, :2]), TEACHER[:, :2]
    target = TARGET % 2
    loss = get_loss("kd_ls", ce_weight=0.0)
    with pytest.warns(UserWarning, match=r"2 classes carries no teacher signal.*Use method 'kd'"):
        soft = loss(*_logits(student, teacher), target)["loss"]
    (gradient,) = torch.autograd.grad(soft, student)
    assert gradient.abs().max() < 1e-6, "with 2 classes the standardised rows are constant: no gradient"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss(*_logits(student, teacher), target)  # once per loss object, not every batch
    plain = KDLoss(temperature=2.0, soft_weight=1.0)(*_logits(student, teacher), None)["loss"]
    (plain_gradient,) = torch.autograd.grad(plain, student)
    assert plain_gradient.abs().max() > 1e-2, "plain KD does carry the teacher's signal on the same rows"
    with pytest.warns(UserWarning, match="Use method 'dkd'"):
        get_loss("dkd_ls")(*_logits(student, teacher), target)


def test_kd_ls_soft_weight_keeps_kdistill_0_1s_mix() -> None:
    """``soft_weight=w``: CE (1 − w) + KD w (0.1's form), which is the authors' mix with the KD weight 10x lighter."""
    ours = get_loss("kd_ls", soft_weight=0.9, std="population")(*_logits(STUDENT), TARGET)
    kd = ours["kd"]
    assert ours["loss"].item() == pytest.approx(0.1 * ours["ce"].item() + 0.9 * kd.item(), rel=1e-12)


# --- DIST (hunto/DIST_KD), transcribed ------------------------------------------------------------------------------


def _ref_dist(student: torch.Tensor, teacher: torch.Tensor, beta: float, gamma: float, tau: float) -> torch.Tensor:
    def cosine_similarity(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)

    def pearson_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return cosine_similarity(a - a.mean(1).unsqueeze(1), b - b.mean(1).unsqueeze(1))

    def inter_class_relation(y_s: torch.Tensor, y_t: torch.Tensor) -> torch.Tensor:
        return 1 - pearson_correlation(y_s, y_t).mean()

    y_s, y_t = (student / tau).softmax(dim=1), (teacher / tau).softmax(dim=1)
    inter = tau**2 * inter_class_relation(y_s, y_t)
    intra = tau**2 * inter_class_relation(y_s.transpose(0, 1), y_t.transpose(0, 1))
    return beta * inter + gamma * intra


@pytest.mark.parametrize(("tau", "beta", "gamma"), [(1.0, 1.0, 1.0), (4.0, 2.0, 2.0)])
def test_dist_equals_the_authors_dist(tau: float, beta: float, gamma: float) -> None:
    loss = DISTLoss(temperature=tau, inter_weight=beta, intra_weight=gamma)
    _assert_same_value_and_gradient(
        lambda x: loss(*_logits(x[0]), TARGET)["loss"],
        lambda x: F.cross_entropy(x[0], TARGET) + _ref_dist(x[0], TEACHER, beta, gamma, tau),
        [STUDENT],
    )


# --- RKD (lenscloth/RKD, RepDistiller, mdistiller), transcribed -----------------------------------------------------


def _ref_pdist(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    e_square = e.pow(2).sum(dim=1)
    prod = e @ e.t()
    res = (e_square.unsqueeze(1) + e_square.unsqueeze(0) - 2 * prod).clamp(min=eps).sqrt().clone()
    res[range(len(e)), range(len(e))] = 0
    return res


def _ref_rkd(student: torch.Tensor, teacher: torch.Tensor, w_d: float, w_a: float) -> torch.Tensor:
    student, teacher = student.reshape(len(student), -1), teacher.reshape(len(teacher), -1)
    t_d = _ref_pdist(teacher)
    t_d = t_d / t_d[t_d > 0].mean()
    d = _ref_pdist(student)
    d = d / d[d > 0].mean()
    loss_d = F.smooth_l1_loss(d, t_d)
    td = teacher.unsqueeze(0) - teacher.unsqueeze(1)
    t_angle = torch.bmm(F.normalize(td, p=2, dim=2), F.normalize(td, p=2, dim=2).transpose(1, 2)).view(-1)
    sd = student.unsqueeze(0) - student.unsqueeze(1)
    s_angle = torch.bmm(F.normalize(sd, p=2, dim=2), F.normalize(sd, p=2, dim=2).transpose(1, 2)).view(-1)
    loss_a = F.smooth_l1_loss(s_angle, t_angle)
    return w_d * loss_d + w_a * loss_a


EMB_S = _randn(B, 5, seed=4)
EMB_T = _randn(B, 11, seed=5, scale=3.0)
MAP_S = _randn(B, 4, 6, 6, seed=6)
MAP_T = _randn(B, 8, 3, 3, seed=7)


def _features(student: torch.Tensor, teacher: torch.Tensor) -> tuple[Outputs, Outputs]:
    return Outputs(STUDENT, {"s": student}), Outputs(TEACHER, {"t": teacher})


def test_rkd_equals_the_reference_rkd_over_all_entries() -> None:
    loss = RKDLoss(student_layer="s", teacher_layer="t", ce_weight=0.0)
    _assert_same_value_and_gradient(
        lambda x: loss(*_features(x[0], EMB_T), None)["loss"], lambda x: _ref_rkd(x[0], EMB_T, 25, 50), [EMB_S]
    )


def test_rkd_distinct_option_is_the_reference_times_b_over_b_minus_1_and_its_square() -> None:
    ours = RKDLoss(student_layer="s", teacher_layer="t", ce_weight=0.0, reduction="distinct")
    terms = ours(*_features(EMB_S, EMB_T), None)
    distance = _ref_rkd(EMB_S, EMB_T, 1.0, 0.0)
    angle = _ref_rkd(EMB_S, EMB_T, 0.0, 1.0)
    torch.testing.assert_close(terms["distance"], distance * B / (B - 1), **TOL)
    torch.testing.assert_close(terms["angle"], angle * B**2 / (B - 1) ** 2, **TOL)


# --- AT (szagoruyko/attention-transfer; RepDistiller / mdistiller for unequal sizes), transcribed -------------------


def _ref_at(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.pow(2).mean(1).view(x.size(0), -1))


def _ref_at_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    s_h, t_h = f_s.shape[2], f_t.shape[2]
    if s_h > t_h:
        f_s = F.adaptive_avg_pool2d(f_s, (t_h, t_h))
    elif s_h < t_h:
        f_t = F.adaptive_avg_pool2d(f_t, (s_h, s_h))
    return (_ref_at(f_s) - _ref_at(f_t)).pow(2).mean()


@pytest.mark.parametrize(
    ("student_map", "teacher_map"),
    [(MAP_S, _randn(B, 8, 6, 6, seed=8)), (MAP_S, MAP_T), (_randn(B, 4, 3, 3, seed=9), _randn(B, 8, 6, 6, seed=10))],
    ids=["equal sizes", "student larger", "teacher larger"],
)
def test_at_equals_the_reference_with_beta_over_2(student_map: torch.Tensor, teacher_map: torch.Tensor) -> None:
    """The authors' total is β/2·Σ at_loss with β = 1000; unequal sizes pool the larger raw map first."""
    loss = ATLoss(student_layers="s", teacher_layers="t")
    _assert_same_value_and_gradient(
        lambda x: loss(*_features(x[0], teacher_map), TARGET)["loss"],
        lambda x: F.cross_entropy(STUDENT, TARGET) + 1000 / 2 * _ref_at_loss(x[0], teacher_map),
        [student_map],
    )


def test_at_resize_energy_option_is_a_different_operation_from_pooling_the_raw_map() -> None:
    pooled = ATLoss(student_layers="s", teacher_layers="t", ce_weight=0.0)
    resized = ATLoss(student_layers="s", teacher_layers="t", ce_weight=0.0, size_mismatch="resize_energy")
    energy = MAP_S.pow(2).mean(1, keepdim=True)
    by_hand = F.normalize(F.adaptive_avg_pool2d(energy, (3, 3)).flatten(1)) - _ref_at(MAP_T)
    value = resized(*_features(MAP_S, MAP_T), None)["at"]
    torch.testing.assert_close(value, by_hand.pow(2).mean(), **TOL)
    assert value.item() != pytest.approx(pooled(*_features(MAP_S, MAP_T), None)["at"].item(), rel=1e-3)


# --- PKT (passalis/probabilistic_kt, as RepDistiller transcribes it) ------------------------------------------------


def _ref_pkt(output_net: torch.Tensor, target_net: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    output_net = output_net / (torch.sqrt(torch.sum(output_net**2, dim=1, keepdim=True)) + eps)
    target_net = target_net / (torch.sqrt(torch.sum(target_net**2, dim=1, keepdim=True)) + eps)
    model_similarity = (torch.mm(output_net, output_net.transpose(0, 1)) + 1.0) / 2.0
    target_similarity = (torch.mm(target_net, target_net.transpose(0, 1)) + 1.0) / 2.0
    model_similarity = model_similarity / torch.sum(model_similarity, dim=1, keepdim=True)
    target_similarity = target_similarity / torch.sum(target_similarity, dim=1, keepdim=True)
    return torch.mean(target_similarity * torch.log((target_similarity + eps) / (model_similarity + eps)))


def test_pkt_equals_the_reference_with_weight_30000() -> None:
    loss = PKTLoss(student_layer="s", teacher_layer="t")
    _assert_same_value_and_gradient(
        lambda x: loss(*_features(x[0], EMB_T), TARGET)["loss"],
        lambda x: F.cross_entropy(STUDENT, TARGET) + 30000 * _ref_pkt(x[0], EMB_T),
        [EMB_S],
    )


def test_pkt_batchmean_option_is_b_times_the_reference() -> None:
    loss = PKTLoss(student_layer="s", teacher_layer="t", reduction="batchmean", weight=1.0, ce_weight=0.0)
    value = loss(*_features(EMB_S, EMB_T), None)["pkt"]
    torch.testing.assert_close(value, B * _ref_pkt(EMB_S, EMB_T), **TOL)


# --- SP (RepDistiller's Similarity), FitNets (RepDistiller's HintLoss), transcribed --------------------------------


def _ref_sp(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    bsz = f_s.shape[0]
    f_s, f_t = f_s.view(bsz, -1), f_t.view(bsz, -1)
    g_s = F.normalize(torch.mm(f_s, torch.t(f_s)))
    g_t = F.normalize(torch.mm(f_t, torch.t(f_t)))
    g_diff = g_t - g_s
    return (g_diff * g_diff).view(-1, 1).sum(0)[0] / (bsz * bsz)


def test_sp_equals_the_reference_with_gamma_3000() -> None:
    loss = SPLoss(student_layers="s", teacher_layers="t", ce_weight=0.0)
    _assert_same_value_and_gradient(
        lambda x: loss(*_features(x[0], MAP_T), None)["loss"], lambda x: 3000 * _ref_sp(x[0], MAP_T), [MAP_S]
    )


def test_fitnet_hint_is_the_references_mse_and_hint_weight_100_gives_its_weight() -> None:
    teacher_map = _randn(B, 4, 6, 6, seed=11)  # same shape: the projector is the identity
    loss = FitNet(student_layers="s", teacher_layers="t", hint_weight=100.0)
    _assert_same_value_and_gradient(
        lambda x: loss(*_features(x[0], teacher_map), TARGET)["loss"],
        lambda x: F.cross_entropy(STUDENT, TARGET) + 100 * torch.nn.MSELoss()(x[0], teacher_map),
        [MAP_S],
    )


# --- CRD's memory update (HobbitLong/RepDistiller crd/memory.py), transcribed --------------------------------------


def test_crd_memory_update_equals_the_authors_momentum_update() -> None:
    rows, dim = 20, 6
    loss = CRDLoss(student_layer="s", teacher_layer="t", embed_dim=dim, negatives=5).double()
    index = torch.tensor([3, 7, 11, 0, 19, 4, 8, 2, 13])
    student, teacher = _features(EMB_S, EMB_T)
    teacher = Outputs(teacher.logits, teacher.features, index=index)
    loss.prepare(student, teacher, rows)
    loss.double()
    before_student, before_teacher = loss.student_memory.clone(), loss.teacher_memory.clone()
    with torch.no_grad():
        v_s = F.normalize(loss.student_embed(EMB_S), dim=1)
        v_t = F.normalize(loss.teacher_embed(EMB_T), dim=1)
    loss(student, teacher, None)

    def authors_update(memory: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        pos = torch.index_select(memory, 0, index.view(-1))
        pos.mul_(0.5)
        pos.add_(torch.mul(v, 1 - 0.5))
        l_norm = pos.pow(2).sum(1, keepdim=True).pow(0.5)
        updated = memory.clone()
        updated.index_copy_(0, index, pos.div(l_norm))
        return updated

    torch.testing.assert_close(loss.student_memory, authors_update(before_student, v_s), **TOL)
    torch.testing.assert_close(loss.teacher_memory, authors_update(before_teacher, v_t), **TOL)


# --- BYOT: the paper's loss (Zhang et al. 2019), transcribed --------------------------------------------------


def test_byot_equals_the_papers_loss_with_the_deepest_ce_weighted_one_minus_alpha() -> None:
    """Σ over all classifiers of (1 − α)·CE + α·KL + λ·‖F_i − F_C‖², the deepest classifier's KL and hint being 0."""
    alpha, temperature, hint = 0.3, 3.0, 0.03
    loss = DeepSupervision(shallow_layers=("a",), deep_layer="deep").double()
    shallow, deep = _randn(B, 5, 4, seed=12), _randn(B, 6, 2, seed=13)
    loss.prepare(Outputs(STUDENT, {"a": shallow, "deep": deep}), None, B)
    loss.double()
    head = loss.heads[0]

    def reference(x: Sequence[torch.Tensor]) -> torch.Tensor:
        logits, shallow_map = x
        pooled = shallow_map.mean(dim=2)
        head_logits, projected = head.classifier(pooled), head.projection(pooled)
        kl = _ref_kd(head_logits, logits.detach(), temperature)
        hint_term = F.mse_loss(projected, deep.mean(dim=2))
        deepest = (1 - alpha) * F.cross_entropy(logits, TARGET)
        return deepest + (1 - alpha) * F.cross_entropy(head_logits, TARGET) + alpha * kl + hint * hint_term

    _assert_same_value_and_gradient(
        lambda x: loss(Outputs(x[0], {"a": x[1], "deep": deep}), None, TARGET)["loss"],
        reference,
        [STUDENT, shallow],  # the deepest feature enters detached (a target), so it gets no gradient
    )
    assert loss.deep_ce_weight == pytest.approx(0.7)
    assert DeepSupervision(deep_ce_weight=1.0).deep_ce_weight == 1.0


# --- multi-teacher averaging (Hinton et al. 2015's ensemble target) -------------------------------------------------


def test_multi_teacher_average_equals_kd_toward_the_mean_distribution() -> None:
    members = _randn(B, 3, C, seed=14, scale=2.0)
    temperature = 4.0

    def reference(x: Sequence[torch.Tensor]) -> torch.Tensor:
        mean_probs = F.softmax(members / temperature, dim=2).mean(dim=1)
        log_q = F.log_softmax(x[0] / temperature, dim=1)
        soft = (mean_probs * (mean_probs.log() - log_q)).sum(1).mean() * temperature**2
        return 0.5 * F.cross_entropy(x[0], TARGET) + 0.5 * soft

    _assert_same_value_and_gradient(
        lambda x: multi_teacher_loss(x[0], members, TARGET, temperature=temperature)["loss"], reference, [STUDENT]
    )


def _authors_contrast(
    memory: torch.Tensor, anchor: torch.Tensor, idx: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """RepDistiller's ContrastMemory for one direction: exp(<memory[idx], v>/T) / Z, Z from this (first) batch."""
    batch, dim = anchor.shape
    weight = torch.index_select(memory, 0, idx.view(-1)).detach().view(batch, -1, dim)
    out = torch.exp(torch.div(torch.bmm(weight, anchor.view(batch, dim, 1)), temperature))
    normaliser = (out.mean() * memory.size(0)).detach()
    return torch.div(out, normaliser), normaliser


def _authors_contrast_loss(x: torch.Tensor, n_data: int, eps: float = 1e-7) -> torch.Tensor:
    """RepDistiller's ContrastLoss (NCE against uniform noise)."""
    bsz, m = x.shape[0], x.size(1) - 1
    pn = 1 / float(n_data)
    p_pos = x.select(1, 0)
    log_d1 = torch.div(p_pos, p_pos.add(m * pn + eps)).log_()
    p_neg = x.narrow(1, 1, m)
    log_d0 = torch.div(p_neg.clone().fill_(m * pn), p_neg.add(m * pn + eps)).log_()
    return -(log_d1.sum(0) + log_d0.view(-1, 1).sum(0)) / bsz


def test_crd_nce_objective_equals_the_authors_contrast_memory_and_loss() -> None:
    rows, dim, negatives, temperature = 30, 6, 5, 0.07
    loss = CRDLoss(student_layer="s", teacher_layer="t", embed_dim=dim, negatives=negatives, objective="nce")
    index = torch.tensor([3, 7, 11, 0, 19, 4, 8, 2, 13])
    student, teacher = _features(EMB_S, EMB_T)
    teacher = Outputs(teacher.logits, teacher.features, index=index)
    loss.prepare(student, teacher, rows)
    loss.double()
    student_memory, teacher_memory = loss.student_memory.clone(), loss.teacher_memory.clone()
    torch.manual_seed(5)
    drawn = torch.randint(0, rows, (negatives,))
    idx = torch.cat([index[:, None], drawn[None, :].expand(len(index), -1)], dim=1)  # positive first, as the authors

    def ours(x: Sequence[torch.Tensor]) -> torch.Tensor:
        torch.manual_seed(5)
        loss.student_memory.copy_(student_memory)
        loss.teacher_memory.copy_(teacher_memory)
        loss.normalisers = None
        return loss(Outputs(STUDENT, {"s": x[0]}), Outputs(TEACHER, {"t": EMB_T}, index=index), None)["loss"]

    def reference(x: Sequence[torch.Tensor]) -> torch.Tensor:
        v1 = F.normalize(loss.student_embed(x[0]), dim=1)  # the same embedding layers, applied by hand
        v2 = F.normalize(loss.teacher_embed(EMB_T), dim=1)
        out_v1, _ = _authors_contrast(teacher_memory, v1, idx, temperature)  # student anchor, teacher memory
        out_v2, _ = _authors_contrast(student_memory, v2, idx, temperature)
        return 0.8 * (_authors_contrast_loss(out_v1, rows) + _authors_contrast_loss(out_v2, rows))[0]

    _assert_same_value_and_gradient(ours, reference, [EMB_S])
