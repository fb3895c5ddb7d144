"""The side-by-side report: teacher vs distilled student vs the same student trained without a teacher."""

from __future__ import annotations

import io
import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdistill.io import atomic_write_json

__all__ = ["Report"]

_COLUMNS = (
    ("accuracy", "accuracy", "{:.4f}"),
    ("retention", "retention", "{:.1%}"),
    ("agreement", "agreement", "{:.4f}"),
    ("nll", "NLL", "{:.3f}"),
    ("ece", "ECE", "{:.3f}"),
    ("parameters", "params", "{:,.0f}"),
    ("size_bytes", "size", None),
    ("latency_ms", "p50 ms @1", "{:.3f}"),
    ("latency_p95_ms", "p95 ms @1", "{:.3f}"),
    ("throughput_rows_s", "rows/s @256", "{:,.0f}"),
)


def _human_bytes(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


@dataclass
class Report:
    """Metrics per model (``"teacher"``, ``"student"``, ``"baseline"``) measured on one split, plus the settings.

    Each model's entry holds accuracy, nll, ece, agreement (with the teacher), retention (accuracy / the teacher's),
    parameters, size_bytes, latency_ms (p50, batch 1), throughput_rows_s and the thread count used.
    ``diagnostics`` (optional, written by :func:`kdistill.compress.compress`) holds per-model reliability bins and
    per-class accuracy for the HTML report.
    """

    split: str
    rows: int
    models: dict[str, dict[str, float]]
    settings: dict[str, Any] = field(default_factory=dict)
    diagnostics: dict[str, Any] = field(default_factory=dict)

    @property
    def retention(self) -> float:
        """The distilled student's accuracy over the teacher's."""
        return self.models["student"]["retention"]

    def to_dict(self) -> dict[str, Any]:
        data = {
            "split": self.split,
            "rows": self.rows,
            "models": self.models,
            "settings": self.settings,
            "machine": {
                "platform": platform.platform(),
                "processor": platform.machine(),
                "cpu_count": os.cpu_count(),
                "torch": torch.__version__,
            },
        }
        if self.diagnostics:
            data["diagnostics"] = self.diagnostics
        return data

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the report as JSON, atomically."""
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Report:
        data = json.loads(Path(path).read_text())
        return cls(
            split=data["split"],
            rows=data["rows"],
            models=data["models"],
            settings=data.get("settings", {}),
            diagnostics=data.get("diagnostics", {}),
        )

    def table(self) -> Any:
        """A rich Table, one row per model."""
        from rich.table import Table

        title = f"kdistill report — {self.split} split, {self.rows} rows"
        table = Table(title=title, title_justify="left")
        table.add_column("model")
        for _, header, _ in _COLUMNS:
            table.add_column(header, justify="right")
        for name, metrics in self.models.items():
            cells = []
            for key, _, fmt in _COLUMNS:
                value = metrics.get(key)
                if value is None:
                    cells.append("—")
                elif fmt is None:
                    cells.append(_human_bytes(value))
                else:
                    cells.append(fmt.format(value))
            table.add_row(name, *cells)
        threads = next(iter(self.models.values())).get("threads")
        if threads is not None:
            table.caption = f"latency and throughput measured with {threads:.0f} thread(s), median of 7 repeats"
        return table

    def __str__(self) -> str:
        from rich.console import Console

        buffer = io.StringIO()
        Console(file=buffer, width=140).print(self.table())
        return buffer.getvalue()
