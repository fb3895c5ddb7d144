"""What ``kdistill export`` and ``kdistill profile`` do, kept out of cli.py so the CLI stays a thin parser.

- ``kdistill export --dataset digits --out DIR``: the whole pipeline with the built-in teacher of that data set
  (digits: a 200-tree RandomForest; mnist1d: a CNN), distil -> prune -> quantize -> export, everything measured.
- ``kdistill export RUN --dataset digits --out DIR``: a saved student (a run folder or its student.safetensors) to
  ONNX (checked against PyTorch) and INT8, accuracy of both measured on the data set's test split.
- ``kdistill profile DIR --dataset digits``: every artefact in DIR (``*.onnx``, ``student.safetensors``) through the
  one profiling harness, optionally with the built-in teacher (``--teacher``).

``--data FILE.npz`` replaces ``--dataset`` with rows of your own: an .npz with ``x`` and ``y``, or named inputs
``x.input_ids``, ``x.attention_mask`` (a tokenized text set) and ``y``, as config files read them. A transformer
student is then exported and profiled like any other: from a run folder (its ``student.safetensors``) or from its
``save_pretrained`` folder, each batch cut to its longest row.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdistill.api import load
from kdistill.compress.export import OnnxPredictor, export_onnx
from kdistill.compress.pipeline import CompressResult, compress
from kdistill.compress.quantize import quantize_onnx
from kdistill.data import Split, as_split, rows_in, run_trimmed, take_rows, trim_padding
from kdistill.datasets import load_dataset
from kdistill.demo import builtin_teacher, demo_recipe
from kdistill.errors import CheckpointError, ConfigError, DataError, ExportError, ShapeMismatchError
from kdistill.io import atomic_write_json
from kdistill.pipeline import ModelEntry, _eval_predict, measure_models, teacher_entry
from kdistill.profile import MEMORY_MEASURE, count_parameters
from kdistill.report import Report
from kdistill.result import WEIGHTS_FILE
from kdistill.teachers import as_teacher, teacher_logits

__all__ = ["export_saved_student", "load_student", "profile_folder", "read_rows", "run_pipeline"]

_PRETRAINED_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


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


def _is_pretrained_folder(path: Path) -> bool:
    """A transformers ``save_pretrained`` folder: its config.json and weights (a run folder has student.safetensors)."""
    return (
        path.is_dir()
        and not (path / WEIGHTS_FILE).exists()
        and (path / "config.json").is_file()
        and any((path / name).is_file() for name in _PRETRAINED_WEIGHTS)
    )


def load_student(source: str | os.PathLike[str]) -> nn.Module:
    """A saved student in eval mode: a run folder or its ``student.safetensors`` (:func:`kdistill.load`), or the
    ``save_pretrained`` folder of a transformers classifier (a transformer student's saved form)."""
    path = Path(source)
    if _is_pretrained_folder(path):
        from kdistill.students.transformer import load_classifier

        return load_classifier(str(path))
    return load(path)


def read_rows(path: str | os.PathLike[str]) -> Split:
    """The labelled rows of an .npz: ``x`` and ``y``, or named inputs ``x.<name>`` (``x.input_ids``,
    ``x.attention_mask``) and ``y``, read as config files read them (nothing unpickled)."""
    from kdistill.run import _read_archive

    file = Path(path)
    if file.suffix.lower() != ".npz" or not file.is_file():
        raise DataError(
            f"--data {file}: no .npz file there",
            hint="pass an .npz saved with np.savez(path, x=rows, y=labels) (or x.input_ids=..., x.attention_mask=...).",
        )
    try:
        with np.load(file, allow_pickle=False) as archive:
            x, y = _read_archive(file, archive)
    except (ValueError, OSError) as exc:
        raise DataError(
            f"{file} is not a readable .npz of plain arrays ({exc})", hint="np.savez(path, x=..., y=...)."
        ) from exc
    return as_split((x, y), name=file.name)


def _splits(dataset_name: str, data: str | os.PathLike[str] | None, seed: int) -> tuple[Split, Split, str]:
    """(rows for the check and calibration, rows to score, their name): the built-in data set's train and test
    splits, or the rows of ``data`` for both."""
    if data is not None:
        rows = read_rows(data)
        return rows, rows, str(data)
    dataset = load_dataset(dataset_name, seed)
    return as_split(dataset.train, name="train"), as_split(dataset.test, name="test"), dataset_name


def _logits(predict: Any, x: Any, batch: int = 256) -> torch.Tensor:
    """``predict``'s logits on every row of ``x``, in batches each cut to its longest row (a token mapping)."""
    with torch.inference_mode():
        return torch.cat([run_trimmed(predict, take_rows(x, slice(i, i + batch))) for i in range(0, rows_in(x), batch)])


def _describe(x: Any) -> str:
    if isinstance(x, Mapping):
        return "inputs " + ", ".join(f"{name} {tuple(value.shape[1:])}" for name, value in x.items())
    return f"rows of shape {tuple(x.shape[1:])}"


def _check_fits(student: nn.Module, rows: Any, source: str | os.PathLike[str], data_name: str) -> None:
    """Raise a clear error when the saved student cannot take the data's rows (the wrong ``--dataset``/``--data``:
    other features, or token ids past the student's vocabulary)."""
    predict: Any = _eval_predict(student)  # takes a mapping of inputs too
    try:
        with torch.no_grad():
            predict(trim_padding(take_rows(rows, slice(0, 2))))
    except (RuntimeError, IndexError, TypeError) as exc:
        if isinstance(rows, Mapping):
            vocabulary = getattr(getattr(student, "config", None), "vocab_size", "?")
            raise ShapeMismatchError(
                f"the student in {source} (vocabulary {vocabulary}) cannot take the {_describe(rows)} of "
                f"{data_name} ({exc})",
                hint="pass rows tokenized with the student's own tokenizer (its teacher's).",
            ) from exc
        if hasattr(getattr(student, "config", None), "vocab_size"):
            raise ShapeMismatchError(
                f"the student in {source} is a transformer and cannot take the {_describe(rows)} of {data_name}: it "
                f"takes token inputs ({exc})",
                hint="pass the tokenized rows: an .npz with x.input_ids, x.attention_mask (and y).",
            ) from exc
        expected = getattr(student, "in_shape", "?")
        seen = f"has {_describe(rows)}" if isinstance(rows, Mapping) else f"rows have shape {tuple(rows.shape[1:])}"
        raise ShapeMismatchError(
            f"the student in {source} takes rows of shape {tuple(expected) if expected != '?' else '?'}, "
            f"but {data_name} {seen} ({exc})",
            hint="pass the --dataset (or --data) the student was trained on.",
        ) from exc


def export_saved_student(
    source: str | os.PathLike[str],
    dataset_name: str,
    out: str | os.PathLike[str],
    *,
    data: str | os.PathLike[str] | None = None,
    quantize: str = "auto",
    tolerance: float = 1e-4,
    seed: int = 0,
) -> dict[str, Any]:
    """Export a saved student (:func:`load_student`: a run folder, its weights file, or a transformer's
    ``save_pretrained`` folder) to ``out/student.onnx`` and ``out/student.int8.onnx``, with the numerical check on
    the data set's training rows (also the calibration rows) and accuracy of PyTorch, ONNX fp32 and INT8 on its test
    split. ``data``: an .npz of your own rows instead (:func:`read_rows`), used for the check, the calibration and
    the accuracy; a token mapping is checked on its first 64 rows. Writes and returns ``out/export.json``."""
    student = load_student(source)
    train, test, data_name = _splits(dataset_name, data, seed)
    assert test.y is not None
    _check_fits(student, train.x, source, data_name)
    tokens = not isinstance(train.x, torch.Tensor)
    if tokens and quantize == "static":
        raise ExportError(
            "static INT8 calibrates one float input; this student takes token ids",
            hint="use --quantize dynamic (or auto) for a transformer student.",
        )
    sample = trim_padding(take_rows(train.x, slice(0, 64))) if tokens else train.x
    folder = Path(out)
    exported = export_onnx(student, sample, folder / "student.onnx", tolerance=tolerance)
    summary: dict[str, Any] = {"source": str(source), "dataset": data_name, "export": exported.to_dict()}
    predictors: dict[str, Any] = {"pytorch": _eval_predict(student), "onnx_fp32": OnnxPredictor(exported.path)}
    if quantize != "none":
        quantized = quantize_onnx(
            exported.path,
            folder / "student.int8.onnx",
            mode=quantize,
            calibration_rows=None if tokens else train.x.numpy(),
        )
        summary["int8"] = quantized.to_dict()
        predictors["onnx_int8"] = OnnxPredictor(quantized.path)
    accuracy = {
        name: float((_logits(predict, test.x).argmax(dim=1) == test.y).float().mean())
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
    data: str | os.PathLike[str] | None = None,
    threads: int = 1,
    batch_size: int = 256,
    with_teacher: bool = False,
    seed: int = 0,
    latency_budget_s: float | None = None,
) -> Report:
    """Measure every artefact under ``folder`` (``*.onnx`` and ``student.safetensors``, one level of sub-folders;
    or ``folder`` itself as a transformer's ``save_pretrained`` folder, next to its ONNX files) on the data set's
    test split, or on the rows of ``data`` (an .npz, :func:`read_rows`): accuracy, size on disk, parameters,
    p50/p95 latency at batch 1, throughput at ``batch_size``, peak memory. ``with_teacher`` retrains the built-in
    teacher (seeded) to add it as a reference."""
    root = Path(folder)
    files = sorted([*root.glob("*.onnx"), *root.glob("*/*.onnx")], key=lambda p: (p.name.split(".")[0], p.name))
    files += sorted([*root.glob("student.safetensors"), *root.glob("*/student.safetensors")])
    pretrained = _is_pretrained_folder(root)
    if not files and not pretrained:
        raise CheckpointError(
            f"nothing to profile in {root}: no *.onnx, student.safetensors or save_pretrained model there or one "
            "folder down",
            hint="point at the folder written by `kdistill export` (or `kdistill demo`, or a run).",
        )
    if with_teacher and data is not None:
        raise ConfigError(
            "--teacher retrains a built-in data set's teacher, and --data names rows of your own",
            hint="drop --teacher (or --data).",
        )
    _, test, data_name = _splits(dataset_name, data, seed)
    entries: dict[str, ModelEntry] = {}
    reference = None
    if with_teacher:
        dataset = load_dataset(dataset_name, seed)
        adapter = as_teacher(builtin_teacher(dataset, seed))
        entries["teacher"] = teacher_entry(adapter)
        reference = teacher_logits(adapter, test.x)
    modules: dict[str, nn.Module] = {}
    torch_models = [(path, "student", path.stat().st_size) for path in files if path.suffix == ".safetensors"]
    if pretrained:
        weights = sum(file.stat().st_size for name in _PRETRAINED_WEIGHTS if (file := root / name).is_file())
        torch_models.insert(0, (root, "student", weights))
    for path, _, size in torch_models:
        module = load_student(path)
        _check_fits(module, test.x, path, data_name)
        name = "student" if path == root else _artefact_name(path, root)
        modules[name] = module
        entries[name] = ModelEntry(_eval_predict(module), size, count_parameters(module), "torch")
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
        "dataset": data_name,
        "folder": str(root),
        "runtimes": {name: entry.runtime for name, entry in entries.items()},
        "profile_threads": threads,
        "profile_batch_size": batch_size,
        "memory_measure": MEMORY_MEASURE,
    }
    return Report(split="test", rows=len(test), models=models, settings=settings)
