"""The teacher-output cache: a teacher's outputs on a data set, computed once and reused across epochs, runs and
larger data sets.

Layout under ``<root>`` (``$KDISTILL_CACHE_DIR`` or ``./.kdistill-cache``)::

    chunks/<store>/               one store per (teacher fingerprint, output kind, storage)
        <chunk>.safetensors       the outputs of up to ``chunk_rows`` rows, their row fingerprints (``rows``,
                                  (n, 16) uint8) and a BLAKE2b checksum of its arrays; named by the BLAKE2b of its
                                  rows' fingerprints, written atomically, never changed
        .lock                     held (``flock``) by the one process filling the store
    sets/<entry>/                 one entry per (teacher, data set, kind, storage): the view handed to training
        logits.npy                dense outputs aligned row for row with the data set (fp32 / fp16), or
        values.npy indices.npy rest.npy   (``topk:K``), each memory-mapped on open
        manifest.json             shapes, dtypes and BLAKE2b checksums of those files

**Keyed by content, in chunks.** Every input row has a fingerprint, the BLAKE2b of its bytes (all fields of a mapping
input, integer dtypes as they are, keyed by their names, dtypes and per-row shapes). A fill looks every row of the set
up in the store, runs the teacher only on rows found nowhere (each distinct row once) and writes them as new chunks,
then gathers the set's view from the chunks. A set that adds rows to one seen before (appended, or a shuffled
superset) computes only the new rows. A killed fill leaves whole chunks only (each is renamed into place), so the next
fill computes only what is missing. A whole-set output (``compute=``, e.g. out-of-fold targets) cannot be split by
row: its entry is keyed by the whole set's fingerprint and ``kind`` and written as a view directly, without chunks.

**Integrity.** A view is built in a temporary folder and published by renaming the folder, so a reader sees a whole
entry or none. Opening one verifies its checksums; a mismatch is a :class:`~kdistill.errors.CacheError` naming the
file, and :func:`cached_teacher_outputs` then deletes the view and rebuilds it (from the chunks, which are checked
when read: a bad chunk is deleted and its rows recomputed). Two processes filling the same store take turns on its
lock file; where ``flock`` does not exist, the writes are still atomic and idempotent. Under ``torchrun`` the ranks
that hold the teacher split the missing rows between them, then rank 0 gathers the entry and the other ranks open it
(``collective=True``; or rank 0 alone fills and sends ``entry.key``, and the others call :func:`open_entry`).

Storage options: ``"fp32"`` (exact), ``"fp16"`` (half the bytes; ~3 significant digits), ``"topk:K"`` (the K
largest logits per row, or per token for (rows, seq, vocab) outputs, their indices, and the log-sum-exp of the rest;
read with the ``kd_topk`` loss, which uses that form exactly) and ``"topk16:K"`` (the token-level layout: the same as
float16 log-probabilities, 4K + 2 bytes a token; :meth:`CacheEntry.bytes_per_token` reports it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file as load_numpy_file
from safetensors.numpy import save as save_numpy

from kdistill.data import fingerprint_arrays
from kdistill.errors import CacheError
from kdistill.io import atomic_write_bytes, atomic_write_json
from kdistill.losses.kd_topk import encode_topk, pack_topk
from kdistill.teachers.base import Teacher, TopK, batch_logits

__all__ = [
    "DEFAULT_CACHE_DIR",
    "CacheEntry",
    "CacheKey",
    "EntryInfo",
    "Inputs",
    "cache_entries",
    "cache_key",
    "cached_teacher_outputs",
    "clear_cache",
    "default_cache_dir",
    "open_entry",
    "parse_storage",
    "read_entry",
    "row_fingerprints",
    "sample_tail",
    "set_fingerprint",
    "tail_samples",
]

_log = logging.getLogger(__name__)

Inputs = torch.Tensor | Mapping[str, torch.Tensor]
"""A transfer set's inputs: one tensor (rows, ...), or named tensors with the same number of rows
(``{"input_ids": int64 (rows, seq), "attention_mask": int64 (rows, seq)}``)."""

DEFAULT_CACHE_DIR = ".kdistill-cache"
_MANIFEST = "manifest.json"
_STORE_FILE = "store.json"
_LOCK = ".lock"
_SETS, _CHUNKS = "sets", "chunks"
_FORMAT_VERSION = 2
_BLOCK = 1 << 20
_HASH_ROWS = 1 << 16
_ATTEMPTS = 3


def default_cache_dir() -> Path:
    """``$KDISTILL_CACHE_DIR`` when set, else ``./.kdistill-cache``."""
    return Path(os.environ.get("KDISTILL_CACHE_DIR", DEFAULT_CACHE_DIR))


def parse_storage(storage: str) -> tuple[str, int | None]:
    """``"fp32"`` -> ("fp32", None), ``"fp16"`` -> ("fp16", None), ``"topk:K"`` -> ("topk", K), ``"topk16:K"`` and
    ``"topk16:K+S"`` (a sampled tail of S ids, :func:`tail_samples`) -> ("topk16", K)."""
    if storage in ("fp32", "fp16"):
        return storage, None
    if storage.startswith("topk16:"):
        k16, samples = _topk16_numbers(storage)
        if k16 >= 1 and samples >= 0:
            return "topk16", k16
    elif storage.startswith("topk:"):
        try:
            k = int(storage.split(":", 1)[1])
        except ValueError:
            k = 0
        if k >= 1:
            return "topk", k
    raise CacheError(
        f"unknown cache storage {storage!r}",
        hint="use 'fp32', 'fp16', 'topk:K', 'topk16:K' or 'topk16:K+S' with K, S >= 1 (e.g. 'topk:8', 'topk16:32+32').",
    )


def tail_samples(storage: str) -> int:
    """S of a ``"topk16:K+S"`` storage (the tail ids drawn per token); 0 for every other storage."""
    if not storage.startswith("topk16:"):
        return 0
    parse_storage(storage)
    return _topk16_numbers(storage)[1]


def _topk16_numbers(storage: str) -> tuple[int, int]:
    """(K, S) of ``"topk16:K"`` (S = 0) or ``"topk16:K+S"`` (S >= 1); (0, 0) when they are not whole numbers."""
    text = storage.split(":", 1)[1]
    k_text, plus, s_text = text.partition("+")
    try:
        k, samples = int(k_text), int(s_text) if plus else 0
    except ValueError:
        return 0, 0
    return (k, samples) if not plus or samples >= 1 else (0, 0)


def _digest(*parts: object) -> str:
    return hashlib.blake2b(json.dumps([_FORMAT_VERSION, *parts]).encode(), digest_size=16).hexdigest()


@dataclass(frozen=True)
class CacheKey:
    """What an entry holds: ``teacher`` = ``Teacher.fingerprint()``, ``data`` = :func:`set_fingerprint` of the inputs,
    ``kind`` of output (``"logits"``, ``"embeddings"``, ``"oof:folds=5:seed=0"``), ``storage`` (``"fp32"``,
    ``"fp16"``, ``"topk:K"``)."""

    teacher: str
    data: str
    kind: str
    storage: str

    def digest(self) -> str:
        """The entry's folder name: 32 hex characters of BLAKE2b over the four fields."""
        return _digest(self.teacher, self.data, self.kind, self.storage)

    def store(self) -> str:
        """The chunk store's folder name: BLAKE2b over (teacher, kind, storage), shared by every data set."""
        return _digest("store", self.teacher, self.kind, self.storage)


