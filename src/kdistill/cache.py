"""The teacher-output cache: a teacher's outputs on a data set, computed once and reused across epochs and runs.

Layout: ``<root>/<key>/``, one folder per (teacher fingerprint, data fingerprint, output kind, storage):

- while filling: ``key.json`` (what the entry is for) and ``part-<start>-<stop>.safetensors`` chunks, each written
  atomically with a BLAKE2b checksum of its arrays in its metadata. A fill that is killed leaves whole chunks only;
  the next fill verifies them and computes only the missing ones.
- when complete: one ``.npy`` file per array (``logits`` for fp32/fp16; ``values``, ``indices``, ``rest`` for
  top-k), read memory-mapped so a set larger than RAM works, and ``manifest.json`` (written last, atomically) with
  each file's shape, dtype and BLAKE2b checksum. Opening an entry verifies the checksums; a mismatch is a
  :class:`~kdistill.errors.CacheError` that says which file, and :func:`cached_teacher_outputs` then recomputes
  the entry instead of using it.

Storage options: ``"fp32"`` (exact), ``"fp16"`` (half the bytes; logits rounded to ~3 significant digits) and
``"topk:K"`` (K largest logits + their indices + the log-sum-exp of the rest; for many classes, read with the
``kd_topk`` loss, which uses that form exactly).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file as load_numpy_file
from safetensors.numpy import save as save_numpy

from kdistill.data import fingerprint_arrays
from kdistill.errors import CacheError
from kdistill.io import atomic_write_bytes, atomic_write_json
from kdistill.losses.kd_topk import encode_topk, pack_topk
from kdistill.teachers.base import Teacher

__all__ = [
    "DEFAULT_CACHE_DIR",
    "CacheEntry",
    "CacheKey",
    "cache_entries",
    "cached_teacher_outputs",
    "clear_cache",
    "default_cache_dir",
    "fill_cache",
    "open_entry",
    "parse_storage",
]

_log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = ".kdistill-cache"
_MANIFEST = "manifest.json"
_KEY_FILE = "key.json"
_FORMAT_VERSION = 1
_BLOCK = 1 << 20


def default_cache_dir() -> Path:
    """``$KDISTILL_CACHE_DIR`` when set, else ``./.kdistill-cache``."""
    return Path(os.environ.get("KDISTILL_CACHE_DIR", DEFAULT_CACHE_DIR))


def parse_storage(storage: str) -> tuple[str, int | None]:
    """``"fp32"`` -> ("fp32", None), ``"fp16"`` -> ("fp16", None), ``"topk:K"`` -> ("topk", K)."""
    if storage in ("fp32", "fp16"):
        return storage, None
    if storage.startswith("topk:"):
        try:
            k = int(storage.split(":", 1)[1])
        except ValueError:
            k = 0
        if k >= 1:
            return "topk", k
    raise CacheError(
        f"unknown cache storage {storage!r}", hint="use 'fp32', 'fp16' or 'topk:K' with K >= 1 (e.g. 'topk:8')."
    )


@dataclass(frozen=True)
class CacheKey:
    """What an entry holds: ``teacher`` = ``Teacher.fingerprint()``, ``data`` = fingerprint of the inputs, ``kind`` of
    output (``"logits"``), ``storage`` (``"fp32"``, ``"fp16"``, ``"topk:K"``)."""

    teacher: str
    data: str
    kind: str
    storage: str

    def digest(self) -> str:
        """The entry's folder name: 32 hex characters of BLAKE2b over the four fields."""
        text = json.dumps([_FORMAT_VERSION, self.teacher, self.data, self.kind, self.storage])
        return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _checksum_arrays(arrays: dict[str, np.ndarray]) -> str:
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


def _encode(logits: torch.Tensor, storage: str) -> dict[str, np.ndarray]:
    """The arrays stored for ``logits`` (rows, classes) float32 in ``storage``."""
    mode, k = parse_storage(storage)
    if mode == "fp32":
        return {"logits": logits.float().numpy()}
    if mode == "fp16":
        largest = float(logits.abs().max()) if logits.numel() else 0.0
        if largest > float(np.finfo(np.float16).max):
            raise CacheError(
                f"teacher logits reach {largest:.3g}, beyond float16's range (65504)",
                hint="use cache storage 'fp32' (or 'topk:K') for this teacher.",
            )
        return {"logits": logits.float().numpy().astype(np.float16)}
    assert k is not None
    values, indices, rest = encode_topk(logits.float(), k)
    index_dtype = np.int16 if logits.shape[1] <= np.iinfo(np.int16).max else np.int32
    return {"values": values.numpy(), "indices": indices.numpy().astype(index_dtype), "rest": rest.numpy()}


