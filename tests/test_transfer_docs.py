"""docs/scarce_labels.md's examples, run as written: the python blocks in order in one namespace, and its YAML
config validated (with the unlabeled rows file it names)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import numpy as np
import pytest

from kdistill.config import load_config

DOC = Path(__file__).resolve().parents[1] / "docs" / "scarce_labels.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), flags=re.DOTALL)


def test_scarce_labels_python_examples_print_what_they_say() -> None:
    blocks = _blocks("python")
    assert len(blocks) == 4
    namespace: dict[str, object] = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        for block in blocks:
            exec(compile(block, str(DOC), "exec"), namespace)
    assert printed.getvalue().splitlines() == [
        "180 1020 0.0387",
        "2000 munge",
        "live, rows per epoch; agreement on a fresh draw",
        "1020 False",
    ]


def test_scarce_labels_yaml_example_validates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (yaml_text,) = _blocks("yaml")
    (tmp_path / "scarce.yaml").write_text(yaml_text)
    np.save(tmp_path / "unlabeled.npy", np.zeros((10, 64), dtype=np.float32))
    monkeypatch.chdir(tmp_path)
    config = load_config(tmp_path / "scarce.yaml")
    assert config.transfer is not None and config.transfer.kind == "munge" and config.transfer.rows == 5000
    assert config.data.unlabeled == "unlabeled.npy"
    from kdistill.run import run_spec

    spec = run_spec(config)
    assert spec.unlabeled is not None and spec.unlabeled.shape == (10, 64)
