"""``kdistill.distill``: teacher in, trained student and an honest report out.

A thin front end: it turns its arguments into a :class:`~kdistill.pipeline.RunSpec` (the settings validated by the
same model as a YAML config) and runs it through :func:`kdistill.pipeline.execute`, the one path every run takes.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from kdistill import defaults
from kdistill.config import validate_settings, validate_soft_targets
from kdistill.engine.live import Augment
from kdistill.errors import ConfigError
from kdistill.losses import Loss
from kdistill.pipeline import RunSpec, _oof_logits, execute
from kdistill.result import WEIGHTS_FILE, DistillResult, load, save_student
from kdistill.teachers import as_teacher

__all__ = ["WEIGHTS_FILE", "DistillResult", "distill", "load", "save_student"]

_oof_logits = _oof_logits  # re-exported for the tests of out-of-fold targets

_ARGUMENT_PATHS: dict[str, tuple[str, ...]] = {
    "epochs": ("train", "epochs"),
    "batch_size": ("train", "batch_size"),
    "lr": ("train", "optimizer", "lr"),
    "weight_decay": ("train", "optimizer", "weight_decay"),
    "patience": ("train", "patience"),
    "seed": ("seed",),
    "task": ("task",),
    "num_threads": ("device", "num_threads"),
    "device": ("device", "type"),
    "cache_dir": ("cache", "dir"),
    "cache_storage": ("cache", "storage"),
    "baseline": ("report", "baseline"),
    "report": ("report", "enabled"),
    "profile": ("report", "profile"),
    "max_steps": ("train", "max_steps"),
    "on_policy": ("on_policy",),
}
"""Where each of distill()'s own arguments lives in the settings (the YAML layout)."""

_API_DEFAULTS: dict[str, Any] = {
    "device": {"type": "cpu"},
    "report": {"profile": True},
    "logging": {"console": False, "progress": True},
}
"""Where the Python API's defaults differ from a config file's: the CPU unless told (a config says ``auto``), the
report times the models, and the progress bar replaces the per-epoch console line."""


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _lookup(tree: Mapping[str, Any], path: tuple[str, ...]) -> tuple[bool, Any]:
    node: Any = tree
    for part in path:
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


_KD_DEFAULTS = {"temperature": 4.0, "soft_weight": 0.5}
"""``kd``'s (and ``kd_topk``'s) temperature and soft weight when distill() is not given them."""


def _accepts(method: str, name: str) -> bool:
    """Whether the registered method ``method`` takes the hyper-parameter ``name`` (an unknown method is left to the
    settings' validation, which names the closest one)."""
    from kdistill.losses.base import LOSSES

    if method not in LOSSES:
        return True
    params = LOSSES.params(method)
    return params is None or name in params


def _method_terms(
    method: Any, temperature: float | None, soft_weight: float | None, method_params: Mapping[str, Any] | None
) -> list[dict[str, Any]] | None:
    """``method`` as the list of terms a config holds (None for a Loss object). ``temperature`` and
    ``soft_weight`` (None: not given) go to ``kd``/``kd_topk`` (defaults 4 and 0.5), to ``regression_kd`` (the soft
    weight) and to any other single method that takes them (the token divergences, dkd, the multi-teacher methods:
    each with its own defaults); given to a method that does not take them, they are an error rather than ignored.
    In a composition they configure its ``kd`` term."""
    given = {
        name: value for name, value in (("temperature", temperature), ("soft_weight", soft_weight)) if value is not None
    }
    if isinstance(method, str):
        if method in ("kd", "kd_topk"):
            own = _KD_DEFAULTS | given
        else:
            refused = [name for name in given if not _accepts(method, name)]
            if refused:
                raise ConfigError(
                    f"method {method!r} has no {' or '.join(refused)}, but distill() was given "
                    + ", ".join(f"{name}={given[name]}" for name in refused),
                    hint=f"drop {'= and '.join(refused)}=, or pass what {method!r} takes as method_params={{...}} "
                    "(`kdistill list methods` shows each method's settings).",
                )
            own = given
        return [{"name": method, "params": own | dict(method_params or {})}]
    if isinstance(method, (list, tuple, dict)):
        per_method = {name: dict(values) for name, values in (method_params or {}).items()}
        stray = sorted(set(per_method) - set(method))
        if stray:
            raise ConfigError(
                f"method_params for {stray}, which are not among the methods {sorted(method)}",
                hint="key method_params by the method names you compose.",
            )
        if "kd" in method:
            per_method["kd"] = _KD_DEFAULTS | given | per_method.get("kd", {})
        elif given:
            raise ConfigError(
                f"{', '.join(f'{name}={value}' for name, value in given.items())} configure the 'kd' term, but the "
                f"composed methods {sorted(method)} have none",
                hint="give each method its settings as method_params={name: {...}}.",
            )
        weights = dict(method) if isinstance(method, dict) else dict.fromkeys(method, 1.0)
        return [
            {"name": name, "weight": weight, "params": per_method.get(name, {})} for name, weight in weights.items()
        ]
    return None


