"""What ``kdistill export`` and ``kdistill profile`` do, kept out of cli.py so the CLI stays a thin parser.

- ``kdistill export --dataset digits --out DIR``: the whole pipeline with the built-in teacher of that data set
  (digits: a 200-tree RandomForest; mnist1d: a CNN), distil -> prune -> quantize -> export, everything measured.
- ``kdistill export RUN --dataset digits --out DIR``: a saved student (a run folder or its student.safetensors) to
  ONNX (checked against PyTorch) and INT8, accuracy of both measured on the data set's test split.
- ``kdistill profile DIR --dataset digits``: every artefact in DIR (``*.onnx``, ``student.safetensors``) through the
  one profiling harness, optionally with the built-in teacher (``--teacher``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdistill.api import load
from kdistill.compress.export import OnnxPredictor, export_onnx
from kdistill.compress.pipeline import CompressResult, compress
from kdistill.compress.quantize import quantize_onnx
from kdistill.data import as_split
from kdistill.datasets import load_dataset
from kdistill.demo import builtin_teacher, demo_recipe
from kdistill.errors import CheckpointError, ShapeMismatchError
from kdistill.io import atomic_write_json
from kdistill.pipeline import ModelEntry, _eval_predict, measure_models, teacher_entry
from kdistill.profile import MEMORY_MEASURE, count_parameters
from kdistill.report import Report
from kdistill.teachers import as_teacher, teacher_logits

__all__ = ["export_saved_student", "profile_folder", "run_pipeline"]


def run_pipeline(
    dataset_name: str,
    out: str | os.PathLike[str],
    *,
    prune_ratio: float = 0.5,
    quantize: str = "auto",
    tolerance: float = 1e-4,
    seed: int = 0,
    html: bool = True,
    verbose: bool = False,
    latency_budget_s: float | None = None,
    epochs: int = 100,
    finetune_epochs: int = 50,
) -> CompressResult:
    """distil -> prune -> quantize -> export on a built-in data set with its built-in teacher and student, as
    ``kdistill demo`` sets them up (:func:`kdistill.demo.demo_recipe`)."""
    dataset = load_dataset(dataset_name, seed)
    teacher, student, settings = demo_recipe(dataset, seed, verbose)
    result = compress(
        teacher,
        student,
        dataset.train,
        val=dataset.val,
        test=dataset.test,
        out=out,
        prune_ratio=prune_ratio,
        quantize=quantize,
        tolerance=tolerance,
        seed=seed,
        html=html,
        verbose=verbose,
        latency_budget_s=latency_budget_s,
        epochs=epochs,
        finetune_epochs=finetune_epochs,
        **settings,
    )
    result.report.settings["dataset"] = dataset_name
    result.report.save(result.folder / "report.json")
    return result


def _check_fits(student: nn.Module, rows: torch.Tensor, source: str | os.PathLike[str], dataset_name: str) -> None:
    """Raise a clear error when the saved student cannot take the data set's rows (the wrong ``--dataset``)."""
    try:
        with torch.no_grad():
            student.eval()(rows[:2])
    except RuntimeError as exc:
        expected = getattr(student, "in_shape", "?")
        raise ShapeMismatchError(
            f"the student in {source} takes rows of shape {tuple(expected) if expected != '?' else '?'}, "
            f"but {dataset_name} rows have shape {tuple(rows.shape[1:])} ({exc})",
            hint="pass the --dataset the student was trained on.",
        ) from exc