# ------------------------------------------------------------------------------------------------ row fingerprints
def _as_fields(inputs: Inputs | np.ndarray) -> dict[str, np.ndarray]:
    """``inputs`` as named numpy arrays (rows, ...) with the same number of rows; a tensor is the field ``""``."""
    items = inputs.items() if isinstance(inputs, Mapping) else [("", inputs)]
    fields: dict[str, np.ndarray] = {}
    for name, value in sorted(items):
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu()
            array = value.view(torch.int16).numpy() if value.dtype == torch.bfloat16 else value.numpy()
        elif isinstance(value, np.ndarray):
            array = value
        else:
            raise CacheError(
                f"cache inputs {name or 'x'!r} is a {type(value).__name__}, not a tensor",
                hint="pass a tensor (rows, ...) or a mapping of tensors with the same number of rows.",
            )
        if array.ndim == 0:
            raise CacheError(f"cache inputs {name or 'x'!r} is a scalar", hint="pass one row per example.")
        fields[name] = array
    sizes = {name: len(array) for name, array in fields.items()}
    if not fields or len(set(sizes.values())) != 1:
        raise CacheError(
            f"cache inputs must have the same number of rows in every field, got {sizes}",
            hint="give every tensor of the mapping one row per example.",
        )
    return fields


def _schema_key(fields: Mapping[str, np.ndarray]) -> bytes:
    schema = [[name, str(array.dtype), list(array.shape[1:])] for name, array in fields.items()]
    return hashlib.blake2b(json.dumps(schema).encode(), digest_size=32).digest()


_MEMO: dict[str, Any] = {"key": None, "refs": (), "rows": None}


def _memo_key(inputs: Inputs | np.ndarray) -> tuple[Any, ...] | None:
    """Who ``inputs`` are (torch tensors only: identity, storage, shape, dtype and in-place version counter), or None.
    The memo holds weak references, so an id can only repeat once its tensor is gone, and then the memo is stale."""
    items = sorted(inputs.items()) if isinstance(inputs, Mapping) else [("", inputs)]
    tensors = [(name, value) for name, value in items if isinstance(value, torch.Tensor)]
    if len(tensors) != len(items):
        return None
    return tuple((name, id(t), t.data_ptr(), t._version, tuple(t.shape), str(t.dtype)) for name, t in tensors)


def row_fingerprints(inputs: Inputs | np.ndarray) -> np.ndarray:
    """One content fingerprint per row: (rows, 16) uint8, the BLAKE2b of the row's bytes in every field, keyed by the
    fields' names, dtypes and per-row shapes (the same numbers as int32 and int64 are different rows).

    The last tensor inputs' fingerprints are remembered (a run keys its cache entry, then fills or opens it: one
    pass over the rows, not two); a tensor changed in place, or another tensor, is hashed again."""
    key = _memo_key(inputs)
    refs = _MEMO["refs"]
    if key is not None and key == _MEMO["key"] and all(ref() is not None for ref in refs):
        return cast(np.ndarray, _MEMO["rows"])
    rows = _row_fingerprints(inputs)
    if key is not None:
        values = inputs.values() if isinstance(inputs, Mapping) else [inputs]
        _MEMO.update(key=key, refs=tuple(weakref.ref(value) for value in values), rows=rows)
    return rows


def _row_fingerprints(inputs: Inputs | np.ndarray) -> np.ndarray:
    fields = _as_fields(inputs)
    key = _schema_key(fields)
    rows = len(next(iter(fields.values())))
    out = bytearray()
    for start in range(0, rows, _HASH_ROWS):
        parts = [np.ascontiguousarray(a[start : start + _HASH_ROWS]) for a in fields.values()]
        block = np.concatenate([p.reshape(len(p), -1).view(np.uint8) for p in parts], axis=1)
        for row in block:
            out += hashlib.blake2b(row.data, key=key, digest_size=16).digest()
    return np.frombuffer(bytes(out), dtype=np.uint8).reshape(rows, 16)


