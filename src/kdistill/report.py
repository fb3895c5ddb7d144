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
from kdistill.verdict import Verdict

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

_REGRESSION_COLUMNS = (
    ("r2", "R²", "{:.4f}"),
    ("retention", "R² ret.", "{:.1%}"),
    ("rmse_retention", "RMSE ret.", "{:.1%}"),
    ("agreement", "corr. teacher", "{:.4f}"),
    ("rmse", "RMSE", "{:.4g}"),
    ("mae", "MAE", "{:.4g}"),
    *_COLUMNS[5:],
)
"""The table of a regression report (task ``regression``: its models have ``r2``); RMSE and MAE in the targets'
units, retention as the ratio of R² and of RMSE (teacher's over the model's)."""

_EMBEDDING_COLUMNS = (
    ("spearman", "Spearman", "{:.3f}"),
    ("spearman_hard", "Spearman hard", "{:.3f}"),
    ("recall_at_10", "recall@10", "{:.3f}"),
    ("cosine", "cosine", "{:.3f}"),
    ("parameters", "params", "{:,.0f}"),
    ("size_bytes", "size", None),
    ("sentences_per_s_batch_1", "sent/s @1", "{:,.0f}"),
    ("sentences_per_s_batch_64", "sent/s @64", "{:,.0f}"),
    ("speedup_batch_64", "× teacher @64", "{:.1f}"),
)
"""The table of an embedding report (its models have ``spearman``): Spearman of pairwise cosines against the
teacher's on random and on hard pairs, recall@10, cosine to the teacher's embeddings (NaN for a narrower student),
and sentences/s on one thread (with ``report.profile``)."""


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

    The judgement, read first (:meth:`lines`): ``verdict`` (:class:`~kdistill.verdict.Verdict`: student vs baseline,
    McNemar's exact test on the same rows), ``advice`` (the fired :mod:`kdistill.diagnose` rules, each with its
    finding, advice and the setting to change), ``privacy`` (per model, the membership-inference AUCs of
    :mod:`kdistill.privacy`: training rows vs the evaluated rows) and ``measured`` (what the rules read).
    ``search``: for a searched student, the search's summary (:meth:`kdistill.search.SearchResult.to_dict`: every
    trial, the Pareto fronts, the one-line answer), shown as a table and a plot in the HTML report.
    """

    split: str
    rows: int
    models: dict[str, dict[str, float]]
    settings: dict[str, Any] = field(default_factory=dict)
    diagnostics: dict[str, Any] = field(default_factory=dict)
    verdict: Verdict | None = None
    advice: list[dict[str, str]] = field(default_factory=list)
    privacy: dict[str, dict[str, float]] = field(default_factory=dict)
    measured: dict[str, Any] = field(default_factory=dict)
    search: dict[str, Any] = field(default_factory=dict)

    @property
    def retention(self) -> float:
        """The distilled student's accuracy over the teacher's."""
        return self.models["student"]["retention"]

    def lines(self) -> list[str]:
        """What the report opens with: the verdict line, one line per piece of advice, and the privacy reading."""
        from kdistill.privacy import privacy_reading

        found = [self.verdict.line()] if self.verdict is not None else []
        found += [f"advice: {item['line']}" for item in self.advice]
        if not self.advice and self.verdict is not None:
            found.append("advice: none (no diagnosis fired)")
        if self.privacy:
            worst = {name: max(attack["loss_auc"], attack["confidence_auc"]) for name, attack in self.privacy.items()}
            aucs = ", ".join(
                f"{name} {attack['loss_auc']:.2f}/{attack['confidence_auc']:.2f}"
                for name, attack in self.privacy.items()
            )
            top = max(worst, key=lambda name: worst[name])
            found.append(
                f"privacy: membership-inference AUC (loss/confidence attack; 0.5 = no signal) {aucs}; "
                f"{top}: {privacy_reading(worst[top])}"
            )
        if self.settings.get("transfer_rows"):
            from kdistill.transfer.plan import rows_line

            found.append(rows_line(self.settings["transfer_rows"]))
        return found

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "lines": self.lines(),
            "verdict": None if self.verdict is None else self.verdict.to_dict(),
            "advice": self.advice,
            "privacy": self.privacy,
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
        if self.measured:
            data["measured"] = self.measured
        if self.diagnostics:
            data["diagnostics"] = self.diagnostics
        if self.search:
            data["search"] = self.search
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
            verdict=Verdict.from_dict(data["verdict"]) if data.get("verdict") else None,
            advice=list(data.get("advice", [])),
            privacy=dict(data.get("privacy", {})),
            measured=dict(data.get("measured", {})),
            search=dict(data.get("search", {})),
        )

    def table(self) -> Any:
        """A rich Table, one row per model."""
        from rich.table import Table

        title = "\n".join([f"kdistill report — {self.split} split, {self.rows} rows", *self.lines()])
        table = Table(title=title, title_justify="left")
        table.add_column("model")
        columns: tuple[tuple[str, str, str | None], ...] = _COLUMNS
        if any("r2" in metrics for metrics in self.models.values()):
            columns = _REGRESSION_COLUMNS
        elif any("spearman" in metrics for metrics in self.models.values()):
            columns = _EMBEDDING_COLUMNS
        for _, header, _ in columns:
            table.add_column(header, justify="right")
        for name, metrics in self.models.items():
            cells = []
            for key, _, fmt in columns:
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
