"""Language-model distillation, measured: a GPT-2 teacher trained here on the Python standard library, a student a
quarter its size trained three ways, the top-k cache, and the chunked loss's memory.

Setup (issue 13): the standard library's ``.py`` sources (``kdistill.lm.stdlib_sources``: test suites left out,
modules held out by a hash of their path), a byte-level BPE tokenizer trained on the training modules
(``tokenizers``), whole blocks of ``--seq`` tokens. A GPT-2 teacher (``--teacher-layers`` x ``--teacher-width``)
trained with cross-entropy for ``--teacher-steps``; students of ``--student-layers`` x ``--student-width`` (fresh
weights, same tokenizer), each trained ``--student-steps`` steps of batch ``--batch`` with AdamW on the same
batches (seeded), three ways:

(a) CE only; (b) forward KL (T = 1) + CE, ``soft_weight`` 0.5, the teacher run live (full logits);
(c) the same loss from a ``topk16:K`` cache of the teacher's outputs on the training blocks (K top log-probs, ids
and a rest bucket per token, float16), read exactly by ``kdistill.losses.token_distill_loss``; and one more student
for each ``--also-storage`` (e.g. ``topk16:32+32``: the same top-k with 32 tail ids sampled per token, which forward
KL reads as an unbiased estimate over the whole vocabulary).

Reported: held-out perplexity of the teacher and of each student (mean and sd over ``--seeds``), the share of the
CE-to-teacher perplexity gap closed by (b) and (c), the share of (b)'s gain that (c) keeps, cache bytes per token
(against 2 x vocab for fp16 logits), student tokens/s for each (median step time, the three taking turns every 10
steps so they see the same load), and the loss's peak memory at vocab 32,000: the naive full-logit loss, the
chunked loss over logits at ``--chunk`` tokens, the engine's form (the registered ``forward_kl`` loss at its
default ``chunk_size="auto"``: a sixteenth of the batch's tokens), and the chunked loss over hidden states + head
(each in its own process: peak RSS above the process's RSS once its inputs exist, with glibc's mmap threshold fixed
at 1 MiB so that RSS follows the live tensors).

``--bytes-probe``: bytes per token of a ``topk16:K`` cache entry at a larger vocabulary (a byte-level BPE trained to
``--vocab`` ids on the same corpus, default 8,192; an untrained GPT-2 of that vocabulary as the teacher, since the
layout's size does not depend on the weights), measured on disk, against 2 × vocab bytes for fp16 logits.
``--memory-only``: the memory measurement alone. ``--generation-only``: on-policy generation
(``lm.sample_continuations``) of the student and teacher shapes, with the KV cache and with the whole prefix each
step, and whether both drew the same tokens.

Run: ``benchmarks/lm.py --quick`` (1 seed, a 4 x 128 teacher trained 1,000 steps; 33 min on a busy 2-core box),
or without ``--quick`` for the issue's sizes (4 x 256 teacher, 2 x 128 student, 3 seeds; an hour or more on 2 CPU
cores). Prints one summary line, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch

from kdistill import lm
from kdistill.cache import cached_teacher_outputs
from kdistill.losses import get_loss
from kdistill.losses.chunked import auto_chunk_size, chunked_head_loss, chunked_token_loss
from kdistill.losses.kd import cross_entropy
from kdistill.losses.token import token_distill_loss
from kdistill.tasks import get_task
from kdistill.teachers import Outputs, TopK, TorchTeacher

QUICK = {
    "files": 100, "vocab": 1024, "seq": 64, "teacher_layers": 4, "teacher_width": 128, "teacher_steps": 1000,
    "student_layers": 2, "student_width": 64, "student_steps": 300, "batch": 16, "seeds": 1, "topk": 32,
    "memory_tokens": 1024, "blocks": 4096,
}  # fmt: skip
FULL = {
    "files": None, "vocab": 8192, "seq": 128, "teacher_layers": 4, "teacher_width": 256, "teacher_steps": 3000,
    "student_layers": 2, "student_width": 128, "student_steps": 300, "batch": 32, "seeds": 3, "topk": 32,
    "memory_tokens": 4096, "blocks": 16384,
}  # fmt: skip
MEMORY_VOCAB = 32_000


def _gpt2(vocab: int, layers: int, width: int, seq: int, seed: int) -> torch.nn.Module:
    return lm.causal_lm("gpt2", vocab, layers=layers, width=width, heads=max(1, width // 32), positions=seq, seed=seed)


def _lr(step: int, total: int, peak: float) -> float:
    warmup = max(1, total // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _perplexity(model: torch.nn.Module, ids: torch.Tensor, batch: int = 32) -> float:
    batches = [(ids[at : at + batch], None) for at in range(0, len(ids), batch)]
    return float(get_task("token_lm").validate(lm.LMLogits(model), batches)["val_perplexity"])


def train_teacher(ids: torch.Tensor, settings: dict[str, Any]) -> tuple[torch.nn.Module, float]:
    teacher = _gpt2(settings["vocab"], settings["teacher_layers"], settings["teacher_width"], settings["seq"], 0)
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=3e-3, weight_decay=0.01)
    generator = torch.Generator().manual_seed(0)
    task = get_task("token_lm")
    started = time.perf_counter()
    teacher.train()
    for step in range(settings["teacher_steps"]):
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, settings["teacher_steps"], 3e-3)
        x = ids[torch.randint(0, len(ids), (settings["batch"],), generator=generator)]
        loss = cross_entropy(teacher(x).logits, task.encode_targets(x))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(teacher.parameters(), 1.0)
        optimizer.step()
    return teacher.eval(), time.perf_counter() - started


def train_students(
    ids: torch.Tensor, teacher: torch.nn.Module, caches: dict[str, TopK], settings: dict[str, Any], seed: int
) -> dict[str, dict[str, Any]]:
    """The students of one seed (CE, live KD, and one per cache way in ``caches``: ``"kd_cache"`` and any
    ``"kd_cache:<storage>"``), trained in turns of 10 steps on the same batches; each one's model and median step
    seconds."""
    task = get_task("token_lm")
    ways = ("ce", "kd_live", *caches)
    students = {
        way: _gpt2(settings["vocab"], settings["student_layers"], settings["student_width"], settings["seq"], seed + 1)
        for way in ways
    }
    peak = settings.get("student_lr", 3e-3)
    optimizers = {way: torch.optim.AdamW(model.parameters(), lr=peak, weight_decay=0.01) for way, model in
                  students.items()}  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    steps = settings["student_steps"]
    order = [torch.randint(0, len(ids), (settings["batch"],), generator=generator) for _ in range(steps)]
    seconds: dict[str, list[float]] = {way: [] for way in ways}
    for model in students.values():
        model.train()
    for first in range(0, steps, 10):
        rotation = first // 10 % len(ways)
        for way in ways[rotation:] + ways[:rotation]:  # who goes first rotates, so none always follows another
            for step in range(first, min(first + 10, steps)):
                index = order[step]
                x = ids[index]
                target = task.encode_targets(x)
                started = time.perf_counter()
                for group in optimizers[way].param_groups:
                    group["lr"] = _lr(step, steps, peak)
                logits = students[way](x).logits
                if way == "ce":
                    loss = cross_entropy(logits, target)
                else:
                    if way == "kd_live":
                        with torch.no_grad():
                            teacher_side: torch.Tensor | TopK = teacher(x).logits
                    else:
                        teacher_side = caches[way].index_select(index)
                    loss = token_distill_loss(logits, teacher_side, target, temperature=1.0, soft_weight=0.5)["loss"]
                optimizers[way].zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(students[way].parameters(), 1.0)
                optimizers[way].step()
                seconds[way].append(time.perf_counter() - started)
    return {way: {"model": students[way].eval(), "step_s": statistics.median(seconds[way])} for way in ways}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def _peak_rss_bytes() -> int:
    """This process's RSS high-water mark (VmHWM; ``ru_maxrss`` would carry the parent's from before exec)."""
    with open("/proc/self/status") as handle:
        line = next(line for line in handle if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def memory_probe(variant: str, tokens: int, vocab: int, chunk: int) -> dict[str, float]:
    """Peak RSS above the inputs' of one loss + backward at (tokens, vocab), in this process."""
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    hidden_size = 256
    teacher = torch.randn(1, tokens, vocab, generator=generator)
    target = torch.randint(0, vocab, (1, tokens), generator=generator)
    hidden = torch.randn(1, tokens, hidden_size, generator=generator, requires_grad=True)
    weight = (torch.randn(vocab, hidden_size, generator=generator) * 0.02).requires_grad_()
    logits = None
    if variant != "head":  # the student's logits exist before the loss runs (a model's output)
        with torch.no_grad():
            logits = (hidden @ weight.T).requires_grad_()
    baseline = _rss_bytes()
    started = time.perf_counter()
    if variant == "naive":
        assert logits is not None
        loss = token_distill_loss(logits, teacher, target)["loss"]
    elif variant == "chunked":
        assert logits is not None
        loss = chunked_token_loss(logits, teacher, target, chunk_size=chunk)["loss"]
    elif variant == "engine":  # what training runs: the registered loss at its default chunk_size="auto"
        assert logits is not None
        loss = get_loss("forward_kl")(Outputs(logits), Outputs(teacher), target)["loss"]
        chunk = auto_chunk_size(tokens, vocab) or tokens
    else:
        loss = chunked_head_loss(hidden, weight, teacher, target, chunk_size=chunk)["loss"]
    loss.backward()
    seconds = time.perf_counter() - started
    peak = _peak_rss_bytes()
    return {"peak_above_inputs_mb": (peak - baseline) / 2**20, "seconds": seconds, "loss": float(loss.detach()),
            "chunk": chunk}  # fmt: skip


