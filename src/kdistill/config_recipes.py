"""Teachers a config file can name (``teacher.kind``), in one registry: ``kdistill list teachers``.

Each entry says what the kind needs (``factory``: a ``module:attribute`` of the user's own code; ``path``: a file or
folder), which ``params`` it accepts (``None``: any, they go to the user's factory), and how to build the teacher
from the training split. Built-in recipes (``random_forest``, ``logistic_regression``, ``cnn``) are trained here on
the configured data, seeded; ``sklearn`` and ``torch`` call the user's factory; ``saved`` loads a kdistill run folder.
Other teacher kinds register here with :func:`register_teacher`.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdistill.data import Split
from kdistill.errors import ConfigError, TeacherError

__all__ = [
    "COMPRESSION_STEPS",
    "TEACHER_RECIPES",
    "CompressionRecipe",
    "TeacherRecipe",
    "import_reference",
    "register_teacher",
    "signature_params",
]


@dataclass(frozen=True)
class TeacherRecipe:
    """``build(params, train, context)`` returns a teacher object that :func:`kdistill.as_teacher` accepts.

    ``context`` holds ``seed``, ``factory`` (already imported, or None), ``path`` (resolved, or None), ``output``
    and ``verbose``. ``params``: the accepted parameter names, or None when any are passed through.
    """

    description: str
    build: Callable[[dict[str, Any], Split, dict[str, Any]], Any]
    needs: tuple[str, ...] = ()
    params: Callable[[], list[str]] | None = None


TEACHER_RECIPES: dict[str, TeacherRecipe] = {}


def register_teacher(name: str, recipe: TeacherRecipe) -> None:
    """Make ``teacher.kind: name`` valid in config files."""
    if name in TEACHER_RECIPES:
        raise ValueError(f"teacher kind {name!r} is registered twice")
    TEACHER_RECIPES[name] = recipe


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


def _random_forest(params: dict[str, Any], train: Split, context: dict[str, Any]) -> Any:
    from sklearn.ensemble import RandomForestClassifier

    settings = {"n_estimators": 200, "n_jobs": 1, "random_state": context["seed"]} | params
    return RandomForestClassifier(**settings).fit(_flat(train), _labels(train))


def _logistic_regression(params: dict[str, Any], train: Split, context: dict[str, Any]) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    settings = {"max_iter": 1000, "random_state": context["seed"]} | params
    return make_pipeline(StandardScaler(), LogisticRegression(**settings)).fit(_flat(train), _labels(train))


def _cnn_params() -> list[str]:
    return ["batch_size", "channels", "epochs", "kernel_size", "lr", "patience", "weight_decay"]


def _cnn(params: dict[str, Any], train: Split, context: dict[str, Any]) -> nn.Module:
    """A CNN trained on the hard labels with kdistill's own loop (the teacher of the MNIST-1D demo)."""
    from kdistill.engine import EarlyStopping, TrainConfig, TransferSet, fit
    from kdistill.losses import get_loss
    from kdistill.students import CNN

    settings: dict[str, Any] = {"channels": [64, 64, 64], "kernel_size": 5, "epochs": 60, "batch_size": 128}
    settings["lr"] = 1e-2
    settings |= {"weight_decay": 5e-2, "patience": 15} | params
    assert train.y is not None
    classes = int(train.y.max()) + 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(context["seed"])
        teacher = CNN(train.x.shape[1:], classes, channels=settings["channels"], kernel_size=settings["kernel_size"])
    teacher.standardize.fit(train.x)
    config = TrainConfig(
        epochs=settings["epochs"],
        batch_size=settings["batch_size"],
        lr=settings["lr"],
        weight_decay=settings["weight_decay"],
        seed=context["seed"],
        verbose=False,
    )
    fit(teacher, get_loss("ce"), TransferSet(train.x, train.y, None), config=config, callbacks=[EarlyStopping()])
    return teacher.eval()


def _user_sklearn(params: dict[str, Any], train: Split, context: dict[str, Any]) -> Any:
    from sklearn.utils.validation import check_is_fitted

    model = context["factory"](**params)
    try:
        check_is_fitted(model)
    except Exception:  # not fitted (or not an estimator: as_teacher says so later)
        if hasattr(model, "fit"):
            model.fit(_flat(train), _labels(train))
    return model


def _user_torch(params: dict[str, Any], train: Split, context: dict[str, Any]) -> Any:
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


def _saved(params: dict[str, Any], train: Split, context: dict[str, Any]) -> Any:
    from kdistill.api import load

    return load(context["path"])


def _flat(split: Split) -> Any:
    return split.x.reshape(len(split), -1).numpy()


def _labels(split: Split) -> Any:
    if split.y is None:
        raise ConfigError(
            "this teacher is trained on the data, so the training split needs labels",
            hint="add labels (y:, or the label column), or use a teacher that is already trained.",
        )
    return split.y.numpy()


def _lazy_sklearn(path: str, name: str) -> Callable[[], list[str]]:
    def names() -> list[str]:
        module = importlib.import_module(path)
        return sorted(getattr(module, name)().get_params())

    return names


register_teacher(
    "random_forest",
    TeacherRecipe(
        "a scikit-learn RandomForestClassifier (200 trees) fitted on the training split; params go to it",
        _random_forest,
        params=_lazy_sklearn("sklearn.ensemble", "RandomForestClassifier"),
    ),
)
register_teacher(
    "logistic_regression",
    TeacherRecipe(
        "StandardScaler + LogisticRegression fitted on the training split; params go to LogisticRegression",
        _logistic_regression,
        params=_lazy_sklearn("sklearn.linear_model", "LogisticRegression"),
    ),
)
register_teacher(
    "cnn",
    TeacherRecipe(
        "a 1-D/2-D CNN trained first on the hard labels (params: channels, kernel_size, epochs, lr, ...)",
        _cnn,
        params=_cnn_params,
    ),
)
register_teacher(
    "sklearn",
    TeacherRecipe(
        "your scikit-learn classifier from factory: module:attribute (fitted on the training split if unfitted)",
        _user_sklearn,
        needs=("factory",),
    ),
)
register_teacher(
    "torch",
    TeacherRecipe(
        "your trained torch.nn.Module from factory: module:attribute (path: optional .safetensors weights)",
        _user_torch,
        needs=("factory",),
    ),
)
register_teacher(
    "saved",
    TeacherRecipe(
        "a student saved by an earlier kdistill run (path: its folder)", _saved, needs=("path",), params=list
    ),
)


def signature_params(factory: Callable[..., Any]) -> list[str] | None:
    """The keyword parameters ``factory`` accepts, or None when it takes ``**kwargs`` (anything goes)."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return None
    names = []
    for name, parameter in signature.parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            return None
        if parameter.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
            names.append(name)
    return [name for name in names if name != "self"]


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
        "INT8 student.int8.onnx with ONNX Runtime (params: mode auto|dynamic|static, per_channel), after onnx",
        _quantize_step,
        params=("mode", "per_channel", "max_calibration_rows"),
        after="onnx",
    ),
}
