"""Sentence encoders: all-MiniLM-L6-v2 distilled into a static-embedding student and a 2-layer transformer student,
on docstring sentences of the installed packages, through kdistill's one pipeline (``kdistill.distill(...,
task="embedding")``), scored by how much of the teacher's similarity structure each kept and how fast each runs on
one thread.

Stages (each one's wall time is printed and kept in the JSON):

1. corpus: ``kdistill.sentences.read_sentences("docstrings")``: the corpus's train / test splits by module, distinct
   sentences in a seeded order, the first ``--train`` / ``--test``;
2. teacher embeddings of the train and test sentences through kdistill's cache (``--cache-dir``), computed once per
   sentence (a later run, or a run on a subset, reads them);
3. static student: ``distill(teacher, "static", ...)``: the teacher on every vocabulary token (cached too), PCA to
   ``--pca-dims``, SIF weights from the corpus's token counts (scored untrained), then fine-tuned on the teacher's
   embeddings (``--static-loss``, ``--static-epochs``); the run's report scores teacher and student;
4. transformer student: ``distill(teacher, "transformer", ...)``: teacher layers ``--layers`` copied (each keeping
   ``--intermediate-size`` of its feed-forward units when given), trained on the
   teacher's embeddings for ``--transformer-minutes`` of wall time (``train.max_minutes``);
5. ONNX: the transformer student's saved folder exported (fp32, checked against PyTorch, and dynamic INT8), and
   both files' sentences/s at batch 1 and 64 on one thread (ONNX Runtime, tokenisation included);
6. the saved students reloaded by Model2Vec and sentence-transformers, compared with kdistill's embeddings.

Scores on the held-out (test) sentences, from each run's report: Spearman between teacher and student cosines on
random pairs and on each sentence's 10 nearest teacher neighbours, recall@10 of the teacher's neighbours, and
sentences/s at batch 1 and 64 on one thread (``kdistill.embedding_eval``).

    nice -n 10 python benchmarks/sentence_encoders.py --quick      # ~3k train / 500 test sentences
    python benchmarks/sentence_encoders.py                          # 45k train / 1k test, 15 min transformer

Prints a table, a summary line, and one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import kdistill
from kdistill.cache import cached_teacher_outputs
from kdistill.embedding_eval import sentence_speeds, similarity_report
from kdistill.sentence_export import export_sentence_folder
from kdistill.sentences import load_sentence_teacher, read_sentences, sentence_split, sentence_student


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3k train / 500 test sentences, 5 min transformer")
    parser.add_argument("--train", type=int, default=None, help="train sentences (default 45000, quick 3000)")
    parser.add_argument("--test", type=int, default=None, help="held-out sentences (default 1000, quick 500)")
    parser.add_argument(
        "--train-from", type=int, default=0, help="skip the first N train sentences of the seeded order (default 0)"
    )
    parser.add_argument(
        "--pca-dims", type=int, default=256, help="static student width (default 256); 0 keeps the teacher's width"
    )
    parser.add_argument(
        "--pca-center",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="centre the token vectors before PCA, as Model2Vec does (default); --no-pca-center: uncentred",
    )
    parser.add_argument("--static-loss", default="cosine", choices=["cosine", "mse", "contrastive"])
    parser.add_argument("--static-epochs", type=int, default=None, help="default 20 (quick 30)")
    parser.add_argument("--static-lr", type=float, default=1e-3)
    parser.add_argument("--static-batch", type=int, default=256)
    parser.add_argument("--layers", default="4,5", help="teacher layers the transformer student starts from")
    parser.add_argument(
        "--intermediate-size", type=int, default=None, help="feed-forward units each student layer keeps (all)"
    )
    parser.add_argument("--transformer-loss", default="cosine", choices=["cosine", "mse", "contrastive"])
    parser.add_argument("--transformer-minutes", type=float, default=None, help="default 15 (quick 5)")
    parser.add_argument("--transformer-epochs", type=int, default=2, help="planned epochs (the lr schedule's length)")
    parser.add_argument("--transformer-lr", type=float, default=1e-4)
    parser.add_argument(
        "--schedule-to-budget",
        action="store_true",
        help="end the transformer's lr schedule at the time budget's end (train.schedule.to_budget), not the epochs'",
    )
    parser.add_argument("--skip-transformer", action="store_true", help="the static student only")
    parser.add_argument("--skip-static", action="store_true", help="the transformer student only")
    parser.add_argument("--cache-dir", default=".kdistill-cache", help="teacher-output cache (default: %(default)s)")
    parser.add_argument("--out", default=None, help="folder for the runs and exports (default: a temporary one)")
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


def _embed(teacher: Any, sentences: list[str], cache_dir: str) -> torch.Tensor:
    """The teacher's embeddings of ``sentences``, through the cache, on the rows a run keys them by."""
    entry = cached_teacher_outputs(teacher, sentence_split(teacher, sentences, "rows").x, cache_dir=cache_dir)
    return torch.as_tensor(np.asarray(entry.teacher_targets())).float()


