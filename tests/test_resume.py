"""Checkpoints and resume: a run killed with SIGKILL in the middle of an epoch, resumed (from its last epoch, or from a
mid-epoch checkpoint at the next step), ends bit for bit where an
uninterrupted run ends; a resumed config must match; a NaN loss stops the run and never replaces a good checkpoint."""

from __future__ import annotations

import importlib.util
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


# A run through fit() with a checkpoint every 5 optimizer steps; `python script.py FOLDER CASE` trains and saves the
# student, and dies by SIGKILL right after optimizer step KILL_AFTER_STEPS when that is set.
MID_EPOCH_RUN = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    from sklearn.datasets import load_digits
    from safetensors.torch import save_file
    from torch import nn
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from kdistill.engine import Checkpointer, EarlyStopping, TrainConfig, TransferSet, fit, load_checkpoint
    from kdistill.losses import get_loss
    from kdistill.teachers import TorchTeacher

    def jitter(x, generator):
        return x + 0.5 * torch.randn(x.shape, generator=generator)

    def train(folder, case, resume=False):
        x, y = load_digits(return_X_y=True)
        x, y = torch.tensor(x[:600] / 16, dtype=torch.float32), torch.tensor(y[:600])
        torch.manual_seed(0)
        teacher = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        logits = teacher(x).detach()
        student = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 10))
        path = os.path.join(folder, "checkpoint.safetensors")
        callbacks = [EarlyStopping(patience=None), Checkpointer(path, every_steps=5)]
        extra = {}
        settings = {"epochs": 4, "batch_size": 64, "seed": 1, "verbose": False}  # 10 steps per epoch
        if case == "augmented":
            extra = {"teacher": TorchTeacher(teacher), "augment": jitter, "prefetch_teacher": True}
        else:
            settings |= {"grad_accumulation": 3, "clip_grad_norm": 0.5}
        state = fit(
            student,
            get_loss("kd", temperature=2.0),
            TransferSet(x, y, None if case == "augmented" else logits),
            val=(x[:100], y[:100]),
            config=TrainConfig(**settings),
            callbacks=callbacks,
            resume=load_checkpoint(path) if resume else None,
            **extra,
        )
        save_file(dict(student.state_dict()), os.path.join(folder, "student.safetensors"))
        return state

    if __name__ == "__main__":
        steps = 0
        def kill_after(optimizer, args, kwargs):
            global steps
            steps += 1
            if steps == int(os.environ["KILL_AFTER_STEPS"]):
                os.kill(os.getpid(), signal.SIGKILL)
        register_optimizer_step_post_hook(kill_after)
        train(sys.argv[1], sys.argv[2])
    """
)


@pytest.mark.parametrize("case", ["accumulated", "augmented"])
def test_sigkill_mid_epoch_resumes_at_the_next_step_bit_for_bit(tmp_path: Path, case: str) -> None:
    """Killed after step 27 (epoch 2, step 7), resumed from the checkpoint of step 25: dropout, shuffling, Adam,
    early stopping, gradient accumulation and clipping (or the augmentation generator with prefetch) continue."""
    script = tmp_path / "mid_epoch_run.py"
    script.write_text(MID_EPOCH_RUN)
    spec = importlib.util.spec_from_file_location("mid_epoch_run", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (tmp_path / "whole").mkdir()
    whole = module.train(str(tmp_path / "whole"), case)

    killed = tmp_path / "killed"
    killed.mkdir()
    done = subprocess.run(
        [sys.executable, str(script), str(killed), case],
        env={**os.environ, "KILL_AFTER_STEPS": "27"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    checkpoint = load_checkpoint(killed / "checkpoint.safetensors")
    assert (checkpoint.epoch, checkpoint.step_in_epoch, checkpoint.completed) == (1, 5, False)
    resumed = module.train(str(killed), case, resume=True)
    expected, got = _weights(tmp_path / "whole"), _weights(killed)
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    strip = [{k: v for k, v in epoch.items() if k != "time_s"} for epoch in whole.history]
    assert [{k: v for k, v in epoch.items() if k != "time_s"} for epoch in resumed.history] == strip
    assert resumed.global_step == whole.global_step == 40


def test_a_nan_before_a_mid_epoch_checkpoint_stops_and_keeps_the_previous_one(tmp_path: Path) -> None:
    from torch import nn

    from kdistill.engine import Checkpointer, TrainConfig, TransferSet, fit
    from kdistill.losses import get_loss

    class NanFromCall(nn.Module):
        def __init__(self, call: int) -> None:
            super().__init__()
            self.layer, self.call, self.calls = nn.Linear(4, 3), call, 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return self.layer(x) * (float("nan") if self.calls > self.call else 1.0)

    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    path = tmp_path / "checkpoint.safetensors"
    with pytest.raises(NonFiniteLossError) as caught:  # steps 1-4 fine, step 5 NaN; saves at 3 and would at 6
        fit(
            NanFromCall(4),
            get_loss("ce"),
            TransferSet(x, y, None),
            config=TrainConfig(epochs=1, batch_size=4, verbose=False),
            callbacks=[Checkpointer(path, every_steps=3)],
        )
    assert "at step 4 (epoch 0, batch 4)" in str(caught.value)
    assert f"{path} (epoch 0, step 3)" in str(caught.value)
    checkpoint = load_checkpoint(path)
    assert (checkpoint.epoch, checkpoint.step_in_epoch) == (-1, 3)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:  # a kdistill that resumes only at epoch ends refuses it
        assert json.loads((handle.metadata() or {})["kdistill_checkpoint"])["format"] == 2
    assert all(bool(torch.isfinite(t).all()) for t in checkpoint.model.values())
