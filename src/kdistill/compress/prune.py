"""Structured pruning with Torch-Pruning, then KD fine-tuning from the original teacher to win accuracy back.

Structured means whole neurons (Linear outputs) and channels (Conv outputs, with their BatchNorm entries) are
removed, and every layer that reads them shrinks to match: the pruned model has fewer parameters and does fewer
multiply-adds, unlike unstructured (zeroed-weight) sparsity. Torch-Pruning traces the model once on example rows to
find the groups of coupled dimensions; within a layer, the groups with the smallest L2 norm of their weights are cut:

    importance(group) = sqrt(sum of w^2 over every weight in the group),  keep the top (1 - ratio) per layer.

The output layer is never pruned (its width is the number of classes). Fine-tuning then trains the pruned model with
the Hinton KD loss against the original teacher's precomputed logits (``kdistill.engine.fit``), exactly as
distillation did.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kdistill._deps import require
from kdistill.engine import EarlyStopping, ProgressBar, TrainConfig, TransferSet, fit
from kdistill.errors import ExportError
from kdistill.losses import get_loss
from kdistill.students import CNN, MLP

__all__ = [
    "PrunedStudent",
    "finetune_with_teacher",
    "output_layer",
    "prune_and_finetune",
    "prune_structured",
    "pruned_spec",
]


@dataclass
class PrunedStudent:
    """What :func:`prune_structured` (+ :func:`finetune_with_teacher`) produced.

    ``model``: the smaller module (eval mode). ``parameters_before`` / ``parameters_after``: parameter counts.
    ``history``: the fine-tuning epochs' metrics (empty without fine-tuning). ``spec``: how to rebuild it, for the
    built-in students (None for a custom module).
    """

    model: nn.Module
    ratio: float
    parameters_before: int
    parameters_after: int
    history: list[dict[str, float]]
    spec: dict[str, Any] | None


def output_layer(model: nn.Module) -> nn.Module:
    """The last ``nn.Linear`` in ``model`` (the classifier head of the built-in students), never pruned."""
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ExportError(
            f"cannot find the output layer of {type(model).__name__}: it has no nn.Linear",
            hint="pass ignored_layers=[model.your_output_layer] to prune_structured.",
        )
    return linears[-1]


def _parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def prune_structured(
    model: nn.Module,
    example_rows: torch.Tensor,
    *,
    ratio: float = 0.5,
    ignored_layers: Sequence[nn.Module] | None = None,
) -> nn.Module:
    """A pruned copy of ``model``: ``ratio`` of each prunable layer's output neurons/channels removed (L2 magnitude).

    Args:
        model: the trained student (left untouched; a deep copy is pruned).
        example_rows: a few input rows, (rows, *row_shape), to trace the layers' dependencies.
        ratio: fraction of channels removed per layer, in [0, 1). 0.5 on an MLP roughly quarters the hidden weights.
        ignored_layers: layers of ``model`` not to prune; default: its output layer (:func:`output_layer`).
    """
    tp = require("torch_pruning")
    if not 0.0 <= ratio < 1.0:
        raise ExportError(f"pruning ratio must be in [0, 1), got {ratio}", hint="e.g. ratio=0.5 removes half.")
    ignored_ids = {id(layer) for layer in (ignored_layers or [output_layer(model)])}
    pruned = copy.deepcopy(model).cpu().eval()
    ignored = [
        module
        for original, module in zip(model.modules(), pruned.modules(), strict=True)
        if id(original) in ignored_ids
    ]
    example = example_rows[: min(4, len(example_rows))].float()
    pruner = tp.pruner.MetaPruner(
        pruned,
        example,
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=ratio,
        ignored_layers=ignored,
    )
    pruner.step()
    return pruned.eval()


def pruned_spec(spec: dict[str, Any] | None, model: nn.Module) -> dict[str, Any] | None:
    """The built-in student's spec with its widths read off the pruned ``model``, so ``kdistill.load`` rebuilds it."""
    if spec is None:
        return None
    widths: dict[str, Any] = {}
    if isinstance(model, MLP):
        linears = [m for m in model.layers if isinstance(m, nn.Linear)]
        widths["hidden"] = [layer.out_features for layer in linears[:-1]]
    elif isinstance(model, CNN):
        widths["channels"] = [m.out_channels for m in model.features if isinstance(m, (nn.Conv1d, nn.Conv2d))]
    return spec | widths


def finetune_with_teacher(
    model: nn.Module,
    train_x: torch.Tensor,
    train_y: torch.Tensor | None,
    teacher_logits: torch.Tensor,
    *,
    val: tuple[torch.Tensor, torch.Tensor] | None = None,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 1e-3,
    temperature: float = 4.0,
    soft_weight: float = 0.5,
    patience: int | None = 10,
    seed: int = 0,
    verbose: bool = False,
) -> list[dict[str, float]]:
    """Fine-tune ``model`` in place with the KD loss against ``teacher_logits`` (rows, classes), aligned row for
    row with ``train_x``; early stopping on ``val`` restores the best epoch. Returns the per-epoch history.

    The loss is ``soft_weight * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - soft_weight) * CE(s, y)``, the same
    as :func:`kdistill.kd_loss`; the lower default ``lr`` suits a model that is already trained.
    """
    loss = get_loss("kd", temperature=temperature, soft_weight=soft_weight)
    config = TrainConfig(
        epochs=epochs, batch_size=batch_size, lr=lr, patience=patience, seed=seed, verbose=verbose, warmup_fraction=0.0
    )
    callbacks: list[Any] = [EarlyStopping(patience=patience)] if val is not None else []
    if verbose:
        callbacks.append(ProgressBar("fine-tuning (pruned)"))
    state = fit(model, loss, TransferSet(train_x, train_y, teacher_logits), val=val, config=config, callbacks=callbacks)
    return state.history


def prune_and_finetune(
    model: nn.Module,
    train_x: torch.Tensor,
    train_y: torch.Tensor | None,
    teacher_logits: torch.Tensor,
    *,
    ratio: float = 0.5,
    spec: dict[str, Any] | None = None,
    val: tuple[torch.Tensor, torch.Tensor] | None = None,
    epochs: int = 30,
    seed: int = 0,
    verbose: bool = False,
    **finetune_params: Any,
) -> PrunedStudent:
    """:func:`prune_structured` then :func:`finetune_with_teacher` (``epochs=0`` skips fine-tuning)."""
    pruned = prune_structured(model, train_x, ratio=ratio)
    history: list[dict[str, float]] = []
    if epochs > 0:
        history = finetune_with_teacher(
            pruned,
            train_x,
            train_y,
            teacher_logits,
            val=val,
            epochs=epochs,
            seed=seed,
            verbose=verbose,
            **finetune_params,
        )
    return PrunedStudent(
        model=pruned.eval(),
        ratio=ratio,
        parameters_before=_parameters(model),
        parameters_after=_parameters(pruned),
        history=history,
        spec=pruned_spec(spec, pruned),
    )