_KEYS = ("spearman", "spearman_hard", "recall_at_10", "sentences_per_s_batch_1", "sentences_per_s_batch_64")


def _row(metrics: dict[str, float]) -> dict[str, float]:
    return {key: float(metrics[key]) for key in _KEYS if key in metrics}


def _onnx_speeds(folder: Path, teacher: Any, sentences: list[str], export: dict[str, Any]) -> dict[str, Any]:
    """sentences/s of the fp32 and INT8 ONNX files at batch 1 and 64, one thread, tokenisation included."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    tokenizer = teacher.tokenizer
    encoders = {}
    for name in ("onnx", "int8"):
        session = onnxruntime.InferenceSession(export[name], options, providers=["CPUExecutionProvider"])

        def encode(batch: list[str], session: Any = session) -> Any:
            tokens = tokenizer(batch, padding=True, truncation=True, max_length=256, return_tensors="np")
            feeds = {"input_ids": tokens["input_ids"].astype(np.int64)}
            feeds["attention_mask"] = tokens["attention_mask"].astype(np.int64)
            return session.run(["embeddings"], feeds)[0]

        encoders[f"transformer_{name}"] = encode
    return sentence_speeds(encoders, sentences)


def main() -> None:
    args = _parse()
    train_size = args.train or (3000 if args.quick else 45_000)
    test_size = args.test or (500 if args.quick else 1000)
    args.static_epochs = args.static_epochs or (30 if args.quick else 20)
    minutes = args.transformer_minutes if args.transformer_minutes is not None else (5.0 if args.quick else 15.0)
    args.pca_dims = args.pca_dims or None  # 0: the teacher's width (null in the JSON, as in a config)
    layers = [int(part) for part in args.layers.split(",")]
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    stages = _Stages()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="sentence-encoders-"))

    train, _, test = stages.run(
        "corpus", read_sentences, "docstrings", train=args.train_from + train_size, test=test_size
    )
    train = train[args.train_from :]
    print(f"using {len(train)} train, {len(test)} test sentences; runs in {out}", flush=True)
    teacher = load_sentence_teacher("minilm")
    stages.run("teacher_train_embeddings", _embed, teacher, train, args.cache_dir)
    test_targets = stages.run("teacher_test_embeddings", _embed, teacher, test, args.cache_dir)

    results: dict[str, dict[str, float]] = {}
    common: dict[str, Any] = {"test": test, "task": "embedding", "patience": None, "cache_dir": args.cache_dir}
    common |= {"seed": args.seed, "num_threads": 1, "verbose": False, "profile": True}
    static = None if args.skip_static else _static_stage(args, teacher, train, test_targets, stages, out, common)
    if static is not None:
        static_run, results["static_untrained"] = static
        results["teacher"] = _row(static_run.report.models["teacher"])
        results["static"] = _row(static_run.report.models["student"])

    transformer_info: dict[str, Any] = {}
    if not args.skip_transformer:
        transformer = stages.run(
            "transformer_run", kdistill.distill, teacher, "transformer", train, method=args.transformer_loss,
            student_params={"layer_map": layers, "intermediate_size": args.intermediate_size},
            epochs=args.transformer_epochs, batch_size=32,
            lr=args.transformer_lr, weight_decay=0.01,
            settings={"train": {"max_minutes": minutes, "schedule": {"to_budget": args.schedule_to_budget}}},
            out=out / "transformer", **common,
        )  # fmt: skip
        history = transformer.history
        stages.seconds["transformer_train"] = round(sum(epoch["time_s"] for epoch in history), 1)
        # the teacher's speed measured in this run's report: a ratio of two numbers taken under the same load
        results["teacher_in_transformer_run"] = _row(transformer.report.models["teacher"])
        results["transformer"] = _row(transformer.report.models["student"])
        transformer_info = {"epochs_run": len(history), "last_train_loss": history[-1]["train_loss"]}
        transformer_info |= {"steps": history[-1]["step"], "last_lr": history[-1]["lr"]}
        print(f"transformer: {len(history)} epoch(s) in the budget, loss {history[-1]['train_loss']:.4f}", flush=True)
        export = stages.run("onnx_export", export_sentence_folder, out / "transformer" / "model", out / "onnx")
        onnx_speeds = stages.run("onnx_throughput", _onnx_speeds, out / "onnx", teacher, test, export)
        teacher_b64 = results["teacher_in_transformer_run"]["sentences_per_s_batch_64"]
        for name, speeds in onnx_speeds.items():
            results[name] = {key: value for key, value in speeds.items() if not key.startswith("speedup")}
            results[name] |= {key: results["transformer"][key] for key in _KEYS[:3]} if name.endswith("onnx") else {}
        transformer_info["export"] = export
        transformer_info["int8_vs_teacher_batch_64"] = onnx_speeds["transformer_int8"]["sentences_per_s_batch_64"]
        transformer_info["int8_vs_teacher_batch_64"] /= teacher_b64

    static_student = None if static is None else static[0].student
    reload_check = stages.run("reload_check", _reload, out, test[:64], static_student, args.skip_transformer)

    def own_teacher(name: str) -> str:  # the static run's teacher, or the transformer run's
        return "teacher_in_transformer_run" if name.startswith(("transformer", "teacher_in")) else "teacher"

    speedups = {  # each student against the teacher of its own run: two numbers taken under the same load
        name: metrics["sentences_per_s_batch_64"] / results[own_teacher(name)]["sentences_per_s_batch_64"]
        for name, metrics in results.items()
        if "sentences_per_s_batch_64" in metrics
    }
    header = ("model", "spearman", "hard", "recall@10", "sent/s b1", "sent/s b64", "x teacher")
    print("\n" + f"{header[0]:<20}" + "".join(f"{name:>11}" for name in header[1:]))
    for name, metrics in results.items():
        cells = [metrics.get(key, float("nan")) for key in _KEYS]
        ratio = speedups.get(name, float("nan"))
        print(f"{name:<20}" + "".join(f"{value:>11.3f}" for value in cells) + f"{ratio:>11.1f}")
    summary = {
        "benchmark": "sentence_encoders",
        "quick": args.quick,
        "train_sentences": len(train),
        "train_from": args.train_from,
        "test_sentences": len(test),
        "pca_dims": args.pca_dims,
        "pca_center": args.pca_center,
        "static_loss": args.static_loss,
        "static_epochs": None if static is None else len(static[0].history),
        "static_lr": args.static_lr,
        "transformer_layers": layers,
        "transformer_intermediate_size": args.intermediate_size,
        "transformer_loss": args.transformer_loss,
        "transformer_minutes": minutes,
        "schedule_to_budget": args.schedule_to_budget,
        "transformer": transformer_info,
        "results": results,
        "speedup_vs_teacher_batch_64": speedups,
        "reload": reload_check,
        "stage_seconds": stages.seconds,
        "threads": 1,
    }
    parts = []
    if "static" in results:
        parts.append(
            f"static spearman {results['static']['spearman']:.3f} (untrained "
            f"{results['static_untrained']['spearman']:.3f}) at {speedups['static']:.0f}x the teacher"
        )
    if "transformer" in results:
        parts.append(
            f"transformer {results['transformer']['spearman']:.3f} at {speedups['transformer']:.1f}x, INT8 ONNX "
            f"{speedups['transformer_int8']:.1f}x (batch 64, 1 thread)"
        )
    print("\nsummary: " + "; ".join(parts))
    print(json.dumps(summary, default=str))


def _static_stage(
    args: argparse.Namespace,
    teacher: Any,
    train: list[str],
    test_targets: Any,
    stages: Any,
    out: Path,
    common: dict[str, Any],
) -> tuple[Any, dict[str, float]]:
    """The static student: built (scored untrained), then fine-tuned through ``distill``; (its run, the untrained
    scores)."""
    params = {"pca_dims": args.pca_dims, "pca_center": args.pca_center}
    build = sentence_student("static", teacher, train, params, cache_dir=args.cache_dir)
    untrained = stages.run("static_init", build)
    raw = similarity_report(test_targets, untrained.encode(common["test"]), seed=args.seed)
    scores = {"spearman": raw["spearman_random"], "spearman_hard": raw["spearman_hard"]}
    scores["recall_at_10"] = raw["recall_at_10"]
    static = stages.run(
        "static_run", kdistill.distill, teacher, "static", train, method=args.static_loss, student_params=params,
        epochs=args.static_epochs, batch_size=args.static_batch, lr=args.static_lr, weight_decay=0.0,
        out=out / "static", **common,
    )  # fmt: skip
    stages.seconds["static_finetune"] = round(sum(epoch["time_s"] for epoch in static.history), 1)
    first, last = static.history[0]["train_loss"], static.history[-1]["train_loss"]
    print(f"static: {len(static.history)} epochs, train loss {first:.4f} -> {last:.4f}", flush=True)
    return static, scores


def _reload(out: Path, sentences: list[str], static: Any, skip_transformer: bool) -> dict[str, float]:
    """The run folders' ``model/`` loaded by Model2Vec and sentence-transformers: max |difference| to kdistill's."""
    found: dict[str, float] = {}
    if static is not None:
        from model2vec import StaticModel

        theirs = StaticModel.from_pretrained(out / "static" / "model").encode(sentences, use_multiprocessing=False)
        found["model2vec_max_abs_diff"] = float(np.abs(static.encode(sentences).numpy() - theirs).max())
    if not skip_transformer:
        from sentence_transformers import SentenceTransformer

        from kdistill.teachers import SentenceTeacher

        folder = out / "transformer" / "model"
        ours = SentenceTeacher.from_pretrained(folder).encode(sentences).numpy()
        loaded = SentenceTransformer(str(folder), device="cpu").encode(sentences)
        found["sentence_transformers_max_abs_diff"] = float(np.abs(ours - loaded).max())
    return found


if __name__ == "__main__":
    main()
