"""docs/methods.md's python examples, run as written, in order, in one namespace (as a reader would paste them)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "methods.md"


def test_methods_page_examples_run_and_print_what_they_say() -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    assert len(blocks) >= 5
    namespace: dict[str, object] = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        for block in blocks:
            exec(compile(block, str(DOC), "exec"), namespace)
    lines = printed.getvalue().splitlines()
    assert lines[0] == "2.0"  # temperature= reached DKD
    assert lines[1] == "method 'ce' has no temperature, but distill() was given temperature=2.0"
    lines = lines[2:]
    assert lines[0] == "['train_ce', 'train_loss', 'train_nckd', 'train_tckd']"
    assert lines[1].startswith("no module named ['layer3'] in MLP")
    assert lines[2] == "['train_fitnet/hint', 'train_kd/ce', 'train_kd/kd']"
    assert lines[4] == "2"
    assert lines[5] == "True"
