"""The README's Python examples run as written, and its two shell commands are what CI runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_python_example_runs(index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # examples write runs/ into the current folder
    exec(compile(_blocks("python")[index], f"README.md python block {index}", "exec"), {"__name__": "__readme__"})


def test_ci_runs_the_readme_test_command() -> None:
    setup, tests = _blocks("bash")[:2]
    assert "torch==2.13.0" in setup.split("&&")[1]  # the CPU build goes in before anything that depends on torch
    assert tests.strip() in (ROOT / ".ci" / "run").read_text()