def set_fingerprint(
    rows: np.ndarray, *, labels: torch.Tensor | np.ndarray | None = None, whole_set: bool = False
) -> str:
    """The data set's fingerprint from its :func:`row_fingerprints` (rows, 16), in order; ``labels`` and
    ``whole_set`` (an output computed from the whole set) are part of it when given."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(b"whole-set" if whole_set else b"rows")
    digest.update(np.ascontiguousarray(rows).tobytes())
    if labels is not None:
        digest.update(fingerprint_arrays(labels).encode())
    return digest.hexdigest()


def cache_key(
    teacher: Teacher,
    inputs: Inputs | np.ndarray,
    *,
    kind: str = "logits",
    storage: str = "fp32",
    labels: torch.Tensor | np.ndarray | None = None,
    whole_set: bool = False,
) -> CacheKey:
    """The key :func:`cached_teacher_outputs` files ``teacher``'s outputs on ``inputs`` under (``whole_set``: for a
    ``compute=`` entry), e.g. to :func:`open_entry` one without filling it."""
    data = set_fingerprint(row_fingerprints(inputs), labels=labels, whole_set=whole_set)
    return CacheKey(teacher=teacher.fingerprint(), data=data, kind=kind, storage=storage)


def _as_void(rows: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(rows).view("V16").reshape(-1)


def _as_tensors(inputs: Inputs | np.ndarray) -> Inputs:
    """numpy arrays (or a mapping of them) as tensors sharing their memory; tensors as they are."""
    if isinstance(inputs, Mapping):
        return {name: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for name, v in inputs.items()}
    return torch.from_numpy(inputs) if isinstance(inputs, np.ndarray) else inputs


def _take_rows(inputs: Inputs, positions: np.ndarray) -> Inputs:
    index = torch.as_tensor(positions, dtype=torch.long)
    if isinstance(inputs, Mapping):
        return {name: value[index] for name, value in inputs.items()}
    return inputs[index]


# --------------------------------------------------------------------------------------------------------- encoding
def _checksum_arrays(arrays: Mapping[str, np.ndarray]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(arrays):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(arrays[name]).tobytes())
    return digest.hexdigest()


def _checksum_file(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_storage(storage: str, kind: str) -> None:
    mode, _ = parse_storage(storage)
    if mode in ("topk", "topk16") and kind.startswith("embedding"):
        raise CacheError(
            f"cache storage {storage!r} keeps the largest logits, which means nothing for {kind!r}",
            hint="store embeddings as 'fp32' or 'fp16'.",
        )


def _encode(outputs: torch.Tensor, storage: str) -> dict[str, np.ndarray]:
    """The arrays stored for ``outputs`` (rows, classes), (rows, seq, vocab) or (rows, dim) in ``storage``.

    topk:K, along the last axis: ``values`` (rows, [seq,] K) float32, ``indices`` (rows, [seq,] K) int16 (int32 above
    32,767 classes), ``rest`` (rows, [seq]) float32 = log Σ exp(z_j) over the other classes.

    topk16:K (the token-level layout: 4K + 2 bytes a token below 32,768 ids, 130 B at K = 32): the same fields as
    float16 **log-probabilities** (``values - LSE(z)``, ``rest - LSE(z)``, so the range is bounded whatever the
    logits' offset; an empty rest bucket is float16's lowest, -65504, whose probability is 0). The losses read
    them as bucket logits (a softmax is unchanged by the shift), so nothing else differs from ``topk:K`` but the
    precision (float16 spacing is at most 0.016 nats for log-probabilities above -32)."""
    mode, k = parse_storage(storage)
    outputs = outputs.detach().float().cpu()
    if mode == "fp32":
        return {"logits": outputs.numpy()}
    if mode == "fp16":
        largest = float(outputs.abs().max()) if outputs.numel() else 0.0
        if largest > float(np.finfo(np.float16).max):
            raise CacheError(
                f"teacher outputs reach {largest:.3g}, beyond float16's range (65504)",
                hint="use cache storage 'fp32' (or 'topk:K') for this teacher.",
            )
        return {"logits": outputs.numpy().astype(np.float16)}
    assert k is not None
    if outputs.ndim not in (2, 3):
        raise CacheError(
            f"cache storage {storage!r} needs (rows, classes) or (rows, seq, vocab) outputs, "
            f"got {tuple(outputs.shape)}",
            hint="use 'fp32' or 'fp16' for outputs of other shapes.",
        )
    classes = outputs.shape[-1]
    if k > classes:
        raise CacheError(
            f"cache storage {storage!r} keeps {k} of {classes} classes", hint=f"use 'topk:K' with K <= {classes}."
        )
    flat = outputs.reshape(-1, classes)
    values, indices, rest = encode_topk(flat, k)
    lead = tuple(outputs.shape[:-1])
    index_dtype = np.int16 if classes <= np.iinfo(np.int16).max else np.int32
    if mode == "topk16":
        values, rest = _as_log_probs16(values, rest)
    arrays = {
        "values": values.reshape(*lead, k).numpy(),
        "indices": indices.reshape(*lead, k).numpy().astype(index_dtype),
        "rest": rest.reshape(lead).numpy(),
    }
    samples = tail_samples(storage)
    if samples:
        if outputs.ndim != 3:
            raise CacheError(
                f"cache storage {storage!r} samples a tail per token, so it needs (rows, seq, vocab) outputs, "
                f"got {tuple(outputs.shape)}",
                hint=f"use 'topk16:{k}' (a rest bucket, no tail samples) for per-row outputs.",
            )
        tail_ids, tail_plogp = sample_tail(outputs, indices.reshape(*lead, k), samples, seeds=_row_seeds(arrays))
        arrays["tail_ids"] = tail_ids.numpy().astype(index_dtype)
        arrays["tail_plogp"] = tail_plogp.half().numpy()
    return arrays


def sample_tail(
    logits: torch.Tensor, top_ids: torch.Tensor, samples: int, seeds: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The sampled tail of ``"topk16:K+S"`` storage for token logits (rows, seq, vocab) with top-k ids ``top_ids``
    (rows, seq, K): ``samples`` ids per token drawn with replacement from the teacher's distribution renormalised
    over the tokens outside its top k (rows, seq, S), and :math:`\sum_{v \notin \text{top-k}} p_v \log p_v`
    (rows, seq), with :math:`p` the softmax over the full vocabulary.

    Row ``r``'s draws come from a generator seeded with ``seeds[r]`` (the cache seeds each row from its stored top-k
    bytes, so a row refilled after a kill, or filled in another batch, draws the same ids). Drawn by inverse
    transform: uniforms in [0, 1) times the tail's mass, looked up in the cumulative sum over the vocabulary (in
    float64), so a top-k token (zero width there) is never drawn. A token whose top k is the whole vocabulary
    (empty tail) gets ids 0 and 0 for the sum; its tail weight (the rest bucket's mass) is 0."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    tail_p = log_p.exp().scatter(-1, top_ids.long(), 0.0)
    plogp = torch.where(tail_p > 0, tail_p * log_p, torch.zeros_like(tail_p)).sum(-1)
    cumulative = tail_p.double().cumsum(-1)
    uniforms = torch.stack(
        [torch.rand(logits.shape[1], samples, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
         for seed in seeds]
    )  # fmt: skip
    mass = cumulative[..., -1:]
    ids = torch.searchsorted(cumulative, uniforms * mass, right=True).clamp_max(logits.shape[-1] - 1)
    empty = (mass <= 0).expand_as(ids)
    return ids.masked_fill(empty, 0), plogp


def _row_seeds(arrays: dict[str, np.ndarray]) -> list[int]:
    """One seed per row from its stored top-k bytes (values and ids): the same row always draws the same tail."""
    values, indices = arrays["values"], arrays["indices"]
    return [
        int.from_bytes(hashlib.blake2b(values[row].tobytes() + indices[row].tobytes(), digest_size=8).digest(), "big")
        >> 1
        for row in range(len(values))
    ]


def _as_log_probs16(values: torch.Tensor, rest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k logits (N, k) and rest LSE (N,) as float16 log-probabilities (see :func:`_encode`, ``topk16``)."""
    lowest = float(np.finfo(np.float16).min)
    total = torch.logaddexp(values.logsumexp(dim=-1), rest)
    log_values = (values - total.unsqueeze(-1)).clamp_min(lowest).half()
    log_rest = (rest - total).clamp_min(lowest).half()
    return log_values, log_rest


