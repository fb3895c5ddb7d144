"""Memory-bounded token losses: the divergences of :mod:`kdistill.losses.token` computed a chunk of tokens at a time.

The naive loss over (tokens, vocab) logits keeps several float32 (tokens × vocab) tensors alive until backward (the
upcast logits, both log-softmaxes, the probabilities, the products); at a 32k vocabulary that is what runs out of
memory first. Here the forward pass walks the real tokens ``chunk_size`` at a time without building a graph, and the
backward pass walks them again, recomputing each chunk's loss with gradients and writing that chunk's gradient into
the one gradient tensor that any loss must return. At most one chunk's ``chunk_size × vocab`` float32 intermediates
exist at once.

Two forms:

- :func:`chunked_token_loss` takes the student's logits (batch, seq, vocab), as every kdistill loss does (the logits
  and their gradient remain, in the logits' dtype; the float32 intermediates are bounded).
- :func:`chunked_head_loss` takes the student's last hidden states (batch, seq, hidden) and its output head's weight
  (vocab, hidden) instead, so the logits themselves are never held beyond a chunk (Liger's fused-linear idea):
  memory is ``chunk_size × vocab`` plus the head's gradient.

Choosing ``chunk_size``: the chunk's float32 working set is about ``6 × chunk_size × vocab × 4`` bytes (logits,
two log-softmaxes, probabilities, a product, the gradient), so ``chunk_size = budget_bytes / (24 × vocab)``:
1024 tokens at vocab 32k is ~0.8 GB; 256 tokens ~0.2 GB. Smaller chunks cost more Python overhead per token (the
benchmark measures the trade-off); :func:`chunk_size_for` computes it from a byte budget.

The token losses' default, ``chunk_size="auto"`` (:func:`auto_chunk_size`), ties the chunk to the batch instead: the
logits form cannot go below the student's logits' gradient (one tokens × vocab tensor, about 1/7 of what the naive
loss keeps), and a chunk of a sixteenth of the batch's counted tokens adds about 10/16 of one more (measured: the
backward's recomputation keeps ~10 chunk-sized float32 tensors), so the peak stays near 1.6/7 ≈ 0.23 of the naive
loss's, under the 1/4 target, whatever the batch. Small batches (the naive loss's working set under 64 MiB) are not
chunked at all (same numbers as before, no per-chunk overhead); a chunk never exceeds :func:`chunk_size_for`'s
256 MiB budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from kdistill.errors import MethodError
from kdistill.losses.common import check_token_shapes, counted_positions, token_count
from kdistill.losses.token import (
    _at_least_float32,
    _check_unit,
    _divergence_and_ce,
    check_tail_reader,
    check_teacher_fits,
    divergence,
)
from kdistill.teachers.base import TopK

__all__ = ["AUTO_CHUNK_PARTS", "auto_chunk_size", "chunk_size_for", "chunked_head_loss", "chunked_token_loss"]

_BYTES_PER_LOGIT = 24
"""float32 numbers alive per (token, vocab entry) in one chunk: about six (see the module docstring)."""


def chunk_size_for(vocab: int, budget_bytes: int = 256 * 2**20) -> int:
    """The number of tokens per chunk whose float32 working set fits ``budget_bytes`` (default 256 MiB) at ``vocab``
    entries: ``max(1, budget_bytes // (24 · vocab))``."""
    return max(1, budget_bytes // (_BYTES_PER_LOGIT * vocab))


AUTO_CHUNK_PARTS = 16
"""``chunk_size="auto"`` cuts a large batch's counted tokens into this many chunks (see the module docstring)."""

_UNCHUNKED_BYTES = 64 * 2**20
"""Below this naive working set (7 float32 numbers per token and vocabulary entry) ``"auto"`` does not chunk."""


def auto_chunk_size(tokens: int, vocab: int) -> int | None:
    """The chunk ``chunk_size="auto"`` uses for ``tokens`` counted tokens over ``vocab`` entries: None (no chunking)
    when the naive loss's float32 working set ``7 · 4 · tokens · vocab`` bytes is under 64 MiB, else
    ``ceil(tokens / 16)`` tokens, at most :func:`chunk_size_for` ``(vocab)``."""
    if 7 * 4 * tokens * vocab < _UNCHUNKED_BYTES:
        return None
    return max(1, min(-(-tokens // AUTO_CHUNK_PARTS), chunk_size_for(vocab)))


@dataclass(frozen=True)
class _Settings:
    kind: str
    temperature: float
    beta: float
    skew: float
    chunk_size: int
    want_hard: bool


def _teacher_rows(teacher: torch.Tensor | TopK, rows: torch.Tensor) -> torch.Tensor | TopK:
    if isinstance(teacher, TopK):
        return teacher.flat().index_select(rows)
    return teacher.reshape(-1, teacher.shape[-1]).index_select(0, rows)


def _chunk_sums(
    logits: torch.Tensor, teacher: torch.Tensor | TopK, target: torch.Tensor | None, settings: _Settings
) -> torch.Tensor:
    """(2,): the chunk's summed divergence (before T²) and summed cross-entropy (0 without targets)."""
    soft, hard = _divergence_and_ce(_at_least_float32(logits), teacher, target, settings.temperature, settings.kind,
                                    settings.beta, settings.skew)  # fmt: skip
    return torch.stack([soft.sum(), soft.new_zeros(()) if hard is None else hard.sum()])


def _chunks(positions: torch.Tensor, size: int) -> list[torch.Tensor]:
    return list(positions.split(size)) if len(positions) else []


class _ChunkedLogits(torch.autograd.Function):
    """sums (2,) of :func:`_chunk_sums` over the counted ``positions`` of flat (tokens, vocab) logits, chunk by chunk;
    backward recomputes each chunk with gradients."""

    @staticmethod
    def forward(
        ctx: Any,
        logits: torch.Tensor,
        positions: torch.Tensor,
        target: torch.Tensor | None,
        teacher: torch.Tensor | TopK,
        settings: _Settings,
    ) -> torch.Tensor:
        total = logits.new_zeros(2, dtype=torch.float64 if logits.dtype == torch.float64 else torch.float32)
        with torch.no_grad():
            for rows in _chunks(positions, settings.chunk_size):
                chunk_target = None if target is None else target.index_select(0, rows)
                total += _chunk_sums(logits.index_select(0, rows), _teacher_rows(teacher, rows), chunk_target, settings)
        ctx.save_for_backward(logits, positions, *([] if target is None else [target]))
        ctx.teacher, ctx.settings = teacher, settings
        return total

    @staticmethod
    def backward(ctx: Any, grad_sums: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        logits, positions, *maybe_target = ctx.saved_tensors
        target = maybe_target[0] if maybe_target else None
        grad = torch.zeros_like(logits)
        for rows in _chunks(positions, ctx.settings.chunk_size):
            with torch.enable_grad():
                chunk = logits.index_select(0, rows).detach().requires_grad_()
                chunk_target = None if target is None else target.index_select(0, rows)
                sums = _chunk_sums(chunk, _teacher_rows(ctx.teacher, rows), chunk_target, ctx.settings)
                (chunk_grad,) = torch.autograd.grad((sums * grad_sums).sum(), chunk)
            grad.index_copy_(0, rows, chunk_grad.to(grad.dtype))
        return grad, None, None, None, None


class _ChunkedHead(torch.autograd.Function):
    """As :class:`_ChunkedLogits`, from flat hidden states (tokens, hidden) and a head ``weight`` (vocab, hidden)
    (and ``bias`` (vocab,) or None): each chunk's logits are made, used and dropped."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        positions: torch.Tensor,
        target: torch.Tensor | None,
        teacher: torch.Tensor | TopK,
        settings: _Settings,
    ) -> torch.Tensor:
        total = hidden.new_zeros(2, dtype=torch.float64 if hidden.dtype == torch.float64 else torch.float32)
        with torch.no_grad():
            for rows in _chunks(positions, settings.chunk_size):
                logits = F.linear(hidden.index_select(0, rows), weight, bias)
                chunk_target = None if target is None else target.index_select(0, rows)
                total += _chunk_sums(logits, _teacher_rows(teacher, rows), chunk_target, settings)
        ctx.has_bias, ctx.has_target = bias is not None, target is not None
        saved = [hidden, weight, positions]
        saved += [bias] if bias is not None else []
        saved += [target] if target is not None else []
        ctx.save_for_backward(*saved)
        ctx.teacher, ctx.settings = teacher, settings
        return total

    @staticmethod
    def backward(ctx: Any, grad_sums: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, positions, *rest = ctx.saved_tensors
        bias = rest.pop(0) if ctx.has_bias else None
        target = rest.pop(0) if ctx.has_target else None
        grad_hidden = torch.zeros_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=_at_least_float32(weight[:0]).dtype)
        grad_bias = None if bias is None else torch.zeros_like(bias, dtype=grad_weight.dtype)
        for rows in _chunks(positions, ctx.settings.chunk_size):
            with torch.enable_grad():
                chunk = hidden.index_select(0, rows).detach().requires_grad_()
                leaf_weight = weight.detach().requires_grad_()
                leaf_bias = None if bias is None else bias.detach().requires_grad_()
                logits = F.linear(chunk, leaf_weight, leaf_bias)
                chunk_target = None if target is None else target.index_select(0, rows)
                sums = _chunk_sums(logits, _teacher_rows(ctx.teacher, rows), chunk_target, ctx.settings)
                inputs = [chunk, leaf_weight] + ([] if leaf_bias is None else [leaf_bias])
                grads = torch.autograd.grad((sums * grad_sums).sum(), inputs)
            grad_hidden.index_copy_(0, rows, grads[0].to(grad_hidden.dtype))
            grad_weight += grads[1]
            if grad_bias is not None:
                grad_bias += grads[2]
        return (
            grad_hidden,
            grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),  # type: ignore[union-attr]
            None,
            None,
            None,
            None,
        )


def _settings(kind: str, temperature: float, soft_weight: float, beta: float, skew: float, chunk_size: int,
              want_hard: bool) -> _Settings:  # fmt: skip
    if temperature <= 0:
        raise MethodError(f"temperature must be > 0, got {temperature}", hint="use a temperature such as 1 or 2.")
    _check_unit("soft_weight", soft_weight)
    if chunk_size < 1:
        raise MethodError(f"chunk_size must be >= 1 tokens, got {chunk_size}", hint="see chunk_size_for(vocab).")
    divergence(torch.zeros(1, 2), torch.zeros(1, 2), kind, beta=beta, skew=skew)  # checks kind, beta, skew
    return _Settings(kind, temperature, beta, skew, chunk_size, want_hard)


def _mix(
    sums: torch.Tensor, count: torch.Tensor | float, target: torch.Tensor | None, temperature: float, soft_weight: float
) -> dict[str, torch.Tensor]:
    soft = sums[0] / count * temperature**2
    if target is None:
        return {"loss": soft, "kd": soft}
    hard = sums[1] / count
    return {"loss": (1.0 - soft_weight) * hard + soft_weight * soft, "ce": hard, "kd": soft}


def chunked_token_loss(
    student_logits: torch.Tensor,
    teacher: torch.Tensor | TopK,
    target: torch.Tensor | None,
    *,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    soft_weight: float = 0.5,
    beta: float = 0.5,
    skew: float = 0.1,
    mask: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
    chunk_size: int = 1024,
) -> dict[str, torch.Tensor]:
    """:func:`~kdistill.losses.token.token_distill_loss`, the same value and gradient (to float rounding), with at
    most ``chunk_size`` tokens' float32 intermediates alive at once (see the module docstring). Same arguments and
    terms, plus ``chunk_size`` (tokens per chunk)."""
    check_token_shapes(student_logits, mask, target, method=f"chunked {kind}")
    check_teacher_fits(student_logits, teacher, f"chunked {kind}")
    check_tail_reader(teacher, kind, temperature, beta, skew)
    settings = _settings(kind, temperature, soft_weight, beta, skew, chunk_size, target is not None)
    counted = counted_positions(
        student_logits.shape[:-1], None if mask is None else mask.bool(), target, student_logits.device
    )
    positions = counted.reshape(-1).nonzero().squeeze(1)
    flat = student_logits.reshape(-1, student_logits.shape[-1])
    flat_target = None if target is None else target.reshape(-1)
    sums = _ChunkedLogits.apply(flat, positions, flat_target, teacher, settings)
    return _mix(sums, token_count(counted, normalizer), target, temperature, soft_weight)


def chunked_head_loss(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    teacher: torch.Tensor | TopK,
    target: torch.Tensor | None,
    *,
    head_bias: torch.Tensor | None = None,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    soft_weight: float = 0.5,
    beta: float = 0.5,
    skew: float = 0.1,
    mask: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
    chunk_size: int = 1024,
) -> dict[str, torch.Tensor]:
    """The loss of :func:`chunked_token_loss` on the logits ``hidden @ head_weight.T + head_bias``, without ever
    holding more than ``chunk_size`` tokens of them: gradients flow to ``hidden`` (batch, seq, hidden),
    ``head_weight`` (vocab, hidden) and ``head_bias`` (vocab,). For a Hugging Face causal LM: ``hidden`` is
    ``model.model(...)``'s / ``model.transformer(...)``'s last hidden state and ``head_weight`` is
    ``model.lm_head.weight``."""
    if hidden.ndim != 3 or head_weight.ndim != 2 or hidden.shape[-1] != head_weight.shape[-1]:
        raise MethodError(
            f"chunked_head_loss needs hidden (batch, seq, hidden) and head weight (vocab, hidden); got "
            f"{tuple(hidden.shape)} and {tuple(head_weight.shape)}",
            hint="pass the last hidden states and lm_head.weight.",
        )
    positions_shape = hidden.shape[:-1]
    meta_logits = hidden.new_empty((*positions_shape, head_weight.shape[0]), device="meta")
    check_token_shapes(meta_logits, mask, target, method=f"chunked {kind}")
    check_teacher_fits(meta_logits, teacher, f"chunked {kind}")
    check_tail_reader(teacher, kind, temperature, beta, skew)
    settings = _settings(kind, temperature, soft_weight, beta, skew, chunk_size, target is not None)
    counted = counted_positions(positions_shape, None if mask is None else mask.bool(), target, hidden.device)
    positions = counted.reshape(-1).nonzero().squeeze(1)
    flat = hidden.reshape(-1, hidden.shape[-1])
    flat_target = None if target is None else target.reshape(-1)
    sums = _ChunkedHead.apply(flat, head_weight, head_bias, positions, flat_target, teacher, settings)
    return _mix(sums, token_count(counted, normalizer), target, temperature, soft_weight)
