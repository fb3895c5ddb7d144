"""Distilling several teachers at once: their averaged distribution, or a per-sample confidence-weighted mixture.

Averaging follows Hinton, Vinyals & Dean (2015, ensembles as teachers); the confidence weighting follows Zhang, Chen &
Wang, "Confidence-Aware Multi-Teacher Knowledge Distillation", ICASSP 2022, https://arxiv.org/abs/2201.00007

The teacher's outputs carry ``features["members"]``: (batch, members, classes) logits, one slice per teacher, as the
ensemble adapter returns them when asked for the feature ``"members"``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kdistill.errors import MethodError, ShapeMismatchError
from kdistill.losses.base import BaseLoss, register_loss
from kdistill.losses.common import (
    as_target,
    check_non_negative,
    check_positive,
    check_row_outputs,
    get_feature,
    require_teacher,
    with_cross_entropy,
)
from kdistill.teachers.base import Outputs

__all__ = ["MultiTeacherKD", "confidence_weights", "multi_teacher_loss"]

MEMBERS = "members"


def confidence_weights(member_logits: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    r"""Per-sample weights of each teacher, (batch, members, classes) -> (batch, members), rows summing to 1.

    With labels: :math:`w_{im} = \mathrm{softmax}_m(-\mathrm{CE}(z_{im}, y_i))`, so a teacher that is right and sure
    on row i leads it (CA-MKD's idea: trust the teachers that know the answer). Without labels:
    :math:`w_{im} = \mathrm{softmax}_m(\log\max_c p_{imc})`, i.e. proportional to each teacher's top probability.
    """
    log_probs = F.log_softmax(member_logits, dim=2)
    if target is None:
        score = log_probs.max(dim=2).values
    else:
        index = target[:, None, None].expand(-1, member_logits.shape[1], 1)
        score = log_probs.gather(2, index).squeeze(2)  # -CE of each member on each row
    return F.softmax(score, dim=1)


def multi_teacher_loss(
    student_logits: torch.Tensor,
    member_logits: torch.Tensor,
    target: torch.Tensor | None,
    *,
    weighting: str = "average",
    temperature: float = 4.0,
    soft_weight: float = 0.5,
) -> dict[str, torch.Tensor]:
    r"""KD from M teachers. ``"average"``: the target is the mean of the members' softened distributions,

    .. math:: \bar p_i = \frac{1}{M}\sum_m \mathrm{softmax}(z_{im}/T),\qquad
              \mathrm{kd} = T^2\,\frac{1}{B}\sum_i \mathrm{KL}(\bar p_i \,\|\, q_i)

    ``"confidence"``: each member's divergence is weighted per sample (:func:`confidence_weights`),
    :math:`\mathrm{kd} = T^2\,\frac{1}{B}\sum_i \sum_m w_{im}\,\mathrm{KL}(p_{im}\,\|\,q_i)`, with
    :math:`q_i = \mathrm{softmax}(z^s_i/T)`. Then :math:`\mathcal{L} = (1-w)\,\mathrm{CE} + w\,\mathrm{kd}`
    (kd alone without labels).

    Args:
        student_logits: (batch, classes). member_logits: (batch, members, classes).
        target: (batch,) or None.

    Returns:
        ``{"loss", "ce", "kd"}``.
    """
    check_positive("temperature", temperature)
    if (
        member_logits.ndim != 3
        or member_logits.shape[0] != student_logits.shape[0]
        or (member_logits.shape[2] != student_logits.shape[1])
    ):
        raise ShapeMismatchError(
            f"teacher members {tuple(member_logits.shape)} do not fit student logits {tuple(student_logits.shape)}",
            hint="members must be (batch, members, classes) with the student's batch and classes.",
        )
    member_logits = as_target(member_logits)
    student_log_probs = F.log_softmax(student_logits / temperature, dim=1)
    member_log_probs = F.log_softmax(member_logits / temperature, dim=2)
    if weighting == "average":
        mean_probs = member_log_probs.exp().mean(dim=1)
        per_row = (mean_probs * (mean_probs.clamp_min(1e-30).log() - student_log_probs)).sum(dim=1)
    elif weighting == "confidence":
        weights = confidence_weights(member_logits, target)
        divergence = (member_log_probs.exp() * (member_log_probs - student_log_probs[:, None, :])).sum(dim=2)
        per_row = (weights * divergence).sum(dim=1)
    else:
        raise MethodError(f"weighting must be 'average' or 'confidence', got {weighting!r}", hint="use one of those.")
    soft = per_row.mean() * temperature**2
    if target is None:
        return {"loss": soft, "kd": soft}
    return with_cross_entropy({"kd": soft}, soft_weight * soft, student_logits, target, 1.0 - soft_weight)


class MultiTeacherKD(BaseLoss):
    """Class form of :func:`multi_teacher_loss`; reads ``teacher.features["members"]``."""

    teacher_features: Sequence[str] = (MEMBERS,)
    at_equal = "zero"
    batch_order_invariant = True

    def __init__(self, weighting: str = "average", temperature: float = 4.0, soft_weight: float = 0.5) -> None:
        if weighting not in ("average", "confidence"):
            raise MethodError(
                f"weighting must be 'average' or 'confidence', got {weighting!r}", hint="use one of those."
            )
        self.weighting = weighting
        self.temperature = check_positive("temperature", temperature)
        if not 0.0 <= check_non_negative("soft_weight", soft_weight) <= 1.0:
            raise MethodError(f"soft_weight must be in [0, 1], got {soft_weight}", hint="1 drops the hard-label term.")
        self.soft_weight = soft_weight

    def __call__(
        self, student: Outputs, teacher: Outputs | None, target: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        check_row_outputs(student, teacher, f"multi_{self.weighting}")
        teacher = require_teacher(teacher, f"multi_{self.weighting}")
        members = get_feature(teacher, MEMBERS, role="teacher", method=f"multi_{self.weighting}")
        return multi_teacher_loss(
            student.logits,
            members,
            target,
            weighting=self.weighting,
            temperature=self.temperature,
            soft_weight=self.soft_weight,
        )


@register_loss("multi_avg", "multi-teacher KD toward the members' averaged softened distribution (needs an ensemble)")
def multi_avg(temperature: float = 4.0, soft_weight: float = 0.5) -> MultiTeacherKD:
    """KD from the average of the ensemble members' distributions."""
    return MultiTeacherKD("average", temperature=temperature, soft_weight=soft_weight)


@register_loss("multi_conf", "multi-teacher KD, each member weighted per sample by its confidence on the label")
def multi_conf(temperature: float = 4.0, soft_weight: float = 0.5) -> MultiTeacherKD:
    """KD from every member, weighted per sample by :func:`confidence_weights`."""
    return MultiTeacherKD("confidence", temperature=temperature, soft_weight=soft_weight)
