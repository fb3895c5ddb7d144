"""Teachers a config file can name (``teacher.kind``), in one registry: ``kdistill list teachers``.

A teacher kind is one builder, ``build(train, context, **params)``, registered with :func:`register_teacher`. It
returns anything :func:`kdistill.as_teacher` accepts. ``train`` is the training :class:`~kdistill.data.Split`;
``context`` holds ``seed``, ``factory`` (the user's ``module:attribute``, already imported, or None), ``path``
(resolved, or None), ``output`` and ``verbose``. The builder's keyword parameters are what ``teacher.params``
accepts (``**params``: any, passed on; ``params_of`` names the class whose signature lists them). Built-in kinds
(``random_forest``, ``logistic_regression``, ``cnn``) are trained here on the configured data, seeded; ``sklearn``
and ``torch`` call the user's factory; ``hf`` loads a transformers folder; ``saved`` loads a kdistill run folder.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from kdistill.data import Split
from kdistill.errors import ConfigError, TeacherError
from kdistill.registry import Entry, Registry, UnknownNameError, signature_params

__all__ = [
    "COMPRESSION_STEPS",
    "TEACHER_RECIPES",
    "CompressionRecipe",
    "TeacherRecipe",
    "UnknownTeacherKindError",
    "import_reference",
    "register_teacher",
    "signature_params",
]

_T = TypeVar("_T")


class UnknownTeacherKindError(UnknownNameError, ConfigError):
    """An unknown ``teacher.kind`` or teacher parameter, with the closest valid name."""


@dataclass(frozen=True)
class TeacherRecipe(Entry):
    """A registered teacher kind: ``factory(train, context, **params)`` builds it; ``needs``: the config fields it
    requires (``"factory"``, ``"path"``)."""

    needs: tuple[str, ...] = ()

    def build(self, params: dict[str, Any], train: Split, context: dict[str, Any]) -> Any:
        """The teacher object for ``params`` (``teacher.params``), trained or loaded from ``train`` and ``context``."""
        return self.factory(train, context, **params)


TEACHER_RECIPES: Registry[TeacherRecipe] = Registry(
    "teacher kind", entry_type=TeacherRecipe, skip_leading=2, error=UnknownTeacherKindError
)
"""Every teacher kind a config can name, by name."""


def register_teacher(
    name: str,
    description: str,
    *,
    needs: Sequence[str] = (),
    params_of: Callable[[], Callable[..., Any]] | None = None,
) -> Callable[[_T], _T]:
    """Decorator making ``teacher.kind: name`` valid in config files; it decorates ``build(train, context,
    **params)``. ``needs``: config fields the kind requires; ``params_of``: returns the callable whose signature
    lists the accepted params, for a builder that passes ``**params`` on."""
    return TEACHER_RECIPES.register(name, description, needs=tuple(needs), params_of=params_of)


def import_reference(reference: str, *, base: Path | None = None, field: str = "factory") -> Any:
    """Import ``module:attribute`` (the attribute may be dotted). ``base``, the config file's folder, is searched
    first, so a config next to the user's ``my_models.py`` can say ``my_models:build``. This runs the user's module:
    the same trust as running their script."""
    module_name, _, attribute = reference.partition(":")
    if not module_name or not attribute:
        raise ConfigError(
            f"{field}: {reference!r} is not a module:attribute reference",
            hint="write it as module:attribute, e.g. my_models:build_teacher (my_models.py next to the config).",
        )
    added = base is not None and str(base) not in sys.path
    if added:
        sys.path.insert(0, str(base))
    bytecode = sys.dont_write_bytecode
    sys.dont_write_bytecode = True  # no __pycache__ next to the user's module: a run writes only to its folder
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"{field}: cannot import module {module_name!r} ({exc})",
            hint="put the module next to the config file or on PYTHONPATH, and check its spelling.",
        ) from exc
    finally:
        sys.dont_write_bytecode = bytecode
        if added:
            sys.path.remove(str(base))
    for part in attribute.split("."):
        if not hasattr(target, part):
            import difflib

            names = [name for name in dir(target) if not name.startswith("_")]
            close = difflib.get_close_matches(part, names, n=1)
            raise ConfigError(
                f"{field}: module {module_name!r} has no attribute {part!r}",
                hint=(f"did you mean {close[0]!r}? " if close else "") + f"names there: {', '.join(names[:20])}",
            )
        target = getattr(target, part)
    return target


def _random_forest_class() -> Any:
    from sklearn.ensemble import RandomForestClassifier

    return RandomForestClassifier


def _logistic_regression_class() -> Any:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression


@register_teacher(
    "random_forest",
    "a scikit-learn RandomForestClassifier (200 trees) fitted on the training split; params go to it",
    params_of=_random_forest_class,
)
def _random_forest(train: Split, context: dict[str, Any], **params: Any) -> Any:
    settings = {"n_estimators": 200, "n_jobs": 1, "random_state": context["seed"]} | params
    return _random_forest_class()(**settings).fit(_flat(train), _labels(train))


@register_teacher(
    "logistic_regression",
    "StandardScaler + LogisticRegression fitted on the training split; params go to LogisticRegression",
    params_of=_logistic_regression_class,
)
def _logistic_regression(train: Split, context: dict[str, Any], **params: Any) -> Any:
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    settings = {"max_iter": 1000, "random_state": context["seed"]} | params
    model = make_pipeline(StandardScaler(), _logistic_regression_class()(**settings))
    return model.fit(_flat(train), _labels(train))


@register_teacher("cnn", "a 1-D/2-D CNN trained first on the hard labels (the teacher of the MNIST-1D demo)")
def _cnn(
    train: Split,
    context: dict[str, Any],
    *,
    channels: Sequence[int] = (64, 64, 64),
    kernel_size: int = 5,
    epochs: int = 60,
    batch_size: int = 128,
    lr: float = 1e-2,
    weight_decay: float = 5e-2,
    patience: int | None = 15,
) -> nn.Module:
    """A CNN trained on the hard labels with kdistill's own loop. It is given no validation rows, so ``patience``
    (early stopping) has no effect yet; it is accepted so configs written for it stay valid."""
    from kdistill.engine import EarlyStopping, TrainConfig, TransferSet, fit
    from kdistill.losses import get_loss
    from kdistill.students import CNN

    labels = _labels(train)
    classes = int(labels.max()) + 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(context["seed"])
        teacher = CNN(train.x.shape[1:], classes, channels=list(channels), kernel_size=kernel_size)
    teacher.standardize.fit(train.x)
    config = TrainConfig(
        epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=context["seed"], verbose=False
    )
    assert train.y is not None
    stopping = EarlyStopping(patience=patience)
    fit(teacher, get_loss("ce"), TransferSet(train.x, train.y, None), config=config, callbacks=[stopping])
    return teacher.eval()


@register_teacher(
    "sklearn",
    "your scikit-learn classifier from factory: module:attribute (fitted on the training split if unfitted)",
    needs=("factory",),
)
def _user_sklearn(train: Split, context: dict[str, Any], **params: Any) -> Any:
    from sklearn.utils.validation import check_is_fitted

    model = context["factory"](**params)
    try:
        check_is_fitted(model)
    except Exception:  # not fitted (or not an estimator: as_teacher says so later)
        if hasattr(model, "fit"):
            model.fit(_flat(train), _labels(train))
    return model


@register_teacher(
    "torch",
    "your trained torch.nn.Module from factory: module:attribute (path: optional .safetensors weights)",
    needs=("factory",),
)
def _user_torch(train: Split, context: dict[str, Any], **params: Any) -> Any:
    from kdistill.teachers import TorchTeacher

    module = context["factory"](**params)
    if not isinstance(module, nn.Module):
        raise TeacherError(
            f"teacher.factory returned a {type(module).__name__}, not a torch.nn.Module",
            hint="return the (trained) module from the factory, or use kind: sklearn for scikit-learn models.",
        )
    if context["path"] is not None:
        from safetensors.torch import load_file

        module.load_state_dict(load_file(str(context["path"])))
    output = "logits" if context["output"] == "auto" else context["output"]
    return TorchTeacher(module, output=output)


@register_teacher(
    "hf",
    "a Hugging Face model from a local folder (path: save_pretrained output), never downloaded; serves the "
    "attention mask and hidden states the TinyBERT losses read [hf]",
    needs=("path",),
)
def _hf(train: Split, context: dict[str, Any], *, auto_class: str = "AutoModelForSequenceClassification") -> Any:
    """:meth:`kdistill.teachers.HFTeacher.from_pretrained` of ``path`` (``local_files_only``). ``auto_class``: the
    transformers class that loads it (any ``AutoModelFor...`` whose output has ``.logits``)."""
    from kdistill.teachers import HFTeacher

    output = "logits" if context["output"] == "auto" else context["output"]
    return HFTeacher.from_pretrained(context["path"], auto_class=auto_class, output=output)


@register_teacher(
    "sentence",
    "a sentence encoder (task embedding): path a local sentence-transformers folder, none the bundled MiniLM [text]",
)
def _sentence(train: Split, context: dict[str, Any]) -> Any:
    from kdistill.sentences import BUNDLED_TEACHER, load_sentence_teacher

    return load_sentence_teacher(context["path"] if context["path"] is not None else BUNDLED_TEACHER)


@register_teacher("saved", "a student saved by an earlier kdistill run (path: its folder)", needs=("path",))
def _saved(train: Split, context: dict[str, Any]) -> Any:
    from kdistill.api import load

    return load(context["path"])


def _flat(split: Split) -> Any:
    return split.x.reshape(len(split), -1).numpy()


def _labels(split: Split) -> Any:
    if split.stream is not None:
        raise ConfigError(
            "this teacher kind is fitted on the training rows, which are streamed (read batch by batch)",
            hint="use a trained teacher (kind torch, hf, onnx, saved, or a fitted sklearn factory), or load the rows "
            "in memory (data.train.stream: false).",
        )
    if split.y is None:
        raise ConfigError(
            "this teacher is trained on the data, so the training split needs labels",
            hint="add labels (y:, or the label column), or use a teacher that is already trained.",
        )
    return split.y.numpy()


@dataclass(frozen=True)
class CompressionRecipe:
    """A step of a config's ``compression`` list, run on the trained student in order. ``apply(student, params,
    context)`` writes into ``context["folder"]`` and returns what it measured (JSON-able); ``context`` also holds
    ``train_x`` (sample and calibration rows) and ``done`` (earlier steps' results, by name). ``after``: a step
    that must come earlier in the list."""

    description: str
    apply: Callable[[nn.Module, dict[str, Any], dict[str, Any]], dict[str, Any]]
    params: tuple[str, ...] = ()
    after: str | None = None


def _onnx_step(student: nn.Module, params: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    from kdistill.compress import export_onnx

    exported = export_onnx(student, context["train_x"], context["folder"] / "student.onnx", **params)
    return exported.to_dict()


def _quantize_step(student: nn.Module, params: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    from kdistill.compress import quantize_onnx

    source = Path(context["done"]["onnx"]["path"])
    target = context["folder"] / "student.int8.onnx"
    return quantize_onnx(source, target, calibration_rows=context["train_x"], **params).to_dict()


COMPRESSION_STEPS: dict[str, CompressionRecipe] = {
    "onnx": CompressionRecipe(
        "export to student.onnx, checked against PyTorch (params: tolerance, opset; needs kdistill[onnx])",
        _onnx_step,
        params=("tolerance", "opset", "check_rows"),
    ),
    "quantize": CompressionRecipe(
        "INT8 student.int8.onnx with ONNX Runtime (params: mode auto|dynamic|static, per_channel, reduce_range), "
        "after onnx",
        _quantize_step,
        params=("mode", "per_channel", "reduce_range", "max_calibration_rows"),
        after="onnx",
    ),
}
