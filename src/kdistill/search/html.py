"""The search's part of the HTML report: the one-line answer, the Pareto table and the accuracy-vs-cost plots.

Called by :func:`kdistill.report_html.render_html` when the report holds a search (``report.search``, the dict of
:meth:`kdistill.search.SearchResult.to_dict`). Plain HTML and one base64 PNG, like the rest of the report.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from typing import Any

from kdistill.search.result import COST_AXES

__all__ = ["search_section"]

_FRONT_NAMES = {"parameters": "params", "size_bytes": "bytes", "latency_ms": "latency"}


def _cell(value: Any, fmt: str) -> str:
    return "—" if value is None else fmt.format(value)


def _pareto_table(search: dict[str, Any]) -> str:
    """Every trial on at least one front, cheapest in parameters first, with the fronts it is on."""
    fronts: dict[str, list[int]] = search.get("pareto", {})
    on_front = {number for numbers in fronts.values() for number in numbers}
    chosen = (search.get("chosen") or {}).get("number")
    rows = sorted(
        (record for record in search.get("trials", []) if record["number"] in on_front),
        key=lambda record: (record["parameters"], record["number"]),
    )
    head = (
        "<tr><th>trial</th><th>student</th><th>val accuracy</th><th>params</th><th>bytes</th>"
        "<th>p50 ms @1</th><th>T</th><th>soft weight</th><th>lr</th><th>epochs</th><th>on the front of</th></tr>"
    )
    body = []
    for record in rows:
        member = ", ".join(_FRONT_NAMES[cost] for cost, numbers in fronts.items() if record["number"] in numbers)
        mark = " (chosen)" if record["number"] == chosen else ""
        cells = [
            f"{record['number']}{mark}",
            str(record.get("label")),
            _cell(record.get("val_accuracy"), "{:.4f}"),
            _cell(record.get("parameters"), "{:,}"),
            _cell(record.get("size_bytes"), "{:,}"),
            _cell(record.get("latency_ms"), "{:.3f}"),
            _cell(record.get("temperature"), "{:.2f}"),
            _cell(record.get("soft_weight"), "{:.2f}"),
            _cell(record.get("lr"), "{:.2g}"),
            str(record.get("epochs_run")),
            member,
        ]
        body.append("<tr>" + "".join(f"<td>{html.escape(text)}</td>" for text in cells) + "</tr>")
    return f"<table id='pareto'>{head}{''.join(body)}</table>"


def _pareto_plot(plt: Any, search: dict[str, Any], png: Callable[[Any], str]) -> str | None:
    """Three panels, accuracy against parameters, bytes and latency: every finished trial as a grey dot, the front
    as a blue step line, the chosen trial circled."""
    trials = [r for r in search.get("trials", []) if r["state"] == "complete" and r.get("val_accuracy") is not None]
    if not trials:
        return None
    from matplotlib.ticker import NullFormatter

    by_number = {record["number"]: record for record in trials}
    chosen = (search.get("chosen") or {}).get("number")
    figure, axes = plt.subplots(1, len(COST_AXES), figsize=(13, 3.6))
    for axis, (cost, label) in zip(axes, COST_AXES, strict=True):
        points = [r for r in trials if r.get(cost) is not None]
        axis.scatter([r[cost] for r in points], [r["val_accuracy"] for r in points], s=18, color="#9ca3af")
        front = [by_number[n] for n in search.get("pareto", {}).get(cost, []) if n in by_number]
        if front:
            axis.step(
                [r[cost] for r in front], [r["val_accuracy"] for r in front], where="post", color="#2563eb", marker="o"
            )
        if chosen in by_number and by_number[chosen].get(cost) is not None:
            axis.scatter(
                [by_number[chosen][cost]],
                [by_number[chosen]["val_accuracy"]],
                s=140,
                facecolors="none",
                edgecolors="#dc2626",
                linewidths=2,
                label="chosen",
            )
            axis.legend(fontsize=8, loc="lower right")
        axis.set_xscale("log")
        axis.xaxis.set_minor_formatter(NullFormatter())  # log-axis minor labels overlap on narrow ranges
        axis.set(xlabel=label, ylabel="validation accuracy (short run)", title=f"accuracy vs {label.split(' (')[0]}")
        axis.grid(alpha=0.3, which="both")
    return png(figure)


def search_section(search: dict[str, Any], plt: Any, png: Callable[[Any], str]) -> str:
    """The report's "Student search" section: the answer, counts, the Pareto table and plot. ``png(figure)`` turns
    a matplotlib figure into base64 PNG (the report's own helper)."""
    counts = ", ".join(f"{count} {state.replace('_', ' ')}" for state, count in search.get("counts", {}).items())
    plot = _pareto_plot(plt, search, png)
    image = (
        f"<figure><img alt='Pareto fronts' src='data:image/png;base64,{plot}'>"
        "<figcaption class='note'>accuracy vs parameters, bytes and latency: every trial, the front, the chosen"
        "</figcaption></figure>"
        if plot is not None
        else "<p class='note'>no finished trial to plot</p>"
    )
    budget = {name: value for name, value in search.get("budget", {}).items() if value is not None}
    return (
        "<h2>Student search</h2>"
        f"<p class='verdict' id='search-answer'>{html.escape(str(search.get('answer', '')))}</p>"
        f"<p class='note'>budget {html.escape(str(budget))}; trials: {html.escape(counts)}; "
        f"{search.get('epochs_trained', 0)} epochs of short KD runs; {search.get('wall_time_s', 0)} s in this process; "
        f"storage {html.escape(str(search.get('storage')))}; every trial is in search/trials.json</p>"
        f"<h2>Pareto front</h2>{_pareto_table(search)}{image}"
    )