def _method_knobs(terms: Sequence[Any]) -> dict[str, Any]:
    """The report's ``temperature`` and ``soft_weight``: those of the first of the validated method ``terms`` that
    sets them."""
    for term in terms:
        knobs = {name: term.params[name] for name in ("temperature", "soft_weight") if name in term.params}
        if knobs:
            return knobs
    return {}


def _settings_from_arguments(
    settings: Mapping[str, Any] | None,
    *,
    method: Any,
    temperature: float | None,
    soft_weight: float | None,
    method_params: Mapping[str, Any] | None,
    flat: Mapping[str, Any],
) -> dict[str, Any]:
    """distill()'s arguments as settings in the YAML layout: the API's defaults, then ``settings``, then every
    argument that is not at its default (one that ``settings`` sets to another value is an error)."""
    given = dict(settings or {})
    merged = _merge(_API_DEFAULTS, given)
    defaults_of = _argument_defaults()
    for name, value in flat.items():
        path = _ARGUMENT_PATHS[name]
        if value == defaults_of[name]:
            if not _lookup(given, path)[0]:
                merged = _merge(merged, _nested(path, value))
            continue
        present, other = _lookup(given, path)
        if present and other != value:
            raise ConfigError(
                f"{name}={value!r} and settings {'.'.join(path)}={other!r} disagree",
                hint=f"set it in one place: drop {name}= or the settings entry.",
            )
        merged = _merge(merged, _nested(path, value))
    terms = _method_terms(method, temperature, soft_weight, method_params)
    default_method = method == "kd" and temperature is None and soft_weight is None and not method_params
    if terms is not None and not ("method" in given and default_method):
        if "method" in given:
            raise ConfigError(
                "the method is given twice: as method= (with temperature, soft_weight, method_params) and in settings",
                hint="set it in one place.",
            )
        merged["method"] = terms
    return merged