# ------------------------------------------------------------------------------------------------------------ entry
@dataclass
class CacheEntry:
    """A complete entry (verified on open unless ``verify=False``). ``arrays``: name -> memory-mapped array aligned
    row for row with the data set.

    ``shape``: the outputs' shape per row ((classes,), (seq, vocab) or (dim,)); ``classes`` is its last number.
    ``meta``: what the filling call passed as ``meta`` (JSON), e.g. the teacher's class labels.
    """

    folder: Path
    key: CacheKey
    rows: int
    classes: int
    arrays: dict[str, np.ndarray]
    created: float
    shape: tuple[int, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def storage(self) -> str:
        return self.key.storage

    def nbytes(self) -> int:
        """Bytes of the stored arrays (without the .npy headers)."""
        return int(sum(array.nbytes for array in self.arrays.values()))

    @property
    def tokens(self) -> int | None:
        """Positions stored for a token-level entry (rows × seq of (rows, seq, vocab) outputs); None otherwise."""
        return self.rows * self.shape[0] if len(self.shape) == 2 else None

    def bytes_per_token(self) -> float | None:
        """:meth:`nbytes` / :attr:`tokens` for a token-level entry (fp16 logits: 2 × vocab; ``topk16:K``: 4K + 2
        below 32,768 ids); None for per-row outputs."""
        tokens = self.tokens
        return None if not tokens else self.nbytes() / tokens

    def teacher_targets(self) -> torch.Tensor:
        """What the engine indexes by row. fp32/fp16: the outputs (rows, *shape), memory-mapped (no copy; fp16 stays
        fp16 and is upcast per batch by the loss). topk: the packed (rows, 2k + 1) form for ``kd_topk``
        (``[values | indices | rest]``, :func:`~kdistill.losses.kd_topk.pack_topk`; (rows, seq, 2k + 1) for token
        outputs), in memory."""
        if "logits" in self.arrays:
            return torch.from_numpy(self.arrays["logits"])
        values, indices, rest = self.topk()
        if values.ndim == 2:
            return pack_topk(values, indices.long(), rest)
        fields = [values.float(), indices.float(), rest.float().unsqueeze(-1)]
        tail = self.tail()
        if tail is not None:  # [values | indices | rest | tail_ids | tail_plogp], TopK.from_packed(table, S)
            fields += [tail[0].float(), tail[1].float().unsqueeze(-1)]
        return torch.cat(fields, dim=-1)

    def topk(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A ``topk:K`` entry's three tensors, memory-mapped, aligned row for row with the data set: ``values``
        (rows, [seq,] K) float32, largest first; ``indices`` (rows, [seq,] K) int16 (int32 above 32,767 classes; cast
        a batch with ``.long()`` to gather); ``rest`` (rows, [seq]) float32, the log-sum-exp of the other classes."""
        if "values" not in self.arrays:
            raise CacheError(
                f"cache entry {self.folder.name} stores {self.storage!r}, not top-k",
                hint="read it with teacher_targets(), or fill an entry with storage='topk:K'.",
            )
        values, indices, rest = (torch.from_numpy(self.arrays[name]) for name in ("values", "indices", "rest"))
        return values, indices, rest

    def tail(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A ``"topk16:K+S"`` entry's sampled tail, memory-mapped: ``tail_ids`` (rows, seq, S) int16 (int32 above
        32,767 ids) and ``tail_plogp`` (rows, seq) float16 (see :func:`sample_tail`); None for other storages."""
        if "tail_ids" not in self.arrays:
            return None
        return torch.from_numpy(self.arrays["tail_ids"]), torch.from_numpy(self.arrays["tail_plogp"])

    def topk_outputs(self) -> TopK:
        """The whole entry as a :class:`~kdistill.teachers.TopK` (in memory, float32 values; with the sampled tail
        of a ``"topk16:K+S"`` entry)."""
        values, indices, rest = (field.clone() for field in self.topk())
        tail = self.tail()
        if tail is None:
            return TopK(values.float(), indices, rest.float())
        return TopK(values.float(), indices, rest.float(), tail[0].clone(), tail[1].float())


def read_entry(folder: str | os.PathLike[str], *, verify: bool = True) -> CacheEntry:
    """The entry in ``folder`` (a ``sets/<entry>`` folder), memory-mapped.

    Raises :class:`CacheError` when a file is missing, truncated or fails its checksum (``verify=True`` reads every
    byte once to check).
    """
    folder = Path(folder)
    manifest_path = folder / _MANIFEST
    root = folder.parent.parent
    hint = f"delete it with `kdistill cache clear --dir {root} {folder.name}`; kdistill recomputes it."
    try:
        manifest = json.loads(manifest_path.read_text())
        key = CacheKey(**manifest["key"])
        files = manifest["arrays"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CacheError(f"cache manifest {manifest_path} is missing or unreadable ({exc})", hint=hint) from exc
    arrays: dict[str, np.ndarray] = {}
    for name, info in files.items():
        path = folder / info["file"]
        if not path.exists():
            raise CacheError(f"cache file {path} is missing", hint=hint)
        if verify:
            seen = _checksum_file(path)
            if seen != info["blake2b"]:
                raise CacheError(
                    f"cache file {path} is corrupt: checksum {seen}, expected {info['blake2b']}", hint=hint
                )
        try:
            array = np.load(path, mmap_mode="c", allow_pickle=False)  # copy-on-write: writes never reach the file
        except (OSError, ValueError) as exc:
            raise CacheError(f"cache file {path} is unreadable ({exc})", hint=hint) from exc
        if list(array.shape) != info["shape"] or str(array.dtype) != info["dtype"]:
            raise CacheError(
                f"cache file {path} has shape {array.shape} {array.dtype}, expected {info['shape']} {info['dtype']}",
                hint=hint,
            )
        arrays[name] = array
    shape = tuple(int(n) for n in manifest["shape"])
    return CacheEntry(
        folder,
        key,
        int(manifest["rows"]),
        shape[-1] if shape else 1,
        arrays,
        float(manifest["created"]),
        shape,
        dict(manifest.get("meta") or {}),
    )


def open_entry(root: str | os.PathLike[str], key: CacheKey, *, verify: bool = True) -> CacheEntry | None:
    """The complete entry for ``key`` under ``root``, memory-mapped; None when there is none.

    Raises :class:`CacheError` when the entry exists but is damaged (see :func:`read_entry`).
    """
    folder = Path(root) / _SETS / key.digest()
    if not folder.is_dir():
        return None
    entry = read_entry(folder, verify=verify)
    if entry.key != key:
        raise CacheError(
            f"cache entry {folder.name} holds {entry.key}, not {key}",
            hint=f"delete it with `kdistill cache clear --dir {root} {folder.name}`.",
        )
    return entry


# ------------------------------------------------------------------------------------------------------ chunk store
@contextlib.contextmanager
def _locked(lock: Path) -> Iterator[None]:
    """Hold the lock file ``lock`` (``flock``: released by the kernel if the process dies). Without ``fcntl``
    (Windows) nothing is locked; every write is still atomic and idempotent."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with lock.open("a+b") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log.info("%s is held by another process filling the cache; waiting for it", lock)
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@dataclass
class _Index:
    """Every row in a store: sorted fingerprints (as 16-byte voids), and the chunk and offset of each."""

    chunks: list[Path]
    keys: np.ndarray
    chunk_of: np.ndarray
    offset_of: np.ndarray

    def lookup(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Chunk number (-1 where absent) and offset of each of ``rows`` (n, 16)."""
        wanted = _as_void(rows)
        if not len(self.keys):
            return np.full(len(wanted), -1), np.zeros(len(wanted), dtype=np.int64)
        at = np.minimum(np.searchsorted(self.keys, wanted), len(self.keys) - 1)
        found = self.keys[at] == wanted
        return np.where(found, self.chunk_of[at], -1), np.where(found, self.offset_of[at], 0)


def _chunk_rows_of(path: Path) -> np.ndarray | None:
    try:
        with safe_open(str(path), framework="numpy") as handle:
            return np.asarray(handle.get_tensor("rows"))
    except (SafetensorError, OSError, ValueError) as exc:
        _log.warning("cache chunk %s is unreadable (%s); recomputing its rows", path.name, exc)
        return None


def _scan(store: Path, only: list[Path] | None = None) -> _Index:
    """The store's index (of the chunks ``only``, when given), from each chunk's ``rows`` array (16 bytes per row);
    unreadable chunks are deleted."""
    chunks: list[Path] = []
    keys: list[np.ndarray] = []
    chunk_of: list[np.ndarray] = []
    offset_of: list[np.ndarray] = []
    for path in sorted(store.glob("*.safetensors") if only is None else only):
        rows = _chunk_rows_of(path)
        if rows is None or rows.ndim != 2 or rows.shape[1] != 16:
            path.unlink(missing_ok=True)
            continue
        keys.append(_as_void(rows))
        chunk_of.append(np.full(len(rows), len(chunks)))
        offset_of.append(np.arange(len(rows)))
        chunks.append(path)
    if not chunks:
        empty = np.empty(0, dtype="V16")
        return _Index([], empty, np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64))
    all_keys = np.concatenate(keys)
    order = np.argsort(all_keys, kind="stable")
    return _Index(chunks, all_keys[order], np.concatenate(chunk_of)[order], np.concatenate(offset_of)[order])


def _read_chunk(path: Path) -> tuple[dict[str, np.ndarray], tuple[int, ...]] | None:
    """A chunk's arrays (``rows`` included) and the outputs' shape per row, or None (with a warning) when it is
    unreadable or fails its checksum."""
    try:
        arrays = load_numpy_file(str(path))
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
        shape = tuple(int(n) for n in json.loads(metadata["shape"]))
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as exc:
        _log.warning("cache chunk %s is unreadable (%s); recomputing its rows", path.name, exc)
        return None
    if metadata.get("checksum") != _checksum_arrays(arrays) or len({len(a) for a in arrays.values()}) != 1:
        _log.warning("cache chunk %s fails its checksum; recomputing its rows", path.name)
        return None
    return arrays, shape


def _write_chunk(store: Path, rows: np.ndarray, arrays: dict[str, np.ndarray], shape: tuple[int, ...]) -> Path:
    """Write one chunk atomically, named by its rows' fingerprints (the same rows always get the same name)."""
    contents = {"rows": np.ascontiguousarray(rows), **{name: np.ascontiguousarray(a) for name, a in arrays.items()}}
    name = hashlib.blake2b(contents["rows"].tobytes(), digest_size=16).hexdigest()
    metadata = {
        "checksum": _checksum_arrays(contents),
        "shape": json.dumps(list(shape)),
        "format": str(_FORMAT_VERSION),
    }
    return atomic_write_bytes(store / f"{name}.safetensors", save_numpy(contents, metadata=metadata))


def _outputs_of(teacher: Teacher, batch: Inputs) -> torch.Tensor:
    outputs = batch_logits(teacher, batch)
    if not isinstance(outputs, torch.Tensor) or outputs.ndim < 2:
        raise CacheError(
            f"the teacher returned {type(outputs).__name__} {tuple(getattr(outputs, 'shape', ()))}; the cache stores "
            "(rows, classes), (rows, seq, vocab) or (rows, dim) outputs",
            hint="return one row of outputs per input row.",
        )
    return outputs


def _compute_missing(
    store: Path,
    teacher: Teacher,
    inputs: Inputs,
    rows: np.ndarray,
    positions: np.ndarray,
    storage: str,
    chunk_rows: int,
    batch_size: int,
) -> tuple[tuple[int, ...], list[Path]]:
    """Run ``teacher`` on ``positions`` of ``inputs`` (distinct rows, in order) and write them as chunks of
    ``chunk_rows`` rows, each batched by ``batch_size``; returns the outputs' shape per row and the chunks.

    Each batch's outputs are encoded in the storage's form as soon as the teacher returns them, so memory holds one
    batch of dense outputs and a chunk of the stored form: with ``topk16:32`` over a vocabulary of 8,192, 130 bytes
    a token instead of 32 KB (the dense chunk of 4,096 blocks of 64 tokens would be 8.6 GB). Encoding is row by row,
    so the chunk is the same bytes as encoding it whole."""
    shape: tuple[int, ...] | None = None
    written: list[Path] = []
    for start in range(0, len(positions), chunk_rows):
        chunk = positions[start : start + chunk_rows]
        parts: list[dict[str, np.ndarray]] = []
        count = 0
        for at in range(0, len(chunk), batch_size):
            outputs = _outputs_of(teacher, _take_rows(inputs, chunk[at : at + batch_size])).float()
            if shape is not None and tuple(outputs.shape[1:]) != shape:
                raise CacheError(
                    f"the teacher's outputs changed shape between batches: {shape} per row, then "
                    f"{tuple(outputs.shape[1:])}",
                    hint="give every row the same shape of outputs (pad token rows to one length).",
                )
            shape = tuple(outputs.shape[1:])
            count += len(outputs)
            parts.append(_encode(outputs, storage))
            del outputs
        if count != len(chunk):
            raise CacheError(
                f"the teacher returned {count} rows of outputs for {len(chunk)} input rows",
                hint="return one row of outputs per input row.",
            )
        assert shape is not None  # a chunk holds at least one batch
        arrays = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
        written.append(_write_chunk(store, rows[chunk], arrays, shape))
    return shape or (), written


class _ChunkFailed(Exception):
    """A chunk failed its checksum while a view was being gathered (it has been deleted): fill again."""


_Written = tuple[dict[str, np.memmap], tuple[int, ...]]
"""What a view writer made: the arrays (memory-mapped files in the view's folder) and the outputs' shape per row."""


def _gather_from_chunks(index: _Index, chunk: np.ndarray, offset: np.ndarray) -> Callable[[Path], _Written]:
    """A writer that gathers each row of the view from its chunk (one chunk in memory at a time)."""

    def write(folder: Path) -> _Written:
        targets: dict[str, np.memmap] = {}
        shape: tuple[int, ...] = ()
        by_chunk = np.argsort(chunk, kind="stable")
        numbers, starts = np.unique(chunk[by_chunk], return_index=True)
        for number, at in zip(numbers, np.split(by_chunk, starts[1:]), strict=True):
            path = index.chunks[int(number)]
            read = _read_chunk(path)
            if read is None:
                path.unlink(missing_ok=True)
                raise _ChunkFailed
            arrays, shape = read
            arrays.pop("rows")
            if not targets:
                targets = {
                    name: np.lib.format.open_memmap(
                        folder / f"{name}.npy", mode="w+", dtype=a.dtype, shape=(len(chunk), *a.shape[1:])
                    )
                    for name, a in arrays.items()
                }
            layout = {n: (a.dtype, a.shape[1:]) for n, a in arrays.items()}
            if layout != {n: (t.dtype, t.shape[1:]) for n, t in targets.items()}:
                raise CacheError(
                    f"cache chunk {path.name} holds outputs of another shape or dtype than the set's other chunks",
                    hint=f"clear the store: `kdistill cache clear --dir {path.parents[2]} {path.parent.name}`.",
                )
            for name, target in targets.items():
                target[at] = arrays[name][offset[at]]
        return targets, shape

    return write


def _write_arrays(arrays: Mapping[str, np.ndarray], shape: tuple[int, ...]) -> Callable[[Path], _Written]:
    def write(folder: Path) -> _Written:
        targets = {}
        for name, array in arrays.items():
            target = np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=array.dtype, shape=array.shape)
            target[:] = array
            targets[name] = target
        return targets, shape

    return write


def _publish(
    root: Path, key: CacheKey, rows: int, write: Callable[[Path], _Written], meta: Mapping[str, Any], source: str
) -> Path:
    """Build the view in a temporary folder (arrays, fsync, checksums, manifest), then rename the folder into place.

    If another process published the same entry first, its folder is kept and ours discarded."""
    sets = root / _SETS
    sets.mkdir(parents=True, exist_ok=True)
    final = sets / key.digest()
    tmp = Path(tempfile.mkdtemp(dir=sets, prefix=f".tmp-{key.digest()}-"))
    try:
        targets, shape = write(tmp)
        files: dict[str, Any] = {}
        for name in list(targets):
            target = targets.pop(name)
            target.flush()
            path = Path(cast(str, target.filename))
            dtype, array_shape = str(target.dtype), [int(n) for n in target.shape]
            del target
            with path.open("rb+") as handle:
                os.fsync(handle.fileno())
            files[name] = {"file": path.name, "dtype": dtype, "shape": array_shape, "blake2b": _checksum_file(path)}
        manifest = {
            "key": asdict(key),
            "rows": rows,
            "shape": list(shape),
            "arrays": files,
            "source": source,
            "meta": dict(meta),
            "created": time.time(),
            "format": _FORMAT_VERSION,
        }
        atomic_write_json(tmp / _MANIFEST, manifest)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / _MANIFEST).exists():
                raise
            _log.info("cache entry %s was published by another process; using it", final.name)
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


