"""A self-contained HTML report: one file, plots embedded as base64 PNG, no scripts, no network.

It opens with the judgement (:meth:`kdistill.report.Report.lines`): the verdict (did the teacher help, by how much,
McNemar's p-value), each piece of advice with the setting to change, and the membership-inference reading. Then it
shows the metrics table of every model, then five plots: training curves (validation accuracy and training loss
per epoch) of the distilled student, the baseline and the pruned student's fine-tuning; accuracy vs size on disk and
accuracy vs batch-1 latency for every model (teacher, baseline, student, pruned, INT8; log-scale x); a reliability
diagram (accuracy against mean confidence per confidence bin; the diagonal is perfect calibration); and per-class
accuracy of the student and its INT8 export against the teacher's. Needs matplotlib (the "report" extra).
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from pathlib import Path
from typing import Any

from kdistill._deps import require
from kdistill.io import atomic_write_bytes
from kdistill.report import Report, _human_bytes

__all__ = ["render_html", "write_html_report", "write_html_report_from_folder"]

_COLORS = {
    "teacher": "#1f2937",
    "baseline": "#9ca3af",
    "student": "#2563eb",
    "student_onnx": "#60a5fa",
    "student_int8": "#0891b2",
    "pruned": "#d97706",
    "pruned_onnx": "#f59e0b",
    "pruned_int8": "#dc2626",
}

_TABLE_COLUMNS = (
    ("accuracy", "accuracy", "{:.4f}"),
    ("accuracy_delta", "Δ acc (INT8)", "{:+.4f}"),
    ("retention", "retention", "{:.1%}"),
    ("agreement", "agreement", "{:.4f}"),
    ("ece", "ECE", "{:.3f}"),
    ("parameters", "params", "{:,.0f}"),
    ("size_bytes", "size", None),
    ("latency_ms", "p50 ms @1", "{:.3f}"),
    ("latency_p95_ms", "p95 ms @1", "{:.3f}"),
    ("throughput_rows_s", "rows/s", "{:,.0f}"),
    ("peak_memory_bytes", "peak mem", None),
)


def _color(name: str) -> str:
    return _COLORS.get(name, "#7c3aed")


def _png(figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    require("matplotlib.pyplot").close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _training_curves(plt: Any, history: dict[str, Any]) -> str | None:
    runs = {name: epochs for name, epochs in history.items() if epochs}
    if not runs:
        return None
    figure, (acc_axis, loss_axis) = plt.subplots(1, 2, figsize=(11, 3.6))
    for name, epochs in runs.items():
        steps = [int(epoch.get("epoch", i)) + 1 for i, epoch in enumerate(epochs)]
        label = {"pruned": "pruned (KD fine-tuning)"}.get(name, name)
        if any("val_accuracy" in epoch for epoch in epochs):
            acc_axis.plot(steps, [e.get("val_accuracy") for e in epochs], label=label, color=_color(name))
        loss_axis.plot(steps, [e.get("train_loss") for e in epochs], label=label, color=_color(name))
    acc_axis.set(title="validation accuracy", xlabel="epoch", ylabel="accuracy")
    loss_axis.set(title="training loss (its own objective)", xlabel="epoch", ylabel="loss")
    loss_axis.set_yscale("log")
    for axis in (acc_axis, loss_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    return _png(figure)


def _tradeoff(plt: Any, models: dict[str, dict[str, float]], key: str, label: str) -> str | None:
    points = {name: m for name, m in models.items() if m.get(key) and "accuracy" in m}
    if not points:
        return None
    figure, axis = plt.subplots(figsize=(5.6, 4))
    markers = "osD^v<>P*X"
    for index, (name, metrics) in enumerate(points.items()):
        marker = markers[index % len(markers)]
        axis.scatter(metrics[key], metrics["accuracy"], s=60, color=_color(name), marker=marker, label=name, zorder=3)
    axis.legend(fontsize=8, loc="best")
    axis.set_xscale("log")
    axis.set(xlabel=label, ylabel="test accuracy", title=f"accuracy vs {label.split(' (')[0]}")
    axis.grid(alpha=0.3, which="both")
    return _png(figure)


def _reliability(plt: Any, diagnostics: dict[str, Any]) -> str | None:
    bins = diagnostics.get("reliability") or {}
    shown = [name for name in ("teacher", "baseline", "student", "student_int8", "pruned_int8") if name in bins]
    if not shown:
        return None
    figure, axis = plt.subplots(figsize=(5.6, 4))
    axis.plot([0, 1], [0, 1], linestyle="--", color="#6b7280", label="perfect calibration")
    for name in shown:
        data = bins[name]
        kept = [(c, a) for c, a, n in zip(data["confidence"], data["accuracy"], data["count"], strict=True) if n > 0]
        axis.plot([c for c, _ in kept], [a for _, a in kept], marker="o", color=_color(name), label=name)
    axis.set(xlabel="mean confidence in bin", ylabel="accuracy in bin", title="reliability diagram", xlim=(0, 1))
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return _png(figure)


def _per_class(plt: Any, diagnostics: dict[str, Any]) -> str | None:
    per_class = diagnostics.get("per_class_accuracy") or {}
    shown = [name for name in ("teacher", "student", "student_int8", "pruned_int8") if name in per_class]
    if not shown:
        return None
    classes = diagnostics.get("classes") or list(range(len(per_class[shown[0]])))
    width = 0.8 / len(shown)
    figure, axis = plt.subplots(figsize=(11, 3.6))
    for offset, name in enumerate(shown):
        values = [v if v is not None else 0.0 for v in per_class[name]]
        positions = [i + (offset - (len(shown) - 1) / 2) * width for i in range(len(values))]
        axis.bar(positions, values, width=width, color=_color(name), label=name)
    axis.set_xticks(range(len(classes)), [str(c) for c in classes])
    lowest = min(v for name in shown for v in per_class[name] if v is not None)
    axis.set(xlabel="class", ylabel="accuracy", title="per-class accuracy against the teacher")
    axis.set_ylim(max(0.0, lowest - 0.1), 1.0)
    axis.grid(alpha=0.3, axis="y")
    axis.legend(ncol=len(shown), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18))
    return _png(figure)


def _table(report: Report) -> str:
    runtimes = report.settings.get("runtimes", {})
    head = "".join(f"<th>{html.escape(header)}</th>" for _, header, _ in _TABLE_COLUMNS)
    rows = []
    for name, metrics in report.models.items():
        cells = []
        for key, _, fmt in _TABLE_COLUMNS:
            value = metrics.get(key)
            text = "—" if value is None else _human_bytes(value) if fmt is None else fmt.format(value)
            cells.append(f"<td>{html.escape(text)}</td>")
        runtime = html.escape(str(runtimes.get(name, "")))
        rows.append(f"<tr><th>{html.escape(name)}</th><td class='rt'>{runtime}</td>{''.join(cells)}</tr>")
    return f"<table><tr><th>model</th><th>runtime</th>{head}</tr>{''.join(rows)}</table>"


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #111827; background: #ffffff; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 28px; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #d1d5db; padding: 4px 8px; text-align: right; }
tr > th:first-child, td.rt { text-align: left; } tr:nth-child(even) { background: #f3f4f6; }
img { max-width: 100%; } .plots { display: flex; flex-wrap: wrap; gap: 12px; }
.note { color: #4b5563; font-size: 13px; }
.verdict { border-left: 6px solid #2563eb; background: #eff6ff; padding: 8px 14px; font-size: 15px; }
.verdict.hurt { border-color: #dc2626; background: #fef2f2; }
.verdict.none { border-color: #9ca3af; background: #f9fafb; }
.advice li { margin: 4px 0; } code { background: #f3f4f6; padding: 0 3px; }
pre { background: #f3f4f6; padding: 8px; font-size: 12px; overflow-x: auto; }
"""


