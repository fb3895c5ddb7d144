"""Checkpoints and resume: a run killed with SIGKILL in the middle of an epoch, resumed, ends bit for bit where an
uninterrupted run ends; a resumed config must match; a NaN loss stops the run and never replaces a good checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdistill.engine.checkpoint import load_checkpoint
from kdistill.errors import CheckpointError, NonFiniteLossError
from kdistill.run import run

STEPS_PER_EPOCH = 17  # digits' 1,077 training rows in batches of 64

CONFIG = """
name: resume-test
data: {dataset: digits}
teacher: {kind: random_forest, params: {n_estimators: 10}}
student: {kind: mlp, params: {hidden: [32], dropout: 0.2}}
method: {name: kd, params: {temperature: 3.0}}
train: {epochs: 4, batch_size: 64, patience: 10}
report: {baseline: true, profile: false}
logging: {console: false}
"""

# Runs the CLI as a user would, with one test-only addition: a global optimizer hook that SIGKILLs the process
# right after the N-th optimizer step (no chance to clean up, like a node that dies).
KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from torch.optim.optimizer import register_optimizer_step_post_hook
    steps = 0
    def kill_after(optimizer, args, kwargs):
        global steps
        steps += 1
        if steps == int(os.environ["KILL_AFTER_STEPS"]):
            os.kill(os.getpid(), signal.SIGKILL)
    register_optimizer_step_post_hook(kill_after)
    from kdistill.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(CONFIG)
    return path


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "student.safetensors"))


def test_sigkill_mid_epoch_then_resume_gives_bit_identical_weights(tmp_path: Path) -> None:
    config = _config(tmp_path)
    reference = run(config, overrides=["out=" + str(tmp_path / "reference")], verbose=False)

    killed_folder = tmp_path / "killed"
    kill_at = 2 * STEPS_PER_EPOCH + 9  # in the middle of the third epoch
    done = subprocess.run(
        [sys.executable, "-c", KILLER, "run", str(config), "--set", f"out={killed_folder}", "--quiet"],
        env={**os.environ, "KILL_AFTER_STEPS": str(kill_at)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert not (killed_folder / "student.safetensors").exists()
    checkpoint = load_checkpoint(killed_folder / "checkpoint-student.safetensors")
    assert (checkpoint.epoch, checkpoint.completed) == (1, False)  # epochs 0 and 1 finished, 2 was cut

    resumed = run(config, overrides=["out=" + str(killed_folder)], resume=True, verbose=False)
    assert resumed.resumed
    expected, got = _weights(reference.folder), _weights(killed_folder)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name  # bit for bit, dropout and Adam state included
    assert resumed.result is not None
    assert reference.result is not None
    strip = [{k: v for k, v in epoch.items() if k != "time_s"} for epoch in reference.result.history]
    assert [{k: v for k, v in epoch.items() if k != "time_s"} for epoch in resumed.result.history] == strip
    baseline_expected = json.loads((reference.folder / "history.json").read_text())["baseline"]
    baseline_got = json.loads((killed_folder / "history.json").read_text())["baseline"]
    assert [e["val_accuracy"] for e in baseline_got] == [e["val_accuracy"] for e in baseline_expected]
    # the killed process logged nothing twice: one line per epoch and phase
    lines = [json.loads(line) for line in (killed_folder / "metrics.jsonl").read_text().splitlines()]
    assert [(line["phase"], line["epoch"]) for line in lines] == [("student", float(e)) for e in range(4)] + [
        ("baseline", float(e)) for e in range(4)
    ]


def test_resume_refuses_a_config_that_changes_the_weights(tmp_path: Path) -> None:
    config = _config(tmp_path)
    folder = tmp_path / "run"
    overrides = ["out=" + str(folder), "train.epochs=1", "report.baseline=false"]
    run(config, overrides=overrides, verbose=False)
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError, match=r"train\.optimizer\.lr: 0\.03 -> 0\.01"):
        run(config, overrides=[*overrides, "train.optimizer.lr=0.01"], resume=True, verbose=False)
    with pytest.raises(CheckpointError, match=r"student\.params\.hidden: \[32\] -> \[64\]"):
        run(config, overrides=[*overrides, "student.params.hidden=[64]"], resume=True, verbose=False)
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    # what does not decide the weights may change: logging, the report
    again = run(config, overrides=[*overrides, "logging.jsonl=false", "report.enabled=false"], resume=True)
    assert again.resumed


NAN_STUDENT = textwrap.dedent(
    """
    import torch
    from torch import nn

    class BlowsUp(nn.Module):
        '''An MLP whose training forward pass returns NaN logits from its N-th call on.'''
        def __init__(self, nan_from_call: int) -> None:
            super().__init__()
            self.layers = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
            self.nan_from_call = nan_from_call
            self.calls = 0
        def forward(self, x):
            logits = self.layers(x / 16.0)
            if self.training:
                self.calls += 1
                if self.calls > self.nan_from_call:
                    return logits * float("nan")
            return logits
    """
)


def test_nan_loss_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "nan_student.py").write_text(NAN_STUDENT)
    config = tmp_path / "nan.yaml"
    bad_step = STEPS_PER_EPOCH + 5  # 0-based: epoch 1, batch 5
    config.write_text(
        CONFIG.replace(
            "student: {kind: mlp, params: {hidden: [32], dropout: 0.2}}",
            f"student: {{kind: custom, factory: 'nan_student:BlowsUp', params: {{nan_from_call: {bad_step}}}}}",
        )
    )
    folder = tmp_path / "out"
    with pytest.raises(NonFiniteLossError) as caught:
        run(config, overrides=[f"out={folder}"], verbose=False)
    message = str(caught.value)
    assert f"at step {bad_step} (epoch 1, batch 5)" in message
    assert f"{folder / 'checkpoint-student.safetensors'} (epoch 0)" in message
    checkpoint = load_checkpoint(folder / "checkpoint-student.safetensors")
    assert checkpoint.epoch == 0
    assert all(bool(torch.isfinite(t).all()) for t in checkpoint.model.values() if t.is_floating_point())
    assert not (folder / "student.safetensors").exists()
