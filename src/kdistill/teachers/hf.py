"""A Hugging Face transformers model (anything whose output has ``.logits``) as a teacher, loaded offline."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdistill.errors import ShapeMismatchError, TeacherError
from kdistill.features import capture_features
from kdistill.teachers._convert import check_output_kind, to_logits
from kdistill.teachers.base import Outputs
from kdistill.teachers.registry import register_adapter
from kdistill.teachers.torch import TorchTeacher

__all__ = ["MASK_FEATURE", "HFTeacher"]

_INTEGER_INPUTS = ("input_ids", "token_type_ids")
_MAPPING_INTEGERS = ("input_ids", "token_type_ids", "attention_mask", "position_ids")

MASK_FEATURE = "attention_mask"
"""A feature name the adapter answers itself: the batch's (batch, seq) attention mask (all ones without one), so a
loss that reads the teacher's features (TinyBERT's, masked) sees which positions are real tokens."""


def _attention_mask(inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    mask = inputs.get("attention_mask")
    if mask is not None:
        return mask
    ids = next(iter(inputs.values()))
    return torch.ones(ids.shape[:2], dtype=torch.long, device=ids.device)


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise TeacherError(
            "Hugging Face teachers need the transformers package",
            hint="pip install 'kdistill[hf]' (or: pip install transformers).",
        ) from exc
    return transformers


def _is_transformers_model(obj: Any) -> bool:
    return isinstance(obj, nn.Module) and type(obj).__module__.startswith("transformers.") and hasattr(obj, "config")


@register_adapter(
    "hf",
    "a Hugging Face transformers model with .logits, from a local folder or a config [hf]",
    accepts=_is_transformers_model,
    order=10,
)
class HFTeacher(TorchTeacher):
    """Runs a transformers model in eval mode under ``torch.inference_mode()`` and reads ``output.logits``.

    Each batch ``x`` (batch, *shape) is passed as the keyword ``input_name`` (``"input_ids"``: (batch, tokens), cast to
    int64 since kdistill keeps data as float32; ``"pixel_values"``, ``"inputs_embeds"``: kept float). For token ids,
    an ``attention_mask`` hides the model's ``pad_token_id`` when its config has one. Named intermediate outputs
    (``"bert.encoder.layer.0"``) are captured with forward hooks, as for any torch teacher; the feature
    ``"attention_mask"`` (:data:`MASK_FEATURE`) is the batch's mask. A mapping batch (the tokenizer's
    ``input_ids``, ``attention_mask``, ...: :func:`kdistill.text.tokenize`) is passed as keywords, ids kept int64.

    Never touches the hub: build from a local folder (:meth:`from_pretrained`) or a config (:meth:`from_config`).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        input_name: str = "input_ids",
        output: str = "logits",
        classes: np.ndarray | Sequence[Any] | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__(
            model, output="logits", classes=None if classes is None else np.asarray(classes), device=device
        )
        self.output = check_output_kind(output)
        self._kind = self.output
        self.input_name = input_name

    @classmethod
    def from_pretrained(
        cls, folder: str | os.PathLike[str], *, auto_class: str = "AutoModelForSequenceClassification", **kwargs: Any
    ) -> HFTeacher:
        """Load a saved model from a local ``folder`` (``save_pretrained`` output) with ``local_files_only=True``.

        ``auto_class``: the transformers class that builds it (any ``AutoModelFor...`` whose output has logits).
        Other keyword arguments go to :class:`HFTeacher`.
        """
        path = Path(folder)
        if not (path / "config.json").exists():
            raise TeacherError(
                f"{path} is not a saved transformers model (no config.json there)",
                hint="pass the folder written by model.save_pretrained(folder); kdistill never downloads from the hub.",
            )
        factory = getattr(_transformers(), auto_class)
        return cls(factory.from_pretrained(str(path), local_files_only=True), **kwargs)

    @classmethod
    def from_config(
        cls, config: Any, *, auto_class: str = "AutoModelForSequenceClassification", seed: int = 0, **kwargs: Any
    ) -> HFTeacher:
        """Build a freshly initialised model from a transformers config (seeded), e.g. for tests or to train later."""
        factory = getattr(_transformers(), auto_class)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = factory.from_config(config)
        return cls(model, **kwargs)

    def fingerprint(self) -> str:
        config: Any = getattr(self.module, "config", None)
        text = config.to_json_string() if config is not None and hasattr(config, "to_json_string") else ""
        digest = hashlib.blake2b(
            f"{super().fingerprint()}:{self.input_name}:{self.output}:{text}".encode(), digest_size=16
        )
        return digest.hexdigest()

    def _check_ids(self, ids: torch.Tensor) -> None:
        """Token ids the model has no embedding row or position for are a :class:`ShapeMismatchError` (rows
        tokenized with another tokenizer, or not truncated), not an index error deep inside the model."""
        get_embeddings = getattr(self.module, "get_input_embeddings", None)
        embeddings = get_embeddings() if callable(get_embeddings) else None
        rows = getattr(embeddings, "num_embeddings", None)
        if isinstance(rows, int) and ids.numel() and (int(ids.max()) >= rows or int(ids.min()) < 0):
            raise ShapeMismatchError(
                f"token id {int(ids.max()) if int(ids.max()) >= rows else int(ids.min())} is outside "
                f"{type(self.module).__name__}'s {rows} embedding rows",
                hint="tokenize the rows with the teacher's own tokenizer (kdistill.text.tokenize(texts, folder)).",
            )
        positions = getattr(getattr(self.module, "config", None), "max_position_embeddings", None)
        if isinstance(positions, int) and ids.ndim == 2 and ids.shape[1] > positions:
            raise ShapeMismatchError(
                f"rows of {ids.shape[1]} tokens are longer than {type(self.module).__name__}'s {positions} positions",
                hint=f"truncate them: kdistill.text.tokenize(texts, folder, model=teacher) cuts rows to {positions}.",
            )

    def _inputs(self, x: torch.Tensor | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if isinstance(x, Mapping):  # the tokenizer's mapping: passed as keywords, token ids and masks as int64
            inputs = {
                name: value.to(self.device).long() if name in _MAPPING_INTEGERS else value.to(self.device)
                for name, value in x.items()
            }
            if "input_ids" in inputs:
                self._check_ids(inputs["input_ids"])
            return inputs
        x = x.to(self.device)
        if self.input_name not in _INTEGER_INPUTS:
            return {self.input_name: x}
        ids = x.round().long()
        inputs = {self.input_name: ids}
        pad = getattr(getattr(self.module, "config", None), "pad_token_id", None)
        if self.input_name == "input_ids" and pad is not None:
            inputs["attention_mask"] = (ids != pad).long()
        return inputs

    def __call__(self, x: torch.Tensor | Mapping[str, torch.Tensor], *, features: Sequence[str] = ()) -> Outputs:
        inputs = self._inputs(x)
        paths = [name for name in features if name != MASK_FEATURE]
        with torch.inference_mode(), capture_features(self.module, paths) as captured:
            result = self.module(**inputs)
        if MASK_FEATURE in features:
            captured[MASK_FEATURE] = _attention_mask(inputs)
        raw = getattr(result, "logits", None)
        if not isinstance(raw, torch.Tensor):
            raise TeacherError(
                f"the transformers model {type(self.module).__name__} returned no .logits tensor",
                hint="use a model with a classification head (AutoModelForSequenceClassification, ...).",
            )
        logits, self._kind = to_logits(raw, self._kind, source=f"transformers teacher {type(self.module).__name__}")
        self._num_classes = int(logits.shape[-1])
        return Outputs(logits=logits, features=dict(captured))
