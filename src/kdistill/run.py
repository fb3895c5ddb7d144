"""``kdistill run``: a validated config, run through the one pipeline, checkpointed every epoch, resumable after a
kill, under torchrun too.

A thin front end: it reads the config's data files, names the teacher recipe and the student, and hands
:func:`kdistill.pipeline.execute` the :class:`~kdistill.pipeline.RunSpec` that ``kdistill.distill`` would build for
the same run (same settings model, same loss composition, same cache, same report: the same weights). Every bad input
fails before anything is written or trained: the config (schema, files, the user's ``module:attribute``
references), the run folder (an existing run needs ``--resume``; a resumed run must have the same config where it
matters), the data, the teacher and its outputs, the student and the loss. Only then is the run folder written:

    <out>/config.json                   the validated config, its resume fingerprint and the data's fingerprint
    <out>/cache/                        teacher outputs on the training rows (kdistill.cache; ``cache.dir`` moves it)
    <out>/checkpoint-student.safetensors, checkpoint-baseline.safetensors   every epoch, atomically
    <out>/metrics.jsonl                 one line per epoch and phase; tensorboard/ when asked for
    <out>/student.safetensors, history.json, report.json    at the end (``kdistill.load(out)`` reads the student)
    <out>/student.onnx, student.int8.onnx, compression.json   with compression steps

Under ``torchrun --nproc_per_node=N`` each rank runs this same code: rank 0 builds the teacher and fills the cache,
the other ranks read it (read-only), every rank trains on 1/N of each batch (DistributedDataParallel; gloo on the
CPU, NCCL on GPUs), and only rank 0 writes checkpoints, logs and the report.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from kdistill.config import RunConfig, check_references, load_config
from kdistill.config_recipes import TEACHER_RECIPES, import_reference
from kdistill.data import Split
from kdistill.errors import ConfigError, DataError, KdistillError, StudentError, TeacherError
from kdistill.pipeline import RunSpec, execute
from kdistill.result import DistillResult
from kdistill.teachers import Teacher, as_teacher

__all__ = ["RunResult", "run", "run_spec", "validate"]


@dataclass
class RunResult:
    """What :func:`run` returns: the run folder, the result (on ranks other than 0 under torchrun: the trained student
    without a report), and whether it resumed."""

    folder: Path
    result: DistillResult
    resumed: bool
    config: RunConfig


def validate(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> RunConfig:
    """Validate a config file fully (schema, data files, ``module:attribute`` references) without running it."""
    config = load_config(path, tuple(overrides))
    check_references(config)
    return config


def run(
    config: RunConfig | str | os.PathLike[str],
    *,
    overrides: Sequence[str] = (),
    resume: bool = False,
    verbose: bool = True,
) -> RunResult:
    """Run a distillation from a config (a :class:`RunConfig` or a YAML path); see the module docstring.

    ``resume=True`` continues the run in the config's folder from its last checkpoint, and refuses a config that
    differs from the original in what changes the weights (seed, data, teacher, student, method, train, precision).
    """
    if not isinstance(config, RunConfig):
        config = load_config(config, tuple(overrides))
    if config.budget is not None or config.search is not None:
        raise ConfigError(
            f"{config.name}: the config has a {'budget' if config.budget is not None else 'search'} section, which "
            "only a student search reads",
            hint="run it with `kdistill search CONFIG.yaml`, or drop the budget and search sections.",
        )
    check_references(config)
    result = execute(run_spec(config, resume=resume, verbose=verbose), config_dump=config.model_dump(mode="json"))
    return RunResult(config.run_folder, result, resume, config)


def run_spec(config: RunConfig, *, resume: bool = False, verbose: bool = True) -> RunSpec:
    """The :class:`~kdistill.pipeline.RunSpec` of a validated config: its data read, its teacher recipe and student
    named, its user references imported."""
    if config.teacher.kind == "sentence" or config.data.sentences is not None:
        return _sentence_spec(config, resume=resume, verbose=verbose)
    splits = _load_data(config)
    dumped = config.model_dump(mode="json")
    student: str | Any = config.student.kind
    student_params = dict(config.student.params)
    if config.student.kind == "transformer" and isinstance(student_params.get("teacher"), str):
        student_params["teacher"] = str(config.resolve(student_params["teacher"]))  # a folder next to the config
    if config.student.kind == "custom":
        assert config.student.factory is not None
        factory = import_reference(config.student.factory, base=config.base, field="student.factory")
        student, student_params = _custom_student(factory, student_params), {}
    augment = None
    if config.augment is not None:
        augment = import_reference(config.augment.function, base=config.base, field="augment.function")
    return RunSpec(
        settings=config,
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        teacher_factory=lambda train: _build_teacher(config, train, verbose),
        student=student,
        student_params=student_params,
        soft_targets=config.teacher.soft_targets,
        oof_folds=config.teacher.oof_folds,
        augment=augment,
        prefetch_teacher=config.augment is not None and config.augment.prefetch_teacher,
        out=config.run_folder,
        resume=resume,
        stream=config.data.train is not None and config.data.train.stream,
        stream_rows=None if config.data.train is None else config.data.train.rows,
        verbose=verbose,
        identity={section: dumped[section] for section in ("data", "teacher", "student")},
        report_settings={"config": config.name, "teacher": config.teacher.kind, "student": config.student.kind},
        unlabeled=_read_unlabeled(config),
    )


def _sentence_spec(config: RunConfig, *, resume: bool, verbose: bool) -> RunSpec:
    """The spec of a sentence-encoder run (teacher kind ``sentence``, ``data.sentences``, task ``embedding``): the
    teacher loaded, the sentences as its token ids, the student's builder (:mod:`kdistill.sentences`)."""
    from kdistill.sentences import (
        BUNDLED_TEACHER,
        load_sentence_teacher,
        read_sentences,
        sentence_split,
        sentence_student,
    )

    sentences = config.data.sentences
    if config.teacher.kind != "sentence" or sentences is None or config.task != "embedding":
        raise ConfigError(
            f"{config.name}: a sentence-encoder run needs teacher kind 'sentence', data.sentences and task "
            f"'embedding' together; got teacher kind {config.teacher.kind!r}, "
            f"data.sentences {'set' if sentences is not None else 'missing'}, task {config.task!r}",
            hint="see examples/sentence/static.yaml.",
        )
    path = config.teacher.path
    teacher = load_sentence_teacher(config.resolve(path) if path is not None else BUNDLED_TEACHER)
    train, val, test = read_sentences(
        sentences.source,
        train=sentences.train,
        val=sentences.val,
        test=sentences.test,
        seed=sentences.seed,
        base=config.base,
    )
    folder = config.run_folder
    cache_dir = config.cache.dir if config.cache.dir is not None else folder / "cache"
    student: Any = config.student.kind
    if student == "custom":
        assert config.student.factory is not None
        factory = import_reference(config.student.factory, base=config.base, field="student.factory")
        student = _custom_student(factory, dict(config.student.params))
    else:
        student = sentence_student(student, teacher, train, config.student.params, cache_dir=cache_dir)
    dumped = config.model_dump(mode="json")
    return RunSpec(
        settings=config,
        train=sentence_split(teacher, train, "train"),
        val=None if val is None else sentence_split(teacher, val, "val"),
        test=sentence_split(teacher, test, "test"),
        teacher=teacher,
        student=student,
        out=folder,
        resume=resume,
        verbose=verbose,
        identity={section: dumped[section] for section in ("data", "teacher", "student")},
        report_settings={"config": config.name, "teacher": config.teacher.kind, "student": config.student.kind},
    )


