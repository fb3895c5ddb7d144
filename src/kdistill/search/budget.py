"""A candidate's cost and the budget check, done before any training.

Parameters and bytes are computed (:func:`kdistill.profile.count_parameters`, the safetensors size of
:func:`kdistill.profile.model_size_bytes`); the batch-1 latency is measured with the budget's thread count through
:func:`kdistill.profile.time_inference` (median of single calls after warm-up), only for candidates that already fit
the other limits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kdistill.config import BudgetConfig
from kdistill.profile import count_parameters, model_size_bytes, time_inference

__all__ = ["Cost", "excess", "measure_cost", "over_budget"]

_LIMITS = (("parameters", "max_params"), ("size_bytes", "max_bytes"), ("latency_ms", "max_latency_ms"))


@dataclass(frozen=True)
class Cost:
    """What one candidate costs: ``parameters``, ``size_bytes`` (safetensors), ``latency_ms`` (p50 at batch 1 with
    ``threads`` threads; None when not measured)."""

    parameters: int
    size_bytes: int
    latency_ms: float | None
    threads: int

    def describe(self) -> str:
        """``"4,810 params, 20.1 KB, 0.041 ms @1 thread"``."""
        from kdistill.report import _human_bytes

        latency = "" if self.latency_ms is None else f", {self.latency_ms:.3f} ms @{self.threads} thread(s)"
        return f"{self.parameters:,} params, {_human_bytes(self.size_bytes)}{latency}"


def _latency_ms(module: nn.Module, rows: torch.Tensor, threads: int) -> float:
    module.eval()
    timing = time_inference(
        module, rows[:8], batch_size=1, threads=threads, repeats=5, min_time=0.002, latency_budget_s=0.03
    )
    return float(timing["latency_ms"])


def measure_cost(module: nn.Module, rows: torch.Tensor, budget: BudgetConfig, *, latency: bool = True) -> Cost:
    """``module``'s cost on ``rows`` (a few training rows, (rows, *features)). The latency is measured when
    ``latency`` is True and the candidate is within the size limits (timing a model already over budget is waste)."""
    parameters, size = count_parameters(module), model_size_bytes(module)
    within_size = (budget.max_params is None or parameters <= budget.max_params) and (
        budget.max_bytes is None or size <= budget.max_bytes
    )
    measured = _latency_ms(module, rows, budget.threads) if latency and within_size else None
    return Cost(parameters=parameters, size_bytes=size, latency_ms=measured, threads=budget.threads)


def excess(cost: Cost, budget: BudgetConfig) -> float:
    """The largest relative overshoot, ``max(cost / limit - 1)`` over the budget's limits: <= 0 inside the budget.
    Optuna's TPE reads it as the constraint, so it learns how far outside a region lies. 0 with no limit; a latency
    limit on an unmeasured latency counts as the size overshoot alone."""
    ratios = [
        getattr(cost, field) / getattr(budget, limit) - 1.0
        for field, limit in _LIMITS
        if getattr(budget, limit) is not None and getattr(cost, field) is not None
    ]
    return max(ratios, default=0.0)


def over_budget(cost: Cost, budget: BudgetConfig) -> list[str]:
    """Each limit ``cost`` breaks, in words (``"17,290 params > max_params 5,000"``); empty inside the budget."""
    broken = []
    if budget.max_params is not None and cost.parameters > budget.max_params:
        broken.append(f"{cost.parameters:,} params > max_params {budget.max_params:,}")
    if budget.max_bytes is not None and cost.size_bytes > budget.max_bytes:
        broken.append(f"{cost.size_bytes:,} bytes > max_bytes {budget.max_bytes:,}")
    if budget.max_latency_ms is not None and cost.latency_ms is not None and cost.latency_ms > budget.max_latency_ms:
        broken.append(
            f"{cost.latency_ms:.3f} ms > max_latency_ms {budget.max_latency_ms:g} (batch 1, {cost.threads} thread(s))"
        )
    return broken
