"""docs/lm.md's python examples, run as written, in order, in one namespace, printing what the page says."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "lm.md"

pytest.importorskip("transformers")


def test_lm_page_examples_run_and_print_what_they_say(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    text = DOC.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert len(blocks) == 5
    namespace: dict[str, object] = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        for block in blocks:
            exec(compile(block, str(DOC), "exec"), namespace)
    lines = printed.getvalue().splitlines()
    assert lines == [
        "['ce', 'kd', 'loss']",
        "160 18.0",
        "36.0 (20, 8, 8)",
        "['val_agreement', 'val_loss', 'val_perplexity', 'val_token_accuracy']",
        "[2, 3, 4, 6] True True",
    ]
    for line in lines:  # the page quotes each output right after its block
        assert f"prints `{line}`" in text
