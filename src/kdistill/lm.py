"""Language-model distillation helpers [hf]: an offline corpus (the Python standard library's source), a byte-level
BPE tokenizer trained on it, token blocks, small GPT-2 / Llama causal LMs from configs or local folders, the
vocabulary check between teacher and student, a student from a subset of the teacher's layers, and GKD's on-policy
data (:class:`OnPolicyMixer`: with probability λ a batch's continuations are the student's own samples).

Everything here runs offline: no hub download is ever attempted (``local_files_only=True``).

The vocabulary check (:func:`check_vocabularies`) is the guard against the silent mismatch: a student whose logits
cover another vocabulary than the teacher's is an error naming both sizes. One mismatch is legitimate, the
**padded embedding**: a model whose embedding (and logit) rows were rounded up (GPT-2's 50257 ids padded to 50304
for speed) has extra rows the tokenizer never produces. Those ids never occur as inputs or targets, so they carry no
knowledge to distil; :func:`check_vocabularies` then returns the tokenizer's size and :class:`LMLogits` cuts both
models' logits to it (the softmax is then over the real vocabulary, and the padded rows get no gradient).
"""

from __future__ import annotations

import hashlib
import inspect
import sysconfig
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdistill._deps import require
from kdistill.errors import ConfigError, DataError, ShapeMismatchError, StudentError

__all__ = [
    "LMLogits",
    "OnPolicyMixer",
    "causal_lm",
    "check_vocabularies",
    "encode_blocks",
    "lm_student",
    "load_causal_lm",
    "logit_rows",
    "sample_continuations",
    "stdlib_sources",
    "tokenizer_size",
    "train_tokenizer",
]

EOS = "<|endoftext|>"
"""The separator appended after every document (and the tokenizer's only special token)."""