def _probe_in_subprocess(variant: str, tokens: int, chunk: int) -> dict[str, float]:
    command = [sys.executable, __file__, "--memory-probe", variant, "--memory-tokens", str(tokens),
               "--chunk", str(chunk)]  # fmt: skip
    # glibc's mmap threshold fixed at 1 MiB: freed buffers go back to the OS, so RSS follows the live tensors (with
    # the default dynamic threshold, freed ~30 MB chunks stay in the heap and the chunked loss's RSS overstates it)
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": str(2**20)}
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800, check=True, env=env)
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _memory(tokens: int, chunk: int) -> dict[str, dict[str, float]]:
    return {variant: _probe_in_subprocess(variant, tokens, chunk) for variant in ("naive", "chunked", "engine", "head")}


def memory_only(tokens: int, chunk: int) -> dict[str, Any]:
    """The loss's peak memory at vocab 32,000 alone (``--memory-only``)."""
    memory = _memory(tokens, chunk)
    naive = memory["naive"]["peak_above_inputs_mb"]
    result: dict[str, Any] = {"benchmark": "lm-memory", "tokens": tokens, "vocab": MEMORY_VOCAB, **memory}
    result |= {f"{variant}_vs_naive": memory[variant]["peak_above_inputs_mb"] / naive for variant in memory}
    print(
        f"lm memory at vocab {MEMORY_VOCAB}, {tokens} tokens: naive {naive:.0f} MB; "
        + ", ".join(
            f"{variant} (chunk {memory[variant]['chunk']:.0f}) {memory[variant]['peak_above_inputs_mb']:.0f} MB "
            f"({result[f'{variant}_vs_naive']:.2f}x)"
            for variant in ("chunked", "engine", "head")
        )
    )
    print(json.dumps(result))
    return result


