"""Shared by the adapters: telling probabilities from logits, and turning either into float32 logits."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdistill.errors import TeacherError
from kdistill.teachers.base import TeacherBase, probs_to_logits

__all__ = ["OUTPUT_KINDS", "check_output_kind", "detect_output_kind", "to_logits"]

_log = logging.getLogger("kdistill.teachers")

OUTPUT_KINDS = ("auto", "logits", "probs")
_ROW_SUM_TOLERANCE = 1e-3


def check_output_kind(output: str) -> str:
    """``output`` if it is one of :data:`OUTPUT_KINDS`, else a :class:`TeacherError` naming the valid ones."""
    if output not in OUTPUT_KINDS:
        raise TeacherError(f"unknown output kind {output!r}", hint="use 'auto', 'logits' or 'probs'.")
    return output


def detect_output_kind(values: torch.Tensor) -> str:
    """``"probs"`` when every value is in [0, 1] and every row sums to 1 (within 1e-3), else ``"logits"``.

    values: (batch, classes). A row of logits that happens to look like a distribution is rare; state the kind
    explicitly (``output="logits"``) when it is not.
    """
    if values.numel() == 0 or values.ndim < 2:
        return "logits"
    in_range = bool(((values >= 0) & (values <= 1)).all())
    sums_to_one = bool(((values.sum(dim=-1) - 1).abs() <= _ROW_SUM_TOLERANCE).all())
    return "probs" if in_range and sums_to_one else "logits"


def to_logits(values: Any, output: str, *, source: str) -> tuple[torch.Tensor, str]:
    """Float32 logits from ``values`` (numpy or torch, (batch, classes)) and the kind that was used.

    ``output="auto"`` detects the kind (:func:`detect_output_kind`) and logs it; ``"probs"`` become log-probabilities
    (:func:`~kdistill.teachers.probs_to_logits`), whose softmax gives the probabilities back.
    """
    tensor = torch.as_tensor(np.asarray(values) if not isinstance(values, torch.Tensor) else values).float()
    if tensor.ndim < 2:
        raise TeacherError(
            f"{source} returned an array of shape {tuple(tensor.shape)}; "
            "expected (batch, classes) or (batch, seq, vocab)",
            hint="return one row of class scores per input row.",
        )
    if not bool(torch.isfinite(tensor).all()) and output != "logits":
        raise TeacherError(f"{source} returned NaN or inf", hint="check the teacher on these rows.")
    kind = output
    if kind == "auto":
        kind = detect_output_kind(tensor)
        _log.info("%s: outputs look like %s (state output='logits' or 'probs' to override)", source, kind)
    return (probs_to_logits(tensor) if kind == "probs" else tensor), kind


class FileBacked(TeacherBase):
    """For teachers that live in one file (ONNX models, precomputed outputs): the report's size is the file's, the
    parameter count is unknown, and the fingerprint hashes the file's bytes behind ``_fingerprint_header()``."""

    path: Path
    _fingerprint: str | None = None

    def _fingerprint_header(self) -> str:
        raise NotImplementedError

    def size_bytes(self) -> int | None:
        """Bytes of the file, for the report."""
        return self.path.stat().st_size

    def parameter_count(self) -> int | None:
        """Unknown from the outside: None (the report shows a dash)."""
        return None

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            digest = hashlib.blake2b(digest_size=16)
            digest.update(self._fingerprint_header().encode())
            with self.path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            self._fingerprint = digest.hexdigest()
        return self._fingerprint
