"""docs/search.md's python example, run as written, and the config example it names, validated."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

from kdistill.config import load_config
from kdistill.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "search.md"


def test_search_page_example_runs_and_prints_what_it_says(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    text = DOC.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert len(blocks) == 1
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(blocks[0], str(DOC), "exec"), {})
    shown = text.split("prints\n\n```\n", 1)[1].split("```", 1)[0]
    assert printed.getvalue() == shown


def test_the_config_example_validates_and_a_wrong_budget_key_names_the_closest() -> None:
    config = load_config(ROOT / "examples" / "digits_search.yaml")
    assert config.budget is not None and config.budget.max_params == 5000
    assert config.search is not None and config.search.families == ["mlp", "cnn"]
    with pytest.raises(ConfigError, match=r"budget\.max_latency: unknown key; did you mean 'max_latency_ms'\?"):
        load_config(ROOT / "examples" / "digits_search.yaml", ["budget.max_latency=0.1"])
