"""Several methods at once: a weighted sum of losses, each term reported under ``"<method>/<term>"``."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from kdistill.errors import MethodError
from kdistill.losses.base import LOSSES, BaseLoss, Loss, as_loss, get_loss, unknown_name
from kdistill.teachers.base import Outputs

__all__ = ["Compose", "compose_methods"]


def _unique(names: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(names))


class Compose(nn.Module, BaseLoss):
    r"""A weighted sum of losses: :math:`\mathcal{L} = \sum_k w_k\,\mathcal{L}_k`.

    ``losses``: name -> loss; ``weights``: name -> w_k (default 1 each). The result holds ``"loss"`` and every
    component's terms as ``"<name>/<term>"`` (``"kd/kd"``, ``"kd/ce"``, ``"fitnet/hint"``), unweighted, so the history
    and report carry each one. The features asked for are the union of the components'; every hook (``prepare``,
    ``start_epoch``, ``precompute``) is forwarded to each component; components that are ``nn.Module`` (learned
    projectors) are registered as submodules, so their parameters are trained. Components that do not subclass
    :class:`~kdistill.losses.Loss` are wrapped by :func:`~kdistill.losses.as_loss`.

    ``precompute``: the components' tables side by side in one (rows, width) table; each batch's rows are split
    back, so each component finds its own in ``teacher.precomputed`` (and None when it precomputed nothing).

    Each component adds its own hard-label term unless it was built with ``ce_weight=0``;
    :func:`compose_methods` does that for every component after the first.
    """

    def __init__(self, losses: Mapping[str, Loss], weights: Mapping[str, float] | None = None) -> None:
        super().__init__()
        if not losses:
            raise MethodError("Compose needs at least one loss, got none", hint="pass {'kd': KDLoss(), ...}.")
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(losses))
        if unknown:
            raise MethodError(f"weights for {unknown}, which are not among the losses {sorted(losses)}")
        self.components: dict[str, BaseLoss] = {name: as_loss(loss) for name, loss in losses.items()}
        self.weights = {name: float(weights.get(name, 1.0)) for name in losses}
        self.modules_by_name = nn.ModuleDict(
            {n: loss for n, loss in self.components.items() if isinstance(loss, nn.Module)}
        )
        self._precomputed: dict[str, tuple[int, int]] | None = None  # name -> (start, stop) columns of its table
        self.needs_teacher = any(getattr(loss, "needs_teacher", True) for loss in losses.values())
        self.student_features: Sequence[str] = _unique([f for loss in losses.values() for f in loss.student_features])
        self.teacher_features: Sequence[str] = _unique([f for loss in losses.values() for f in loss.teacher_features])
        self.at_equal = (
            "zero" if all(getattr(loss, "at_equal", "none") == "zero" for loss in losses.values()) else "none"
        )
        self.batch_order_invariant = all(getattr(loss, "batch_order_invariant", False) for loss in losses.values())

    def start_epoch(self, epoch: int, total_epochs: int) -> None:
        for loss in self.components.values():
            loss.start_epoch(epoch, total_epochs)

    def prepare(self, student: Outputs, teacher: Outputs | None, rows: int) -> None:
        for loss in self.components.values():
            loss.prepare(student, teacher, rows)

    def precompute(self, teacher_logits: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor | None:
        tables: dict[str, torch.Tensor] = {}
        for name, loss in self.components.items():
            table = loss.precompute(teacher_logits, target)
            if table is not None:
                tables[name] = table.float().reshape(len(table), -1)
        if not tables:
            self._precomputed = None
            return None
        self._precomputed, start = {}, 0
        for name, table in tables.items():
            self._precomputed[name] = (start, start + table.shape[1])
            start += table.shape[1]
        return torch.cat(list(tables.values()), dim=1)

    def _teacher_for(self, name: str, teacher: Outputs | None) -> Outputs | None:
        """``teacher`` with ``precomputed`` narrowed to component ``name``'s columns (None if it has none)."""
        if teacher is None or teacher.precomputed is None or self._precomputed is None:
            return teacher
        columns = self._precomputed.get(name)
        return teacher.replace(precomputed=None if columns is None else teacher.precomputed[:, columns[0] : columns[1]])

    def forward(
        self, student: Outputs, teacher: Outputs | None, target: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        total = student.logits.new_zeros(())
        result: dict[str, torch.Tensor] = {}
        for name, loss in self.components.items():
            terms = loss(student, self._teacher_for(name, teacher), target)
            total = total + self.weights[name] * terms["loss"]
            parts = {key: value for key, value in terms.items() if key != "loss"} or {"loss": terms["loss"]}
            result |= {f"{name}/{key}": value for key, value in parts.items()}
        return {"loss": total, **result}


def compose_methods(
    methods: Sequence[str] | Mapping[str, float],
    method_params: Mapping[str, Mapping[str, Any]] | None = None,
) -> Compose:
    """Build a :class:`Compose` from registered names: ``["kd", "fitnet"]`` (weights 1) or ``{"kd": 1.0, "fitnet":
    0.5}``, with each method's hyper-parameters in ``method_params[name]``.

    Every method after the first that takes a ``ce_weight`` gets ``ce_weight=0`` unless ``method_params`` sets it, so
    the hard-label term is counted once (KD's, in ``["kd", "fitnet"]``; ``kd_ls`` placed later also drops its own).
    ``kd`` and the multi-teacher methods mix their hard term through ``soft_weight`` and have no ``ce_weight``: name
    them first.
    """
    weights = dict(methods) if isinstance(methods, Mapping) else dict.fromkeys(methods, 1.0)
    params = {name: dict(values) for name, values in (method_params or {}).items()}
    stray = sorted(set(params) - set(weights))
    if stray:
        raise MethodError(
            f"method_params for {stray}, which are not among the methods {sorted(weights)}",
            hint="key method_params by the method names you compose.",
        )
    losses: dict[str, Loss] = {}
    for position, name in enumerate(weights):
        if name not in LOSSES:
            raise unknown_name("method", name, list(LOSSES))
        own = params.get(name, {})
        accepts = inspect.signature(LOSSES[name].factory).parameters
        if position > 0 and "ce_weight" in accepts and "ce_weight" not in own:
            own = {**own, "ce_weight": 0.0}
        losses[name] = get_loss(name, **own)
    return Compose(losses, weights)
