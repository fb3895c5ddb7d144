"""Optional dependencies of the compress package, imported on first use with an error that names the extra."""

from __future__ import annotations

import importlib
from types import ModuleType

from kdistill.errors import DependencyError

_EXTRAS = {
    "onnx": "onnx",
    "onnxruntime": "onnx",
    "onnxruntime.quantization": "onnx",
    "onnxruntime.quantization.shape_inference": "onnx",
    "torch_pruning": "prune",
    "matplotlib": "report",
    "matplotlib.pyplot": "report",
}


def require(module: str) -> ModuleType:
    """Import ``module`` or raise :class:`DependencyError` saying which kdistill extra brings it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra = _EXTRAS.get(module, module)
        raise DependencyError(
            f"this feature needs the {module.split('.')[0]!r} package, which is not installed ({exc})",
            hint=f"pip install 'kdistill[{extra}]'",
        ) from exc
