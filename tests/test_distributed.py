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


# fit() under torchrun with gradient accumulation and a checkpoint every 4 steps (mid-epoch saves gather every rank's
# state); `script.py FOLDER ACCUMULATION [resume]`. KILL_AFTER_STEPS kills rank 0 after that optimizer step.
FIT_SCRIPT = """
import os, signal, sys
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from sklearn.datasets import load_digits
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from kdistill.engine import Checkpointer, TrainConfig, TransferSet, fit, load_checkpoint
from kdistill.losses import get_loss


def train(folder, accumulation, dropout=0.0, resume=False):
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x[:600] / 16, dtype=torch.float32), torch.tensor(y[:600])
    torch.manual_seed(0)
    logits = nn.Linear(64, 10)(x).detach() * 3
    student = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, 10))
    path = os.path.join(folder, "checkpoint.safetensors")
    config = TrainConfig(epochs=3, batch_size=61, grad_accumulation=accumulation, clip_grad_norm=1.0, verbose=False)
    state = fit(
        student,
        get_loss("kd", temperature=2.0),
        TransferSet(x, y, logits),
        config=config,
        callbacks=[Checkpointer(path, every_steps=4)],
        resume=load_checkpoint(path) if resume else None,
    )
    if state.rank == 0:
        save_file(dict(student.state_dict()), os.path.join(folder, "student.safetensors"))
    return state


if __name__ == "__main__":
    steps = 0
    def kill_after(optimizer, args, kwargs):
        global steps
        steps += 1
        if steps == int(os.environ.get("KILL_AFTER_STEPS", "0")) and os.environ["RANK"] == "0":
            os.kill(os.getpid(), signal.SIGKILL)
    register_optimizer_step_post_hook(kill_after)
    dist.init_process_group("gloo")
    train(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), resume=len(sys.argv) > 4)
    dist.barrier()  # both ranks done (rank 0 has saved) before the group is torn down
    dist.destroy_process_group()
"""


def _fit_script(tmp_path: Path) -> Path:
    script = tmp_path / "fit_ddp.py"
    script.write_text(FIT_SCRIPT)
    return script


def _torchrun(script: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=300, env=env)


def test_torchrun_with_gradient_accumulation_matches_one_process_without(tmp_path: Path) -> None:
    """2 ranks x 2 micro-batches (slices of 31/30 rows, micro-batches of 16/15/15/15) against one process taking
    each batch of 61 rows at once: the weighting makes the step's gradient the batch's mean; no_sync defers the
    all-reduce to the last micro-batch."""
    import importlib.util

    script = _fit_script(tmp_path)
    (tmp_path / "two").mkdir()
    done = _torchrun(script, str(tmp_path / "two"), "2", "0.0")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    spec = importlib.util.spec_from_file_location("fit_ddp", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (tmp_path / "one").mkdir()
    module.train(str(tmp_path / "one"), 1)
    single = load_file(str(tmp_path / "one" / "student.safetensors"))
    parallel = load_file(str(tmp_path / "two" / "student.safetensors"))
    for name in single:
        torch.testing.assert_close(parallel[name], single[name], rtol=1e-4, atol=1e-5, msg=name)
    from kdistill.engine import load_checkpoint

    checkpoint = load_checkpoint(tmp_path / "two" / "checkpoint.safetensors")
    assert checkpoint.completed


@pytest.mark.skipif(not os.environ.get("KDISTILL_SLOW"), reason="3 torchrun launches (~1 min): KDISTILL_SLOW=1")
def test_torchrun_killed_mid_epoch_resumes_from_the_step_checkpoint_bit_for_bit(tmp_path: Path) -> None:
    """Rank 0 killed after step 15 (epoch 1, step 5); both ranks resume from the checkpoint of step 12, each with its
    own dropout state and step terms."""
    script = _fit_script(tmp_path)
    for folder in ("reference", "killed"):
        (tmp_path / folder).mkdir()
    assert _torchrun(script, str(tmp_path / "reference"), "2", "0.2").returncode == 0
    killed = _torchrun(script, str(tmp_path / "killed"), "2", "0.2", env={**os.environ, "KILL_AFTER_STEPS": "15"})
    assert killed.returncode != 0
    from kdistill.engine import load_checkpoint

    checkpoint = load_checkpoint(tmp_path / "killed" / "checkpoint.safetensors")
    assert (checkpoint.epoch, checkpoint.step_in_epoch) == (0, 2)
    assert len(checkpoint.trainer["rank_local"]) == 2
    done = _torchrun(script, str(tmp_path / "killed"), "2", "0.2", "resume")
    assert done.returncode == 0, done.stderr[-3000:]
    expected = load_file(str(tmp_path / "reference" / "student.safetensors"))
    got = load_file(str(tmp_path / "killed" / "student.safetensors"))
    assert all(torch.equal(expected[name], got[name]) for name in expected)


DISTILL_SCRIPT = """
import os, sys
import torch
from safetensors.torch import save_file
import kdistill
from kdistill.datasets import load_dataset

data = load_dataset("digits")
torch.manual_seed(0)
teacher = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)).eval()
result = kdistill.distill(
    teacher, "mlp", data.train, val=data.val, test=data.test, hidden=(32,), epochs=3, batch_size=269,
    verbose=False, profile=False, baseline=False, out=sys.argv[1] if len(sys.argv) > 1 else None,
)
rank = os.environ.get("RANK", "0")
save_file({k: v.contiguous() for k, v in result.student.state_dict().items()}, sys.argv[2] + f"-rank{rank}.safetensors")
# one write per rank (print writes its parts one by one, and the two ranks share the pipe)
sys.stdout.write(f"{'report' if result.report is not None else 'no report'} {rank}\\n")
sys.stdout.flush()
"""


def test_distill_under_torchrun_trains_one_student_on_every_rank(tmp_path: Path) -> None:
    """distill() itself under torchrun: each rank returns the same trained student, rank 0 alone reports and writes
    the run folder, and the weights match one process's (up to the order of floating-point sums)."""
    script = tmp_path / "distill_script.py"
    script.write_text(DISTILL_SCRIPT)
    done = _torchrun(script, str(tmp_path / "two"), str(tmp_path / "weights"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(done.stdout.split("\n")[:-1]) == ["no report 1", "report 0"]
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one"), str(tmp_path / "single")], timeout=300)
    assert one.returncode == 0
    rank0, rank1 = (load_file(str(tmp_path / f"weights-rank{r}.safetensors")) for r in (0, 1))
    single = load_file(str(tmp_path / "single-rank0.safetensors"))
    for name in single:
        assert torch.equal(rank0[name], rank1[name]), name
        torch.testing.assert_close(rank0[name], single[name], rtol=1e-4, atol=1e-5, msg=name)
    assert json.loads((tmp_path / "two" / "report.json").read_text())["settings"]["world_size"] == 2