@dataclass
class CacheEntry:
    """A complete, verified entry. ``arrays``: name -> read-only memory-mapped array, rows first."""

    folder: Path
    key: CacheKey
    rows: int
    classes: int
    arrays: dict[str, np.ndarray]
    created: float

    @property
    def storage(self) -> str:
        return self.key.storage

    def nbytes(self) -> int:
        """Bytes of the stored arrays (without the .npy headers)."""
        return int(sum(array.nbytes for array in self.arrays.values()))

    def teacher_targets(self) -> torch.Tensor:
        """What the engine indexes by row. fp32/fp16: the logits (rows, classes), memory-mapped (no copy; fp16 stays
        fp16 and is upcast per batch by the loss). topk: the packed (rows, 2k + 1) form for ``kd_topk``, in memory."""
        if "logits" in self.arrays:
            return torch.from_numpy(self.arrays["logits"])
        values, indices, rest = (torch.from_numpy(np.asarray(self.arrays[n])) for n in ("values", "indices", "rest"))
        return pack_topk(values, indices.long(), rest)


def _entry_folder(root: Path, key: CacheKey) -> Path:
    return root / key.digest()


def _parts(folder: Path) -> Iterator[tuple[int, int, Path]]:
    for path in sorted(folder.glob("part-*.safetensors")):
        _, start, stop = path.stem.split("-")
        yield int(start), int(stop), path


def _read_part(path: Path, rows: int) -> dict[str, np.ndarray] | None:
    """A chunk's arrays, or None (with a warning) when it is unreadable or fails its checksum."""
    try:
        arrays = load_numpy_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as handle:
            expected = (handle.metadata() or {}).get("checksum")
    except (SafetensorError, OSError, ValueError) as exc:
        _log.warning("cache chunk %s is unreadable (%s); recomputing it", path.name, exc)
        return None
    if expected != _checksum_arrays(arrays) or any(len(a) != rows for a in arrays.values()):
        _log.warning("cache chunk %s fails its checksum; recomputing it", path.name)
        return None
    return arrays


def open_entry(root: str | os.PathLike[str], key: CacheKey, *, verify: bool = True) -> CacheEntry | None:
    """The complete entry for ``key`` under ``root``, memory-mapped; None when there is none (or it is still filling).

    Raises :class:`CacheError` when the entry exists but a file is missing, truncated or fails its checksum
    (``verify=True`` reads every byte once to check).
    """
    folder = _entry_folder(Path(root), key)
    manifest_path = folder / _MANIFEST
    if not manifest_path.exists():
        return None
    hint = f"delete it with `kdistill cache clear --dir {root} {folder.name}`; kdistill.distill recomputes it."
    try:
        manifest = json.loads(manifest_path.read_text())
        stored_key = CacheKey(**manifest["key"])
        files = manifest["arrays"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CacheError(f"cache manifest {manifest_path} is unreadable ({exc})", hint=hint) from exc
    if stored_key != key:
        raise CacheError(f"cache entry {folder.name} holds {stored_key}, not {key}", hint=hint)
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
    return CacheEntry(folder, key, int(manifest["rows"]), int(manifest["classes"]), arrays, float(manifest["created"]))


def _finalize(folder: Path, key: CacheKey, rows: int, chunks: list[tuple[int, int, Path]]) -> None:
    """Stream the chunks into one memory-mapped .npy per array, checksum them, then write the manifest."""
    from safetensors import safe_open

    first = load_numpy_file(str(chunks[0][2]))
    with safe_open(str(chunks[0][2]), framework="numpy") as handle:
        classes = int((handle.metadata() or {})["classes"])
    layout = {name: (array.dtype, array.shape[1:]) for name, array in first.items()}
    targets: dict[str, np.memmap] = {}
    for name, (dtype, tail) in layout.items():
        tmp = folder / f".{name}.npy.tmp"
        targets[name] = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(rows, *tail))
    for start, stop, path in chunks:
        arrays = load_numpy_file(str(path))
        for name, target in targets.items():
            target[start:stop] = arrays[name]
    files: dict[str, Any] = {}
    for name, target in targets.items():
        target.flush()
        tmp = Path(target.filename)  # type: ignore[arg-type]
        del target
        with tmp.open("rb+") as handle:
            os.fsync(handle.fileno())
        final = folder / f"{name}.npy"
        os.replace(tmp, final)
        dtype, tail = layout[name]
        files[name] = {
            "file": final.name,
            "dtype": str(dtype),
            "shape": [rows, *tail],
            "blake2b": _checksum_file(final),
        }
    manifest = {
        "key": asdict(key),
        "rows": rows,
        "classes": classes,
        "arrays": files,
        "created": time.time(),
        "format": _FORMAT_VERSION,
    }
    atomic_write_json(folder / _MANIFEST, manifest)
    for _, _, path in chunks:
        path.unlink(missing_ok=True)