def export_saved_student(
    source: str | os.PathLike[str],
    dataset_name: str,
    out: str | os.PathLike[str],
    *,
    quantize: str = "auto",
    tolerance: float = 1e-4,
    seed: int = 0,
) -> dict[str, Any]:
    """Export a saved built-in student to ``out/student.onnx`` and ``out/student.int8.onnx``, with the numerical
    check on the data set's training rows (also the calibration rows) and accuracy of PyTorch, ONNX fp32 and INT8 on
    its test split. Writes and returns ``out/export.json``."""
    student = load(source)
    dataset = load_dataset(dataset_name, seed)
    train = as_split(dataset.train, name="train")
    test = as_split(dataset.test, name="test")
    assert test.y is not None
    _check_fits(student, train.x, source, dataset_name)
    folder = Path(out)
    exported = export_onnx(student, train.x, folder / "student.onnx", tolerance=tolerance)
    summary: dict[str, Any] = {"source": str(source), "dataset": dataset_name, "export": exported.to_dict()}
    predictors: dict[str, Any] = {"pytorch": student, "onnx_fp32": OnnxPredictor(exported.path)}
    if quantize != "none":
        quantized = quantize_onnx(
            exported.path, folder / "student.int8.onnx", mode=quantize, calibration_rows=train.x.numpy()
        )
        summary["int8"] = quantized.to_dict()
        predictors["onnx_int8"] = OnnxPredictor(quantized.path)
    with torch.inference_mode():
        accuracy = {
            name: float((predict(test.x).argmax(dim=1) == test.y).float().mean())
            for name, predict in predictors.items()
        }
    summary["accuracy"] = accuracy
    if "onnx_int8" in accuracy:
        summary["accuracy_delta_int8"] = accuracy["onnx_int8"] - accuracy["onnx_fp32"]
    atomic_write_json(folder / "export.json", summary)
    return summary


def _artefact_name(path: Path, root: Path) -> str:
    if path.suffix == ".onnx":
        stem = path.name.removesuffix(".onnx")
        return stem.replace(".int8", "_int8") if stem.endswith(".int8") else f"{stem}_onnx"
    folder = path.parent.name if path.parent != root else ""
    return "pruned" if folder == "pruned" else "student"


def profile_folder(
    folder: str | os.PathLike[str],
    dataset_name: str,
    *,
    threads: int = 1,
    batch_size: int = 256,
    with_teacher: bool = False,
    seed: int = 0,
    latency_budget_s: float | None = None,
) -> Report:
    """Measure every artefact under ``folder`` (``*.onnx`` and ``student.safetensors``, one level of sub-folders)
    on the data set's test split: accuracy, size on disk, parameters, p50/p95 latency at batch 1, throughput at
    ``batch_size``, peak memory. ``with_teacher`` retrains the built-in teacher (seeded) to add it as a reference."""
    root = Path(folder)
    files = sorted([*root.glob("*.onnx"), *root.glob("*/*.onnx")], key=lambda p: (p.name.split(".")[0], p.name))
    files += sorted([*root.glob("student.safetensors"), *root.glob("*/student.safetensors")])
    if not files:
        raise CheckpointError(
            f"nothing to profile in {root}: no *.onnx or student.safetensors there or one folder down",
            hint="point at the folder written by `kdistill export` (or `kdistill demo`).",
        )
    dataset = load_dataset(dataset_name, seed)
    test = as_split(dataset.test, name="test")
    entries: dict[str, ModelEntry] = {}
    reference = None
    if with_teacher:
        adapter = as_teacher(builtin_teacher(dataset, seed))
        entries["teacher"] = teacher_entry(adapter)
        reference = teacher_logits(adapter, test.x)
    modules: dict[str, nn.Module] = {}
    for path in files:
        if path.suffix == ".safetensors":
            module = load(path)
            _check_fits(module, test.x, path, dataset_name)
            name = _artefact_name(path, root)
            modules[name] = module
            entries[name] = ModelEntry(_eval_predict(module), path.stat().st_size, count_parameters(module), "torch")
    for path in files:
        if path.suffix == ".onnx":
            name = _artefact_name(path, root)
            source = modules.get(name.removesuffix("_int8").removesuffix("_onnx"))
            params = count_parameters(source) if source is not None else 0
            runtime = "onnxruntime int8" if name.endswith("_int8") else "onnxruntime fp32"
            entries[name] = ModelEntry(OnnxPredictor(path, threads=threads), path.stat().st_size, params, runtime)
    models, _ = measure_models(
        entries,
        test,
        reference,
        profile=True,
        threads=threads,
        batch_size=batch_size,
        latency_budget_s=latency_budget_s,
        memory=True,
    )
    settings = {
        "dataset": dataset_name,
        "folder": str(root),
        "runtimes": {name: entry.runtime for name, entry in entries.items()},
        "profile_threads": threads,
        "profile_batch_size": batch_size,
        "memory_measure": MEMORY_MEASURE,
    }
    return Report(split="test", rows=len(test), models=models, settings=settings)
