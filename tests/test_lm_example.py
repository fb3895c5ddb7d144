"""examples/lm_stdlib/lm_stdlib.yaml as a user runs it: the preparation script (--tiny), then `kdistill run`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kdistill.cli import main

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

ROOT = Path(__file__).resolve().parents[1]


def test_the_lm_example_prepares_and_runs(tmp_path: Path) -> None:
    for name in ("lm_demo.py", "lm_stdlib.yaml"):
        shutil.copy(ROOT / "examples" / "lm_stdlib" / name, tmp_path / name)
    env = {"PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, "lm_demo.py", "--tiny"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "prepared" in done.stdout and (tmp_path / "lm" / "teacher" / "config.json").is_file()
    assert main(["validate", str(tmp_path / "lm_stdlib.yaml")]) == 0
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        assert main(["run", "lm_stdlib.yaml", "--quiet"]) == 0
    folder = tmp_path / "runs" / "lm-stdlib"
    history = json.loads((folder / "history.json").read_text())
    assert {"val_perplexity", "train_kd", "train_ce"} <= set(history["student"][-1])
    assert (folder / "student.safetensors").is_file()
