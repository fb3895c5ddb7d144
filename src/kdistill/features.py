"""Capturing intermediate outputs of a module by path (``"layer3"``, ``"encoder.blocks.2"``) with forward hooks."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from kdistill.errors import StudentError

__all__ = ["capture_features", "module_paths"]


def module_paths(module: nn.Module) -> list[str]:
    """Every named submodule path of ``module``, in definition order (the names feature methods accept)."""
    return [name for name, _ in module.named_modules() if name]


@contextmanager
def capture_features(module: nn.Module, names: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, each forward pass of ``module`` fills the yielded dict with ``{path: output}``.

    A wrong path raises :class:`StudentError` listing the valid ones. Tuple outputs keep their first element (the
    hidden state, for most transformer blocks).
    """
    captured: dict[str, torch.Tensor] = {}
    if not names:
        yield captured
        return
    modules = dict(module.named_modules())
    missing = [name for name in names if name not in modules or not name]
    if missing:
        raise StudentError(
            f"no module named {missing} in {type(module).__name__}",
            hint=f"valid names: {module_paths(module)}",
        )

    def _hook(name: str) -> Callable[[nn.Module, object, object], None]:
        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            captured[name] = output[0] if isinstance(output, (tuple, list)) else output  # type: ignore[assignment]

        return hook

    handles = [modules[name].register_forward_hook(_hook(name)) for name in names]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()
