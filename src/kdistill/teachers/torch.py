"""A PyTorch module as a teacher."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from kdistill.errors import TeacherError
from kdistill.features import capture_features
from kdistill.teachers.base import Outputs, TeacherBase, probs_to_logits
from kdistill.teachers.registry import register_adapter

__all__ = ["TorchTeacher"]


def _is_module(obj: object) -> bool:
    return isinstance(obj, nn.Module)


@register_adapter(
    "torch",
    "a torch.nn.Module: eval mode, inference_mode, named features via forward hooks",
    accepts=_is_module,
    order=20,
)
class TorchTeacher(TeacherBase):
    """Runs ``module`` in eval mode under ``torch.inference_mode()``.

    ``output``: ``"logits"`` (default) or ``"probs"`` when the module ends in a softmax. Named intermediate outputs are
    captured with forward hooks when a method asks for them. The module is never modified beyond ``.eval()``.
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        output: str = "logits",
        classes: np.ndarray | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        if not isinstance(module, nn.Module):
            raise TeacherError(f"expected a torch.nn.Module, got {type(module).__name__}")
        if output not in ("logits", "probs"):
            raise TeacherError(f"unknown output {output!r}", hint="use 'logits' or 'probs'.")
        self.module = module.to(device).eval()
        self.output = output
        self.device = torch.device(device)
        self.classes = None if classes is None else np.asarray(classes)
        self._num_classes: int | None = None if classes is None else len(classes)

    @property
    def num_classes(self) -> int | None:
        return self._num_classes

    def size_bytes(self) -> int | None:
        """Bytes of the module's state dict saved as safetensors."""
        from kdistill.profile import model_size_bytes

        return model_size_bytes(self.module)

    def parameter_count(self) -> int | None:
        """The module's parameters (buffers such as batch-norm statistics not counted)."""
        from kdistill.profile import count_parameters

        return count_parameters(self.module)

    def fingerprint(self) -> str:
        digest = hashlib.blake2b(digest_size=16)
        digest.update(f"{type(self.module).__qualname__}:{self.output}".encode())
        for name, tensor in self.module.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def __call__(self, x: torch.Tensor | Mapping[str, torch.Tensor], *, features: Sequence[str] = ()) -> Outputs:
        with torch.inference_mode(), capture_features(self.module, features) as captured:
            if isinstance(x, Mapping):  # a mapping of inputs goes in as keywords: model(input_ids=..., ...)
                result = self.module(**{name: value.to(self.device) for name, value in x.items()})
            else:
                result = self.module(x.to(self.device))
        logits = result.logits if hasattr(result, "logits") else result
        if not isinstance(logits, torch.Tensor) or logits.ndim < 2:
            shape = getattr(logits, "shape", None)
            raise TeacherError(
                f"the teacher module returned {type(logits).__name__} of shape {shape}; expected (batch, classes)",
                hint="return logits from forward(), or an object with a .logits tensor.",
            )
        logits = logits.float()
        if self.output == "probs":
            logits = probs_to_logits(logits)
        self._num_classes = int(logits.shape[-1])
        return Outputs(logits=logits, features=dict(captured))
