"""Metric logs as callbacks: one JSON line per epoch (``metrics.jsonl``), optional TensorBoard, and console lines.

Only rank 0 writes under distributed training. On a resumed run the JSONL file is rewritten from the checkpoint's
history first, so epochs logged after the last checkpoint by a killed process do not appear twice.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdistill.engine.callbacks import Callback
from kdistill.errors import ConfigError
from kdistill.io import atomic_write_bytes

if TYPE_CHECKING:
    from kdistill.engine.loop import TrainState

__all__ = ["ConsoleLog", "JsonlLogger", "TensorBoardLogger"]


class JsonlLogger(Callback):
    """Appends each epoch's metrics to ``path`` as one JSON object per line, flushed and fsynced (with evaluations
    every N steps, their rows too, written in order at the epoch's end).

    Each line: ``{"phase": ..., "epoch": 0, "lr": ..., "train_loss": ..., "val_accuracy": ..., "time_s": ...}``.
    """

    def __init__(self, path: str | os.PathLike[str], *, phase: str = "student") -> None:
        self.path = Path(path)
        self.phase = phase
        self._written = 0

    def _line(self, metrics: dict[str, float]) -> str:
        return json.dumps({"phase": self.phase, **metrics}) + "\n"

    def on_train_begin(self, state: TrainState) -> None:
        if state.rank != 0:
            return
        kept = []
        if self.path.exists():  # other phases' lines stay; this phase's are rebuilt from the (resumed) history
            kept = [line for line in self.path.read_text().splitlines(keepends=True) if not self._is_mine(line)]
        lines = kept + [self._line(metrics) for metrics in state.history]
        atomic_write_bytes(self.path, "".join(lines).encode())
        self._written = len(state.history)

    def _is_mine(self, line: str) -> bool:
        try:
            return bool(json.loads(line).get("phase") == self.phase)
        except json.JSONDecodeError:
            return True  # a line cut short by a kill: dropped

    def on_epoch_end(self, state: TrainState) -> None:
        if state.rank != 0:
            return
        with self.path.open("a") as handle:  # the epoch's row, after any evaluation rows of its steps
            handle.writelines(self._line(metrics) for metrics in state.history[self._written :])
            self._written = len(state.history)
            handle.flush()
            os.fsync(handle.fileno())


class TensorBoardLogger(Callback):
    """Writes each epoch's metrics as TensorBoard scalars under ``folder`` (needs ``pip install tensorboard``)."""

    def __init__(self, folder: str | os.PathLike[str], *, phase: str = "student") -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ConfigError(
                "logging.tensorboard is true but the tensorboard package is not installed",
                hint="pip install 'kdistill[tensorboard]', or set logging.tensorboard: false.",
            ) from exc
        self._writer_class = SummaryWriter
        self.folder = Path(folder)
        self.phase = phase
        self._writer: Any = None

    def on_train_begin(self, state: TrainState) -> None:
        if state.rank == 0:
            self._writer = self._writer_class(log_dir=str(self.folder / self.phase))

    def on_epoch_end(self, state: TrainState) -> None:
        if self._writer is None:
            return
        metrics = state.history[-1]
        for name, value in metrics.items():
            if name != "epoch":
                self._writer.add_scalar(name, value, global_step=int(metrics["epoch"]))
        self._writer.flush()

    def on_train_end(self, state: TrainState) -> None:
        if self._writer is not None:
            self._writer.close()


class ConsoleLog(Callback):
    """Prints one line per epoch with rich (loss, validation accuracy, time); for logs of long, unattended runs."""

    def __init__(self, phase: str = "student") -> None:
        from rich.console import Console

        self.phase = phase
        self._console = Console(stderr=True)

    def on_train_begin(self, state: TrainState) -> None:
        if state.rank == 0 and state.history:
            self._console.print(f"[bold]{self.phase}[/bold]: resumed after epoch {len(state.history) - 1}")

    def on_epoch_end(self, state: TrainState) -> None:
        if state.rank != 0:
            return
        metrics = state.history[-1]
        shown = f"[bold]{self.phase}[/bold] epoch {int(metrics['epoch']) + 1}/{state.max_epochs}"
        shown += f"  loss {metrics['train_loss']:.4f}"
        if "val_accuracy" in metrics:
            shown += f"  val acc {metrics['val_accuracy']:.4f}"
        shown += f"  {metrics['time_s']:.2f} s"
        self._console.print(shown, highlight=False)
