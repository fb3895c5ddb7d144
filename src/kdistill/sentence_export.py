"""Save sentence-encoder students in the formats other tools load.

- :func:`save_sentence_transformer`: a :class:`~kdistill.teachers.sentence.SentenceEncoder` (a transformers encoder,
  its pooling and normalisation) as a sentence-transformers folder: the model and tokenizer at the top
  (``save_pretrained``), ``modules.json`` (Transformer, Pooling, and Normalize when the encoder normalises),
  ``1_Pooling/config.json`` and ``sentence_bert_config.json``. ``SentenceTransformer(folder)`` gives the same
  embeddings as the encoder.
- :func:`export_sentence_onnx`: the same encoder as ONNX (``input_ids``, ``attention_mask`` -> ``embeddings``),
  checked against PyTorch, and its dynamic-INT8 quantization.
- :func:`save_model2vec`: a :class:`~kdistill.students.static.StaticEmbedding` in Model2Vec's layout:
  ``model.safetensors`` (``embeddings``: (vocab, dim) float32), ``tokenizer.json``, ``config.json`` (``normalize``,
  ``max_length`` None: no truncation, as the student) and ``modules.json``. ``model2vec.StaticModel.from_pretrained
  (folder)`` gives the same embeddings as the student.

Each folder is written in a temporary sibling folder and renamed into place, so a crash never leaves half a model;
an existing folder is replaced only with ``overwrite=True``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdistill.errors import ExportError
from kdistill.io import atomic_write_bytes, atomic_write_json
from kdistill.students.static import StaticEmbedding
from kdistill.teachers.sentence import SentenceEncoder, check_sentences

__all__ = ["export_sentence_folder", "export_sentence_onnx", "save_model2vec", "save_sentence_transformer"]

_POOLING_FLAGS = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens"}
_ALL_FLAGS = (
    "pooling_mode_cls_token",
    "pooling_mode_mean_tokens",
    "pooling_mode_max_tokens",
    "pooling_mode_mean_sqrt_len_tokens",
)


def _publish(folder: str | os.PathLike[str], overwrite: bool, write: Any) -> Path:
    """Run ``write(tmp)`` in a temporary sibling folder, then rename it to ``folder``."""
    target = Path(folder)
    if target.exists() and not overwrite:
        raise ExportError(f"{target} already exists", hint="pass overwrite=True, or choose a new folder.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        write(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def save_sentence_transformer(
    encoder: SentenceEncoder,
    tokenizer: Any,
    folder: str | os.PathLike[str],
    *,
    max_length: int = 256,
    overwrite: bool = False,
) -> Path:
    """Write ``encoder`` (its ``model`` must have ``save_pretrained``) and ``tokenizer`` (a transformers tokenizer)
    as a sentence-transformers folder; returns its path. A custom pooling function cannot be described in that
    format: an :class:`~kdistill.errors.ExportError`."""
    if not isinstance(encoder.pooling, str):
        raise ExportError(
            "a custom pooling function cannot be saved as a sentence-transformers Pooling module",
            hint="use pooling='mean', 'cls' or 'max' for a model that sentence-transformers loads.",
        )
    model: Any = encoder.model
    if not hasattr(model, "save_pretrained"):
        raise ExportError(
            f"the encoder's model ({type(model).__name__}) has no save_pretrained",
            hint="wrap a transformers model (BertModel, ...) in SentenceEncoder.",
        )
    dim = int(model.config.hidden_size)
    pooling = {flag: flag == _POOLING_FLAGS[encoder.pooling] for flag in _ALL_FLAGS}
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if encoder.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        atomic_write_json(tmp / "modules.json", modules)
        atomic_write_json(tmp / "1_Pooling" / "config.json", {"word_embedding_dimension": dim, **pooling})
        atomic_write_json(tmp / "sentence_bert_config.json", {"max_seq_length": max_length, "do_lower_case": False})
        if encoder.normalize:
            (tmp / "2_Normalize").mkdir()

    return _publish(folder, overwrite, write)


def save_model2vec(student: StaticEmbedding, folder: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write ``student`` in Model2Vec's folder layout (see the module docstring); returns its path."""
    from safetensors.numpy import save as save_safetensors

    vectors = np.ascontiguousarray(student.vectors.weight.detach().cpu().float().numpy())
    config = {**student.config, "hidden_dim": int(vectors.shape[1]), "normalize": bool(student.normalize)}
    config |= {"max_length": None, "embedding_dtype": "float32"}
    modules = [{"idx": 0, "name": "0", "path": ".", "type": "sentence_transformers.models.StaticEmbedding"}]
    if student.normalize:
        modules.append({"idx": 1, "name": "1", "path": "1_Normalize", "type": "sentence_transformers.models.Normalize"})

    def write(tmp: Path) -> None:
        atomic_write_bytes(tmp / "model.safetensors", save_safetensors({"embeddings": vectors}))
        atomic_write_bytes(tmp / "tokenizer.json", student.tokenizer.to_str().encode())
        atomic_write_bytes(tmp / "config.json", (json.dumps(config, indent=2) + "\n").encode())
        atomic_write_json(tmp / "modules.json", modules)

    return _publish(folder, overwrite, write)