@dataclass(frozen=True)
class _Request:
    """The settings of one :func:`cached_teacher_outputs` call (see there)."""

    root: Path
    storage: str
    kind: str
    compute: Callable[[Inputs], torch.Tensor] | None
    labels: torch.Tensor | np.ndarray | None
    meta: Mapping[str, Any]
    chunk_rows: int
    batch_size: int
    verify: bool
    reuse: bool


def _fill_from_chunks(request: _Request, key: CacheKey, teacher: Teacher, inputs: Inputs, rows: np.ndarray) -> Path:
    """Under the store's lock: compute the rows no chunk holds (every row when not ``reuse``), then gather and
    publish the set's entry."""
    root = request.root
    store = root / _CHUNKS / key.store()
    final = root / _SETS / key.digest()
    with _locked(store / _LOCK):
        if not request.reuse:
            shutil.rmtree(final, ignore_errors=True)
        elif (final / _MANIFEST).exists():  # another process filled it while we waited
            return final
        for stale in (root / _SETS).glob(f".tmp-{key.digest()}-*"):  # a killed publish (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        for stale_chunk in store.glob(".*.tmp"):  # a chunk whose write was killed before its rename
            stale_chunk.unlink(missing_ok=True)
        for attempt in range(_ATTEMPTS):
            index = _scan(store)
            chunk, _ = index.lookup(rows)
            missing = np.flatnonzero(chunk < 0) if request.reuse else np.arange(len(rows))
            if len(missing):
                _, first = np.unique(_as_void(rows[missing]), return_index=True)
                distinct = missing[np.sort(first)]
                _log.info(
                    "cache store %s: %d of %d rows found, computing %d distinct rows",
                    store.name,
                    len(rows) - len(missing),
                    len(rows),
                    len(distinct),
                )
                shape, written = _compute_missing(
                    store, teacher, inputs, rows, distinct, key.storage, request.chunk_rows, request.batch_size
                )
                described = {"teacher": key.teacher, "kind": key.kind, "storage": key.storage, "shape": list(shape)}
                atomic_write_json(store / _STORE_FILE, described)
                index = _scan(store, None if request.reuse else written)
            chunk, offset = index.lookup(rows)
            if not bool((chunk >= 0).all()):
                raise CacheError(f"cache store {store} lost rows while filling", hint="is another program deleting it?")
            try:
                return _publish(root, key, len(rows), _gather_from_chunks(index, chunk, offset), request.meta, "chunks")
            except _ChunkFailed:
                _log.warning("cache store %s: a chunk failed its checksum (attempt %d); refilling", store.name, attempt)
    raise CacheError(f"cache store {store} keeps failing its checksums", hint="check the disk, then clear the store.")