def fill_cache(
    root: str | os.PathLike[str],
    key: CacheKey,
    teacher: Teacher,
    x: torch.Tensor,
    *,
    chunk_rows: int = 4096,
    batch_size: int = 1024,
) -> CacheEntry:
    """Compute ``teacher``'s logits on ``x`` (rows, *features) into the entry for ``key``, resuming a killed fill.

    Chunks of ``chunk_rows`` rows are written atomically as they are computed; chunks already on disk (and passing
    their checksum) are not recomputed. When every chunk is there, they are assembled into the memory-mapped files.
    """
    folder = _entry_folder(Path(root), key)
    folder.mkdir(parents=True, exist_ok=True)
    rows = len(x)
    key_file = folder / _KEY_FILE
    described = {"key": asdict(key), "rows": rows, "chunk_rows": chunk_rows}
    if key_file.exists():
        try:
            previous = json.loads(key_file.read_text())
        except (OSError, ValueError):
            previous = None
        if previous != described:  # another layout (chunk size) or a damaged file: start the fill over
            _log.warning("cache entry %s was being filled differently; starting over", folder.name)
            for _, _, path in _parts(folder):
                path.unlink()
    atomic_write_json(key_file, described)
    done = {(start, stop) for start, stop, path in _parts(folder) if _read_part(path, stop - start) is not None}
    if done:
        _log.info(
            "cache entry %s: resuming, %d of %d chunks already there", folder.name, len(done), -(-rows // chunk_rows)
        )
    from kdistill.teachers.base import teacher_logits

    for start in range(0, rows, chunk_rows):
        stop = min(rows, start + chunk_rows)
        if (start, stop) in done:
            continue
        logits = teacher_logits(teacher, x[start:stop], batch_size=batch_size)
        arrays = _encode(logits, key.storage)
        metadata = {"checksum": _checksum_arrays(arrays), "classes": str(logits.shape[1])}
        path = folder / f"part-{start:012d}-{stop:012d}.safetensors"
        atomic_write_bytes(path, save_numpy(arrays, metadata=metadata))
    chunks = [(start, stop, path) for start, stop, path in _parts(folder) if stop <= rows]
    _finalize(folder, key, rows, chunks)
    entry = open_entry(root, key, verify=False)
    assert entry is not None
    return entry


def cached_teacher_outputs(
    teacher: Teacher,
    x: torch.Tensor,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    storage: str = "fp32",
    chunk_rows: int = 4096,
    batch_size: int = 1024,
) -> CacheEntry:
    """The cache entry of ``teacher``'s logits on ``x``: opened when it exists and verifies, else (re)computed.

    Keyed by (``teacher.fingerprint()``, :func:`~kdistill.data.fingerprint_arrays` of ``x``, ``"logits"``,
    ``storage``): a changed teacher or changed data gets a new entry, never stale targets. A corrupt entry is
    reported (a warning with the :class:`CacheError`'s message), deleted and recomputed, never used.
    """
    parse_storage(storage)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = CacheKey(teacher=teacher.fingerprint(), data=fingerprint_arrays(x), kind="logits", storage=storage)
    try:
        entry = open_entry(root, key)
    except CacheError as exc:
        _log.warning("%s; recomputing the entry", exc.message)
        shutil.rmtree(_entry_folder(root, key))
        entry = None
    if entry is not None:
        _log.info("teacher outputs from the cache: %s (%d rows, %s)", entry.folder, entry.rows, storage)
        return entry
    return fill_cache(root, key, teacher, x, chunk_rows=chunk_rows, batch_size=batch_size)


@dataclass(frozen=True)
class EntryInfo:
    """One line of ``kdistill cache ls``."""

    name: str
    complete: bool
    rows: int | None
    classes: int | None
    storage: str | None
    teacher: str | None
    data: str | None
    size_bytes: int
    created: float | None


def cache_entries(root: str | os.PathLike[str] | None = None) -> list[EntryInfo]:
    """Every entry under ``root`` (complete or partially filled), oldest first; nothing is verified or loaded."""
    folder = Path(root) if root is not None else default_cache_dir()
    if not folder.is_dir():
        return []
    infos = []
    for entry in sorted(p for p in folder.iterdir() if p.is_dir()):
        size = sum(f.stat().st_size for f in entry.iterdir() if f.is_file())
        described: dict[str, Any] = {}
        for name in (_MANIFEST, _KEY_FILE):
            try:
                described = json.loads((entry / name).read_text())
                break
            except (OSError, ValueError):
                continue
        key = described.get("key", {})
        infos.append(
            EntryInfo(
                name=entry.name,
                complete=(entry / _MANIFEST).exists(),
                rows=described.get("rows"),
                classes=described.get("classes"),
                storage=key.get("storage"),
                teacher=key.get("teacher"),
                data=key.get("data"),
                size_bytes=size,
                created=described.get("created", entry.stat().st_mtime),
            )
        )
    return sorted(infos, key=lambda info: info.created or 0.0)


def clear_cache(root: str | os.PathLike[str] | None = None, names: list[str] | None = None) -> list[str]:
    """Delete the entries ``names`` (folder names, or unique prefixes of them), or every entry; returns those deleted.

    Raises :class:`CacheError` for a name that matches no entry (or several)."""
    folder = Path(root) if root is not None else default_cache_dir()
    existing = [info.name for info in cache_entries(folder)]
    chosen = existing if not names else []
    for name in names or []:
        matches = [entry for entry in existing if entry.startswith(name)]
        if len(matches) != 1:
            raise CacheError(
                f"{name!r} matches {len(matches)} cache entries in {folder}",
                hint="pass a name (or unique prefix) from `kdistill cache ls`.",
            )
        chosen.append(matches[0])
    for name in chosen:
        shutil.rmtree(folder / name)
    return chosen
