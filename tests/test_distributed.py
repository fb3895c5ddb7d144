"""The same config under ``torchrun --nproc_per_node=2`` (DistributedDataParallel, gloo on the CPU) ends where a
single process ends: each rank takes half of every batch and the gradients are averaged, so only the order of
floating-point sums differs. The batches are chosen so that the ranks' slices differ by a row, and the last batch has
fewer rows than there are ranks (one rank takes part with zero weight)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from kdistill.run import run

CONFIG = """
name: ddp-test
data: {dataset: digits}
teacher: {kind: random_forest, params: {n_estimators: 10}}
student: {kind: mlp, params: {hidden: [32]}}
method: {name: kd, params: {temperature: 3.0}}
train: {epochs: 4, batch_size: 269}  # 1,077 rows: 4 batches split 135/134 over 2 ranks, then a batch of 1 row
report: {baseline: false}
logging: {console: false}
"""


def test_torchrun_two_cpu_processes_match_one_process(tmp_path: Path) -> None:
    config = tmp_path / "ddp.yaml"
    config.write_text(CONFIG)
    two = tmp_path / "two"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run(
        [*torchrun, "-m", "kdistill.cli", "run", str(config), "--set", f"out={two}", "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    one = run(config, overrides=[f"out={tmp_path / 'one'}"], verbose=False).folder

    report = json.loads((two / "report.json").read_text())
    assert report["settings"]["world_size"] == 2
    assert len(list(two.glob("teacher-*.safetensors"))) == 1  # rank 0 wrote the teacher's outputs once
    single, parallel = load_file(str(one / "student.safetensors")), load_file(str(two / "student.safetensors"))
    assert single.keys() == parallel.keys()
    for name in single:
        torch.testing.assert_close(parallel[name], single[name], rtol=1e-4, atol=1e-5, msg=name)
    history_one = json.loads((one / "history.json").read_text())["student"]
    history_two = json.loads((two / "history.json").read_text())["student"]
    assert [e["val_accuracy"] for e in history_two] == [e["val_accuracy"] for e in history_one]
    for a, b in zip(history_one, history_two, strict=True):  # the logged loss is averaged over the ranks
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-4
