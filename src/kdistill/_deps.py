"""Optional dependencies, imported on first use with an error that names the kdistill extra bringing them."""

from __future__ import annotations

import importlib
from types import ModuleType

from kdistill.errors import DependencyError

__all__ = ["require"]

_EXTRAS = {
    "onnx": "onnx",
    "onnxruntime": "onnx",
    "torch_pruning": "prune",
    "matplotlib": "report",
    "transformers": "hf",
    "tokenizers": "hf",
    "optuna": "search",
    "sentence_transformers": "text",
    "model2vec": "text",
}


def require(module: str, purpose: str = "this feature") -> ModuleType:
    """Import ``module`` or raise :class:`DependencyError` saying what needs it (``purpose``: "static students")
    and which kdistill extra brings it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        package = module.split(".")[0]
        extra = _EXTRAS.get(package, package)
        raise DependencyError(
            f"{purpose} needs the {package!r} package, which is not installed ({exc})",
            hint=f"pip install 'kdistill[{extra}]'",
        ) from exc
