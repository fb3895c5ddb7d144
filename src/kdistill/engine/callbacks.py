"""Callbacks: what happens around the loop (early stopping, progress), kept out of the loop itself.

Hooks, called in this order: ``on_train_begin(state)``; then after every optimizer step ``on_batch_end(state, terms)``
(the step's loss terms, detached tensors; only callbacks that override it are called, so it costs nothing when unused),
and per epoch ``on_epoch_end(state)`` after validation; and ``on_train_end(state)``. A callback stops training by
setting ``state.stop = True``. A callback with state that a resumed run needs (early stopping's best score and weights)
returns it from ``state_dict()`` (tensors, numbers, strings, lists, dicts) and takes it back in ``load_state_dict()``;
checkpoints store it.
"""

from __future__ import annotations

import copy
import math
import time
from typing import TYPE_CHECKING, Any

from kdistill.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from kdistill.engine.loop import TrainState

__all__ = ["Callback", "EarlyStopping", "ProgressBar", "TimeBudget"]


class Callback:
    """Base class: override the hooks you need."""

    def on_train_begin(self, state: TrainState) -> None:
        """Before the first epoch."""

    def on_batch_end(self, state: TrainState, terms: dict[str, torch.Tensor]) -> None:
        """After each optimizer step (``state.global_step`` counts them, ``state.step_in_epoch`` within the epoch);
        ``terms``: the step's loss terms (``"loss"`` and the method's parts), detached. Reading a value with
        ``float()`` synchronises a GPU: do it every N steps, not every step."""

    def on_epoch_end(self, state: TrainState) -> None:
        """After each epoch's validation; ``state.history[-1]`` holds its metrics."""

    def on_train_end(self, state: TrainState) -> None:
        """After the last epoch (or the one that stopped)."""

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue exactly; empty for stateless callbacks."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back what :meth:`state_dict` returned."""


class TimeBudget(Callback):
    """Stops training at the first optimizer step after ``seconds`` of wall time since training began (the run's
    ``train.max_minutes``): the same budget for students of different cost. The epoch it stops in is validated and
    logged like any other. A resumed run continues the budget where its checkpoint left it (the seconds spent are in
    :meth:`state_dict`), so a run killed and resumed trains as long in all as one that was not.

    ``schedule=True`` (``train.schedule.to_budget``) puts the learning-rate schedule on the clock too: at every step
    its progress is the larger of the steps' share of the planned steps and the budget's share spent, so a budget
    that ends before the planned epochs still gets the whole schedule (warm-up, then decay to 0 at the budget's end)
    instead of being cut at a high learning rate; a budget longer than the planned schedule leaves it as it is. The
    steps' lr then depends on the machine's speed, as the stopping step already does (Li et al., "Budgeted Training",
    ICLR 2020: a schedule that decays to 0 within the budget beats a longer one cut short). ``clock``: where the
    seconds come from (a test swaps in a fake one)."""

    clock = staticmethod(time.perf_counter)

    def __init__(self, seconds: float, *, schedule: bool = False) -> None:
        if not seconds > 0:
            raise ConfigError(f"a time budget must be > 0 seconds, got {seconds}", hint="e.g. max_minutes: 15.")
        self.seconds = seconds
        self.schedule = schedule
        self._started = 0.0
        self._spent_before = 0.0  # seconds of the budget a resumed run's checkpoint had already spent

    def on_train_begin(self, state: TrainState) -> None:
        self._started = self.clock() - self._spent_before
        if self.schedule and state.scheduler is not None:
            scheduler = state.scheduler
            scheduler.lr_lambdas = [self._on_the_clock(rule, state.total_steps) for rule in scheduler.lr_lambdas]

    def _on_the_clock(self, rule: Any, total_steps: int) -> Any:
        def budgeted(step: int) -> float:  # a plain function: LambdaLR's state_dict stores no state for it
            spent = min(1.0, (self.clock() - self._started) / self.seconds)
            return float(rule(max(step, int(spent * total_steps))))

        return budgeted

    def on_batch_end(self, state: TrainState, terms: dict[str, torch.Tensor]) -> None:
        if self.clock() - self._started >= self.seconds:
            state.stop = True

    def state_dict(self) -> dict[str, Any]:
        return {"spent_s": self.clock() - self._started}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._spent_before = float(state.get("spent_s", 0.0))  # a checkpoint from before kdistill kept it: none