def _fill_whole_set(request: _Request, key: CacheKey, inputs: Inputs, rows: int) -> Path:
    """Under the entry's lock: ``compute`` the whole set's outputs once and publish them as the entry."""
    assert request.compute is not None
    final = request.root / _SETS / key.digest()
    with _locked(request.root / _SETS / f".{key.digest()}.lock"):
        if not request.reuse:
            shutil.rmtree(final, ignore_errors=True)
        elif (final / _MANIFEST).exists():
            return final
        outputs = request.compute(inputs)
        if not isinstance(outputs, torch.Tensor) or outputs.ndim < 2 or len(outputs) != rows:
            raise CacheError(
                f"compute returned {type(outputs).__name__} {tuple(getattr(outputs, 'shape', ()))} for {rows} rows",
                hint="return a tensor with one row of outputs per input row: (rows, classes) or (rows, seq, vocab).",
            )
        arrays = _encode(outputs, key.storage)
        shape = tuple(outputs.shape[1:])
        return _publish(request.root, key, rows, _write_arrays(arrays, shape), request.meta, "whole set")


def _rank_and_world(collective: bool) -> tuple[int, int]:
    import torch.distributed as dist

    if not collective or not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def _open_or_none(root: Path, key: CacheKey, verify: bool) -> CacheEntry | None:
    try:
        return open_entry(root, key, verify=verify)
    except CacheError as exc:
        _log.warning("%s; rebuilding the entry", exc.message)
        shutil.rmtree(root / _SETS / key.digest(), ignore_errors=True)
        return None


