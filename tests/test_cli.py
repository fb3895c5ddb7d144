"""The kdistill command, run as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def _kdistill(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kdistill.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_help_lists_the_commands() -> None:
    done = _kdistill("--help")
    assert done.returncode == 0
    for command in ("demo", "list"):
        assert command in done.stdout


def test_demo_digits_keeps_accuracy_and_is_far_smaller(tmp_path: Path) -> None:
    done = _kdistill("demo", "--quiet", "--out", str(tmp_path / "demo"))
    assert done.returncode == 0, done.stderr
    assert "retention" in done.stdout and "baseline" in done.stdout
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    teacher, student = report["models"]["teacher"], report["models"]["student"]
    assert student["retention"] >= 0.97
    assert teacher["size_bytes"] / student["size_bytes"] >= 100
    assert teacher["latency_ms"] > student["latency_ms"]
    saved = (tmp_path / "demo" / "student.safetensors").stat().st_size
    assert 0 <= saved - student["size_bytes"] < 1024  # the saved file adds the spec and classes as metadata
    assert report["settings"]["teacher"] == "RandomForestClassifier" and report["settings"]["dataset"] == "digits"


def test_list_methods_and_datasets() -> None:
    methods = _kdistill("list", "methods")
    assert methods.returncode == 0 and "kd " in methods.stdout and "Hinton" in methods.stdout
    datasets = _kdistill("list", "datasets")
    assert "digits" in datasets.stdout and "mnist1d" in datasets.stdout


def test_errors_are_reported_not_tracebacks(tmp_path: Path) -> None:
    done = _kdistill("demo", "--dataset", "nope")
    assert done.returncode == 2 and "invalid choice" in done.stderr
