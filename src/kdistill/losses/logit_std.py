"""Logit standardization: compare z-scored logits, so the student need not match the teacher's logit scale.

Sun, Ren, Li, Wang & Cao, "Logit Standardization in Knowledge Distillation", CVPR 2024,
https://arxiv.org/abs/2403.01427; reference code: github.com/sunshangquan/logit-standardization-KD (built on
mdistiller). Its defaults are those of the README's CIFAR-100 commands (``--logit-stand --base-temp 2 --kd-weight 9``).
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch

from kdistill.errors import MethodError
from kdistill.losses.base import BaseLoss, register_loss
from kdistill.losses.common import (
    as_target,
    check_non_negative,
    check_row_outputs,
    labelled_cross_entropy,
    require_teacher,
)
from kdistill.losses.dkd import DKDLoss, dkd_loss
from kdistill.losses.kd import KDLoss, check_logits, kd_loss
from kdistill.teachers.base import Outputs

__all__ = ["LogitStandardized", "standardize_logits"]

_EPS = 1e-7
StdKind = Literal["unbiased", "population"]
_STD_KINDS = ("unbiased", "population")


def _check_std(std: str) -> None:
    if std not in _STD_KINDS:
        raise MethodError(f"std must be one of {_STD_KINDS}, got {std!r}", hint="'unbiased' is the authors' choice.")


def standardize_logits(logits: torch.Tensor, *, std: StdKind = "unbiased") -> torch.Tensor:
    r"""Z-score each row: :math:`\mathcal{Z}(z) = (z - \bar z) / (\sigma(z) + \epsilon)`, (batch, classes),
    :math:`\epsilon = 10^{-7}`.

    ``std="unbiased"`` (the default, as the authors' ``normalize``: ``logit.std(dim=-1)``) divides the sum of squares
    by C − 1; ``"population"`` (kdistill 0.1) by C. The two differ by a constant factor per row,
    :math:`\mathcal{Z}_{pop} = \sqrt{C/(C-1)}\,\mathcal{Z}_{unbiased}`, so KD on population z-scores at temperature T
    equals KD on unbiased z-scores at :math:`T\sqrt{(C-1)/C}`, times :math:`C/(C-1)` (the :math:`T^2` factor keeps
    the nominal T): +11% at 10 classes, +50% at 3. The argmax is unchanged either way.
    """
    _check_std(std)
    mean = logits.mean(dim=1, keepdim=True)
    spread = logits.std(dim=1, keepdim=True, unbiased=std == "unbiased")
    return (logits - mean) / (spread + _EPS)


class LogitStandardized(BaseLoss):
    r"""Wrap :class:`~kdistill.losses.KDLoss` or :class:`~kdistill.losses.DKDLoss` so that their soft terms compare
    standardized logits (:func:`standardize_logits`) at the wrapped loss's temperature:

    .. math::
        \mathcal{L}_{KD+LS} = c\,\mathrm{CE}(z_s, y)
            + k\,T^2\,\mathrm{KL}\big(\mathrm{softmax}(\mathcal{Z}(z_t)/T)\,\|\,
              \mathrm{softmax}(\mathcal{Z}(z_s)/T)\big)

    (KL summed over classes, averaged over the batch) and likewise for DKD's TCKD and NCKD, with DKD's own α, β and
    CE weight. The hard-label cross-entropy stays on the raw student logits (as in the paper and its code):
    standardization only changes what "matching the teacher" means.

    Args:
        inner: the wrapped loss; its temperature (and for DKD its weights and warm-up) are used.
        std: ``"unbiased"`` (the authors') or ``"population"`` (kdistill 0.1); see :func:`standardize_logits` for
            the exact conversion.
        ce_weight, kd_weight: c and k for a wrapped KDLoss; by default ``1 - soft_weight`` and ``soft_weight`` of
            the wrapped loss (the registered ``kd_ls`` passes the authors' c = 0.1, k = 9). Ignored for DKD.

    With 2 classes every standardized row is (+a, −a) with a fixed a, whatever the logits: the soft term is constant
    and passes no gradient, so the student silently gets plain cross-entropy. The loss warns once (a
    ``UserWarning``) and says to use ``kd`` or ``dkd`` without standardization instead.
    Terms are those of the wrapped loss.
    """

    at_equal = "zero"
    batch_order_invariant = True

    def __init__(
        self,
        inner: KDLoss | DKDLoss,
        *,
        std: StdKind = "unbiased",
        ce_weight: float | None = None,
        kd_weight: float | None = None,
    ) -> None:
        if not isinstance(inner, (KDLoss, DKDLoss)):
            raise MethodError(
                f"logit standardization wraps KDLoss or DKDLoss, got {type(inner).__name__}",
                hint="use LogitStandardized(KDLoss(...)) or LogitStandardized(DKDLoss(...)), or the methods "
                "'kd_ls' and 'dkd_ls'.",
            )
        _check_std(std)
        self.inner = inner
        self.std: StdKind = std
        soft_weight = getattr(inner, "soft_weight", 1.0)
        self.ce_weight = check_non_negative("ce_weight", 1.0 - soft_weight if ce_weight is None else ce_weight)
        self.kd_weight = check_non_negative("kd_weight", soft_weight if kd_weight is None else kd_weight)
        self._warned_two_classes = False

    def start_epoch(self, epoch: int, total_epochs: int) -> None:
        """Forwarded to the wrapped loss (DKD's warm-up)."""
        if isinstance(self.inner, DKDLoss):
            self.inner.start_epoch(epoch, total_epochs)

    def _warn_if_no_signal(self, classes: int) -> None:
        if classes == 2 and not self._warned_two_classes:
            self._warned_two_classes = True
            name = "kd" if isinstance(self.inner, KDLoss) else "dkd"
            warnings.warn(
                f"logit standardization with 2 classes carries no teacher signal: every standardized row is "
                f"(+a, -a) with the same a, so '{name}_ls' trains on cross-entropy alone. Use method '{name}' "
                "(without standardization) for binary tasks.",
                UserWarning,
                stacklevel=3,
            )

    def __call__(
        self, student: Outputs, teacher: Outputs | None, target: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        check_row_outputs(student, teacher, "logit standardization")
        teacher = require_teacher(teacher, "logit standardization")
        check_logits(student.logits, teacher.logits)
        self._warn_if_no_signal(student.logits.shape[1])
        student_z = standardize_logits(student.logits, std=self.std)
        teacher_z = standardize_logits(as_target(teacher.logits), std=self.std)
        inner = self.inner
        if isinstance(inner, KDLoss):
            soft = kd_loss(student_z, teacher_z, None, temperature=inner.temperature)["kd"]
            if target is None:
                return {"loss": soft, "kd": soft}
            if self.ce_weight == 0:
                return {"loss": self.kd_weight * soft, "kd": soft}
            hard = labelled_cross_entropy(student.logits, target)
            return {"loss": self.ce_weight * hard + self.kd_weight * soft, "ce": hard, "kd": soft}
        terms = dkd_loss(
            student_z,
            teacher_z,
            target,
            temperature=inner.temperature,
            target_weight=inner.target_weight,
            nontarget_weight=inner.nontarget_weight,
            ce_weight=0.0,
            warmup_factor=inner.warmup_factor,
        )
        if target is None or inner.ce_weight == 0:
            return terms
        hard = labelled_cross_entropy(student.logits, target)
        return {**terms, "loss": inner.ce_weight * hard + terms["loss"], "ce": hard}


@register_loss("kd_ls", "Sun 2024: c·CE + k·KD on z-scored logits (T=2, c=0.1, k=9 as the authors); CE on raw logits")
def kd_ls(
    temperature: float = 2.0,
    ce_weight: float = 0.1,
    kd_weight: float = 9.0,
    std: StdKind = "unbiased",
    soft_weight: float | None = None,
) -> LogitStandardized:
    """KD with logit standardization, at the authors' CIFAR-100 settings: T = 2 (``--base-temp 2``), CE weight 0.1
    (mdistiller's KD default) and KD weight 9 (``--kd-weight 9``), unbiased standard deviation.

    ``soft_weight=w`` (kdistill 0.1's form, CE 1 − w + KD w) overrides ``ce_weight`` and ``kd_weight``: 0.1's default
    w = 0.9 is the authors' mix with a soft term 10 times lighter.
    """
    if soft_weight is not None:
        ce_weight, kd_weight = 1.0 - soft_weight, soft_weight
    return LogitStandardized(
        KDLoss(temperature=temperature, soft_weight=1.0), std=std, ce_weight=ce_weight, kd_weight=kd_weight
    )


@register_loss("dkd_ls", "Sun 2024 + Zhao 2022: DKD on z-scored logits (T=2, α=9, β=72); CE stays on raw logits")
def dkd_ls(
    temperature: float = 2.0,
    target_weight: float = 9.0,
    nontarget_weight: float = 72.0,
    ce_weight: float = 1.0,
    warmup_epochs: int = 20,
    std: StdKind = "unbiased",
) -> LogitStandardized:
    """DKD with logit standardization: mdistiller's DKD (CE 1, α = 1, β = 8, 20 warm-up epochs) with α and β scaled
    by the README's ``--kd-weight 9`` and T = ``--base-temp 2``.

    The authors' ``tools/train.py`` literally sets β = 9·(9·α) = 81 (it scales the already-scaled α) and writes the
    base temperature to ``KD.TEMPERATURE``, leaving DKD's own T = 4 (its logs are nevertheless named with T = 2):
    ``nontarget_weight=81, temperature=4`` reproduces that code path exactly.
    """
    return LogitStandardized(
        DKDLoss(
            temperature=temperature,
            target_weight=target_weight,
            nontarget_weight=nontarget_weight,
            ce_weight=ce_weight,
            warmup_epochs=warmup_epochs,
        ),
        std=std,
    )
