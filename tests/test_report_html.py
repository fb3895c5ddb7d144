"""The HTML report: one self-contained file with every plot embedded, and a real browser renders it."""

from __future__ import annotations

import base64
import html
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

from kdistill.compress.pipeline import model_diagnostics
from kdistill.report import Report
from kdistill.report_html import render_html, write_html_report, write_html_report_from_folder
from kdistill.verdict import classification_verdict

pytest.importorskip("matplotlib")


@pytest.fixture(autouse=True)
def _leave_the_global_rng_as_found():
    """These tests draw random tensors; the global generator is restored after each so no other test's draws change."""
    with torch.random.fork_rng(devices=[]):
        yield


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _report_and_history() -> tuple[Report, dict]:
    report, history, _, _ = _run()
    return report, history


def _run() -> tuple[Report, dict, dict, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    target = torch.randint(0, 4, (200,), generator=generator)
    logits = {}
    for name, noise in (("teacher", 1.0), ("baseline", 2.0), ("student", 1.5), ("student_int8", 1.6)):
        logits[name] = torch.nn.functional.one_hot(target, 4).float() * 3 + noise * torch.randn(
            200, 4, generator=generator
        )
    models = {}
    for index, (name, values) in enumerate(logits.items()):
        models[name] = {
            "accuracy": float((values.argmax(1) == target).float().mean()),
            "size_bytes": 10.0 ** (6 - index),
            "latency_ms": 10.0 ** (1 - index),
            "latency_p95_ms": 2 * 10.0 ** (1 - index),
            "parameters": 1000.0 * (4 - index),
        }
    history = {
        "student": [{"epoch": e, "val_accuracy": 0.5 + 0.04 * e, "train_loss": 2.0 / (e + 1)} for e in range(10)],
        "baseline": [{"epoch": e, "val_accuracy": 0.45 + 0.04 * e, "train_loss": 1.5 / (e + 1)} for e in range(10)],
        "pruned": None,
    }
    diagnostics = model_diagnostics(logits, target, ["a", "b", "c", "d"])
    report = Report(split="test", rows=200, models=models, settings={"profile_threads": 1}, diagnostics=diagnostics)
    report.verdict = classification_verdict(logits["student"], logits["baseline"], target)
    report.advice = [
        {
            "rule": "probability_teacher_hot",
            "finding": "the teacher outputs probabilities and was distilled at temperature 4",
            "advice": "probabilities are already soft: distil at temperature 1",
            "setting": "temperature=1",
            "line": "the teacher outputs probabilities ... (temperature=1)",
        }
    ]
    report.privacy = {name: {"loss_auc": 0.5 + 0.1 * i, "confidence_auc": 0.5} for i, name in enumerate(models)}
    return report, history, logits, target


def test_the_page_opens_with_the_verdict_then_the_advice_before_any_table_or_plot():
    report, history = _report_and_history()
    page = render_html(report, history)
    assert report.verdict is not None
    verdict = page.index(html.escape(report.verdict.line()))
    advice = page.index("<code>temperature=1</code>")
    privacy = page.index("membership-inference AUC")
    assert page.index("<h1>") < verdict < advice < privacy < page.index("<table") < page.index("<img")
    assert f"p = {report.verdict.p_value:.3g}" in page


def test_html_is_self_contained_with_five_embedded_plots():
    report, history = _report_and_history()
    page = render_html(report, history)
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) == 5
    for data in images:
        assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r"(src|href)=['\"](https?:|file:|//)", page)  # nothing fetched from anywhere
    assert "<script" not in page
    for name in report.models:
        assert f"<th>{name}</th>" in page


def test_diagnostics_match_an_independent_count():
    report, _, logits, target = _run()
    predicted, labels = logits["student"].argmax(1).numpy(), target.numpy()
    expected = [float(np.mean(predicted[labels == c] == c)) for c in range(4)]
    assert report.diagnostics["per_class_accuracy"]["student"] == pytest.approx(expected)
    assert report.diagnostics["classes"] == ["a", "b", "c", "d"]
    reliability = report.diagnostics["reliability"]["student"]
    assert sum(reliability["count"]) == 200
    confidence = torch.softmax(logits["student"], 1).max(1).values.numpy()
    top_bin = confidence > 0.9
    assert reliability["count"][-1] == top_bin.sum()
    assert reliability["accuracy"][-1] == pytest.approx(np.mean(predicted[top_bin] == labels[top_bin]))
    # bin accuracies weighted by bin size give back the overall accuracy
    bins = np.array(reliability["count"])
    weighted = float(np.dot(bins, reliability["accuracy"]) / bins.sum())
    assert weighted == pytest.approx(report.models["student"]["accuracy"], abs=1e-6)


def test_missing_data_is_named_not_drawn(tmp_path):
    report = Report(split="val", rows=10, models={"teacher": {"accuracy": 0.9}, "student": {"accuracy": 0.8}})
    page = render_html(report, None)
    assert "not shown (no data in this run)" in page
    assert "reliability diagram" in page.split("not shown")[1]
    report.save(tmp_path / "report.json")
    written = write_html_report_from_folder(tmp_path)
    assert written.read_text().startswith("<!DOCTYPE html>")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium)")
def test_a_headless_browser_renders_a_non_blank_page(tmp_path):
    report, history = _report_and_history()
    page = write_html_report(report, history, tmp_path / "report.html")
    screenshot = tmp_path / "shot.png"
    command = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={screenshot}",
        "--window-size=1200,2000",
        page.resolve().as_uri(),
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    import matplotlib.image

    pixels = matplotlib.image.imread(str(screenshot))[..., :3]
    assert pixels.shape[:2] == (2000, 1200)
    nonwhite = float((pixels.min(axis=2) < 0.95).mean())
    colours = len(np.unique((pixels * 255).astype(np.uint8).reshape(-1, 3), axis=0))
    assert nonwhite > 0.05  # text, table and plots cover a real part of the page
    assert colours > 100  # plots in several colours, not a blank or single-colour page
    # the verdict box (its coloured left border) is drawn at the top of the page, above the table and the plots
    assert report.verdict is not None
    border = {"helped": (37, 99, 235), "hurt": (220, 38, 38), "no significant difference": (156, 163, 175)}
    rgb = (pixels * 255).round().astype(int)
    box = np.all(np.abs(rgb - np.array(border[report.verdict.outcome])) <= 3, axis=2)
    rows_with_border = np.nonzero(box[:, :60].any(axis=1))[0]
    assert rows_with_border.size > 10
    assert rows_with_border.min() < 150