class EarlyStopping(Callback):
    """Stops when ``monitor`` has not improved for ``patience`` epochs, and restores the best weights at the end.

    ``monitor`` is a key of the epoch's metrics (what the validation returned: ``"val_accuracy"``, ``"val_nll"``, or
    a task's own such as ``"val_perplexity"``). ``mode``: ``"max"`` (higher is better) or ``"min"``; None infers it
    from the name as kdistill 0.1 did: ``"max"`` for a name containing ``"accuracy"``, else ``"min"``. With
    ``"max"`` on an accuracy, ties go to the lower ``val_nll``. ``patience=None`` never stops early but still
    restores the best weights. An epoch without validation metrics (no ``val_`` key) is skipped; one whose
    validation lacks ``monitor`` is an error naming the keys it has.
    """

    def __init__(self, monitor: str = "val_accuracy", patience: int | None = 10, mode: str | None = None) -> None:
        if mode is None:
            mode = "max" if "accuracy" in monitor else "min"
        if mode not in ("max", "min"):
            raise ConfigError(f"EarlyStopping mode must be 'max' or 'min', got {mode!r}", hint="higher or lower?")
        self.monitor = monitor
        self.patience = patience
        self.mode = mode
        self.best_epoch = -1
        self._best: tuple[float, float] = (-math.inf, -math.inf)
        self._best_state: dict[str, Any] | None = None

    def _score(self, metrics: dict[str, float]) -> tuple[float, float]:
        value = metrics[self.monitor]
        if self.mode == "min":
            return (-value, 0.0)
        return (value, -metrics.get("val_nll", 0.0) if "accuracy" in self.monitor else 0.0)

    def on_epoch_end(self, state: TrainState) -> None:
        metrics = state.history[-1]
        if self.monitor not in metrics:
            validated = sorted(key for key in metrics if key.startswith("val_"))
            if validated:
                raise ConfigError(
                    f"early stopping monitors {self.monitor!r}, which the validation did not return",
                    hint=f"monitor one of {validated}.",
                )
            return
        score = self._score(metrics)
        if score > self._best:
            from kdistill.engine.checkpoint import full_model_state  # whole tensors of an FSDP student too

            self._best, self.best_epoch = score, state.epoch
            self._best_state = copy.deepcopy(full_model_state(state.model))
        elif self.patience is not None and state.epoch - self.best_epoch >= self.patience:
            state.stop = True

    def on_train_end(self, state: TrainState) -> None:
        if self._best_state is not None:
            from kdistill.engine.checkpoint import load_full_model_state

            load_full_model_state(state.model, self._best_state)
            state.best_epoch = self.best_epoch

    def state_dict(self) -> dict[str, Any]:
        return {"best_epoch": self.best_epoch, "best": list(self._best), "best_state": self._best_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_epoch = int(state["best_epoch"])
        first, second = state["best"]
        self._best = (float(first), float(second))
        self._best_state = state["best_state"]


class ProgressBar(Callback):
    """A rich progress bar over epochs with the latest loss and validation accuracy; updated once per epoch."""

    def __init__(self, description: str = "distilling") -> None:
        self.description = description
        self._progress: Any = None
        self._task: Any = None

    def on_train_begin(self, state: TrainState) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[metrics]}"),
            transient=True,
        )
        self._progress.start()
        self._task = self._progress.add_task(self.description, total=state.max_epochs, metrics="")

    def on_epoch_end(self, state: TrainState) -> None:
        metrics = state.history[-1]
        shown = f"loss {metrics['train_loss']:.4f}"
        if "val_accuracy" in metrics:
            shown += f"  val acc {metrics['val_accuracy']:.4f}"
        self._progress.update(self._task, advance=1, metrics=shown)

    def on_train_end(self, state: TrainState) -> None:
        if self._progress is not None:
            self._progress.stop()