def cached_teacher_outputs(
    teacher: Teacher | None,
    inputs: Inputs | np.ndarray,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    storage: str = "fp32",
    kind: str = "logits",
    compute: Callable[[Inputs], torch.Tensor] | None = None,
    labels: torch.Tensor | np.ndarray | None = None,
    meta: Mapping[str, Any] | None = None,
    chunk_rows: int = 4096,
    batch_size: int = 1024,
    verify: bool = True,
    reuse: bool = True,
    collective: bool = False,
) -> CacheEntry:
    """The cache entry of ``teacher``'s outputs on ``inputs``: opened when it exists and verifies, else filled.

    Args:
        teacher: any :class:`~kdistill.Teacher`; its ``fingerprint()`` keys the entry (None only on ranks other
            than 0 of a collective call, which never run it).
        inputs: a tensor (rows, ...) or a mapping of tensors with the same number of rows (integer dtypes are kept
            and hashed as they are).
        storage: ``"fp32"``, ``"fp16"`` or ``"topk:K"`` (top-k along the last axis: per row of (rows, classes), per
            token of (rows, seq, vocab); refused for ``kind="embeddings"``).
        kind: names the output; part of the key. Without ``compute`` the teacher's ``Outputs.logits`` are stored:
            (rows, classes) logits, (rows, seq, vocab) token logits or (rows, dim) embeddings.
        compute: a whole-set function ``compute(inputs) -> (rows, ...)`` for outputs that cannot be computed row by
            row (out-of-fold targets refit clones of the teacher on folds). Its entry is keyed by the whole set's
            fingerprint (plus ``labels``) and ``kind``, which must name its settings (``"oof:folds=5:seed=0"``);
            nothing is reused when rows are added.
        labels: (rows,) targets that ``compute`` reads; part of the whole-set key.
        meta: JSON-serialisable facts stored with a new entry and returned as ``entry.meta`` (e.g. the teacher's
            class labels, for ranks that never build the teacher).
        chunk_rows, batch_size: rows per stored chunk (one chunk is held in memory while computed), and per teacher
            call.
        verify: check every file's checksum on open (reads each byte once).
        reuse: False runs the teacher (or ``compute``) on every row of this set again, even when an entry or chunks
            hold them, and rebuilds the entry from those fresh outputs.
        collective: True under ``torch.distributed`` (``torchrun``): every rank calls this together, rank 0 fills
            the entry and the others open the one it wrote (ignored without an initialised process group). When
            every rank passes the teacher, the rows no chunk holds are split across the ranks first (each computes
            a contiguous share into chunks), so the teacher's work is divided by the world size. False
            (the default): this process alone; a caller that runs it on rank 0 only sends ``entry.key`` to the
            other ranks, which call :func:`open_entry`.

    Keyed by (``teacher.fingerprint()``, :func:`set_fingerprint` of the inputs, ``kind``, ``storage``): a changed
    teacher or changed data gets a new entry, never stale targets. The teacher runs only on rows that no chunk of the
    (teacher, kind, storage) store holds. A damaged entry is reported (a warning with the :class:`CacheError`'s
    message), deleted and rebuilt, never used.

    Returns:
        The :class:`CacheEntry`, memory-mapped, aligned row for row with ``inputs``.
    """
    _check_storage(storage, kind)
    if chunk_rows < 1 or batch_size < 1:
        raise CacheError(
            f"chunk_rows and batch_size must be >= 1, got {chunk_rows} and {batch_size}", hint="use e.g. 4096, 1024."
        )
    if labels is not None and compute is None:
        raise CacheError(
            "labels key a whole-set compute only; a teacher's own outputs do not depend on them",
            hint="drop labels=, or pass compute=.",
        )
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    request = _Request(root, storage, kind, compute, labels, dict(meta or {}), chunk_rows, batch_size, verify, reuse)
    inputs = _as_tensors(inputs)
    rank, world = _rank_and_world(collective)
    if world > 1:
        return _collective(rank, teacher, inputs, request)
    if teacher is None:
        raise CacheError("cached_teacher_outputs needs a teacher", hint="pass the Teacher whose outputs to cache.")
    return _get(teacher, inputs, request)


def _get(teacher: Teacher, inputs: Inputs, request: _Request) -> CacheEntry:
    rows = row_fingerprints(inputs)
    if not len(rows):
        raise CacheError("cache inputs have no rows", hint="pass at least one row.")
    data = set_fingerprint(rows, labels=request.labels, whole_set=request.compute is not None)
    key = CacheKey(teacher=teacher.fingerprint(), data=data, kind=request.kind, storage=request.storage)
    if request.reuse:
        entry = _open_or_none(request.root, key, request.verify)
        if entry is not None:
            _log.info("teacher outputs from the cache: %s (%d rows, %s)", entry.folder, entry.rows, key.storage)
            return entry
    for _ in range(_ATTEMPTS):
        if request.compute is not None:
            folder = _fill_whole_set(request, key, inputs, len(rows))
        else:
            folder = _fill_from_chunks(request, key, teacher, inputs, rows)
        entry = _open_or_none(request.root, key, verify=False)  # its checksums were just computed from these files
        if entry is not None:
            return entry
    raise CacheError(f"cache entry {folder} keeps failing its checksums", hint="check the disk; clear the entry.")


def _fill_share(rank: int, world: int, teacher: Teacher, inputs: Inputs, request: _Request) -> None:
    """This rank's share of the rows no chunk holds yet, computed and written as chunks (without the store's lock:
    chunks are content-named and renamed into place, so ranks never write the same file). Every rank scans the
    store, meets the others at a barrier (so all split the same missing rows), then computes its contiguous share."""
    import torch.distributed as dist

    rows = row_fingerprints(inputs)
    key = CacheKey(
        teacher=teacher.fingerprint(), data=set_fingerprint(rows), kind=request.kind, storage=request.storage
    )
    store = request.root / _CHUNKS / key.store()
    done = (request.root / _SETS / key.digest() / _MANIFEST).exists()
    chunk, _ = _scan(store).lookup(rows) if store.is_dir() else (np.full(len(rows), -1), None)
    dist.barrier()
    missing = np.flatnonzero(chunk < 0)
    if done or not len(missing):
        return
    _, first = np.unique(_as_void(rows[missing]), return_index=True)
    share = np.array_split(missing[np.sort(first)], world)[rank]
    if len(share):
        _log.info("cache store %s: rank %d computes %d of %d missing rows", store.name, rank, len(share), len(missing))
        shape, _ = _compute_missing(
            store, teacher, inputs, rows, share, key.storage, request.chunk_rows, request.batch_size
        )
        described = {"teacher": key.teacher, "kind": key.kind, "storage": key.storage, "shape": list(shape)}
        atomic_write_json(store / _STORE_FILE, described)


