"""distil -> prune -> quantize -> export, every stage's artefact kept, every model measured on one harness.

The folder :func:`compress` writes::

    out/
      distilled/   student.safetensors, history.json, report.json   (the distilled student and its baseline)
      pruned/      student.safetensors, history.json                (pruned + KD fine-tuned; kdistill.load reads it)
      onnx/        student.onnx, student.int8.onnx, pruned.onnx, pruned.int8.onnx
      compress.json   export checks (max |ONNX - PyTorch|), quantization modes, artefact paths
      history.json    {"student": [...], "baseline": [...], "pruned": [...]} per-epoch metrics
      report.json     every model's accuracy, size, latency, throughput, memory + diagnostics
      report.html     the self-contained HTML report (needs the "report" extra)

The models in the report: ``teacher``, ``baseline`` (same student, hard labels only), ``student`` (PyTorch eager),
``student_onnx`` (ONNX Runtime fp32), ``student_int8``, ``pruned``, ``pruned_onnx``, ``pruned_int8``. INT8 entries
carry ``accuracy_delta``: their accuracy minus their fp32 ONNX source's.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdistill.api import DistillResult, distill, save_student
from kdistill.compress.export import OnnxExport, OnnxPredictor, export_onnx
from kdistill.compress.prune import PrunedStudent, prune_and_finetune
from kdistill.compress.quantize import QuantizedModel, quantize_onnx
from kdistill.data import Split, as_split
from kdistill.errors import DataError
from kdistill.io import atomic_write_json
from kdistill.pipeline import ModelEntry, measure_models, model_entry, teacher_entry
from kdistill.profile import MEMORY_MEASURE
from kdistill.report import Report
from kdistill.teachers import Teacher, as_teacher, teacher_logits

__all__ = ["CompressResult", "compress", "model_diagnostics", "per_class_accuracy", "reliability_bins"]


@dataclass
class CompressResult:
    """What :func:`compress` returns: the folder, the report, and each stage's output."""

    folder: Path
    report: Report
    distilled: DistillResult
    pruned: PrunedStudent | None
    exports: dict[str, OnnxExport] = field(default_factory=dict)
    quantized: dict[str, QuantizedModel] = field(default_factory=dict)
    artefacts: dict[str, Path] = field(default_factory=dict)
    html: Path | None = None


def reliability_bins(logits: torch.Tensor, target: torch.Tensor, *, bins: int = 10) -> dict[str, list[float]]:
    """Reliability-diagram data: for equal-width confidence bins ((b-1)/bins, b/bins], the mean top-class
    probability (``confidence``), the accuracy, and the row count of each bin (empty bins report 0, count 0).
    ``logits``: (rows, classes); ``target``: (rows,)."""
    probs = torch.softmax(logits.float(), dim=1)
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == target).float()
    edges = torch.linspace(0.0, 1.0, bins + 1)
    which = torch.bucketize(confidence, edges[1:-1], right=False)
    out: dict[str, list[float]] = {"confidence": [], "accuracy": [], "count": []}
    for b in range(bins):
        members = which == b
        count = int(members.sum())
        out["count"].append(float(count))
        out["confidence"].append(float(confidence[members].mean()) if count else 0.0)
        out["accuracy"].append(float(correct[members].mean()) if count else 0.0)
    return out


def per_class_accuracy(logits: torch.Tensor, target: torch.Tensor, num_classes: int) -> list[float | None]:
    """Accuracy on the rows of each true class (None for a class with no rows): a list of ``num_classes``."""
    predicted = logits.argmax(dim=1)
    result: list[float | None] = []
    for label in range(num_classes):
        members = target == label
        result.append(float((predicted[members] == label).float().mean()) if bool(members.any()) else None)
    return result


def model_diagnostics(
    logits: dict[str, torch.Tensor], target: torch.Tensor, classes: list[Any] | None
) -> dict[str, Any]:
    """The report's ``diagnostics``: reliability bins and per-class accuracy per model, plus the class labels."""
    num_classes = int(next(iter(logits.values())).shape[1])
    return {
        "classes": classes if classes is not None else list(range(num_classes)),
        "reliability": {name: reliability_bins(values, target) for name, values in logits.items()},
        "per_class_accuracy": {
            name: per_class_accuracy(values, target, num_classes) for name, values in logits.items()
        },
    }


