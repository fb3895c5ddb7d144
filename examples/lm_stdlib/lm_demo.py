"""The language-model demonstration's own code, referenced from lm_stdlib.yaml: ``python
examples/lm_stdlib/lm_demo.py`` prepares it (tokenizer, token blocks, a trained GPT-2 teacher, a few minutes on a
laptop CPU), then ``kdistill run examples/lm_stdlib/lm_stdlib.yaml`` distils the teacher into a student of half its
layers.

Written next to this file, under ``lm/``: ``tokenizer.json``, ``train.npz`` / ``val.npz`` (``x`` and ``y``: (rows,
seq) int64 token ids of the Python standard library's source, validation modules held out by path) and ``teacher/``
(a ``save_pretrained`` folder that ``transformers.AutoModelForCausalLM.from_pretrained`` loads)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdistill import lm
from kdistill.losses import cross_entropy
from kdistill.tasks import get_task

HERE = Path(__file__).resolve().parent


def teacher(folder: str = "lm/teacher") -> nn.Module:
    """The prepared teacher, as a module returning (batch, seq, vocab) logits."""
    return lm.LMLogits(lm.load_causal_lm(HERE / folder))


def student(folder: str = "lm/teacher", layers: int = 2) -> nn.Module:
    """A student of ``layers`` of the teacher's layers (embeddings, chosen blocks, final norm and head copied)."""
    return lm.LMLogits(lm.lm_student(lm.load_causal_lm(HERE / folder), layers=layers).train())


def prepare(out: Path, *, files: int, vocab: int, seq: int, blocks: int, steps: int, width: int) -> None:
    """Tokenizer, token blocks and a teacher trained with cross-entropy for ``steps`` steps of 16 blocks."""
    train_texts, val_texts = lm.stdlib_sources(max_files=files)
    tokenizer = lm.train_tokenizer(train_texts, vocab)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    ids = lm.encode_blocks(tokenizer, train_texts, seq, max_blocks=blocks)
    val = lm.encode_blocks(tokenizer, val_texts, seq, max_blocks=max(8, blocks // 8))
    for name, blocks_of in (("train", ids), ("val", val)):  # y: the same ids (token_lm shifts them into targets)
        np.savez(out / f"{name}.npz", x=blocks_of.numpy(), y=blocks_of.numpy())
    model = lm.causal_lm("gpt2", lm.tokenizer_size(tokenizer), layers=4, width=width, heads=4, positions=seq)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    generator = torch.Generator().manual_seed(0)
    task = get_task("token_lm")
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = 3e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
        x = ids[torch.randint(0, len(ids), (16,), generator=generator)]
        loss = cross_entropy(model(x).logits, task.encode_targets(x))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval().save_pretrained(out / "teacher")
    print(f"prepared {out}: {tuple(ids.shape)} train blocks, teacher loss {float(loss):.2f} after {steps} steps")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="prepare the language-model demonstration")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long preparation (for the tests)")
    args = parser.parse_args()
    if args.tiny:
        prepare(HERE / "lm", files=12, vocab=320, seq=32, blocks=128, steps=20, width=32)
    else:
        prepare(HERE / "lm", files=120, vocab=2048, seq=64, blocks=2048, steps=300, width=128)