# ---- corpus and tokenizer ------------------------------------------------------------------------------------------
def _held_out(relative: str, validation_share: float) -> bool:
    digest = hashlib.blake2b(relative.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < validation_share


def stdlib_sources(
    *,
    max_files: int | None = None,
    validation_share: float = 0.1,
    root: str | Path | None = None,
) -> tuple[list[str], list[str]]:
    """The Python standard library's ``.py`` sources as (train, validation) lists of file texts: sorted by path, the
    test suites (``test/``, ``tests/``, ``idlelib/idle_test``), ``site-packages`` and ``lib2to3`` left out, and
    split by a hash of each module's relative path (held out when it falls below ``validation_share``), so the split
    is the same on every machine with this Python version and held-out modules are never seen in training.
    ``max_files``: keep the first that many of each split's files (in path order) for small runs."""
    base = Path(root) if root is not None else Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "lib2to3", "__pycache__"}
    train: list[str] = []
    val: list[str] = []
    for path in sorted(base.rglob("*.py")):
        relative = path.relative_to(base).as_posix()
        if skip & set(relative.split("/")[:-1]):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        (val if _held_out(relative, validation_share) else train).append(text)
    if not train or not val:
        raise DataError(f"no Python sources under {base}", hint="pass root= a folder of .py files.")
    if max_files is not None:
        train, val = train[:max_files], val[: max(1, max_files // 8)]
    return train, val


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, *, min_frequency: int = 2) -> Any:
    """A byte-level BPE ``tokenizers.Tokenizer`` (GPT-2's pre-tokenizer and decoder) trained on ``texts``, with the
    single special token :data:`EOS` as id 0. Deterministic for the same texts and settings."""
    tokenizers = require("tokenizers", "training a tokenizer")
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    return tokenizer


def tokenizer_size(tokenizer: Any) -> int:
    """The number of ids a tokenizer can produce: ``get_vocab_size()`` of a ``tokenizers.Tokenizer``, ``len()`` of a
    transformers tokenizer (which counts added tokens)."""
    if hasattr(tokenizer, "get_vocab_size"):
        return int(tokenizer.get_vocab_size(with_added_tokens=True))
    return len(tokenizer)


def encode_blocks(tokenizer: Any, texts: Sequence[str], seq_len: int, *, max_blocks: int | None = None) -> torch.Tensor:
    """(rows, seq_len) int64 ids: every text encoded, followed by :data:`EOS`, concatenated in order and cut into
    whole blocks (the tail shorter than a block is dropped; no padding, so every position is a real token)."""
    if seq_len < 2:
        raise DataError(f"seq_len must be >= 2, got {seq_len}", hint="e.g. 128.")
    eos = tokenizer.token_to_id(EOS)
    stream: list[int] = []
    needed = None if max_blocks is None else max_blocks * seq_len
    for encoding in tokenizer.encode_batch(list(texts)):
        stream += [*encoding.ids, eos]
        if needed is not None and len(stream) >= needed:
            break
    blocks = len(stream) // seq_len if needed is None else min(len(stream) // seq_len, max_blocks or 0)
    if blocks == 0:
        raise DataError(f"the texts hold {len(stream)} tokens, fewer than one block of {seq_len}")
    return torch.tensor(stream[: blocks * seq_len], dtype=torch.int64).reshape(blocks, seq_len)


# ---- models --------------------------------------------------------------------------------------------------------
def causal_lm(
    family: str,
    vocab_size: int,
    *,
    layers: int,
    width: int,
    heads: int,
    positions: int = 512,
    seed: int = 0,
    dropout: float = 0.0,
) -> nn.Module:
    """A freshly initialised causal LM of ``family`` ``"gpt2"`` (``GPT2LMHeadModel``) or ``"llama"``
    (``LlamaForCausalLM``, feed-forward 8/3 × width rounded to 8) with tied input/output embeddings, initialised
    under ``torch.manual_seed(seed)`` without touching the global generator."""
    transformers = require("transformers", "language-model helpers")
    if family == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=vocab_size, n_positions=positions, n_embd=width, n_layer=layers, n_head=heads,
            resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        model_class = transformers.GPT2LMHeadModel
    elif family == "llama":
        inner = round(width * 8 / 3 / 8) * 8
        config = transformers.LlamaConfig(
            vocab_size=vocab_size, hidden_size=width, intermediate_size=inner, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=positions,
            tie_word_embeddings=True, attention_dropout=dropout, bos_token_id=0, eos_token_id=0, pad_token_id=None,
        )  # fmt: skip
        model_class = transformers.LlamaForCausalLM
    else:
        raise StudentError(f"unknown causal LM family {family!r}", hint="use 'gpt2' or 'llama'.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_class(config)


def load_causal_lm(source: str | Path | Any) -> nn.Module:
    """A transformers causal LM from a local folder (``save_pretrained`` output; never downloaded) or from a config
    (a ``PretrainedConfig``: freshly initialised), in eval mode."""
    transformers = require("transformers", "language-model helpers")
    if isinstance(source, (str, Path)):
        folder = Path(source)
        if not (folder / "config.json").is_file():
            raise StudentError(
                f"{folder} holds no config.json", hint="pass a folder written by save_pretrained (no hub downloads)."
            )
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    else:
        model = transformers.AutoModelForCausalLM.from_config(source)
    return model.eval()


def logit_rows(model: nn.Module) -> int:
    """How many logits per token a causal LM outputs: its output embedding's rows (else ``config.vocab_size``)."""
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    if size is None:
        raise StudentError(f"cannot tell the vocabulary of {type(model).__name__}", hint="pass a transformers LM.")
    return int(size)


def check_vocabularies(
    teacher: nn.Module,
    student: nn.Module,
    *,
    tokenizer: Any = None,
    student_tokenizer: Any = None,
) -> int:
    """The number of logits teacher and student share, or a :class:`ShapeMismatchError` naming both sizes.

    - Two tokenizers given (the teacher's ``tokenizer`` and the ``student_tokenizer``): they must map the same
      strings to the same ids (same size and the same vocabulary), else the error names both sizes.
    - Equal logit rows: that number (every id is shared).
    - Different logit rows and a tokenizer whose ids all fall below both: the **padded-embedding** case (a model's
      rows rounded up beyond what the tokenizer produces). Returns the tokenizer's size; wrap both models in
      :class:`LMLogits` with it so both softmaxes cover the real ids only.
    - Otherwise the error names the teacher's and the student's sizes.
    """
    teacher_rows, student_rows = logit_rows(teacher), logit_rows(student)
    if tokenizer is not None and student_tokenizer is not None:
        sizes = tokenizer_size(tokenizer), tokenizer_size(student_tokenizer)
        if sizes[0] != sizes[1] or _vocab(tokenizer) != _vocab(student_tokenizer):
            raise ShapeMismatchError(
                f"the teacher's tokenizer has {sizes[0]} ids and the student's {sizes[1]}"
                + (" (same size, different tokens)" if sizes[0] == sizes[1] else ""),
                hint="token-level distillation compares distributions over one vocabulary: give the student the "
                "teacher's tokenizer (a student built with lm_student does).",
            )
    if teacher_rows == student_rows:
        return teacher_rows
    used = None if tokenizer is None else tokenizer_size(tokenizer)
    if used is not None and used <= min(teacher_rows, student_rows):
        return used
    raise ShapeMismatchError(
        f"the teacher outputs {teacher_rows} logits per token and the student {student_rows}"
        + ("" if used is None else f" (the tokenizer produces {used} ids)"),
        hint="build the student with the teacher's vocabulary (lm_student, or causal_lm(vocab_size=...)); when one "
        "model's embedding is only padded beyond the tokenizer, pass tokenizer= so the shared ids are used.",
    )


def _vocab(tokenizer: Any) -> dict[str, int]:
    get = getattr(tokenizer, "get_vocab", None)
    return dict(get()) if callable(get) else {}


class LMLogits(nn.Module):
    """A causal LM seen as a plain module: ``forward(input_ids, attention_mask=None)`` returns its (batch, seq,
    vocab) logits tensor (what kdistill's pipeline and the losses read), optionally cut to the first ``vocab`` ids:
    the padded-embedding case of :func:`check_vocabularies`, where ids at and beyond the tokenizer's size are
    never produced. ``model``: the wrapped LM; :meth:`save_pretrained` saves it whole (padded rows included), in the
    folder layout ``AutoModelForCausalLM.from_pretrained`` loads."""

    def __init__(self, model: nn.Module, vocab: int | None = None) -> None:
        super().__init__()
        rows = logit_rows(model)
        if vocab is not None and not 1 <= vocab <= rows:
            raise ShapeMismatchError(
                f"cannot cut {rows} logits to {vocab}", hint="vocab is at most the model's logit rows."
            )
        self.model = model
        self.vocab = vocab

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **generation: Any) -> Any:
        """The logits tensor; with ``generation`` arguments (``use_cache=True`` and the cache from the last call, as
        :func:`sample_continuations` passes them) the wrapped model's whole output, its ``logits`` cut the same way.
        Generation goes through this call (not the wrapped model's), so hooks on this module still run: FSDP's
        gathering of sharded weights."""
        result = self.model(input_ids=input_ids, attention_mask=attention_mask, **generation)
        logits: torch.Tensor = result.logits if self.vocab is None else result.logits[..., : self.vocab]
        if not generation:
            return logits
        result.logits = logits
        return result

    def save_pretrained(self, folder: str | Path, **kwargs: Any) -> None:
        """The wrapped model's ``save_pretrained(folder)``."""
        self.model.save_pretrained(folder, **kwargs)  # type: ignore[operator]


def lm_student(
    teacher: nn.Module, *, layers: int | None = None, layer_map: Sequence[int] | None = None, width: int | None = None
) -> nn.Module:
    """A student causal LM of the teacher's class and vocabulary: ``layers`` of the teacher's layers (evenly spaced,
    first and last kept), or those of ``layer_map``, with the embeddings, final norm and head copied exactly
    (:func:`kdistill.students.transformer.from_teacher`); ``width`` narrower than the teacher's: a fresh model of
    that width (nothing copied). Its ``save_pretrained`` folder loads with ``AutoModelForCausalLM``."""
    from kdistill.students.transformer import from_teacher

    student = from_teacher(teacher, layers=layers, layer_map=layer_map, hidden_size=width)
    check_vocabularies(teacher, student)
    return student


# ---- on-policy data (GKD) ------------------------------------------------------------------------------------------
def _keeps_a_kv_cache(model: nn.Module) -> bool:
    """Whether ``model`` is a Hugging Face causal LM that keeps a cache of attention keys and values (GPT-2, Llama
    and the rest: their configs carry ``use_cache``)."""
    config = getattr(model, "config", None)
    return bool(getattr(config, "use_cache", False)) and hasattr(model, "prepare_inputs_for_generation")


@torch.no_grad()
def sample_continuations(
    model: nn.Module,
    ids: torch.Tensor,
    *,
    prompt_length: int,
    generator: torch.Generator,
    temperature: float = 1.0,
    kv_cache: bool | None = None,
) -> torch.Tensor:
    """``ids`` (rows, seq) with every position from ``prompt_length`` on replaced by tokens sampled from ``model``
    (a causal LM returning ``.logits`` or a logits tensor) one at a time, at ``temperature``, drawn from
    ``generator`` only (the same generator state gives the same tokens). The model runs in eval mode; its mode is
    restored.

    ``kv_cache``: reuse the attention keys and values of the positions already seen (the model's cache), so each
    new token costs one position's forward pass instead of the whole prefix's: seq − P passes of one token after
    one of the prompt, against seq − P passes of a growing prefix. None (the default) uses it for a Hugging Face
    causal LM (:func:`_keeps_a_kv_cache`, also inside :class:`LMLogits`) and not for a plain module (which gets
    the whole prefix each time); True for a model without one is an error. Both give the same distribution at
    each step (the logits agree to float rounding), so with the same generator they draw the same tokens unless
    two are tied to the last bit."""
    if not 1 <= prompt_length < ids.shape[1]:
        raise DataError(
            f"prompt_length must be in [1, {ids.shape[1] - 1}] for sequences of {ids.shape[1]}, got {prompt_length}",
            hint="keep at least one prompt token and one position to generate.",
        )
    if temperature <= 0:
        raise DataError(f"temperature must be > 0, got {temperature}")
    inner = model.model if isinstance(model, LMLogits) else model
    cached = _keeps_a_kv_cache(inner) if kv_cache is None else kv_cache
    if cached and not _keeps_a_kv_cache(inner):
        raise ConfigError(
            f"kv_cache=True needs a Hugging Face causal LM that returns past_key_values, not a {type(model).__name__}",
            hint="leave kv_cache at None (the default) to use the cache only where the model has one.",
        )
    was_training = model.training
    model.eval()
    try:
        out = ids.clone()
        past = None
        # transformers 5 names the cache argument and output `cache`; 4.x named both `past_key_values`
        name = "cache" if cached and "cache" in inspect.signature(inner.forward).parameters else "past_key_values"
        for position in range(prompt_length, ids.shape[1]):
            if not cached:
                result = model(out[:, :position])
            elif past is None:
                result = model(out[:, :position], use_cache=True)
            else:
                result = model(out[:, position - 1 : position], **{name: past}, use_cache=True)
            logits = result if isinstance(result, torch.Tensor) else result.logits
            past = getattr(result, name) if cached else None
            probs = torch.softmax(logits[:, -1].float() / temperature, dim=-1).cpu()
            out[:, position] = torch.multinomial(probs, 1, generator=generator).squeeze(1).to(out.device)
        return out
    finally:
        model.train(was_training)


class OnPolicyMixer:
    """GKD's data mix (Agarwal et al., 2024): with probability ``student_share`` (GKD's λ) a batch's continuations
    (every position from ``prompt_length`` on) are sampled from the student (:func:`sample_continuations`), else
    the batch is kept; the teacher then labels whatever the batch holds, live. Both the coin and the samples come
    from one generator seeded by ``seed``, so a run is reproducible, and :meth:`state_dict` /
    :meth:`load_state_dict` carry it across a resume.

    Use: ``ids, on_policy = mixer(student, ids)`` before the student's forward pass, then the teacher's logits on
    the returned ``ids``."""

    def __init__(self, student_share: float, *, prompt_length: int, seed: int = 0, temperature: float = 1.0) -> None:
        if not 0.0 <= student_share <= 1.0:
            raise DataError(f"student_share (GKD's lambda) must be in [0, 1], got {student_share}")
        self.student_share = student_share
        self.prompt_length = prompt_length
        self.temperature = temperature
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, student: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, bool]:
        draw = float(torch.rand((), generator=self.generator))
        if draw >= self.student_share:
            return ids, False
        sampled = sample_continuations(
            student, ids, prompt_length=self.prompt_length, generator=self.generator, temperature=self.temperature
        )
        return sampled, True

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The generator's state (what a checkpoint keeps)."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Continue from a :meth:`state_dict`."""
        self.generator.set_state(state["generator"])
