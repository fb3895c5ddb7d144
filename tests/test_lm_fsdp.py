"""FSDP (``torch.distributed.fsdp.fully_shard``) for the student, with 2 CPU ranks on gloo under torchrun: during
training each rank holds half of every sharded parameter; the run ends with the same weights as one process (the
ranks split each batch, the gradients are averaged; two micro-batches a step, synchronised once); a run stopped
mid-way and resumed from its checkpoint (whole tensors in the file) ends with the uninterrupted run's weights; and
distill() selects it from its settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]

COMMON = """
import torch
from kdistill import lm
from kdistill.engine import TrainConfig, TransferSet, fit
from kdistill.losses import get_loss
from kdistill.tasks import get_task
from kdistill.teachers import TorchTeacher

def models():
    teacher = lm.causal_lm("gpt2", 64, layers=2, width=16, heads=2, positions=12, seed=1)
    return lm.LMLogits(teacher), lm.LMLogits(lm.causal_lm("gpt2", 64, layers=2, width=16, heads=2, positions=12))

ids = torch.randint(0, 64, (36, 12), generator=torch.Generator().manual_seed(0))
target = get_task("token_lm").encode_targets(ids)

def train(parallel, callbacks=(), resume=None, on_policy=None):
    teacher, student = models()
    config = TrainConfig(epochs=2, batch_size=8, lr=0.01, max_steps=9, parallel=parallel, verbose=False,
                         clip_grad_norm=1.0, grad_accumulation=2)
    fit(student, get_loss("forward_kl"), TransferSet(ids, target, None), config=config, teacher=TorchTeacher(teacher),
        callbacks=callbacks, resume=resume, on_policy=on_policy)
    return student
"""

SCRIPT = """
import json, os, sys
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from safetensors.torch import save_file
from kdistill.engine.callbacks import Callback
from kdistill.engine.checkpoint import Checkpointer, load_checkpoint
import kdistill
out = sys.argv[1]
dist.init_process_group("gloo")
rank = dist.get_rank()

class Shards(Callback):
    seen = {}
    def on_batch_end(self, state, terms):
        weight = state.model.model.transformer.h[0].attn.c_attn.weight
        Shards.seen = {"dtensor": isinstance(weight, DTensor), "local": list(weight.to_local().shape),
                       "full": list(weight.shape)}

class Stop(Callback):
    def on_batch_end(self, state, terms):
        if state.global_step == 5:
            raise KeyboardInterrupt

whole = train("fsdp", callbacks=(Shards(),))
assert type(whole.model).__name__ == "GPT2LMHeadModel" and not isinstance(whole.model.lm_head.weight, DTensor)
path = os.path.join(out, "checkpoint.safetensors")
try:
    train("fsdp", callbacks=(Stop(), Checkpointer(path, every_steps=2)))
except KeyboardInterrupt:
    pass
dist.barrier()
resumed = train("fsdp", callbacks=(Checkpointer(path, every_steps=2),), resume=load_checkpoint(path))
# on-policy steps generate with the sharded student: every rank runs the same forward passes (no deadlock)
from kdistill.engine.on_policy import OnPolicy
generated = train("fsdp", on_policy=OnPolicy(1.0, prompt_length=8))
# distill() with the FSDP setting, a run folder (checkpoints, early stopping on val) and the report
teacher, student = models()
result = kdistill.distill(teacher, student, ids[:28], val=ids[28:], task="token_lm", method="forward_kl", epochs=2,
                          batch_size=8, out=os.path.join(out, "run"), settings={"device": {"parallel": "fsdp"}},
                          verbose=False, profile=False, baseline=False)
if rank == 0:
    save_file({k: v.clone() for k, v in whole.state_dict().items()}, os.path.join(out, "whole.safetensors"))
    save_file({k: v.clone() for k, v in resumed.state_dict().items()}, os.path.join(out, "resumed.safetensors"))
    with open(os.path.join(out, "facts.json"), "w") as handle:
        json.dump({"shards": Shards.seen, "history": result.history,
                   "on_policy_differs": not torch.equal(generated.model.lm_head.weight, whole.model.lm_head.weight),
                   "perplexity": result.report.models["student"]["perplexity"]}, handle)
dist.destroy_process_group()
"""


@pytest.mark.skipif(not os.environ.get("KDISTILL_SLOW"), reason="one torchrun launch, 4 trainings (~1-1.5 min)")
def test_fsdp_two_cpu_ranks_shard_the_student_match_one_process_and_resume(tmp_path: Path) -> None:
    script = tmp_path / "fsdp_run.py"
    script.write_text(COMMON + SCRIPT)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run(
        [*torchrun, str(script), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    facts = json.loads((tmp_path / "facts.json").read_text())
    assert facts["shards"] == {"dtensor": True, "local": [8, 48], "full": [16, 48]}  # half of the rows per rank
    assert facts["on_policy_differs"]  # the on-policy run trained on the student's own continuations

    namespace: dict = {}
    exec(COMMON, namespace)  # the same models, data and settings in this one process
    single = namespace["train"]("ddp").state_dict()
    whole, resumed = load_file(str(tmp_path / "whole.safetensors")), load_file(str(tmp_path / "resumed.safetensors"))
    assert whole.keys() == resumed.keys() == single.keys()
    for name in single:
        torch.testing.assert_close(whole[name], single[name], rtol=1e-4, atol=1e-5, msg=name)
        assert torch.equal(resumed[name], whole[name]), name
    assert facts["history"][-1]["val_perplexity"] > 1 and facts["perplexity"] > 1
    assert (tmp_path / "run" / "student.safetensors").is_file()