def _judgement(report: Report) -> str:
    """The verdict, the advice and the privacy line, as the page's first section."""
    parts = []
    if report.verdict is not None:
        kind = {"helped": "", "hurt": " hurt", "no significant difference": " none"}[report.verdict.outcome]
        parts.append(f"<p class='verdict{kind}' id='verdict'><strong>{html.escape(report.verdict.line())}</strong></p>")
    if report.advice:
        items = "".join(
            f"<li>{html.escape(item['finding'])}: {html.escape(item['advice'])}: "
            f"<code>{html.escape(item['setting'])}</code></li>"
            for item in report.advice
        )
        parts.append(f"<h2>Advice</h2><ul class='advice' id='advice'>{items}</ul>")
    elif report.verdict is not None:
        parts.append("<p class='note' id='advice'>advice: none (no diagnosis fired)</p>")
    privacy = [line for line in report.lines() if line.startswith("privacy:")]
    if privacy:
        parts.append(f"<p class='note' id='privacy'>{html.escape(privacy[0])}</p>")
    return "".join(parts)


def _search(report: Report, plt: Any) -> str:
    """A searched student's section (the answer, the Pareto table and plot: :mod:`kdistill.search.html`)."""
    if not report.search:
        return ""
    from kdistill.search.html import search_section

    return search_section(report.search, plt, _png)