def _split_fill(rank: int, teacher: Teacher | None, inputs: Inputs, request: _Request) -> None:
    """When every rank holds the teacher (and the outputs are per row), the ranks split the missing rows; an error on
    any rank is raised on every rank."""
    import torch.distributed as dist

    world = dist.get_world_size()
    able: list[Any] = [None] * world
    dist.all_gather_object(able, teacher is not None and request.compute is None and request.reuse)
    if not all(able):
        return
    assert teacher is not None
    error = None
    try:
        _fill_share(rank, world, teacher, inputs, request)
    except Exception as exc:  # every rank must reach the gather below, or the others hang
        error = f"{type(exc).__name__}: {exc}"
    errors: list[Any] = [None] * world
    dist.all_gather_object(errors, error)
    failed = [(number, message) for number, message in enumerate(errors) if message is not None]
    if failed:
        number, message = failed[0]
        raise CacheError(f"rank {number} could not compute its share of the cache ({message})", hint="see its error.")


def _collective(rank: int, teacher: Teacher | None, inputs: Inputs, request: _Request) -> CacheEntry:
    """The ranks that hold the teacher split the rows to compute (all of them or none: :func:`_split_fill`); rank 0
    then fills the entry (from those chunks) and every rank opens the folder rank 0 sends (or raises the error rank
    0 met)."""
    import torch.distributed as dist

    _split_fill(rank, teacher, inputs, request)
    box: list[Any] = [None, None]
    if rank == 0:
        try:
            if teacher is None:
                raise CacheError("rank 0 needs the teacher to fill the cache", hint="pass the teacher on rank 0.")
            entry = _get(teacher, inputs, request)
            box = [str(entry.folder), None]
        except Exception as exc:
            box = [None, f"{type(exc).__name__}: {exc}"]
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    if rank == 0:
        return entry
    if box[0] is None:
        raise CacheError(f"rank 0 could not fill the cache ({box[1]})", hint="see rank 0's error.")
    entry = read_entry(box[0], verify=request.verify)
    rows = len(next(iter(inputs.values()))) if isinstance(inputs, Mapping) else len(inputs)
    if entry.rows != rows:
        raise CacheError(
            f"rank {rank} has {rows} rows but rank 0 cached {entry.rows}",
            hint="give every rank the same transfer set (the engine splits batches across ranks, not the data).",
        )
    return entry


# ------------------------------------------------------------------------------------------------------- ls / clear
@dataclass(frozen=True)
class EntryInfo:
    """One line of ``kdistill cache ls``: a data set's entry (``status`` ``"complete"``), a chunk store
    (``"chunks"``: the rows it holds, reused by every set) or a folder of kdistill 0.1's layout (``"old"``)."""

    name: str
    complete: bool
    rows: int | None
    classes: int | None
    storage: str | None
    teacher: str | None
    data: str | None
    size_bytes: int
    created: float | None
    status: str = "complete"
    kind: str | None = None
    tokens: int | None = None
    """Positions of a token-level entry ((rows, seq, vocab) outputs: rows × seq); None for per-row outputs."""

    @property
    def bytes_per_token(self) -> float | None:
        """Folder bytes per stored token of a token-level entry, else None."""
        return None if not self.tokens else self.size_bytes / self.tokens


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def _set_info(folder: Path) -> EntryInfo:
    try:
        manifest = json.loads((folder / _MANIFEST).read_text())
    except (OSError, ValueError):
        manifest = {}
    key, shape = manifest.get("key", {}), manifest.get("shape") or [None]
    rows = manifest.get("rows")
    tokens = rows * shape[0] if len(shape) == 2 and rows is not None and shape[0] is not None else None
    return EntryInfo(
        folder.name,
        bool(manifest),
        manifest.get("rows"),
        shape[-1],
        key.get("storage"),
        key.get("teacher"),
        key.get("data"),
        _folder_bytes(folder),
        manifest.get("created", folder.stat().st_mtime),
        "complete" if manifest else "damaged",
        key.get("kind"),
        tokens,
    )


def _store_info(folder: Path) -> EntryInfo:
    try:
        described = json.loads((folder / _STORE_FILE).read_text())
    except (OSError, ValueError):
        described = {}
    chunks = list(folder.glob("*.safetensors"))
    rows = 0
    for path in chunks:
        found = _chunk_rows_of(path)
        rows += 0 if found is None else len(found)
    shape = described.get("shape") or [None]
    return EntryInfo(
        folder.name,
        False,
        rows,
        (described.get("shape") or [None])[-1],
        described.get("storage"),
        described.get("teacher"),
        None,
        _folder_bytes(folder),
        min((p.stat().st_mtime for p in chunks), default=folder.stat().st_mtime),
        "chunks",
        described.get("kind"),
        rows * shape[0] if len(shape) == 2 and shape[0] is not None else None,
    )


def cache_entries(root: str | os.PathLike[str] | None = None) -> list[EntryInfo]:
    """Every entry and chunk store under ``root``, oldest first; nothing is verified or loaded."""
    folder = Path(root) if root is not None else default_cache_dir()
    if not folder.is_dir():
        return []
    infos = [_set_info(p) for p in _subfolders(folder / _SETS)]
    infos += [_store_info(p) for p in _subfolders(folder / _CHUNKS)]
    for old in _subfolders(folder):  # kdistill 0.1's flat layout: <root>/<32 hex>/ with key.json or manifest.json
        if _is_old_entry(old):
            infos.append(EntryInfo(old.name, False, None, None, None, None, None, _folder_bytes(old), None, "old"))
    return sorted(infos, key=lambda info: info.created or 0.0)


def _is_old_entry(folder: Path) -> bool:
    name = folder.name
    hex_name = len(name) == 32 and all(c in "0123456789abcdef" for c in name)
    return hex_name and ((folder / _MANIFEST).exists() or (folder / "key.json").exists())


def _subfolders(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _folder_of(root: Path, info: EntryInfo) -> Path:
    parent = {"complete": _SETS, "damaged": _SETS, "chunks": _CHUNKS}.get(info.status)
    return root / parent / info.name if parent else root / info.name


def clear_cache(root: str | os.PathLike[str] | None = None, names: list[str] | None = None) -> list[str]:
    """Delete the entries or chunk stores ``names`` (folder names, or unique prefixes of them), or everything;
    returns those deleted. Deleting an entry keeps the chunks it was gathered from (rebuilding it runs no teacher);
    deleting a store keeps the entries gathered from it.

    Raises :class:`CacheError` for a name that matches no entry (or several)."""
    folder = Path(root) if root is not None else default_cache_dir()
    existing = cache_entries(folder)
    chosen = existing if not names else []
    for name in names or []:
        matches = [info for info in existing if info.name.startswith(name)]
        if len(matches) != 1:
            raise CacheError(
                f"{name!r} matches {len(matches)} cache entries in {folder}",
                hint="pass a name (or unique prefix) from `kdistill cache ls`.",
            )
        chosen.append(matches[0])
    for info in chosen:
        shutil.rmtree(_folder_of(folder, info))
    if not names:
        for parent in (folder / _SETS, folder / _CHUNKS):
            shutil.rmtree(parent, ignore_errors=True)
    return [info.name for info in chosen]