def bytes_probe(vocab: int, k: int, files: int) -> dict[str, Any]:
    """Bytes per token of a ``topk16:k`` entry at ``vocab`` ids (``--bytes-probe``), from the files on disk."""
    started = time.perf_counter()
    train_texts, _ = lm.stdlib_sources(max_files=files)
    tokenizer = lm.train_tokenizer(train_texts, vocab)
    size = lm.tokenizer_size(tokenizer)
    ids = lm.encode_blocks(tokenizer, train_texts, 64, max_blocks=256)
    teacher = lm.LMLogits(_gpt2(size, 2, 64, 64, 0).eval())
    with tempfile.TemporaryDirectory() as folder:
        entry = cached_teacher_outputs(TorchTeacher(teacher), ids, cache_dir=folder, kind="token_logits",
                                       storage=f"topk16:{k}")  # fmt: skip
        layout = entry.bytes_per_token()
        on_disk = sum(path.stat().st_size for path in entry.folder.rglob("*.npy"))
        tokens = entry.tokens
    assert layout is not None and tokens
    result = {
        "benchmark": "lm-bytes", "vocab": size, "k": k, "tokens": tokens, "layout_bytes_per_token": layout,
        "on_disk_bytes_per_token": on_disk / tokens, "fp16_logits_bytes_per_token": 2 * size,
        "ratio": layout / (2 * size), "vocab_for_one_fiftieth": 25 * (4 * k + 2),
        "seconds": time.perf_counter() - started,
    }  # fmt: skip
    print(
        f"lm bytes: topk16:{k} at vocab {size}: {layout:.0f} B/token by layout, {on_disk / tokens:.1f} B/token on disk "
        f"(.npy headers included), vs {2 * size} B fp16 logits: 1/{2 * size / layout:.0f}"
    )
    print(json.dumps(result))
    return result


