"""Contrastive representation distillation, with its memory bank of embeddings for every row of the transfer set.

Tian, Krishnan & Isola, "Contrastive Representation Distillation", ICLR 2020, https://arxiv.org/abs/1910.10699
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from kdistill.errors import MethodError
from kdistill.losses.base import BaseLoss, register_loss
from kdistill.losses.common import (
    as_target,
    check_non_negative,
    check_positive,
    check_row_outputs,
    flatten_rows,
    get_feature,
    require_teacher,
    with_cross_entropy,
)
from kdistill.teachers.base import Outputs

__all__ = ["CRDLoss", "contrastive_loss", "nce_loss"]

_NCE_EPS = 1e-7
Objective = Literal["infonce", "nce"]
_OBJECTIVES = ("infonce", "nce")


def _scores(anchors: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """(batch, 1 + K) dot products: the positive first, then the K negatives (shared (K, d) or per anchor)."""
    positive = (anchors * positives).sum(dim=1, keepdim=True)
    shared = negatives.ndim == 2
    negative = anchors @ negatives.T if shared else torch.einsum("bd,bkd->bk", anchors, negatives)
    return torch.cat([positive, negative], dim=1)


def contrastive_loss(
    anchors: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, temperature: float
) -> torch.Tensor:
    r"""InfoNCE over one positive and K negatives per anchor, all unit vectors:

    .. math::
        -\frac{1}{B}\sum_i \log\frac{e^{a_i\cdot p_i/\tau}}{e^{a_i\cdot p_i/\tau} + \sum_k e^{a_i\cdot n_{ik}/\tau}}

    ``anchors``, ``positives``: (batch, d); ``negatives``: (batch, K, d), or (K, d) shared by every anchor (one
    matrix product instead of a batched one: several times faster on the CPU). Minimising it is maximising a lower
    bound on the mutual information between the two embeddings (the CRD paper's objective, in its softmax form).
    """
    logits = _scores(anchors, positives, negatives) / temperature
    return F.cross_entropy(logits, torch.zeros(len(anchors), dtype=torch.long, device=anchors.device))


def nce_loss(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor,
    temperature: float,
    rows: int,
    normaliser: float,
) -> torch.Tensor:
    r"""The CRD authors' NCE objective (RepDistiller's ``ContrastMemory`` + ``ContrastLoss``): with
    :math:`P_{ij} = e^{a_i\cdot m_{ij}/\tau} / Z` for the positive (j = 0) and the K negatives, and the noise
    probability :math:`P_n = 1/\text{rows}`,

    .. math::
        -\frac{1}{B}\sum_i \Big[\log\frac{P_{i0}}{P_{i0} + K P_n + \epsilon}
            + \sum_{k=1}^{K} \log\frac{K P_n}{P_{ik} + K P_n + \epsilon}\Big], \qquad \epsilon = 10^{-7}.

    ``normaliser``: Z, which the authors estimate once, from the first batch, as the mean of
    :math:`e^{a\cdot m/\tau}` over its (B, K + 1) scores times ``rows`` (:class:`CRDLoss` does the same).
    Shapes as :func:`contrastive_loss`; returns a scalar.
    """
    probabilities = (_scores(anchors, positives, negatives) / temperature).exp() / normaliser
    noise = probabilities.shape[1] - 1
    noise_mass = noise / float(rows)
    log_positive = torch.log(probabilities[:, 0] / (probabilities[:, 0] + noise_mass + _NCE_EPS))
    log_negative = torch.log(noise_mass / (probabilities[:, 1:] + noise_mass + _NCE_EPS))
    return -(log_positive.sum() + log_negative.sum()) / len(anchors)


@register_loss("crd", "Tian 2020: CE + w·contrastive loss between student/teacher embeddings, memory-bank negatives")
class CRDLoss(nn.Module, BaseLoss):
    r"""CRD: :math:`\mathcal{L} = c\,\mathrm{CE} + w\,(\ell(v^s \to m^t) + \ell(v^t \to m^s))`.

    One layer of each (flattened to (batch, d); default ``"features"``) goes through a learned linear embedding to
    ``embed_dim`` and onto the unit sphere: :math:`v^s, v^t`. Two memory banks (rows, embed_dim) hold a momentum
    average of every transfer-set row's embeddings. For each row i of the batch, the student anchor :math:`v^s_i` is
    contrasted (:func:`contrastive_loss`, temperature τ) against the teacher memory: positive :math:`m^t_i`, and
    ``negatives`` rows drawn uniformly at random from the bank once per batch and shared by its anchors (the paper
    draws per anchor; sharing makes the step one matrix product; a draw of an anchor's own row counts as a negative,
    with probability K/rows, as in the paper's sampler); symmetrically for the teacher anchor against the student
    memory.
    After the step, :math:`m_i \leftarrow \mathrm{normalise}(\mu\,m_i + (1-\mu)\,v_i)`.

    Needs the teacher's ``Outputs.index`` (the engine sets it). The banks and embeddings are built on the engine's dry
    batch (``prepare``); the bank has as many rows as the transfer set. Defaults as in the authors' code
    (github.com/HobbitLong/RepDistiller, ``train_student.py`` and ``crd/``): embed_dim 128 (``--feat_dim``),
    τ = 0.07 (``--nce_t``), µ = 0.5 (``--nce_m``), w = 0.8 (``-b 0.8``). The authors draw K = 16384 negatives
    (``--nce_k``) from CIFAR's 50,000 rows; here K = 256, since K must stay well below the transfer set's row count
    (a few thousand rows in kdistill's typical use): pass ``negatives=16384`` on a set that large.

    ``objective``: ``"infonce"`` (default, a stated departure) uses the softmax form above; ``"nce"`` is the authors'
    objective (:func:`nce_loss`: each of the K + 1 scores :math:`e^{v\cdot m/\tau}/Z` judged against the noise level
    K/rows, Z estimated once from the first batch). InfoNCE is kept as the default because it needs no Z (the NCE
    form's first-batch estimate is noisy on small transfer sets, and its noise level K/rows assumes K << rows) and it
    is the bound the paper derives its loss from; the two are not numerically comparable (different scales), and
    ``weight`` = 0.8 is the authors' value for their NCE form.
    Returns ``{"loss", "ce", "crd"}``.
    """

    at_equal = "none"
    batch_order_invariant = False

    def __init__(
        self,
        student_layer: str = "features",
        teacher_layer: str = "features",
        embed_dim: int = 128,
        negatives: int = 256,
        nce_temperature: float = 0.07,
        momentum: float = 0.5,
        weight: float = 0.8,
        ce_weight: float = 1.0,
        objective: Objective = "infonce",
    ) -> None:
        super().__init__()
        if objective not in _OBJECTIVES:
            raise MethodError(
                f"objective must be one of {_OBJECTIVES}, got {objective!r}",
                hint="'nce' is the authors' form, 'infonce' (the default) its softmax bound.",
            )
        self.objective: Objective = objective
        self.student_features = (student_layer,)
        self.teacher_features = (teacher_layer,)
        self.embed_dim = int(check_positive("embed_dim", embed_dim))
        self.negatives = int(check_positive("negatives", negatives))
        self.nce_temperature = check_positive("nce_temperature", nce_temperature)
        if not 0.0 <= momentum < 1.0:
            raise MethodError(f"momentum must be in [0, 1), got {momentum}", hint="the paper uses 0.5.")
        self.momentum = momentum
        self.weight = check_non_negative("weight", weight)
        self.ce_weight = check_non_negative("ce_weight", ce_weight)
        self.student_embed: nn.Module | None = None
        self.teacher_embed: nn.Module | None = None
        self.student_memory: torch.Tensor
        self.teacher_memory: torch.Tensor
        self.register_buffer("student_memory", torch.empty(0, self.embed_dim))
        self.register_buffer("teacher_memory", torch.empty(0, self.embed_dim))
        self.normalisers: list[float] | None = None  # the NCE form's Z per direction, set by the first batch

    def _features(self, student: Outputs, teacher: Outputs) -> tuple[torch.Tensor, torch.Tensor]:
        s = flatten_rows(get_feature(student, self.student_features[0], role="student", method="crd"))
        t = flatten_rows(as_target(get_feature(teacher, self.teacher_features[0], role="teacher", method="crd")))
        return s, t

    def prepare(self, student: Outputs, teacher: Outputs | None, rows: int) -> None:
        """Build the two embeddings from the feature sizes and the two banks (``rows`` random unit vectors each)."""
        s, t = self._features(student, require_teacher(teacher, "crd"))
        device = s.device
        self.student_embed = nn.Linear(s.shape[1], self.embed_dim).to(device)
        self.teacher_embed = nn.Linear(t.shape[1], self.embed_dim).to(device)
        self.student_memory = F.normalize(torch.randn(rows, self.embed_dim, device=device), dim=1)
        self.teacher_memory = F.normalize(torch.randn(rows, self.embed_dim, device=device), dim=1)

    def forward(
        self, student: Outputs, teacher: Outputs | None, target: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        check_row_outputs(student, teacher, "crd")
        teacher = require_teacher(teacher, "crd")
        if teacher.index is None:
            raise MethodError(
                "crd needs the teacher outputs' row index (Outputs.index) to address its memory bank, got None",
                hint="train through kdistill's engine, or pass Outputs(..., index=row_positions).",
            )
        index = teacher.index
        if self.student_embed is None or self.teacher_embed is None:
            self.prepare(student, teacher, int(index.max()) + 1)
        assert self.student_embed is not None
        assert self.teacher_embed is not None
        rows = len(self.teacher_memory)
        if int(index.max()) >= rows:
            raise MethodError(
                f"crd's memory bank has {rows} rows but the batch addresses row {int(index.max())}",
                hint="build the loss on the whole transfer set (the engine's prepare step does).",
            )
        s, t = self._features(student, teacher)
        student_vectors = F.normalize(self.student_embed(s), dim=1)
        teacher_vectors = F.normalize(self.teacher_embed(t), dim=1)
        drawn = torch.randint(0, rows, (self.negatives,), device=index.device)
        pairs = (
            (student_vectors, self.teacher_memory[index], self.teacher_memory[drawn]),
            (teacher_vectors, self.student_memory[index], self.student_memory[drawn]),
        )
        if self.objective == "infonce":
            student_to_teacher, teacher_to_student = (contrastive_loss(*pair, self.nce_temperature) for pair in pairs)
        else:
            if self.normalisers is None:
                with torch.no_grad():
                    self.normalisers = [
                        float((_scores(*pair) / self.nce_temperature).exp().mean()) * rows for pair in pairs
                    ]
            student_to_teacher, teacher_to_student = (
                nce_loss(*pair, self.nce_temperature, rows, normaliser)
                for pair, normaliser in zip(pairs, self.normalisers, strict=True)
            )
        with torch.no_grad():
            mu = self.momentum
            self.student_memory[index] = F.normalize(
                mu * self.student_memory[index] + (1 - mu) * student_vectors, dim=1
            )
            self.teacher_memory[index] = F.normalize(
                mu * self.teacher_memory[index] + (1 - mu) * teacher_vectors, dim=1
            )
        term = student_to_teacher + teacher_to_student
        return with_cross_entropy({"crd": term}, self.weight * term, student.logits, target, self.ce_weight)
