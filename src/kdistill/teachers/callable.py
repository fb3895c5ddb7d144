"""A black-box function as a teacher: a paid API, a remote model, anything that maps a batch to class scores."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file as load_numpy_file
from safetensors.numpy import save as save_numpy

from kdistill.errors import TeacherError
from kdistill.io import atomic_write_bytes
from kdistill.teachers._convert import check_output_kind, to_logits
from kdistill.teachers.base import Outputs, TeacherBase
from kdistill.teachers.registry import register_adapter

__all__ = ["CallableTeacher"]

_log = logging.getLogger(__name__)


def _row_keys(rows: np.ndarray) -> list[bytes]:
    """A 16-byte content hash per row of ``rows`` (rows, *features), the key of the journal."""
    flat = np.ascontiguousarray(rows.reshape(len(rows), -1))
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in flat]


def _is_callable(obj: object) -> bool:
    return callable(obj)


@register_adapter(
    "callable",
    "a function batch -> probabilities or logits (a remote model): batched, retried, resumable journal",
    accepts=_is_callable,
    order=90,
)
class CallableTeacher(TeacherBase):
    """Wraps ``fn(batch) -> scores``: ``batch`` is a float32 numpy array (rows, *features), ``scores`` is
    (rows, classes), probabilities or logits (``output="auto"`` detects which, once, and logs it).

    The function is called on at most ``batch_size`` rows at a time. A call that raises one of ``retry_on`` is retried
    ``retries`` times, sleeping ``backoff_s * 2**attempt`` seconds (at most ``max_backoff_s``) in between, for a
    flaky remote. With ``journal`` (a folder), every answered batch is saved there atomically, keyed by a hash of each
    row's bytes, and reloaded on the next run: a run that was interrupted and started again never asks again for a
    row already answered, and neither does a second epoch or a second call.

    ``fingerprint()`` (what the cache keys on) cannot see inside ``fn``: it hashes ``name`` (default: the function's
    qualified name) and ``version``. Change ``version`` when the model behind the function changes.
    """

    def __init__(
        self,
        fn: Callable[[np.ndarray], Any],
        *,
        name: str | None = None,
        version: str = "1",
        output: str = "auto",
        batch_size: int = 256,
        retries: int = 3,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        retry_on: tuple[type[BaseException], ...] = (Exception,),
        journal: str | Path | None = None,
        classes: Sequence[Any] | np.ndarray | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not callable(fn):
            raise TeacherError(f"expected a callable, got {type(fn).__name__}", hint="pass a function batch -> scores.")
        if batch_size < 1 or retries < 0 or backoff_s < 0:
            raise TeacherError(
                f"batch_size={batch_size}, retries={retries}, backoff_s={backoff_s}: need batch_size >= 1, "
                "retries >= 0 and backoff_s >= 0",
                hint="e.g. CallableTeacher(fn, batch_size=256, retries=3, backoff_s=0.5).",
            )
        self.fn = fn
        self.name = name or f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__name__)}"
        self.version = version
        self.output = check_output_kind(output)
        self._kind = self.output  # "auto" until the first answer decides it
        self.batch_size = batch_size
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.retry_on = retry_on
        self.classes = None if classes is None else np.asarray(classes)
        self._num_classes: int | None = None if classes is None else len(classes)
        self._sleep = sleep
        self._answers: dict[bytes, np.ndarray] = {}
        self._journal = None if journal is None else Path(journal)
        self._journal_files = 0
        self.rows_requested = 0
        """How many rows were sent to ``fn`` so far (answers found in the journal are not counted)."""
        if self._journal is not None:
            self._load_journal(self._journal)

    @property
    def num_classes(self) -> int | None:
        return self._num_classes

    def fingerprint(self) -> str:
        text = f"callable:{self.name}:{self.version}:{self.output}"
        return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()

    def _load_journal(self, folder: Path) -> None:
        files = sorted(folder.glob("answers-*.safetensors"))
        for path in files:
            try:
                tensors = load_numpy_file(str(path))
                keys, values = tensors["keys"], tensors["values"]
            except (SafetensorError, KeyError, OSError) as exc:
                _log.warning("skipping unreadable journal file %s (%s); its rows will be asked again", path, exc)
                continue
            for key, value in zip(keys, values, strict=True):
                self._answers[key.tobytes()] = value
        self._journal_files = len(files)
        if self._answers:
            _log.info("callable teacher %s: %d rows already answered in %s", self.name, len(self._answers), folder)

    def _ask(self, rows: np.ndarray) -> np.ndarray:
        """``fn(rows)`` with retries and exponential back-off: (rows, classes) float32."""
        for attempt in range(self.retries + 1):
            try:
                scores = np.asarray(self.fn(rows), dtype=np.float32)
                break
            except self.retry_on as exc:
                if attempt == self.retries:
                    raise TeacherError(
                        f"the teacher function {self.name} failed {attempt + 1} times on a batch of {len(rows)} rows; "
                        f"last error: {type(exc).__name__}: {exc}",
                        hint="check the remote; with journal= set, answers so far are kept and a rerun resumes.",
                    ) from exc
                wait = min(self.max_backoff_s, self.backoff_s * 2**attempt)
                _log.warning("teacher function %s failed (%s); retry %d in %.2fs", self.name, exc, attempt + 1, wait)
                self._sleep(wait)
        if scores.ndim != 2 or len(scores) != len(rows):
            raise TeacherError(
                f"the teacher function {self.name} returned shape {scores.shape} for {len(rows)} rows",
                hint="return one row of class scores per input row: (rows, classes).",
            )
        self.rows_requested += len(rows)
        return scores

    def _remember(self, keys: list[bytes], scores: np.ndarray) -> None:
        for key, value in zip(keys, scores, strict=True):
            self._answers[key] = value
        if self._journal is not None:
            key_array = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), 16)
            path = self._journal / f"answers-{self._journal_files:08d}.safetensors"
            atomic_write_bytes(path, save_numpy({"keys": key_array, "values": np.ascontiguousarray(scores)}))
            self._journal_files += 1

    def __call__(self, x: torch.Tensor, *, features: Sequence[str] = ()) -> Outputs:
        if features:
            raise TeacherError(
                f"a callable teacher has no intermediate features (asked for {list(features)})",
                hint="use a logit-based method (kd, dkd, dist) with this teacher.",
            )
        rows = x.detach().cpu().float().numpy()
        keys = _row_keys(rows)
        missing = [i for i, key in enumerate(keys) if key not in self._answers]
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            self._remember([keys[i] for i in chunk], self._ask(rows[chunk]))
        scores = np.stack([self._answers[key] for key in keys]) if keys else np.zeros((0, self._num_classes or 0))
        logits, self._kind = to_logits(scores, self._kind, source=f"callable teacher {self.name}")
        self._num_classes = int(logits.shape[1])
        return Outputs(logits=logits)