def generation_only(settings: dict[str, Any], prompt: int, rounds: int = 5) -> dict[str, Any]:
    """On-policy generation's cost with and without the KV cache: ``lm.sample_continuations`` on a batch of
    ``--batch`` rows of ``--seq`` tokens (random ids; the speed does not depend on them), the prompt ``prompt``
    tokens, for an untrained student and teacher of the run's shapes; the two ways take turns, ``rounds`` rounds,
    median. Checks that both drew the same tokens from the same generator."""
    shapes = {"student": ("student_layers", "student_width"), "teacher": ("teacher_layers", "teacher_width")}
    ids = torch.randint(0, settings["vocab"], (settings["batch"], settings["seq"]), generator=torch.Generator())
    result: dict[str, Any] = {"prompt": prompt, "rows": settings["batch"], "seq": settings["seq"], "rounds": rounds}
    for name, (layers, width) in shapes.items():
        model = _gpt2(settings["vocab"], settings[layers], settings[width], settings["seq"], 0)
        seconds: dict[str, list[float]] = {"cached": [], "whole_prefix": []}
        drawn: dict[str, torch.Tensor] = {}
        for _ in range(rounds):
            for way in seconds:
                started = time.perf_counter()
                drawn[way] = lm.sample_continuations(
                    model, ids, prompt_length=prompt, generator=torch.Generator().manual_seed(0),
                    kv_cache=way == "cached",
                )  # fmt: skip
                seconds[way].append(time.perf_counter() - started)
        median = {way: statistics.median(values) for way, values in seconds.items()}
        result[name] = {
            "params": sum(p.numel() for p in model.parameters()),
            "seconds": median,
            "speedup": median["whole_prefix"] / median["cached"],
            "same_tokens": bool(torch.equal(drawn["cached"], drawn["whole_prefix"])),
        }
    print(
        "lm generation (" + ", ".join(f"{name}: KV cache {result[name]['speedup']:.1f}x faster, same tokens "
                                      f"{result[name]['same_tokens']}" for name in shapes) + ")"
    )  # fmt: skip
    print(json.dumps(result))
    return result


