"""The python examples in docs/engine.md run as written."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.fixture(autouse=True)
def _restore_global_rng() -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        yield


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / "engine.md").read_text(), flags=re.DOTALL)


def test_engine_doc_has_its_examples() -> None:
    assert len(_python_blocks()) == 5


@pytest.mark.parametrize("block", range(len(_python_blocks())))
def test_engine_doc_example_runs(block: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    exec(compile(_python_blocks()[block], f"engine.md block {block}", "exec"), {"__name__": "__doc_example__"})
