"""Turning what users pass (numpy, pandas, torch tensors, torch Datasets) into checked tensors.

Everything the engine touches goes through :func:`as_split` (or :func:`as_inputs` for the inputs alone), so every
entry point rejects bad data the same way and with the same messages: empty data, NaN or inf, non-numeric columns, and
X and y of different lengths.

The dtype rule: a plain numeric feature array (numpy, pandas or torch, any numeric dtype) becomes float32, as the MLP
and CNN students expect (kdistill 0.1's rule, which the pinned runs depend on). A mapping of arrays (``{"input_ids":
..., "attention_mask": ...}``) keeps every integer and bool dtype as given (``input_ids`` stay int64, for embeddings);
only its floating-point arrays become float32.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from kdistill.errors import DataError, LabelError

__all__ = [
    "Inputs",
    "Split",
    "as_inputs",
    "as_split",
    "check_stream_classes",
    "concat_rows",
    "encode_labels",
    "fingerprint_arrays",
    "input_keys",
    "rows_in",
    "run_trimmed",
    "stream_split",
    "take_rows",
    "trim_padding",
]

Inputs = torch.Tensor | Mapping[str, torch.Tensor]
"""Rows of inputs: one (rows, *features) tensor, or a mapping of (rows, ...) tensors (``input_ids``,
``attention_mask``, ...) that a model takes as keywords."""


@dataclass(frozen=True)
class Split:
    """One checked split of the data.

    ``x``: (rows, *features) float32, or a mapping of (rows, ...) tensors (integer dtypes kept: ``input_ids``,
    ``attention_mask``; see :func:`as_inputs`); ``y``: (rows,) int64 class indices, or None for unlabeled rows.
    ``raw_x`` keeps what the user passed, for teachers (scikit-learn) that want their own input type back.
    """

    x: Any  # Inputs: a tensor or a mapping of tensors
    y: torch.Tensor | None
    raw_x: Any
    stream: Any = None
    """A streamed split (:func:`stream_split`): the Dataset or iterable read batch by batch in training; ``x`` and
    ``y`` then hold only a sample of its rows (for checks and sizing), and ``rows`` its length."""
    rows: int | None = None

    def __len__(self) -> int:
        return self.rows if self.rows is not None else rows_in(self.x)


def rows_in(inputs: Inputs) -> int:
    """The number of rows of a tensor or of a mapping of tensors (the first's; :func:`as_inputs` checks they agree)."""
    if isinstance(inputs, torch.Tensor):
        return int(inputs.shape[0])
    return int(next(iter(inputs.values())).shape[0])


def take_rows(inputs: Inputs, rows: slice | torch.Tensor) -> Inputs:
    """Rows of a tensor or of each tensor of a mapping: ``rows`` is a slice or a (k,) index tensor."""
    if isinstance(inputs, torch.Tensor):
        return inputs[rows]
    return {name: value[rows] for name, value in inputs.items()}


def trim_padding(inputs: Inputs) -> Inputs:
    """A mapping with an ``attention_mask`` of (rows, seq) cut to its longest row: the trailing columns that every
    row pads are dropped from each (rows, seq, ...) tensor (dynamic padding; right padding assumed). Tensors, and
    mappings without a mask, come back as they are."""
    if isinstance(inputs, torch.Tensor) or "attention_mask" not in inputs:
        return inputs
    mask = inputs["attention_mask"]
    if mask.ndim != 2:
        return inputs
    used = mask.ne(0).any(dim=0).nonzero()
    length = int(used.max()) + 1 if len(used) else 1
    if length == mask.shape[1]:
        return inputs
    seq = mask.shape[1]
    return {
        name: value[:, :length] if value.ndim >= 2 and value.shape[1] == seq else value
        for name, value in inputs.items()
    }


SEQUENCE_KEYS = ("input_ids", "attention_mask", "token_type_ids")
"""The per-token inputs of a tokenized mapping, padded on the right by :func:`concat_rows`."""


def concat_rows(parts: Sequence[Inputs], *, pad_token_id: int = 0) -> Inputs:
    """The rows of ``parts`` one after the other: tensors by ``torch.cat``; mappings (the same keys in every part)
    key by key, each (rows, seq) entry of :data:`SEQUENCE_KEYS` padded on the right to the longest ``seq`` of the
    parts first: ``input_ids`` with ``pad_token_id`` (the tokenizer's / model config's ``pad_token_id``),
    ``attention_mask`` and ``token_type_ids`` with 0, so a padded position is never attended to. Other entries are
    concatenated as they are (their shapes past the rows must agree). A mix of tensors and mappings, or mappings with
    different keys, is a :class:`DataError`."""
    if not parts:
        raise DataError("no rows to concatenate", hint="pass at least one tensor or mapping of rows.")
    if all(isinstance(part, torch.Tensor) for part in parts):
        return torch.cat(list(parts))  # type: ignore[arg-type]
    if not all(isinstance(part, Mapping) for part in parts):
        kinds = sorted({"tensor" if isinstance(part, torch.Tensor) else "mapping" for part in parts})
        raise DataError(
            f"cannot concatenate rows of different kinds ({' and '.join(kinds)})",
            hint="give every part the same form: one tensor each, or the same mapping of inputs.",
        )
    mappings = [part for part in parts if isinstance(part, Mapping)]
    keys = sorted(mappings[0])
    for part in mappings[1:]:
        if sorted(part) != keys:
            raise DataError(
                f"cannot concatenate mappings with different keys: {keys} and {sorted(part)}",
                hint="tokenize every part with the same tokenizer, so they hold the same inputs.",
            )
    joined: dict[str, torch.Tensor] = {}
    for key in keys:
        values = [part[key] for part in mappings]
        if key in SEQUENCE_KEYS and all(value.ndim == 2 for value in values):
            length = max(int(value.shape[1]) for value in values)
            fill = pad_token_id if key == "input_ids" else 0
            values = [torch.nn.functional.pad(value, (0, length - int(value.shape[1])), value=fill) for value in values]
        joined[key] = torch.cat(values)
    return joined


def run_trimmed(function: Any, batch: Inputs) -> torch.Tensor:
    """``function(batch)`` on the batch cut to its longest row (:func:`trim_padding`); per-token outputs (rows, seq,
    ...) come back padded with zeros to the batch's full length, so they stay aligned with its positions (the
    attention mask never counts the padded ones)."""
    trimmed = trim_padding(batch)
    outputs = function(trimmed)
    if trimmed is batch or outputs.ndim < 3:
        return outputs
    assert isinstance(batch, Mapping)
    length = batch["attention_mask"].shape[1]
    return torch.nn.functional.pad(outputs, (0, 0, 0, length - outputs.shape[1]))


def input_keys(inputs: Inputs) -> tuple[str, ...] | tuple[int, ...]:
    """What two splits must share to feed one model: a tensor's row shape, or a mapping's names (sequence lengths
    may differ: each batch is padded to its own longest row)."""
    if isinstance(inputs, torch.Tensor):
        return tuple(inputs.shape[1:])
    return tuple(sorted(inputs))


def _to_numpy_x(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    if hasattr(x, "to_numpy") and hasattr(x, "dtypes"):  # pandas DataFrame
        from pandas.api.types import is_bool_dtype, is_numeric_dtype

        bad = [
            str(col)
            for col, dtype in zip(x.columns, x.dtypes, strict=True)
            if not (is_numeric_dtype(dtype) or is_bool_dtype(dtype))
        ]
        if bad:
            raise DataError(
                f"{name} has non-numeric columns: {bad[:5]}",
                hint="encode them first (e.g. sklearn.preprocessing.OneHotEncoder or OrdinalEncoder).",
            )
        return np.asarray(x.to_numpy())
    try:
        return np.asarray(x)
    except Exception as exc:  # ragged lists and other oddities
        raise DataError(f"{name} cannot be read as an array: {exc}", hint="pass a 2-D numeric array.") from exc


def _check_x(x: Any, name: str) -> torch.Tensor:
    array = _to_numpy_x(x, name)
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise DataError(
            f"{name} is not numeric (dtype {array.dtype})",
            hint="encode text or categorical columns as numbers before distilling.",
        )
    if array.ndim == 0 or array.shape[0] == 0:
        raise DataError(f"{name} is empty (shape {array.shape})", hint="pass at least one row.")
    if array.ndim == 1:
        raise DataError(
            f"{name} is 1-D (shape {array.shape}); expected (rows, features)",
            hint="reshape a single feature with x.reshape(-1, 1), or a single row with x.reshape(1, -1).",
        )
    tensor = torch.as_tensor(array.astype(np.float32, copy=False))
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad_rows = (~finite).reshape(len(tensor), -1).any(dim=1).nonzero().flatten()
        raise DataError(
            f"{name} has NaN or inf in {len(bad_rows)} row(s), first at row {int(bad_rows[0])}",
            hint="impute or drop those rows (e.g. sklearn.impute.SimpleImputer) before distilling.",
        )
    return tensor


def as_inputs(x: Any, *, name: str = "X") -> torch.Tensor | dict[str, torch.Tensor]:
    """Check inputs and return them as a tensor or a mapping of tensors, by the module's dtype rule.

    ``x``: (rows, *features) numeric (float32 out, NaN/inf refused), or a mapping of name -> (rows, ...) arrays or
    tensors with the same number of rows (integer and bool dtypes kept; floating ones float32, NaN/inf refused).
    """
    if not isinstance(x, Mapping):
        return _check_x(x, name)
    if not x:
        raise DataError(f"{name} is an empty mapping", hint="pass at least one array, e.g. {'input_ids': ids}.")
    tensors = {str(key): _check_named(value, f"{name}[{key!r}]") for key, value in x.items()}
    rows = {key: int(value.shape[0]) for key, value in tensors.items()}
    if len(set(rows.values())) > 1:
        raise DataError(
            f"{name} has arrays with different numbers of rows: {rows}",
            hint="every array of the mapping describes the same rows (pad sequences to one length per row).",
        )
    return tensors


def _check_named(value: Any, name: str) -> torch.Tensor:
    """One array of an input mapping: integers and bools keep their dtype, floats become float32 (finite)."""
    tensor = value.detach().cpu() if isinstance(value, torch.Tensor) else torch.as_tensor(_to_numpy_x(value, name))
    if tensor.ndim == 0 or tensor.shape[0] == 0:
        raise DataError(f"{name} is empty (shape {tuple(tensor.shape)})", hint="pass at least one row.")
    if tensor.is_complex():
        raise DataError(f"{name} is complex ({tensor.dtype})", hint="pass real numbers.")
    if not tensor.is_floating_point():
        return tensor
    tensor = tensor.float()
    if not bool(torch.isfinite(tensor).all()):
        bad = (~torch.isfinite(tensor)).reshape(len(tensor), -1).any(dim=1).nonzero().flatten()
        raise DataError(
            f"{name} has NaN or inf in {len(bad)} row(s), first at row {int(bad[0])}",
            hint="impute or drop those rows before distilling.",
        )
    return tensor


def _to_numpy_y(y: Any, name: str) -> np.ndarray:
    if isinstance(y, torch.Tensor):
        return y.detach().cpu().numpy()
    if hasattr(y, "to_numpy"):
        return np.asarray(y.to_numpy())
    return np.asarray(y)


def encode_labels(y: Any, classes: np.ndarray | None, *, name: str = "y") -> torch.Tensor:
    """Map labels to class indices (int64).

    With ``classes`` (a teacher's ``classes_``), each label becomes its position there, and labels the teacher never
    saw raise :class:`LabelError`. Without, labels must already be integer indices >= 0.
    """
    array = _to_numpy_y(y, name)
    if array.ndim != 1:
        array = array.reshape(-1) if array.ndim == 2 and array.shape[1] == 1 else array
    if array.ndim != 1:
        raise DataError(f"{name} must be 1-D class labels, got shape {array.shape}", hint="pass y as a 1-D array.")
    if classes is not None:
        classes = np.asarray(classes)
        order = np.argsort(classes, kind="stable")
        try:
            position = np.searchsorted(classes[order], array)
        except TypeError as exc:
            raise LabelError(
                f"{name} labels ({array.dtype}) cannot be compared with the teacher's classes ({classes.dtype})",
                hint="pass labels of the same type as those the teacher was fitted on.",
            ) from exc
        position = np.clip(position, 0, len(classes) - 1)
        found = classes[order][position] == array
        if not bool(np.all(found)):
            unseen = np.unique(array[~found])
            raise LabelError(
                f"{name} has labels the teacher never saw: {unseen[:10].tolist()} "
                f"(teacher classes: {classes[:20].tolist()})",
                hint="drop those rows, or refit the teacher on data that has every class.",
            )
        return torch.as_tensor(order[position].astype(np.int64))
    if array.dtype.kind == "f" and np.all(np.isfinite(array)) and np.all(array == np.round(array)):
        array = array.astype(np.int64)
    if array.dtype.kind not in "iu":
        raise LabelError(
            f"{name} must hold integer class indices, got dtype {array.dtype}",
            hint="encode labels with sklearn.preprocessing.LabelEncoder, or use DistilledClassifier (any labels).",
        )
    if array.size and int(array.min()) < 0:
        raise LabelError(f"{name} has negative labels (min {int(array.min())})", hint="labels are 0..classes-1.")
    return torch.as_tensor(array.astype(np.int64))


def _materialize(dataset: Dataset, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Read a map-style torch Dataset of ``(x, y)`` (or ``x``) items into two tensors, in order."""
    try:
        length = len(dataset)  # type: ignore[arg-type]
    except TypeError as exc:
        raise DataError(f"{name} is a Dataset without len()", hint="pass a map-style Dataset or (X, y).") from exc
    if length == 0:
        raise DataError(f"{name} is an empty Dataset", hint="pass at least one row.")
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    for batch in DataLoader(dataset, batch_size=1024, shuffle=False):
        if isinstance(batch, (list, tuple)):
            xs.append(torch.as_tensor(batch[0]))
            if len(batch) > 1:
                ys.append(torch.as_tensor(batch[1]))
        else:
            xs.append(torch.as_tensor(batch))
    return torch.cat(xs), (torch.cat(ys) if ys else None)


def as_split(data: Any, *, name: str = "train", classes: np.ndarray | None = None, labeled: bool = True) -> Split:
    """Check ``data`` and return a :class:`Split`.

    ``data``: ``(X, y)`` with X of shape (rows, *features) as numpy, pandas or torch; ``X`` alone for unlabeled data
    (``labeled=False``); or a map-style ``torch.utils.data.Dataset`` yielding ``(x, y)``. A Dataset is read once into
    memory (kdistill batches in-memory tensors by indexing, which is 2-3x faster than a per-sample DataLoader).
    ``X`` may be a mapping of arrays (a tokenizer's ``input_ids`` and ``attention_mask``), checked by
    :func:`as_inputs`: integer dtypes are kept and the model is called as ``model(**batch)``.
    """
    if isinstance(data, Dataset):
        x_raw, y_raw = _materialize(data, name)
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        x_raw, y_raw = data
    elif not labeled:
        x_raw, y_raw = data, None
    else:
        raise DataError(
            f"{name} must be an (X, y) pair or a torch Dataset, got {type(data).__name__}",
            hint=f"pass {name}=(X, y).",
        )
    x = as_inputs(x_raw, name=f"{name} X")
    if y_raw is None:
        if labeled:
            raise DataError(f"{name} has no labels", hint=f"pass {name}=(X, y).")
        return Split(x=x, y=None, raw_x=x_raw)
    y = encode_labels(y_raw, classes, name=f"{name} y")
    if len(y) != rows_in(x):
        raise DataError(
            f"{name} X has {rows_in(x)} rows but y has {len(y)}",
            hint="X and y must describe the same rows; check that they come from the same split.",
        )
    return Split(x=x, y=y, raw_x=x_raw)


def stream_split(
    data: Any, *, name: str = "train", classes: np.ndarray | None = None, rows: int | None = None, sample: int = 2048
) -> Split:
    """A split read batch by batch (:class:`~kdistill.engine.StreamingSource`), never held whole: a map-style
    ``Dataset`` of items ``x``, ``(x, y)`` or a mapping, or an ``IterableDataset`` (then ``rows``, the items per
    epoch, is needed when it has no ``len()``). Up to ``sample`` rows are read and checked like in-memory ones (for
    shape checks, sizing a built-in student and fitting its input standardisation): evenly spaced rows of a
    map-style Dataset, the first rows of an iterable. Labels must be class indices already (each batch's are used as
    they come), so a teacher whose classes are other values is refused."""
    from torch.utils.data import IterableDataset, default_collate

    if isinstance(data, IterableDataset) or not hasattr(data, "__getitem__"):
        length = rows if rows is not None else _length(data, name)
        items = list(itertools.islice(iter(data), sample))
    else:
        length = _length(data, name)
        positions = np.unique(np.linspace(0, length - 1, num=min(sample, length)).round().astype(np.int64))
        items = [data[int(i)] for i in positions]
    if not items or length <= 0:
        raise DataError(f"{name} is an empty stream", hint="pass at least one row.")
    if isinstance(items[0], (tuple, list)):
        x_raw = default_collate([item[0] for item in items])
        y_raw = default_collate([item[1] for item in items]) if len(items[0]) > 1 else None
    else:
        x_raw, y_raw = default_collate(items), None
        if isinstance(x_raw, Mapping) and "labels" in x_raw:
            x_raw = dict(x_raw)
            y_raw = x_raw.pop("labels")
    x = as_inputs(x_raw, name=f"{name} X")
    if classes is not None:
        check_stream_classes(classes, name)
    y = None if y_raw is None else encode_labels(y_raw, None, name=f"{name} y")
    return Split(x=x, y=y, raw_x=data, stream=data, rows=int(length))


def check_stream_classes(classes: np.ndarray, name: str) -> None:
    """A streamed split's labels are used as they come, so the teacher's classes must be 0..C-1."""
    if not np.array_equal(np.asarray(classes), np.arange(len(classes))):
        raise LabelError(
            f"{name} is streamed, and its labels are used as they come, but the teacher's classes are "
            f"{np.asarray(classes)[:10].tolist()}, not 0..{len(classes) - 1}",
            hint="yield class indices in the teacher's order (classes_.tolist().index(label)), or load the data "
            "in memory (stream=False).",
        )


def _length(data: Any, name: str) -> int:
    try:
        return len(data)
    except TypeError as exc:
        raise DataError(
            f"{name} streams from a {type(data).__name__} without len()",
            hint="pass the number of items per epoch (stream_rows=N; YAML data.train.rows): the schedule needs it.",
        ) from exc


def fingerprint_arrays(*arrays: Inputs | np.ndarray | None, extra: Sequence[str] = ()) -> str:
    """A short content hash of arrays (shape, dtype and bytes; a mapping's by name), used to key caches and check
    resumed runs."""
    digest = hashlib.blake2b(digest_size=16)
    for item in extra:
        digest.update(item.encode())
    for array in arrays:
        if array is None:
            digest.update(b"none")
            continue
        if isinstance(array, Mapping):
            digest.update(fingerprint_arrays(*(array[key] for key in sorted(array)), extra=sorted(array)).encode())
            continue
        values = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
        values = np.ascontiguousarray(values)
        digest.update(f"{values.shape}{values.dtype}".encode())
        digest.update(values.tobytes())
    return digest.hexdigest()
