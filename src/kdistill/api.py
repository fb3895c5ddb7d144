"""``kdistill.distill``: teacher in, trained student and an honest report out."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_save
from torch import nn

from kdistill import defaults
from kdistill.data import Split, as_split
from kdistill.engine import EarlyStopping, ProgressBar, TrainConfig, TransferSet, fit, predict_logits
from kdistill.engine.live import Augment
from kdistill.errors import CheckpointError, LabelError, ShapeMismatchError, StudentError, TeacherError
from kdistill.evaluate import classification_metrics
from kdistill.io import atomic_write_bytes, atomic_write_json
from kdistill.losses import Loss, compose_methods, get_loss
from kdistill.profile import count_parameters, model_size_bytes, time_inference
from kdistill.report import Report
from kdistill.students import build_student, student_from_spec
from kdistill.teachers import SklearnTeacher, Teacher, as_teacher, probs_to_logits, teacher_logits

__all__ = ["DistillResult", "distill", "load"]

WEIGHTS_FILE = "student.safetensors"


@dataclass
class DistillResult:
    """What :func:`distill` returns.

    ``student``: the trained module (eval mode, best validation weights). ``history``: one dict of metrics per epoch.
    ``report``: the side-by-side :class:`~kdistill.report.Report` (None with ``report=False``). ``baseline``: the same
    student trained on hard labels only (None with ``baseline=False``). ``spec``: how to rebuild a built-in student.
    ``classes``: the label of each output column.
    """

    student: nn.Module
    history: list[dict[str, float]]
    report: Report | None
    baseline: nn.Module | None
    spec: dict[str, Any] | None
    classes: list[Any] | None
    baseline_history: list[dict[str, float]] | None = None

    def predict(self, x: Any) -> np.ndarray:
        """Predicted labels for ``x`` (in the teacher's label space when it had one)."""
        logits = predict_logits(self.student, as_split(x, name="x", labeled=False).x)
        index = logits.argmax(dim=1).numpy()
        return np.asarray(self.classes)[index] if self.classes is not None else index

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Save into folder ``path``: ``student.safetensors`` (weights, with the spec and classes as metadata),
        ``history.json`` and ``report.json``. Every file is written atomically."""
        folder = Path(path)
        save_student(self.student, folder / WEIGHTS_FILE, spec=self.spec, classes=self.classes)
        atomic_write_json(folder / "history.json", {"student": self.history, "baseline": self.baseline_history})
        if self.report is not None:
            self.report.save(folder / "report.json")
        return folder


def save_student(student: nn.Module, path: Path, *, spec: dict[str, Any] | None, classes: Sequence[Any] | None) -> Path:
    """Write ``student``'s state dict as safetensors with ``spec`` and ``classes`` as JSON metadata, atomically."""
    tensors = {name: t.detach().cpu().contiguous() for name, t in student.state_dict().items()}
    metadata = {"kdistill_spec": json.dumps(spec), "classes": json.dumps(_jsonable(classes))}
    return atomic_write_bytes(path, safetensors_save(tensors, metadata=metadata))


def _jsonable(classes: Sequence[Any] | np.ndarray | None) -> list[Any] | None:
    return None if classes is None else np.asarray(classes).tolist()


def load(path: str | os.PathLike[str], *, student: nn.Module | None = None) -> nn.Module:
    """Restore a saved student (eval mode) from a folder written by :meth:`DistillResult.save` or its weights file.

    Built-in students are rebuilt from the spec stored with the weights; for your own module, pass an instance of
    it as ``student`` and its weights are loaded into it. Nothing is unpickled. The column labels are on
    ``module.kdistill_classes``.
    """
    target = Path(path)
    weights = target / WEIGHTS_FILE if target.is_dir() else target
    if not weights.exists():
        raise CheckpointError(f"no saved student at {weights}", hint="pass the folder given to DistillResult.save.")
    try:
        with safe_open(str(weights), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 - not a dict
    except (SafetensorError, ValueError, OSError) as exc:
        raise CheckpointError(
            f"{weights} is not a readable safetensors file ({exc})",
            hint="the file is corrupt or truncated; save the student again from its run.",
        ) from exc
    spec = json.loads(metadata.get("kdistill_spec", "null"))
    if student is None:
        if spec is None:
            raise CheckpointError(
                f"{weights} holds a custom student, which cannot be rebuilt from a spec",
                hint="pass an instance of your module: kdistill.load(path, student=MyNet()).",
            )
        student = student_from_spec(spec)
    try:
        student.load_state_dict(tensors)
    except RuntimeError as exc:
        raise CheckpointError(f"the weights in {weights} do not fit {type(student).__name__}: {exc}") from exc
    student.kdistill_classes = json.loads(metadata.get("classes", "null"))
    return student.eval()


def _oof_logits(teacher: Teacher, train: Split, folds: int, seed: int) -> torch.Tensor:
    """Out-of-fold soft targets: each row labelled by a clone of the teacher fitted on the other folds."""
    from sklearn.base import clone
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    if not isinstance(teacher, SklearnTeacher):
        raise TeacherError(
            "soft_targets='oof' refits clones of the teacher, so it needs a scikit-learn teacher",
            hint="use soft_targets='predict' for this teacher.",
        )
    assert train.y is not None
    method = "predict_proba" if teacher.output == "probs" else "decision_function"
    folds_split = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    x = np.asarray(train.x.reshape(len(train.x), -1).numpy())
    scores = cross_val_predict(clone(teacher.estimator), x, train.y.numpy(), cv=folds_split, method=method)
    out = torch.as_tensor(np.asarray(scores), dtype=torch.float32)
    if method == "predict_proba":
        return probs_to_logits(out)
    return torch.stack([torch.zeros_like(out), out], dim=1) if out.ndim == 1 else out


def _check_classes(teacher: Teacher, logits: torch.Tensor, splits: Sequence[Split | None]) -> int:
    classes = int(logits.shape[1])
    if teacher.num_classes is not None and teacher.num_classes != classes:
        raise ShapeMismatchError(f"the teacher says it has {teacher.num_classes} classes but outputs {classes}")
    for split in splits:
        if split is not None and split.y is not None and int(split.y.max()) >= classes:
            raise LabelError(
                f"labels go up to {int(split.y.max())} but the teacher outputs {classes} classes",
                hint="labels must be 0..classes-1 in the teacher's output order, and the teacher must cover them all.",
            )
    return classes


def _check_student(student: nn.Module, x: torch.Tensor, classes: int) -> None:
    was_training = student.training
    student.eval()
    try:
        with torch.no_grad():
            out = student(x[:2])
    except Exception as exc:
        raise StudentError(
            f"the student failed on a batch of shape {tuple(x[:2].shape)}: {exc}",
            hint="check the student's expected input shape against the data.",
        ) from exc
    finally:
        student.train(was_training)
    if not isinstance(out, torch.Tensor) or out.shape != (len(x[:2]), classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ShapeMismatchError(
            f"the student outputs {shape} for 2 rows, but the teacher has {classes} classes: expected (2, {classes})",
            hint=f"make the student's last layer output {classes} logits.",
        )


def _model_metrics(
    name: str,
    model: Any,
    predict: Any,
    logits: torch.Tensor,
    target: torch.Tensor,
    reference: torch.Tensor,
    x: torch.Tensor,
    profile: bool,
) -> dict[str, float]:
    metrics = classification_metrics(logits, target, None if name == "teacher" else reference)
    if name == "teacher":
        metrics["agreement"] = 1.0
    if hasattr(model, "size_bytes"):  # teacher adapters that know their size (ONNX and output files, ensembles)
        size, parameters = model.size_bytes(), model.parameter_count()
    else:
        size, parameters = model_size_bytes(model), count_parameters(model)
    if parameters is not None:
        metrics["parameters"] = float(parameters)
    if size is not None:
        metrics["size_bytes"] = float(size)
    if profile:
        metrics |= time_inference(predict, x)
    return metrics


def _build_report(
    teacher: Teacher,
    student: nn.Module,
    baseline: nn.Module | None,
    split: Split,
    split_name: str,
    settings: dict[str, Any],
    profile: bool,
) -> Report:
    assert split.y is not None
    reference = teacher_logits(teacher, split.x)
    wrapped: Any = teacher.estimator if isinstance(teacher, SklearnTeacher) else getattr(teacher, "module", teacher)
    entries: list[tuple[str, Any, Any, torch.Tensor]] = [("teacher", wrapped, teacher, reference)]
    entries.append(("student", student, student, predict_logits(student, split.x)))
    if baseline is not None:
        entries.append(("baseline", baseline, baseline, predict_logits(baseline, split.x)))
    models = {
        name: _model_metrics(name, model, predict, logits, split.y, reference, split.x, profile)
        for name, model, predict, logits in entries
    }
    for metrics in models.values():
        metrics["retention"] = metrics["accuracy"] / models["teacher"]["accuracy"]
    return Report(split=split_name, rows=len(split), models=models, settings=settings)


def distill(
    teacher: Any,
    student: str | nn.Module,
    train: Any,
    *,
    val: Any = None,
    test: Any = None,
    method: str | list[str] | tuple[str, ...] | dict[str, float] | Loss = "kd",
    temperature: float = 4.0,
    soft_weight: float = 0.5,
    method_params: dict[str, Any] | None = None,
    epochs: int = defaults.EPOCHS,
    batch_size: int = defaults.BATCH_SIZE,
    lr: float = defaults.LR,
    weight_decay: float = defaults.WEIGHT_DECAY,
    patience: int | None = defaults.PATIENCE,
    seed: int = 0,
    soft_targets: str = "predict",
    oof_folds: int = 5,
    hidden: Sequence[int] | None = None,
    student_params: dict[str, Any] | None = None,
    baseline: bool = True,
    report: bool = True,
    profile: bool = True,
    num_threads: int | str = "auto",
    device: str = "cpu",
    verbose: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    cache_storage: str = "fp32",
    augment: Augment | None = None,
    prefetch_teacher: bool = False,
) -> DistillResult:
    """Distil ``teacher`` into ``student`` and report how it compares.

    Args:
        teacher: a fitted scikit-learn classifier, a ``torch.nn.Module``, or any :class:`~kdistill.Teacher`.
        student: ``"mlp"``, ``"cnn"`` (built and sized from the data) or your own ``nn.Module`` that maps a batch to
            (batch, classes) logits.
        train, val, test: ``(X, y)`` pairs (numpy, pandas or torch) or torch Datasets. Labels are the teacher's own
            (any type) for scikit-learn teachers, else class indices. ``val`` drives early stopping and restores the
            best epoch's weights (without it, all ``epochs`` run). The report is measured on ``test``, else ``val``.
        method: a registered method name (``kdistill list methods``) or a Loss object. ``temperature`` and
            ``soft_weight`` configure ``"kd"``; other methods take ``method_params``. Several methods at once: a list
            ``["kd", "fitnet"]`` or weights ``{"kd": 1.0, "fitnet": 0.5}``, with ``method_params`` keyed by method
            (``{"fitnet": {"student_layers": "layers.3"}}``); each term is logged as ``train_<method>/<term>``.
        epochs, batch_size, lr, weight_decay, patience: AdamW with warm-up and cosine decay; the defaults are
            :mod:`kdistill.defaults` (lr 3e-2, weight decay 0.1, patience 40: strongly regularised, measured in
            ``docs/defaults.md``). ``patience`` counts epochs without a better ``val`` accuracy (None: never stop).
        soft_targets: ``"predict"`` (the teacher's outputs on the training rows) or ``"oof"`` (out-of-fold outputs of
            clones of a scikit-learn teacher, for teachers that have memorised their training rows).
        baseline: also train the same student, same seed and epochs, on hard labels only, for the report.
        profile: time latency and throughput in the report (the slowest part of the report).
        num_threads: torch threads while training (``"auto"``: 1 for small students); the caller's is restored.
        cache_dir: keep the teacher's outputs on the training rows in this folder (:mod:`kdistill.cache`), keyed by
            teacher, data and storage, and reuse them in later runs. ``cache_storage``: ``"fp32"``, ``"fp16"`` or
            ``"topk:K"`` (the ``"kd"`` method then becomes ``"kd_topk"``, which reads that form exactly).
        augment: ``augment(x_batch, generator) -> x_batch``, applied to every training batch; the teacher then runs
            live on the augmented rows (no cache). ``prefetch_teacher``: run it in a background thread, one batch
            ahead. The baseline is trained with the same augmentation.

    Returns:
        A :class:`DistillResult`.
    """
    adapter = as_teacher(teacher)
    train_split = as_split(train, name="train", classes=adapter.classes)
    val_split = None if val is None else as_split(val, name="val", classes=adapter.classes)
    test_split = None if test is None else as_split(test, name="test", classes=adapter.classes)
    if soft_targets not in ("predict", "oof"):
        raise ValueError(f"soft_targets must be 'predict' or 'oof', got {soft_targets!r}")
    targets: torch.Tensor | None
    if augment is not None:  # the teacher labels each augmented batch live; a few rows tell its classes
        targets, widths = None, teacher_logits(adapter, train_split.x[:8])
    elif soft_targets == "oof":
        targets = widths = _oof_logits(adapter, train_split, oof_folds, seed)
    elif cache_dir is not None:
        from kdistill.cache import cached_teacher_outputs

        entry = cached_teacher_outputs(adapter, train_split.x, cache_dir=cache_dir, storage=cache_storage)
        targets, widths = entry.teacher_targets(), torch.empty(0, entry.classes)
    else:
        targets = widths = teacher_logits(adapter, train_split.x)
    classes = _check_classes(adapter, widths, [train_split, val_split, test_split])

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module, spec = build_student(student, train_split.x, classes, hidden=hidden, **(student_params or {}))
    _check_student(module, train_split.x, classes)
    baseline_module = copy.deepcopy(module) if baseline else None

    if cache_dir is not None and cache_storage.startswith("topk") and targets is not None:
        if method not in ("kd", "kd_topk"):
            raise ValueError(f"cache_storage={cache_storage!r} works with method 'kd' only, got {method!r}")
        method = "kd_topk"
    if isinstance(method, str):
        params = {"temperature": temperature, "soft_weight": soft_weight} if method in ("kd", "kd_topk") else {}
        loss_fn = get_loss(method, **(params | (method_params or {})))
    elif isinstance(method, (list, tuple, dict)):
        per_method = {name: dict(values) for name, values in (method_params or {}).items()}
        if "kd" in method:
            per_method["kd"] = {"temperature": temperature, "soft_weight": soft_weight} | per_method.get("kd", {})
        loss_fn = compose_methods(method, per_method)
    else:
        loss_fn = method
    config = TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        patience=patience,
        seed=seed,
        num_threads=num_threads,
        device=device,
        verbose=verbose,
    )
    val_tensors = None if val_split is None else (val_split.x, val_split.y)

    def train_one(model: nn.Module, loss: Loss, name: str, soft: torch.Tensor | None) -> list[dict[str, float]]:
        callbacks: list[Any] = [EarlyStopping(patience=patience)] if val_tensors is not None else []
        if verbose:
            callbacks.append(ProgressBar(name))
        state = fit(
            model,
            loss,
            TransferSet(train_split.x, train_split.y, soft),
            val=val_tensors,  # type: ignore[arg-type]
            config=config,
            callbacks=callbacks,
            teacher=adapter,
            augment=augment,
            prefetch_teacher=prefetch_teacher,
        )
        return state.history

    history = train_one(module, loss_fn, "distilling", targets)
    baseline_history = None
    if baseline_module is not None:
        baseline_history = train_one(baseline_module, get_loss("ce"), "baseline (no teacher)", None)

    built_report = None
    eval_split, eval_name = (test_split, "test") if test_split is not None else (val_split, "val")
    if report and eval_split is not None:
        settings = {
            "method": method if isinstance(method, (str, list, tuple, dict)) else type(method).__name__,
            "temperature": temperature,
            "soft_weight": soft_weight,
            "soft_targets": soft_targets,
            "epochs_run": len(history),
            "baseline_epochs_run": None if baseline_history is None else len(baseline_history),
            "max_epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "seed": seed,
            "train_rows": len(train_split),
            "student": spec["kind"] if spec else type(module).__name__,
            "teacher": type(getattr(adapter, "estimator", getattr(adapter, "module", adapter))).__name__,
            "loss_terms": {key[6:]: value for key, value in history[-1].items() if key.startswith("train_")},
        }
        built_report = _build_report(adapter, module, baseline_module, eval_split, eval_name, settings, profile)
    return DistillResult(
        student=module.eval(),
        history=history,
        report=built_report,
        baseline=baseline_module,
        spec=spec,
        classes=_jsonable(adapter.classes),
        baseline_history=baseline_history,
    )
