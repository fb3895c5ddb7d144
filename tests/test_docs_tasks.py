"""docs/tasks.md's python examples, run as written, in order, in one namespace (as a reader would paste them)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "tasks.md"


def test_tasks_page_examples_run_and_print_what_they_say() -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    assert len(blocks) == 6
    namespace: dict[str, object] = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        for block in blocks:
            exec(compile(block, str(DOC), "exec"), namespace)
    assert printed.getvalue().splitlines() == [
        "['classification', 'embedding', 'regression', 'token_lm']",
        "val_loss False",
        "[[6, 7, -100, -100], [2, 3, 4, -100]]",
        "True",
        "ShapeMismatchError",
        "True",
        "(2, 4, 5) torch.int64",
        "True",
        "these outputs hold only the teacher's top-k (Outputs.topk), no dense logits",
        "True",
        "['val_cosine', 'val_mse']",
    ]
