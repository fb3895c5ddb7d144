"""A file of precomputed teacher outputs as a teacher: somebody ran the model last month, you have the scores."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdistill.data import fingerprint_arrays
from kdistill.errors import TeacherError
from kdistill.io import atomic_write_bytes
from kdistill.teachers._convert import FileBacked, check_output_kind, to_logits
from kdistill.teachers.base import Outputs
from kdistill.teachers.registry import register_adapter

__all__ = ["FileTeacher", "save_teacher_outputs"]

SUFFIXES = (".npy", ".safetensors", ".parquet")
_SCORE_NAMES = ("logits", "probs")


def _row_hashes(rows: np.ndarray) -> list[bytes]:
    flat = np.ascontiguousarray(np.asarray(rows, dtype=np.float32).reshape(len(rows), -1))
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in flat]


def _pyarrow_parquet() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise TeacherError(
            "reading or writing .parquet teacher outputs needs pyarrow",
            hint="pip install 'kdistill[parquet]' (or: pip install pyarrow), or use .npy / .safetensors.",
        ) from exc
    return pq


def _read(path: Path, id_column: str) -> tuple[np.ndarray, np.ndarray | None, str | None]:
    """(scores (rows, classes), row ids (rows,) or None, "logits"/"probs" when the file names its kind)."""
    if path.suffix == ".npy":
        return np.load(path, mmap_mode="r", allow_pickle=False), None, None
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        tensors = load_file(str(path))
        names = [name for name in _SCORE_NAMES if name in tensors]
        if len(names) != 1:
            raise TeacherError(
                f"{path.name} holds tensors {sorted(tensors)}; expected exactly one of 'logits' or 'probs'",
                hint=f"save the scores under 'logits' (or 'probs'), and optional row ids under {id_column!r}.",
            )
        ids = tensors.get(id_column)
        return tensors[names[0]], ids, names[0]
    if path.suffix == ".parquet":
        table = _pyarrow_parquet().read_table(str(path))
        columns = table.column_names
        ids = np.asarray(table.column(id_column).to_numpy()) if id_column in columns else None
        names = [name for name in _SCORE_NAMES if name in columns]
        if names:  # one list column holding each row's scores
            scores = np.asarray(table.column(names[0]).to_pylist(), dtype=np.float32)
            return scores, ids, names[0]
        score_columns = [name for name in columns if name != id_column]
        scores = np.stack([table.column(name).to_numpy() for name in score_columns], axis=1).astype(np.float32)
        return scores, ids, None
    raise TeacherError(f"cannot read teacher outputs from {path.name}", hint=f"use one of {', '.join(SUFFIXES)}.")


def save_teacher_outputs(
    path: str | os.PathLike[str],
    scores: np.ndarray | torch.Tensor,
    *,
    row_ids: np.ndarray | Sequence[int] | None = None,
    kind: str = "logits",
    id_column: str = "row_id",
) -> Path:
    """Write ``scores`` (rows, classes) to ``path`` (.npy, .safetensors or .parquet) atomically, in the layout
    :class:`FileTeacher` reads: .npy holds scores only (row i is input row i); .safetensors holds ``kind``
    (``"logits"``/``"probs"``) and ``row_ids``; .parquet holds a ``row_ids`` column and a list column ``kind``."""
    target = Path(path)
    values = np.ascontiguousarray(
        scores.detach().cpu().numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores), dtype=np.float32
    )
    ids = None if row_ids is None else np.asarray(row_ids, dtype=np.int64)
    if target.suffix == ".npy":
        if ids is not None:
            raise TeacherError(".npy files hold no row ids", hint="use .safetensors or .parquet for row ids.")
        import io

        buffer = io.BytesIO()
        np.save(buffer, values, allow_pickle=False)
        return atomic_write_bytes(target, buffer.getvalue())
    if target.suffix == ".safetensors":
        from safetensors.numpy import save

        tensors = {kind: values} | ({} if ids is None else {id_column: ids})
        return atomic_write_bytes(target, save(tensors))
    if target.suffix == ".parquet":
        import pyarrow as pa

        pq = _pyarrow_parquet()
        columns: dict[str, Any] = {} if ids is None else {id_column: pa.array(ids)}
        columns[kind] = pa.array(list(values))
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table(columns), sink)
        return atomic_write_bytes(target, sink.getvalue().to_pybytes())
    raise TeacherError(f"cannot write teacher outputs to {target.name}", hint=f"use one of {', '.join(SUFFIXES)}.")


@register_adapter("file", "precomputed outputs in .npy, .safetensors or .parquet: FileTeacher(path, inputs=X)")
class FileTeacher(FileBacked):
    """Serves precomputed outputs from ``path``: a ``.npy`` array, a ``.safetensors`` file or a ``.parquet`` table.

    ``inputs`` (rows, *features) are the rows the outputs were computed on; row id ``i`` means ``inputs[i]``. A file
    without row ids (every ``.npy``) lists the outputs in the order of ``inputs``; with ids (``id_column``), each
    output row says which input it belongs to, in any order. When called on a batch, each row is found by the hash of
    its float32 bytes, so batches may be shuffled or drawn from anywhere in ``inputs``; a row that is not there raises
    :class:`~kdistill.TeacherError` (a file teacher cannot see new inputs, so no augmentation and no report on rows it
    lacks: put the test rows in the file too). ``.npy`` files are memory-mapped.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        inputs: Any,
        output: str = "auto",
        id_column: str = "row_id",
        classes: Sequence[Any] | np.ndarray | None = None,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise TeacherError(f"no teacher-output file at {self.path}", hint=f"pass a {'/'.join(SUFFIXES)} file.")
        scores, ids, named_kind = _read(self.path, id_column)
        if scores.ndim != 2:
            raise TeacherError(
                f"{self.path.name} holds scores of shape {scores.shape}; expected (rows, classes)",
                hint="save one row of class scores per input row.",
            )
        input_rows = np.asarray(inputs.detach().cpu().numpy() if isinstance(inputs, torch.Tensor) else inputs)
        ids = np.arange(len(scores)) if ids is None else np.asarray(ids, dtype=np.int64)
        if len(ids) != len(scores):
            raise TeacherError(f"{self.path.name} has {len(ids)} row ids for {len(scores)} rows of scores")
        if len(ids) and (ids.min() < 0 or ids.max() >= len(input_rows)):
            raise TeacherError(
                f"{self.path.name} has row ids from {ids.min()} to {ids.max()}, but inputs has {len(input_rows)} rows",
                hint="row id i must refer to inputs[i]; pass the inputs the outputs were computed on.",
            )
        position_of_id = np.full(len(input_rows), -1, dtype=np.int64)
        position_of_id[ids] = np.arange(len(ids))
        self._position: dict[bytes, int] = {}
        for row_id, key in enumerate(_row_hashes(input_rows)):
            if position_of_id[row_id] >= 0:
                self._position.setdefault(key, int(position_of_id[row_id]))
        self._scores = scores
        self.output = check_output_kind(named_kind if output == "auto" and named_kind else output)
        self._kind = self.output
        self.classes = None if classes is None else np.asarray(classes)
        self._num_classes = int(scores.shape[1])
        self._inputs_fingerprint = fingerprint_arrays(input_rows.astype(np.float32, copy=False))
        self._fingerprint: str | None = None

    @property
    def num_classes(self) -> int | None:
        return self._num_classes

    def _fingerprint_header(self) -> str:
        return f"file:{self.output}:{self._inputs_fingerprint}"

    def __call__(self, x: torch.Tensor, *, features: Sequence[str] = ()) -> Outputs:
        if features:
            raise TeacherError(
                f"a file of precomputed outputs has no intermediate features (asked for {list(features)})",
                hint="use a logit-based method (kd, dkd, dist) with this teacher.",
            )
        keys = _row_hashes(x.detach().cpu().numpy())
        positions = [self._position.get(key, -1) for key in keys]
        missing = [i for i, position in enumerate(positions) if position < 0]
        if missing:
            raise TeacherError(
                f"{len(missing)} of {len(keys)} rows in this batch are not in {self.path.name} (first: batch row "
                f"{missing[0]})",
                hint="a file teacher only knows the inputs it was built with: pass every row you will ask about "
                "(train, val and test) as inputs=, and no augmentation.",
            )
        scores = np.asarray(self._scores[np.asarray(positions, dtype=np.int64)], dtype=np.float32)
        logits, self._kind = to_logits(scores, self._kind, source=f"teacher file {self.path.name}")
        return Outputs(logits=logits)