def _split_of(data: Any, name: str, adapter: Teacher) -> Split | None:
    return None if data is None else as_split(data, name=name, classes=adapter.classes)


def compress(
    teacher: Any,
    student: str | nn.Module,
    train: Any,
    *,
    val: Any = None,
    test: Any = None,
    out: str | os.PathLike[str] = "runs/compress",
    distilled: DistillResult | None = None,
    prune_ratio: float | None = 0.5,
    finetune_epochs: int = 50,
    finetune_lr: float = 3e-3,
    quantize: str = "auto",
    tolerance: float = 1e-4,
    profile: bool = True,
    threads: int = 1,
    batch_size: int = 256,
    latency_budget_s: float | None = None,
    html: bool = True,
    seed: int = 0,
    verbose: bool = False,
    **distill_params: Any,
) -> CompressResult:
    """Distil ``teacher`` into ``student``, prune it, quantize and export both, and measure everything.

    Args:
        teacher, student, train, val, test: as for :func:`kdistill.distill` (``distill_params`` go there too:
            ``epochs``, ``temperature``, ``student_params``...). ``test`` (else ``val``) is where every model is
            measured.
        distilled: a :class:`~kdistill.DistillResult` from an earlier ``distill`` call, to skip distillation.
        prune_ratio: fraction of each hidden layer's neurons/channels removed (None or 0: no pruning stage).
        finetune_epochs, finetune_lr: the KD fine-tuning of the pruned student against the original teacher's
            logits on the training rows (same ``temperature`` and ``soft_weight`` as distillation).
        quantize: ``"auto"`` (static QDQ for CNNs, dynamic for the rest), ``"dynamic"``, ``"static"``, or
            ``"none"`` to skip INT8.
        tolerance: the largest |ONNX - PyTorch| logit difference accepted at export (else ExportError).
        profile: time every model (latency at batch 1, throughput at ``batch_size``, peak memory) with ``threads``
            threads; ``latency_budget_s`` bounds the batch-1 timing per model (default 0.14 s; more gives a steadier
            p95).
        html: also write ``report.html`` (needs matplotlib, the "report" extra).

    Returns:
        A :class:`CompressResult`; everything is also saved under ``out``.
    """
    started = time.perf_counter()
    folder = Path(out)
    adapter = as_teacher(teacher)
    train_split = as_split(train, name="train", classes=adapter.classes)
    val_split = _split_of(val, "val", adapter)
    test_split = _split_of(test, "test", adapter)
    eval_split = test_split if test_split is not None else val_split
    if eval_split is None or eval_split.y is None:
        raise DataError(
            "compress measures every model on labelled rows, and neither test nor val was given",
            hint="pass test=(X_test, y_test) (or val=...).",
        )
    if distilled is None:
        distilled = distill(
            teacher, student, train, val=val, test=test, seed=seed, verbose=verbose, profile=False, **distill_params
        )
    distilled.save(folder / "distilled")
    artefacts: dict[str, Path] = {"student": folder / "distilled" / "student.safetensors"}

    pruned = None
    if prune_ratio:
        targets = teacher_logits(adapter, train_split.x)
        val_tensors = None if val_split is None or val_split.y is None else (val_split.x, val_split.y)
        pruned = prune_and_finetune(
            distilled.student,
            train_split.x,
            train_split.y,
            targets,
            ratio=prune_ratio,
            spec=distilled.spec,
            val=val_tensors,
            epochs=finetune_epochs,
            lr=finetune_lr,
            temperature=distill_params.get("temperature", 4.0),
            soft_weight=distill_params.get("soft_weight", 0.5),
            seed=seed,
            verbose=verbose,
        )
        artefacts["pruned"] = save_student(
            pruned.model, folder / "pruned" / "student.safetensors", spec=pruned.spec, classes=distilled.classes
        )
        atomic_write_json(folder / "pruned" / "history.json", {"pruned": pruned.history})

    torch_models: dict[str, nn.Module] = {"student": distilled.student}
    if pruned is not None:
        torch_models["pruned"] = pruned.model
    exports: dict[str, OnnxExport] = {}
    quantized: dict[str, QuantizedModel] = {}
    for name, module in torch_models.items():
        exports[name] = export_onnx(module, train_split.x, folder / "onnx" / f"{name}.onnx", tolerance=tolerance)
        artefacts[f"{name}_onnx"] = exports[name].path
        if quantize != "none":
            quantized[name] = quantize_onnx(
                exports[name].path,
                folder / "onnx" / f"{name}.int8.onnx",
                mode=quantize,
                calibration_rows=train_split.x.numpy(),
            )
            artefacts[f"{name}_int8"] = quantized[name].path

    entries: dict[str, ModelEntry] = {"teacher": teacher_entry(adapter)}
    if distilled.baseline is not None:
        entries["baseline"] = model_entry(distilled.baseline)
    for name, module in torch_models.items():
        entries[name] = model_entry(module)
        params = entries[name].parameters
        entries[f"{name}_onnx"] = ModelEntry(
            OnnxPredictor(exports[name].path, threads=threads), exports[name].size_bytes, params, "onnxruntime fp32"
        )
        if name in quantized:
            q = quantized[name]
            runtime = f"onnxruntime int8 ({q.mode})"
            entries[f"{name}_int8"] = ModelEntry(OnnxPredictor(q.path, threads=threads), q.size_bytes, params, runtime)

    reference = teacher_logits(adapter, eval_split.x)
    models, logits = measure_models(
        entries,
        eval_split,
        reference,
        profile=profile,
        threads=threads,
        batch_size=batch_size,
        latency_budget_s=latency_budget_s,
        memory=True,
    )
    assert eval_split.y is not None
    settings: dict[str, Any] = dict(distilled.report.settings) if distilled.report is not None else {}
    settings |= {
        "runtimes": {name: entry.runtime for name, entry in entries.items()},
        "artefacts": {name: str(path.relative_to(folder)) for name, path in artefacts.items()},
        "prune_ratio": prune_ratio,
        "finetune_epochs_run": None if pruned is None else len(pruned.history),
        "quantize": {name: q.mode for name, q in quantized.items()},
        "export_max_abs_diff": {name: e.max_abs_diff for name, e in exports.items()},
        "export_tolerance": tolerance,
        "profile_threads": threads,
        "profile_batch_size": batch_size,
        "memory_measure": MEMORY_MEASURE,
        "compress_wall_time_s": round(time.perf_counter() - started, 1),
    }
    report = Report(
        split="test" if test is not None else "val",
        rows=len(eval_split),
        models=models,
        settings=settings,
        diagnostics=model_diagnostics(logits, eval_split.y, distilled.classes),
    )
    if distilled.report is not None:  # the distillation's judgement: the same verdict, advice and privacy lines
        source = distilled.report
        report.verdict, report.advice, report.privacy, report.measured = (
            source.verdict,
            source.advice,
            source.privacy,
            source.measured,
        )
    report.save(folder / "report.json")
    history = {
        "student": distilled.history,
        "baseline": distilled.baseline_history,
        "pruned": None if pruned is None else pruned.history,
    }
    atomic_write_json(folder / "history.json", history)
    atomic_write_json(
        folder / "compress.json",
        {
            "exports": {name: e.to_dict() for name, e in exports.items()},
            "quantized": {name: q.to_dict() for name, q in quantized.items()},
            "pruning": None
            if pruned is None
            else {
                "ratio": pruned.ratio,
                "parameters_before": pruned.parameters_before,
                "parameters_after": pruned.parameters_after,
                "spec": pruned.spec,
            },
        },
    )
    html_path = None
    if html:
        from kdistill.report_html import write_html_report

        html_path = write_html_report(report, history, folder / "report.html")
    return CompressResult(
        folder=folder,
        report=report,
        distilled=distilled,
        pruned=pruned,
        exports=exports,
        quantized=quantized,
        artefacts=artefacts,
        html=html_path,
    )
