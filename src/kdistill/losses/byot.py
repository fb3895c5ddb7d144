"""Self-distillation by deep supervision: the network's own deepest classifier teaches heads on its shallow layers.

Zhang, Song, Gao, Chen, Bao & Ma, "Be Your Own Teacher: Improve the Performance of Convolutional Neural Networks via
Self Distillation", ICCV 2019, https://arxiv.org/abs/1905.08094
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdistill.losses.base import BaseLoss, register_loss
from kdistill.losses.common import (
    check_non_negative,
    check_positive,
    check_row_outputs,
    get_feature,
    labelled_cross_entropy,
    require_target,
)
from kdistill.losses.kd import kd_loss
from kdistill.teachers.base import Outputs

__all__ = ["DeepSupervision", "pool_feature"]


def pool_feature(feature: torch.Tensor) -> torch.Tensor:
    """(batch, channels, *spatial) -> (batch, channels) by global average pooling; (batch, d) unchanged."""
    return feature if feature.ndim == 2 else feature.flatten(2).mean(dim=2)


class _Head(nn.Module):
    """A shallow exit: global pooling, then a classifier and a projection onto the deepest layer's pooled width."""

    def __init__(self, width: int, deep_width: int, classes: int) -> None:
        super().__init__()
        self.classifier = nn.Linear(width, classes)
        self.projection = nn.Linear(width, deep_width)

    def forward(self, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = pool_feature(feature)
        return self.classifier(pooled), self.projection(pooled)


@register_loss("byot", "Zhang 2019 (Be Your Own Teacher): shallow heads learn from labels and the deepest output")
class DeepSupervision(nn.Module, BaseLoss):
    r"""Deep supervision with self-distillation; no teacher is needed.

    Each layer in ``shallow_layers`` gets a head (pool -> linear classifier :math:`q_i`, and pool -> linear
    projection :math:`h_i` onto the pooled ``deep_layer``), trained with the student and dropped afterwards (the
    student itself is unchanged). With the student's own logits :math:`z` as the deepest classifier:

    .. math::
        \mathcal{L} = c_{deep}\,\mathrm{CE}(z, y) + \sum_i \Big[(1-\alpha)\,\mathrm{CE}(q_i, y)
            + \alpha\,T^2\,\mathrm{KL}\big(\mathrm{softmax}(\bar z/T)\,\|\,\mathrm{softmax}(q_i/T)\big)
            + \lambda\,\mathrm{MSE}(h_i, \bar f)\Big]

    where the bar marks a detached (teacher-side) value and :math:`f` the pooled deepest feature. Defaults from the
    paper: T = 3, α = 0.3, λ = 0.03, and :math:`c_{deep} = 1 - \alpha` (``deep_ce_weight=None``): the paper's loss
    sums :math:`(1-\alpha)\,\mathrm{CE} + \alpha\,\mathrm{KL} + \lambda\,\|F_i - F_C\|^2` over every
    classifier, the deepest included, whose KL and hint terms are 0 (the authors released no code). kdistill 0.1 used
    ``deep_ce_weight=1``. For kdistill's CNN, the blocks' outputs are ``features.2``, ``features.5``, ``features.8``
    (= ``features``). Returns ``{"loss", "ce", "heads_ce", "heads_kd", "heads_hint"}``.
    """

    needs_teacher = False
    at_equal = "none"
    batch_order_invariant = True

    def __init__(
        self,
        shallow_layers: Sequence[str] = ("features.2", "features.5"),
        deep_layer: str = "features",
        temperature: float = 3.0,
        soft_weight: float = 0.3,
        hint_weight: float = 0.03,
        deep_ce_weight: float | None = None,
    ) -> None:
        super().__init__()
        self.shallow_layers = (shallow_layers,) if isinstance(shallow_layers, str) else tuple(shallow_layers)
        self.deep_layer = deep_layer
        self.student_features = (*self.shallow_layers, deep_layer)
        self.temperature = check_positive("temperature", temperature)
        self.soft_weight = check_non_negative("soft_weight", soft_weight)
        self.hint_weight = check_non_negative("hint_weight", hint_weight)
        deep = 1.0 - self.soft_weight if deep_ce_weight is None else deep_ce_weight
        self.deep_ce_weight = check_non_negative("deep_ce_weight", deep)
        self.heads = nn.ModuleList()

    def prepare(self, student: Outputs, teacher: Outputs | None, rows: int) -> None:
        """Build one head per shallow layer from the dry batch's shapes."""
        deep_width = pool_feature(get_feature(student, self.deep_layer, role="student", method="byot")).shape[1]
        classes = student.logits.shape[1]
        self.heads = nn.ModuleList(
            _Head(
                pool_feature(get_feature(student, name, role="student", method="byot")).shape[1], deep_width, classes
            ).to(student.logits.device)
            for name in self.shallow_layers
        )

    def forward(
        self, student: Outputs, teacher: Outputs | None, target: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        check_row_outputs(student, None, "byot")
        target = require_target(target, "byot")
        if len(self.heads) != len(self.shallow_layers):
            self.prepare(student, teacher, 0)
        deep_logits = student.logits.detach()
        deep_feature = pool_feature(get_feature(student, self.deep_layer, role="student", method="byot")).detach()
        zero = student.logits.new_zeros(())
        heads_ce, heads_kd, heads_hint = zero, zero, zero
        for head, name in zip(self.heads, self.shallow_layers, strict=True):
            head_logits, projected = head(get_feature(student, name, role="student", method="byot"))
            terms = kd_loss(head_logits, deep_logits, target, temperature=self.temperature)
            heads_ce = heads_ce + terms["ce"]
            heads_kd = heads_kd + terms["kd"]
            heads_hint = heads_hint + F.mse_loss(projected, deep_feature)
        hard = labelled_cross_entropy(student.logits, target)
        heads = (1 - self.soft_weight) * heads_ce + self.soft_weight * heads_kd + self.hint_weight * heads_hint
        total = self.deep_ce_weight * hard + heads
        return {"loss": total, "ce": hard, "heads_ce": heads_ce, "heads_kd": heads_kd, "heads_hint": heads_hint}
