"""The same config under ``torchrun --nproc_per_node=2`` (DistributedDataParallel, gloo on the CPU) ends where a
single process ends: each rank takes half of every batch and the gradients are averaged, so only the order of
floating-point sums differs. The batches are chosen so that the ranks' slices differ by a row, and the last batch has
fewer rows than there are ranks (one rank takes part with zero weight)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
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
    # rank 0 filled one entry of the teacher-output cache; rank 1 read it
    from kdistill.cache import cache_entries

    complete = [entry for entry in cache_entries(two / "cache") if entry.status == "complete"]
    assert len(complete) == 1
    single, parallel = load_file(str(one / "student.safetensors")), load_file(str(two / "student.safetensors"))
    assert single.keys() == parallel.keys()
    for name in single:
        torch.testing.assert_close(parallel[name], single[name], rtol=1e-4, atol=1e-5, msg=name)
    history_one = json.loads((one / "history.json").read_text())["student"]
    history_two = json.loads((two / "history.json").read_text())["student"]
    assert [e["val_accuracy"] for e in history_two] == [e["val_accuracy"] for e in history_one]
    for a, b in zip(history_one, history_two, strict=True):  # the logged loss is averaged over the ranks
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-4


KILL_RANK_0 = """
import os, signal, sys
from torch.optim.optimizer import register_optimizer_step_post_hook
steps = 0
def kill_after(optimizer, args, kwargs):
    global steps
    steps += 1
    if steps == int(os.environ["KILL_AFTER_STEPS"]) and os.environ["RANK"] == "0":
        os.kill(os.getpid(), signal.SIGKILL)
register_optimizer_step_post_hook(kill_after)
from kdistill.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.skipif(not os.environ.get("KDISTILL_SLOW"), reason="3 torchrun launches (~1 min): KDISTILL_SLOW=1")
def test_torchrun_killed_and_resumed_matches_an_uninterrupted_torchrun_bit_for_bit(tmp_path: Path) -> None:
    """With dropout, so that each rank's own RNG state must come back (the checkpoint gathers them all)."""
    config = tmp_path / "ddp.yaml"
    config.write_text(CONFIG.replace("hidden: [32]}", "hidden: [32], dropout: 0.2}").replace("269", "64"))
    (tmp_path / "kill_rank_0.py").write_text(KILL_RANK_0)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]

    def launch(script: list[str], out: str, *extra: str, env: dict[str, str] | None = None) -> int:
        command = [*torchrun, *script, "run", str(config), "--set", f"out={tmp_path / out}", "--quiet", *extra]
        return subprocess.run(command, capture_output=True, timeout=300, cwd=tmp_path, env=env).returncode

    assert launch(["-m", "kdistill.cli"], "reference") == 0
    killed = launch([str(tmp_path / "kill_rank_0.py")], "killed", env={**os.environ, "KILL_AFTER_STEPS": "43"})
    assert killed != 0
    assert not (tmp_path / "killed" / "student.safetensors").exists()
    assert launch(["-m", "kdistill.cli"], "killed", "--resume") == 0
    expected = load_file(str(tmp_path / "reference" / "student.safetensors"))
    got = load_file(str(tmp_path / "killed" / "student.safetensors"))
    assert all(torch.equal(expected[name], got[name]) for name in expected)
