"""The python examples in docs/teachers.md and docs/cache.md run as written."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _restore_global_rng() -> Iterator[None]:
    """These tests seed torch's global generator; later tests (in other files) get it back untouched."""
    with torch.random.fork_rng(devices=[]):
        yield


DOCS = Path(__file__).resolve().parents[1] / "docs"


def _python_blocks(name: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / name).read_text(), flags=re.DOTALL)


@pytest.mark.parametrize(
    ("page", "block"),
    [(page, i) for page in ("teachers.md", "cache.md") for i in range(len(_python_blocks(page)))],
)
def test_doc_example_runs(page: str, block: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = _python_blocks(page)[block]
    if "transformers" in code:
        pytest.importorskip("transformers")
    if "onnx" in code:
        pytest.importorskip("onnxruntime")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KDISTILL_CACHE_DIR", str(tmp_path / "cache"))
    exec(compile(code, f"{page} block {block}", "exec"), {"__name__": "__doc_example__"})