def _nested(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    tree: Any = value
    for part in reversed(path):
        tree = {part: tree}
    return tree


REGRESSION_KD = "regression_kd"
"""The method a regression run takes when ``method`` is left at ``"kd"``."""


def _is_regressor(teacher: Any) -> bool:
    """Whether ``teacher`` is a scikit-learn-style regressor (``is_regressor``; XGBoost's and LightGBM's too), or an
    adapter around one."""
    from kdistill.teachers import SklearnTeacher
    from kdistill.teachers.sklearn import is_regressor

    if isinstance(teacher, SklearnTeacher):
        return teacher.output == "predict"
    return hasattr(teacher, "fit") and hasattr(teacher, "predict") and is_regressor(teacher)


def _regression_defaults(teacher: Any, task: str, method: Any, settings: Mapping[str, Any] | None) -> tuple[str, Any]:
    """``(task, method)`` after the regression defaults: a regressor teacher with ``task`` left at its default (and
    no task in ``settings``) makes the task ``"regression"``; a regression run with ``method`` left at ``"kd"``
    distils with ``"regression_kd"`` (``soft_weight`` carried over)."""
    if task == "classification" and "task" not in (settings or {}) and _is_regressor(teacher):
        task = "regression"
    resolved = (settings or {}).get("task", task)
    if resolved == "regression" and method == "kd" and "method" not in (settings or {}):
        method = REGRESSION_KD
    return task, method


def _argument_defaults() -> dict[str, Any]:
    import inspect

    parameters = inspect.signature(distill).parameters
    return {name: parameters[name].default for name in _ARGUMENT_PATHS}


def distill(
    teacher: Any,
    student: str | nn.Module,
    train: Any,
    *,
    val: Any = None,
    test: Any = None,
    method: str | list[str] | tuple[str, ...] | dict[str, float] | Loss = "kd",
    task: str = "classification",
    temperature: float | None = None,
    soft_weight: float | None = None,
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
    unlabeled: Any = None,
    transfer: Any = None,
    settings: Mapping[str, Any] | None = None,
    out: str | os.PathLike[str] | None = None,
    resume: bool = False,
    stream: bool = False,
    stream_rows: int | None = None,
    budget: Mapping[str, Any] | None = None,
    search: Mapping[str, Any] | None = None,
    tokenizer: Any = None,
    max_length: int | None = None,
    max_steps: int | None = None,
    on_policy: Mapping[str, Any] | None = None,
) -> DistillResult:
    """Distil ``teacher`` into ``student`` and report how it compares.

    Args:
        teacher: a fitted scikit-learn classifier or regressor, a ``torch.nn.Module``, or any
            :class:`~kdistill.Teacher`.
        student: ``"mlp"``, ``"cnn"`` (built and sized from the data) or your own ``nn.Module`` that maps a batch to
            (batch, classes) logits; ``"auto"`` searches the registered families for the most accurate student
            inside ``budget`` (``{"max_params", "max_bytes", "max_latency_ms", "threads"}``), tuning the
            temperature, soft weight and learning rate too, with ``search`` (``{"trials", "timeout_s", "epochs",
            "storage", ...}``, docs/search.md); the chosen student is then trained fully and reported, and
            ``result.report.search`` holds every trial, the Pareto fronts and the one-line answer.
        train, val, test: ``(X, y)`` pairs (numpy, pandas or torch) or torch Datasets. Labels are the teacher's own
            (any type) for scikit-learn teachers, else class indices. ``val`` drives early stopping and restores the
            best epoch's weights (without it, all ``epochs`` run). The report is measured on ``test``, else ``val``.
        task: what the outputs are (:mod:`kdistill.tasks`): ``"classification"`` ((batch, classes) logits and
            labels), ``"embedding"`` ((batch, dim) embeddings, no labels: methods ``"cosine"``/``"mse"``; validation
            and the report measure the cosine similarity to the teacher's), or ``"token_lm"`` (``train`` holds
            (rows, seq) token ids; next-token targets are derived from them; (batch, seq, vocab) logits; per-token
            ``"kd"``; validation by perplexity), or ``"regression"`` ((batch, outputs) predictions, real targets
            standardised inside the run; chosen by itself when ``teacher`` is a scikit-learn regressor; method
            ``"regression_kd"``, ``soft_weight`` its teacher term's weight; docs/regression.md).
        method: a registered method name (``kdistill list methods``) or a Loss object. ``temperature`` and
            ``soft_weight``, when given, configure the method if it takes them (``"kd"`` defaults to 4 and 0.5, the
            token divergences to 1 and 0.5, each method to its own); one that does not take them is an error, not
            an ignored argument. Other settings go in ``method_params``. Several methods at once: a list
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
        unlabeled: rows without labels (rows, *features), the training rows' columns: the teacher labels them
            (through the cache), and the student learns from them with the labelled rows; the soft term uses every
            row, the hard term only the labelled ones (``docs/scarce_labels.md``). The baseline sees only ``train``.
            For a transformer teacher: a list of raw strings (tokenized with ``tokenizer=`` and ``max_length`` as
            the splits are) or a mapping with the training rows' keys (``input_ids``, ``attention_mask``);
            docs/transformers.md, "Unlabeled texts".
        transfer: generated rows for the teacher to label (:mod:`kdistill.transfer`): a ``Transfer(generator,
            mode="pool", rows=50_000)``, a generator (``Munge()``, ``Mixup()``, ``Jitter()``, ``ClassGaussian()``:
            a pool of 10x the training rows), a registered name, or the mapping a config's ``transfer:`` holds.
        settings: anything else a YAML run can set, in the same layout (``docs/config.md``): ``{"train":
            {"optimizer": {"name": "sgd", "momentum": 0.9}, "schedule": {"name": "constant"}}, "device":
            {"precision": "bf16"}, "logging": {"tensorboard": True}, "compression": [{"name": "onnx"}]}``. It is
            validated by the same model as a config file, so a bad value gets the same error; an argument above that
            is left at its default does not override it, one set to another value that ``settings`` also sets is an
            error.
        out: a run folder: checkpoints every epoch, metrics.jsonl, the teacher-output cache (``<out>/cache``), and
            at the end the student, history and report, as ``kdistill run`` writes them. ``resume=True`` continues
            the run in ``out`` from its last checkpoint (same arguments and data, else a CheckpointError).
        stream: read ``train`` (a torch ``Dataset``) batch by batch instead of loading it into memory, for a
            transfer set too large to hold; the teacher then runs live on each batch (nothing is cached), and a
            sample of 2,048 evenly spaced rows sizes the student and fits its input standardisation. An
            ``IterableDataset`` always streams; ``stream_rows`` gives its items per epoch when it has no ``len()``.
            Labels must be class indices. ``val``/``test`` stay in memory.
        tokenizer: a tokenizer (or its local folder) for raw text: ``train``/``val``/``test`` X given as lists of
            strings are tokenized into ``input_ids``/``attention_mask`` (:func:`kdistill.text.tokenize_splits`;
            truncated to the teacher's positions, or ``max_length``, with one warning). ``student="transformer"``
            with a transformers teacher builds the student from it (``student_params``: ``layers``, ``layer_map``,
            ``hidden_size``; docs/transformers.md).
        max_steps: train exactly that many optimizer steps instead of ``epochs`` passes (the schedule by step;
            ``settings={"train": {"eval_every_steps": N}}`` validates every N steps; docs/lm.md).
        on_policy: GKD's on-policy data for ``task="token_lm"``: ``{"student_share": λ, "prompt_length": P}``
            (optionally ``temperature``, ``seed``): with probability λ a step's batch is the student's own
            continuations of its first P tokens, labelled by the live teacher (docs/lm.md).

    Returns:
        A :class:`DistillResult`.
    """
    task, method = _regression_defaults(teacher, task, method, settings)
    teacher, method = _sentence_defaults(teacher, task, method, settings)
    settings_dict = _settings_from_arguments(
        settings,
        method=method,
        temperature=temperature,
        soft_weight=soft_weight,
        method_params=method_params,
        flat={
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "weight_decay": weight_decay,
            "patience": patience,
            "seed": seed,
            "task": task,
            "num_threads": num_threads,
            "device": device,
            "cache_dir": None if cache_dir is None else os.fspath(cache_dir),
            "cache_storage": cache_storage,
            "baseline": baseline,
            "report": report,
            "profile": profile,
            "max_steps": max_steps,
            "on_policy": None if on_policy is None else dict(on_policy),
        },
    )
    validated = validate_settings(settings_dict)
    targets = validate_soft_targets(soft_targets, oof_folds)
    adapter = as_teacher(teacher)
    student_params = dict(student_params or {})
    if hidden is not None:
        student_params["hidden"] = hidden
    folder = None if out is None else Path(out)
    identity: dict[str, Any] = {}
    if folder is not None:  # what a resume must match besides the settings and the data
        student_id = student if isinstance(student, str) else type(student).__name__
        identity = {"teacher": adapter.fingerprint(), "student": {"kind": student_id, "params": repr(student_params)}}
        if unlabeled is not None:
            identity["unlabeled"] = True  # its rows are in the data fingerprint
    train, val, test, student, student_params, unlabeled = _transformer_inputs(
        adapter, student, student_params, (train, val, test), tokenizer, max_length, unlabeled
    )
    if _is_sentence_teacher(adapter):
        cache_root = validated.cache.dir if validated.cache.dir is not None else (folder and folder / "cache")
        train, val, test, student, student_params = _sentence_inputs(
            adapter, student, student_params, (train, val, test), cache_root
        )
    spec = RunSpec(
        settings=validated,
        train=train,
        val=val,
        test=test,
        teacher=adapter,
        student=student,
        student_params=student_params,
        soft_targets=targets.soft_targets,
        oof_folds=targets.oof_folds,
        loss=None if isinstance(method, (str, list, tuple, dict)) else method,
        augment=augment,
        prefetch_teacher=prefetch_teacher,
        out=folder,
        resume=resume,
        stream=stream,
        stream_rows=stream_rows,
        verbose=verbose,
        identity=identity,
        report_settings=_method_knobs(validated.method),
        unlabeled=unlabeled,
        transfer=transfer,
    )
    if isinstance(student, str) and student == "auto":
        from kdistill.config import validate_search
        from kdistill.search import search_and_distill

        return search_and_distill(spec, validate_search(dict(budget or {}), dict(search or {})))
    elif budget is not None or search is not None:
        raise ConfigError(
            f"budget= and search= are for student='auto' (a student search), but student is {student!r}",
            hint="pass student='auto' to search under the budget, or drop budget= and search=.",
        )
    return execute(spec)  # under torchrun: on every rank, the report and the run folder's files on rank 0 only


def _is_sentence_teacher(teacher: Any) -> bool:
    from kdistill.teachers.sentence import SentenceTeacher

    return isinstance(teacher, SentenceTeacher)


def _sentence_defaults(teacher: Any, task: str, method: Any, settings: Mapping[str, Any] | None) -> tuple[Any, Any]:
    """A sentence-encoder teacher given as a folder (or ``"minilm"``) with ``task="embedding"`` is loaded; its
    default method is ``"cosine"`` (``"kd"`` means nothing for embeddings) unless ``settings`` names one."""
    from kdistill.sentences import load_sentence_teacher

    if task != "embedding":
        return teacher, method
    if isinstance(teacher, (str, os.PathLike)):
        teacher = load_sentence_teacher(teacher)
    if _is_sentence_teacher(teacher) and method == "kd" and "method" not in (settings or {}):
        method = "cosine"
    return teacher, method


def _sentence_inputs(
    teacher: Any,
    student: Any,
    student_params: dict[str, Any],
    splits: tuple[Any, Any, Any],
    cache_dir: Any,
) -> tuple[Any, Any, Any, Any, dict[str, Any]]:
    """Sentences as the teacher's token ids, and ``student="static"``/``"transformer"`` as its builder
    (:mod:`kdistill.sentences`); inputs that are not text, and your own student module, come back as they are."""
    from kdistill.sentences import is_sentences, sentence_split, sentence_student

    names = ("train", "val", "test")
    texts = [value[0] if _is_text_pair(value) else value for value in splits]
    converted = [
        sentence_split(teacher, value, name) if value is not None and is_sentences(value) else original
        for name, value, original in zip(names, texts, splits, strict=True)
    ]
    if isinstance(student, str):  # a registered name: only the two a sentence teacher builds
        if not is_sentences(texts[0]):
            from kdistill.errors import DataError

            raise DataError(
                f"student {student!r} of a sentence teacher is built from the training sentences, but train is a "
                f"{type(splits[0]).__name__}",
                hint="pass train as a list of sentences (strings).",
            )
        built = sentence_student(student, teacher, list(texts[0]), student_params, cache_dir=cache_dir)
        return converted[0], converted[1], converted[2], built, {}
    return converted[0], converted[1], converted[2], student, student_params


def _is_text_pair(value: Any) -> bool:
    from kdistill.sentences import is_sentences

    return isinstance(value, tuple) and len(value) == 2 and is_sentences(value[0]) and value[1] is None


def _transformer_inputs(
    adapter: Any,
    student: Any,
    student_params: dict[str, Any],
    splits: tuple[Any, Any, Any],
    tokenizer: Any,
    max_length: int | None,
    unlabeled: Any = None,
) -> tuple[Any, Any, Any, Any, dict[str, Any], Any]:
    """Raw strings tokenized (with ``tokenizer``), and ``student="transformer"`` built from a transformers
    teacher's own model (docs/transformers.md); anything else comes back as it is. ``unlabeled`` raw strings are
    tokenized with the splits, in the same call (same tokenizer and ``max_length``; errors name the split
    ``unlabeled``); without a tokenizer they are an error, not rows of features."""
    from kdistill.text import is_texts

    model = getattr(adapter, "module", None)
    if tokenizer is not None:
        from kdistill.text import tokenize_splits

        names = ("train", "val", "test", "unlabeled")
        prepared = tokenize_splits([*splits, unlabeled], tokenizer, model=model, max_length=max_length, names=names)
        splits, unlabeled = (prepared[0], prepared[1], prepared[2]), prepared[3]
    elif is_texts(unlabeled) and not _is_sentence_teacher(adapter):
        from kdistill.errors import DataError

        raise DataError(
            f"unlabeled= holds {len(unlabeled)} raw strings, but no tokenizer= was given to turn them into token ids",
            hint="pass tokenizer= (the teacher's folder, with its tokenizer files) so the unlabeled texts are "
            "tokenized like the training rows, or pass them already tokenized: unlabeled={'input_ids': ..., "
            "'attention_mask': ...}.",
        )
    if student == "transformer" and model is not None and student_params.get("teacher") is None:
        from kdistill.students.transformer import student_from_teacher_factory

        return (*splits, student_from_teacher_factory(model, student_params), {}, unlabeled)
    return (*splits, student, student_params, unlabeled)
