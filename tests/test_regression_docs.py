"""docs/regression.md's python examples, run as written, in order, in one namespace (as a reader would paste them);
the XGBoost block skips without xgboost."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
from pathlib import Path

import pytest
import torch

DOC = Path(__file__).resolve().parents[1] / "docs" / "regression.md"


def test_regression_page_examples_run_and_print_what_they_say(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    assert len(blocks) == 5
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__doc_example__"}
    printed = io.StringIO()
    with torch.random.fork_rng(devices=[]), contextlib.redirect_stdout(printed):
        for block in blocks:
            if "from xgboost import" in block and importlib.util.find_spec("xgboost") is None:
                continue
            exec(compile(block, str(DOC), "exec"), namespace)
    lines = printed.getvalue().splitlines()
    assert lines[0] == "regression regression_kd"
    assert lines[1] == "['agreement', 'mae', 'parameters', 'r2', 'retention', 'rmse']"
    assert "True" in lines
    assert "(2, 2) 2" in lines
    assert (tmp_path / "regressor.onnx").is_file()