def _custom_student(factory: Any, params: dict[str, Any]) -> Any:
    def build() -> nn.Module:
        module = factory(**params)
        if not isinstance(module, nn.Module):
            raise StudentError(
                f"student.factory returned a {type(module).__name__}, not a torch.nn.Module",
                hint="return an nn.Module mapping a batch to (batch, classes) logits.",
            )
        return module

    return build


# ---------------------------------------------------------------------------------------------------- data


def _read_csv(path: Path, label_column: str) -> tuple[np.ndarray, np.ndarray]:
    import csv

    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    if len(rows) < 2:
        raise DataError(f"{path} has no data rows", hint="the first line is the header, then one row per example.")
    header = [name.strip() for name in rows[0]]
    if label_column not in header:
        import difflib

        close = difflib.get_close_matches(label_column, header, n=1)
        raise DataError(
            f"{path} has no column {label_column!r}",
            hint=(f"did you mean {close[0]!r}? " if close else "")
            + f"set label_column: to one of {header[:20]} (the class index column).",
        )
    label_at = header.index(label_column)
    values = np.empty((len(rows) - 1, len(header)), dtype=np.float64)
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise DataError(
                f"{path} line {line} has {len(row)} fields, the header has {len(header)}",
                hint="every row needs one value per header column (no missing or extra commas).",
            )
        for column, text in enumerate(row):
            try:
                values[line - 2, column] = float(text)
            except ValueError:
                raise DataError(
                    f"{path} line {line}, column {header[column]!r}: {text!r} is not a number",
                    hint="encode text or categorical columns as numbers first.",
                ) from None
    return np.delete(values, label_at, axis=1), values[:, label_at]