def _mean_sd(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one seed (a few minutes)")
    parser.add_argument("--memory-probe", choices=["naive", "chunked", "engine", "head"], help=argparse.SUPPRESS)
    parser.add_argument("--bytes-probe", action="store_true", help="cache bytes per token at --vocab (8,192) only")
    parser.add_argument("--memory-only", action="store_true", help="the memory measurement only")
    parser.add_argument("--generation-only", action="store_true", help="on-policy generation, KV cache vs none")
    parser.add_argument("--prompt", type=int, default=8, help="prompt tokens in --generation-only")
    parser.add_argument("--memory-tokens", type=int, default=None, help="tokens in the memory measurement")
    parser.add_argument("--chunk", type=int, default=256, help="tokens per chunk of the chunked loss")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--student-lr", type=float, default=3e-3, help="the students' peak lr (default 3e-3)")
    parser.add_argument("--also-storage", action="append", default=[], metavar="STORAGE",
                        help="one more cache student from this storage (e.g. topk16:32+32, a sampled tail); "
                        "repeatable")  # fmt: skip
    for name in ("files", "vocab", "seq", "teacher-layers", "teacher-width", "teacher-steps", "student-layers",
                 "student-width", "student-steps", "batch", "seeds", "topk", "blocks"):  # fmt: skip
        parser.add_argument(f"--{name}", type=int, default=None)
    args = parser.parse_args(argv)
    if args.memory_probe:
        result = memory_probe(args.memory_probe, args.memory_tokens or 1024, MEMORY_VOCAB, args.chunk)
        print(json.dumps(result))
        return result
    torch.set_num_threads(args.threads)
    if args.bytes_probe:
        return bytes_probe(args.vocab or 8192, args.topk or 32, args.files or 100)
    if args.memory_only:
        return memory_only(args.memory_tokens or 1024, args.chunk)
    settings = dict(QUICK if args.quick else FULL)
    for name in settings:
        value = getattr(args, name, None)
        if value is not None:
            settings[name] = value
    if args.memory_tokens is not None:
        settings["memory_tokens"] = args.memory_tokens
    settings["student_lr"] = args.student_lr
    if args.generation_only:
        return generation_only(settings, args.prompt)
    started = time.perf_counter()

    train_texts, val_texts = lm.stdlib_sources(max_files=settings["files"])
    tokenizer = lm.train_tokenizer(train_texts, settings["vocab"])
    vocab = lm.tokenizer_size(tokenizer)
    settings["vocab"] = vocab
    ids = lm.encode_blocks(tokenizer, train_texts, settings["seq"], max_blocks=settings["blocks"])
    val_ids = lm.encode_blocks(tokenizer, val_texts, settings["seq"], max_blocks=256)

    teacher, teacher_seconds = train_teacher(ids, settings)
    teacher_ppl = _perplexity(teacher, val_ids)
    storages = {"kd_cache": f"topk16:{settings['topk']}"} | {f"kd_cache:{name}": name for name in args.also_storage}
    caches: dict[str, TopK] = {}
    cache_bytes: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as folder:
        for way, storage in storages.items():
            entry = cached_teacher_outputs(
                TorchTeacher(lm.LMLogits(teacher)), ids, cache_dir=folder, kind="token_logits", storage=storage
            )
            caches[way] = entry.topk_outputs()
            measured = entry.bytes_per_token()
            assert measured is not None
            cache_bytes[way] = measured
    bytes_per_token = cache_bytes["kd_cache"]

    runs: dict[str, list[float]] = {way: [] for way in ("ce", "kd_live", *caches)}
    step_seconds: dict[str, list[float]] = {way: [] for way in runs}
    for seed in range(settings["seeds"]):
        for way, trained in train_students(ids, teacher, caches, settings, seed).items():
            runs[way].append(_perplexity(trained["model"], val_ids))
            step_seconds[way].append(trained["step_s"])
    tokens_per_step = settings["batch"] * settings["seq"]
    ppl = {way: _mean_sd(values) for way, values in runs.items()}
    gap = ppl["ce"]["mean"] - teacher_ppl
    closed_live = (ppl["ce"]["mean"] - ppl["kd_live"]["mean"]) / gap
    closed_cache = (ppl["ce"]["mean"] - ppl["kd_cache"]["mean"]) / gap
    kept = closed_cache / closed_live if closed_live else float("nan")
    step = {way: statistics.median(values) for way, values in step_seconds.items()}

    memory = _memory(settings["memory_tokens"], args.chunk)
    naive_peak = memory["naive"]["peak_above_inputs_mb"]
    teacher_params = sum(p.numel() for p in teacher.parameters())
    student_params = sum(p.numel() for p in _gpt2(vocab, settings["student_layers"], settings["student_width"],
                                                   settings["seq"], 0).parameters())  # fmt: skip
    result = {
        "benchmark": "lm",
        "mode": "quick" if args.quick else "full",
        "settings": settings,
        "train_tokens": int(ids.numel()),
        "val_tokens": int(val_ids.numel()),
        "teacher_params": teacher_params,
        "student_params": student_params,
        "teacher_train_s": teacher_seconds,
        "perplexity": {"teacher": teacher_ppl, **ppl},
        "gap_closed": {"kd_live": closed_live, "kd_cache": closed_cache},
        "cache_keeps_share_of_live_gain": kept,
        "cache_bytes_per_token": bytes_per_token,
        "fp16_logits_bytes_per_token": 2 * vocab,
        "cache_bytes_ratio": bytes_per_token / (2 * vocab),
        "also_storages": {
            storages[way]: {
                "gap_closed": (ppl["ce"]["mean"] - ppl[way]["mean"]) / gap,
                "keeps_share_of_live_gain": (ppl["ce"]["mean"] - ppl[way]["mean"]) / gap / closed_live
                if closed_live
                else float("nan"),
                "bytes_per_token": cache_bytes[way],
                "bytes_ratio": cache_bytes[way] / (2 * vocab),
            }
            for way in caches
            if way != "kd_cache"
        },
        "student_tokens_per_s": {way: tokens_per_step / seconds for way, seconds in step.items()},
        "step_cost_vs_ce": {way: seconds / step["ce"] for way, seconds in step.items()},
        "memory_at_vocab_32k": {
            "tokens": settings["memory_tokens"],
            "chunk": args.chunk,
            **memory,
            "chunked_vs_naive": memory["chunked"]["peak_above_inputs_mb"] / naive_peak,
            "engine_vs_naive": memory["engine"]["peak_above_inputs_mb"] / naive_peak,
            "head_vs_naive": memory["head"]["peak_above_inputs_mb"] / naive_peak,
        },
        "seconds": time.perf_counter() - started,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch_threads": args.threads,
    }
    print(
        f"lm ({result['mode']}): teacher ppl {teacher_ppl:.1f}, student CE {ppl['ce']['mean']:.1f}, KD live "
        f"{ppl['kd_live']['mean']:.1f} ({100 * closed_live:.1f}% of the gap), KD from topk16:{settings['topk']} cache "
        f"{ppl['kd_cache']['mean']:.1f} ({100 * kept:.0f}% of the live gain at {bytes_per_token:.0f} B/token vs "
        f"{2 * vocab} B fp16); step vs CE: live {result['step_cost_vs_ce']['kd_live']:.2f}x, cache "
        f"{result['step_cost_vs_ce']['kd_cache']:.2f}x; loss peak memory at vocab 32k: naive {naive_peak:.0f} MB, "
        f"chunked {memory['chunked']['peak_above_inputs_mb']:.0f} MB, head {memory['head']['peak_above_inputs_mb']:.0f}"
        f" MB; {result['seconds']:.0f} s"
        + "".join(
            f"; {name}: {100 * also['keeps_share_of_live_gain']:.0f}% of the live gain at "
            f"{also['bytes_per_token']:.0f} B/token, step {result['step_cost_vs_ce']['kd_cache:' + name]:.2f}x"
            for name, also in result["also_storages"].items()
        )
    )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