def render_html(report: Report, history: dict[str, Any] | None = None) -> str:
    """The report as one HTML string with every plot embedded (base64 PNG). ``history``: per-epoch metric dicts by
    run name (``{"student": [...], "baseline": [...], "pruned": [...]}``, as history.json holds)."""
    matplotlib = require("matplotlib")
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot")
    plots = [
        ("training curves: student, baseline and pruned fine-tuning", _training_curves(plt, history or {})),
        ("accuracy vs size on disk", _tradeoff(plt, report.models, "size_bytes", "size on disk (bytes, log)")),
        ("accuracy vs latency at batch 1", _tradeoff(plt, report.models, "latency_ms", "p50 latency (ms, log)")),
        ("reliability diagram", _reliability(plt, report.diagnostics)),
        ("per-class accuracy", _per_class(plt, report.diagnostics)),
    ]
    figures = "".join(
        f"<figure><img alt='{html.escape(title)}' src='data:image/png;base64,{data}'>"
        f"<figcaption class='note'>{html.escape(title)}</figcaption></figure>"
        for title, data in plots
        if data is not None
    )
    missing = [title for title, data in plots if data is None]
    note = f"<p class='note'>not shown (no data in this run): {html.escape(', '.join(missing))}</p>" if missing else ""
    settings = report.settings
    threads = settings.get("profile_threads", next(iter(report.models.values())).get("threads"))
    timing = (
        f"Latency: single batch-1 calls after 3 warm-up calls, p50 and p95; throughput at batch "
        f"{settings.get('profile_batch_size', 256)}: median of 7 timed loops; {threads} thread(s). "
        f"Peak memory: {settings.get('memory_measure', 'not measured')}."
    )
    machine = json.dumps(report.to_dict()["machine"])
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>kdistill report</title>"
        f"<style>{_STYLE}</style></head><body>"
        f"<h1>kdistill report — {html.escape(report.split)} split, {report.rows} rows</h1>"
        f"{_judgement(report)}{_search(report, plt)}<h2>Models</h2>{_table(report)}"
        f"<p class='note'>{html.escape(timing)}</p>"
        f"<h2>Plots</h2><div class='plots'>{figures}</div>{note}"
        f"<h2>Settings</h2><pre>{html.escape(json.dumps(settings, indent=1, default=str))}</pre>"
        f"<p class='note'>machine: {html.escape(machine)}</p></body></html>"
    )


def write_html_report(report: Report, history: dict[str, Any] | None, path: str | os.PathLike[str]) -> Path:
    """Render :func:`render_html` and write it to ``path`` atomically."""
    return atomic_write_bytes(path, render_html(report, history).encode("utf-8"))


def write_html_report_from_folder(folder: str | os.PathLike[str], path: str | os.PathLike[str] | None = None) -> Path:
    """Write ``report.html`` for a run folder holding ``report.json`` (and ``history.json`` when there is one)."""
    source = Path(folder)
    report = Report.load(source / "report.json")
    history_file = source / "history.json"
    history = json.loads(history_file.read_text()) if history_file.exists() else {}
    return write_html_report(report, history, path if path is not None else source / "report.html")