def _read_npy(path: Path, what: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as exc:  # object arrays need pickle, which is refused
        raise DataError(
            f"{path} cannot be read as {what} without unpickling ({exc})",
            hint="save plain numeric arrays: np.save(path, x.astype(np.float32)).",
        ) from exc


def _read_split(config: RunConfig, name: str) -> tuple[Any, Any] | None:
    split = getattr(config.data, name)
    if split is None:
        return None
    if split.factory is not None:
        return import_reference(split.factory, base=config.base, field=f"data.{name}.factory")()
    if split.x is not None:
        return _read_npy(config.resolve(split.x), "x"), _read_npy(config.resolve(split.y), "y")
    path = config.resolve(split.path)
    if path.suffix.lower() == ".csv":
        return _read_csv(path, split.label_column)
    try:
        with np.load(path, allow_pickle=False) as archive:
            return _read_archive(path, archive)
    except (ValueError, OSError) as exc:
        raise DataError(
            f"{path} is not a readable .npz of plain arrays ({exc})",
            hint="save it with np.savez(path, x=features, y=labels), numeric arrays only.",
        ) from exc


def _archive_inputs(path: Path, archive: Any) -> Any:
    """The inputs of an .npz: its array ``x``, or its arrays ``x.<name>`` as a mapping (``x.input_ids``,
    ``x.attention_mask``: what the model takes as keywords); None when it has neither; both is an error."""
    named = {key.removeprefix("x."): archive[key] for key in archive.files if key.startswith("x.")}
    if "x" in archive.files and named:
        raise DataError(
            f"{path} holds both 'x' and named inputs {sorted(named)}", hint="keep one: x, or x.<name> arrays."
        )
    return archive["x"] if "x" in archive.files else (named or None)


def _read_archive(path: Path, archive: Any) -> tuple[Any, Any]:
    """``x`` (or the ``x.<name>`` mapping, :func:`_archive_inputs`) and ``y`` of an .npz."""
    inputs = _archive_inputs(path, archive)
    for key, missing in (("x", inputs is None), ("y", "y" not in archive.files)):
        if missing:
            raise DataError(
                f"{path} has no array {key!r} (it holds {archive.files})",
                hint="save it with np.savez(path, x=features, y=labels), or a mapping of inputs as "
                "np.savez(path, **{'x.input_ids': ids, 'x.attention_mask': mask}, y=labels).",
            )
    return inputs, archive["y"]


def _read_unlabeled(config: RunConfig) -> Any:
    """``data.unlabeled``: a .npy of rows, or a .npz whose array ``x`` holds them, or whose arrays ``x.<name>``
    (``x.input_ids``, ``x.attention_mask``) hold token rows as the splits' .npz do (None when not set)."""
    if config.data.unlabeled is None:
        return None
    path = config.resolve(config.data.unlabeled)
    if path.suffix.lower() == ".npy":
        return _read_npy(path, "unlabeled rows")
    try:
        with np.load(path, allow_pickle=False) as archive:
            inputs = _archive_inputs(path, archive)
            if inputs is None:
                raise DataError(
                    f"{path} has neither an array 'x' nor named inputs 'x.<name>' (it holds {archive.files})",
                    hint="save the unlabeled rows with np.savez(path, x=features), or token rows with "
                    "np.savez(path, **{'x.input_ids': ids, 'x.attention_mask': mask}).",
                )
            return inputs
    except (ValueError, OSError) as exc:
        raise DataError(
            f"{path} is not a readable .npz of plain arrays ({exc})", hint="np.savez(path, x=rows)."
        ) from exc


def _load_data(config: RunConfig) -> dict[str, tuple[Any, Any] | None]:
    """The config's data as (x, y) arrays per split; the pipeline checks them as the run's task reads them."""
    if config.data.dataset is not None:
        from kdistill.datasets import load_dataset

        dataset = load_dataset(config.data.dataset, config.seed)
        raw: dict[str, Any] = {"train": dataset.train, "val": dataset.val, "test": dataset.test}
    else:
        raw = {name: _read_split(config, name) for name in ("train", "val", "test")}
    return raw


# ---------------------------------------------------------------------------------------------------- teacher


def _build_teacher(config: RunConfig, train: Split, verbose: bool) -> Teacher:
    recipe = TEACHER_RECIPES[config.teacher.kind]
    context = {
        "seed": config.seed,
        "factory": None
        if config.teacher.factory is None
        else import_reference(config.teacher.factory, base=config.base, field="teacher.factory"),
        "path": None if config.teacher.path is None else config.resolve(config.teacher.path),
        "output": config.teacher.output,
        "verbose": verbose,
    }
    try:
        built = recipe.build(dict(config.teacher.params), train, context)
    except KdistillError:
        raise
    except (ValueError, TypeError, RuntimeError) as exc:
        raise TeacherError(
            f"teacher kind {config.teacher.kind!r} with params {config.teacher.params} failed to build: {exc}",
            hint="check teacher.params (their names and values); `kdistill list teachers` says what each kind takes.",
        ) from exc
    return as_teacher(built)