class _Traced(torch.nn.Module):
    """The encoder's padding-agnostic forward, for the tracer."""

    def __init__(self, encoder: SentenceEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder.embed(input_ids, attention_mask)


def export_sentence_onnx(
    encoder: SentenceEncoder,
    tokenizer: Any,
    sentences: Sequence[str],
    folder: str | os.PathLike[str],
    *,
    int8: bool = True,
    tolerance: float = 1e-4,
    max_length: int = 256,
) -> dict[str, Any]:
    """Export ``encoder`` to ``folder/model.onnx`` (inputs ``input_ids``, ``attention_mask``: int64 (batch, seq),
    both axes dynamic; output ``embeddings``: (batch, dim)) and, with ``int8``, ``folder/model_int8.onnx`` (ONNX
    Runtime's dynamic INT8 quantization of the weights). Checked on ``sentences`` (tokenised by ``tokenizer``): the
    fp32 file must agree with PyTorch within ``tolerance`` (max |difference|), else
    :class:`~kdistill.errors.ExportError`; the INT8 file's agreement is reported as its smallest cosine similarity
    to PyTorch's embeddings. Returns paths, sizes and those numbers."""
    from kdistill._deps import require
    from kdistill.compress.quantize import quantize_onnx

    onnxruntime = require("onnxruntime")
    texts = check_sentences(sentences)
    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    inputs = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    ids, mask = inputs["input_ids"].long(), inputs["attention_mask"].long()
    module = _Traced(encoder).cpu().eval()
    with torch.no_grad():
        expected = module(ids, mask).numpy()
    fp32 = target / "model.onnx"
    try:
        with (
            tempfile.TemporaryDirectory(prefix="kdistill-onnx-") as scratch,
            warnings.catch_warnings(),
            torch.no_grad(),
        ):
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice and tracer chatter
            scratch_file = Path(scratch) / "model.onnx"
            torch.onnx.export(
                module,
                (ids[:2], mask[:2]),
                str(scratch_file),
                dynamo=False,
                input_names=["input_ids", "attention_mask"],
                output_names=["embeddings"],
                dynamic_axes={
                    "input_ids": {0: "batch", 1: "sequence"},
                    "attention_mask": {0: "batch", 1: "sequence"},
                    "embeddings": {0: "batch"},
                },
                opset_version=17,
            )
            atomic_write_bytes(fp32, scratch_file.read_bytes())
    except Exception as exc:
        raise ExportError(
            f"torch.onnx.export failed for {type(encoder.model).__name__}: {exc}",
            hint="a transformers encoder with mean/cls/max pooling exports; custom pooling must be traceable.",
        ) from exc

    def run(path: Path) -> np.ndarray:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return np.asarray(session.run(["embeddings"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0])

    worst = float(np.abs(run(fp32) - expected).max())
    if worst > tolerance:
        raise ExportError(
            f"the ONNX export differs from PyTorch by {worst:.2e} (tolerance {tolerance:.0e})",
            hint="check the pooling and the opset; the file is kept for inspection at " + str(fp32),
        )
    summary: dict[str, Any] = {"onnx": str(fp32), "onnx_bytes": fp32.stat().st_size, "max_abs_diff": worst}
    if int8:
        quantized = quantize_onnx(fp32, target / "model_int8.onnx", mode="dynamic")
        got = run(quantized.path)
        cosine = (got * expected).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1))
        summary |= {
            "int8": str(quantized.path),
            "int8_bytes": quantized.size_bytes,
            "int8_min_cosine": float(cosine.min()),
        }
    return summary


def export_sentence_folder(
    folder: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    sentences: Sequence[str] | None = None,
    int8: bool = True,
    tolerance: float = 1e-4,
) -> dict[str, Any]:
    """:func:`export_sentence_onnx` for a saved sentence-transformers ``folder`` (what a run writes in
    ``<out>/model`` for a transformer student): checked on ``sentences`` (default: a few built-in ones of several
    lengths); the summary is also written to ``out/export.json``."""
    from kdistill.teachers.sentence import SentenceTeacher

    loaded = SentenceTeacher.from_pretrained(folder)
    checked = list(sentences) if sentences is not None else list(_CHECK_SENTENCES)
    summary = export_sentence_onnx(
        loaded.encoder,
        loaded.tokenizer,
        checked,
        out,
        int8=int8,
        tolerance=tolerance,
        max_length=loaded.max_length or 256,
    )
    atomic_write_json(Path(out) / "export.json", summary)
    return summary


_CHECK_SENTENCES = (
    "Return the sum of the array elements over the given axis.",
    "A small model.",
    "Compute the eigenvalues of a general matrix, sorted in ascending order, and return them with the vectors.",
    "Read the file.",
)
