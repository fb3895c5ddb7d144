"""Token-level divergences for language-model distillation: forward KL, reverse KL, generalized JSD, skew KL (both
directions) and total variation, per token under a padding mask, mixed with next-token cross-entropy.

Every divergence here compares two distributions over the last axis, given as log-probabilities: the teacher's
:math:`p` and the student's :math:`q`, each ``log_softmax(z / T)``. Over (batch, seq, vocab) logits the divergence is
computed per token, summed over the vocabulary, and **averaged over the real tokens** (``mask`` True and target not
-100; padding is never computed at all). The mean is taken over the count of real tokens, never over
``batch × seq`` nor ``batch × seq × vocab`` (TRL's ``batchmean`` once divided by the latter).

Micro-batch invariance: a per-micro-batch mean weighted by rows is not the batch's mean when micro-batches hold
different numbers of real tokens (TRL's gradient-accumulation bug). The functional form takes ``normalizer`` (the
whole batch's real-token count): summing the micro-batches' losses then gives the whole batch's loss and gradient
exactly. The engine does this for you: it weights each token-level micro-batch by its share of the step's real
tokens (:func:`kdistill.engine.loop` ``_token_weights``).

The teacher may be dense logits (batch, seq, vocab) or a :class:`~kdistill.teachers.TopK` (a top-k cache with a
"rest" bucket): the divergence is then taken over the k + 1 buckets (the teacher's k top tokens and one bucket for
all others, see :func:`~kdistill.kd_topk_loss`), computed exactly from the stored form.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F

from kdistill.errors import MethodError, ShapeMismatchError
from kdistill.losses.base import BaseLoss, register_loss
from kdistill.losses.common import check_token_shapes, counted_positions, output_mask, require_teacher, token_count
from kdistill.teachers.base import TOPK_EMPTY_REST, Outputs, TopK

__all__ = [
    "DIVERGENCES",
    "ForwardKL",
    "GeneralizedJSD",
    "ReverseKL",
    "SkewForwardKL",
    "SkewReverseKL",
    "TokenDivergenceLoss",
    "TotalVariation",
    "check_tail_reader",
    "divergence",
    "per_token_divergence",
    "token_distill_loss",
    "token_log_probs",
]

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tv")
"""The names :func:`divergence` accepts."""


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) summed over the last axis; terms where p is exactly 0 count 0 (so -inf logits are safe)."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def _mixture(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(weight_a · a + (1 - weight_a) · b) from log a and log b, for 0 < weight_a < 1 (stable log-sum-exp)."""
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def divergence(
    student_log_probs: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    kind: str = "forward_kl",
    *,
    beta: float = 0.5,
    skew: float = 0.1,
) -> torch.Tensor:
    r"""One divergence per position between teacher :math:`p` and student :math:`q`, over the last axis.

    ``student_log_probs``, ``teacher_log_probs``: (..., vocab) log-probabilities (rows of a log-softmax). Returns
    (...,). With :math:`\mathrm{KL}(a\|b) = \sum_v a_v(\log a_v - \log b_v)`:

    - ``"forward_kl"``: :math:`\mathrm{KL}(p\|q)` (Hinton KD; mass-covering).
    - ``"reverse_kl"``: :math:`\mathrm{KL}(q\|p)` (MiniLLM; mode-seeking).
    - ``"jsd"``: generalized Jensen-Shannon with ``beta`` = :math:`\beta`, TRL's convention (GKDTrainer, after its
      fix of the reversed β): :math:`m = \beta p + (1-\beta) q`,
      :math:`\mathrm{JSD}_\beta = \beta\,\mathrm{KL}(p\|m) + (1-\beta)\,\mathrm{KL}(q\|m)`. ``beta=0`` is defined as
      forward KL and ``beta=1`` as reverse KL (as TRL does): these are the limits of :math:`\mathrm{JSD}_\beta/\beta`
      as :math:`\beta\to0` and of :math:`\mathrm{JSD}_\beta/(1-\beta)` as :math:`\beta\to1`, while
      :math:`\mathrm{JSD}_\beta` itself tends to 0 at both ends. ``beta=0.5`` is the symmetric JSD (at most ln 2).
    - ``"skew_forward_kl"``: DistiLLM's skew KL, :math:`\mathrm{KL}(p\,\|\,\alpha p + (1-\alpha) q)` with
      ``skew`` = :math:`\alpha` (DistiLLM's ``lam``, default 0.1). DistiLLM's code returns the cross-entropy
      :math:`-\sum_v p_v \log(\alpha p_v + (1-\alpha) q_v)`, which is this plus the teacher's entropy
      :math:`H(p)`: the same gradient; add :math:`H(p)` to compare values.
    - ``"skew_reverse_kl"``: :math:`\mathrm{KL}(q\,\|\,\alpha q + (1-\alpha) p)` (DistiLLM's skew reverse KL).
    - ``"tv"``: total variation :math:`\tfrac12\sum_v |p_v - q_v|` (DistillKit's TVD), in [0, 1].
    """
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return _kl(teacher_log_probs, student_log_probs)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return _kl(student_log_probs, teacher_log_probs)
    if kind == "jsd":
        _check_unit("beta", beta)
        mixed = _mixture(teacher_log_probs, student_log_probs, beta)
        return beta * _kl(teacher_log_probs, mixed) + (1.0 - beta) * _kl(student_log_probs, mixed)
    if kind == "skew_forward_kl":
        _check_unit("skew", skew, open_top=True)
        if skew == 0.0:
            return _kl(teacher_log_probs, student_log_probs)
        return _kl(teacher_log_probs, _mixture(teacher_log_probs, student_log_probs, skew))
    if kind == "skew_reverse_kl":
        _check_unit("skew", skew, open_top=True)
        if skew == 0.0:
            return _kl(student_log_probs, teacher_log_probs)
        return _kl(student_log_probs, _mixture(student_log_probs, teacher_log_probs, skew))
    if kind == "tv":
        return 0.5 * (teacher_log_probs.exp() - student_log_probs.exp()).abs().sum(-1)
    raise MethodError(f"unknown divergence {kind!r}", hint=f"use one of {', '.join(DIVERGENCES)}.")


def _check_unit(name: str, value: float, *, open_top: bool = False) -> None:
    top_ok = value < 1.0 if open_top else value <= 1.0
    if not (value >= 0.0 and top_ok):
        bound = "[0, 1)" if open_top else "[0, 1]"
        raise MethodError(f"{name} must be in {bound}, got {value}", hint=f"pass {name} in {bound}.")


def _at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """float16 / bfloat16 / float32 -> float32; float64 stays float64."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def token_log_probs(
    student_logits: torch.Tensor, teacher: torch.Tensor | TopK, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher log-probabilities at temperature T, in float32 (float64 stays), over the last axis: over
    the vocabulary for dense teacher logits (N, vocab), or over the k + 1 buckets of a top-k teacher (N, k) (bucket
    logits: the k kept tokens' logits and the log-sum-exp of the rest, divided by T, as in
    :func:`~kdistill.kd_topk_loss`)."""
    student_log_probs, teacher_log_probs, _ = _log_probs(_at_least_float32(student_logits), teacher, temperature)
    return student_log_probs, teacher_log_probs


REST_BY_SUBTRACTION = 0.05
"""The student's rest bucket is log(1 - its top-k mass) plus its log-normaliser when that rest holds at least this
share; below it (a student that puts over 95% on the teacher's top k) it is the exact log-sum-exp of the other
logits, for those tokens only (the subtraction would lose digits there)."""


def _log_probs(
    student: torch.Tensor, teacher: torch.Tensor | TopK, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`token_log_probs` of float32 (or float64) logits, and for a top-k teacher the student's log-normaliser
    over the full vocabulary (N, 1) (None for dense teachers)."""
    if not isinstance(teacher, TopK):
        teacher_side = _at_least_float32(teacher)
        return F.log_softmax(student / temperature, dim=-1), F.log_softmax(teacher_side / temperature, dim=-1), None
    normaliser, student_top = normaliser_and_picks(student, teacher.indices)
    return (*_bucket_log_probs(student, teacher, temperature, normaliser, student_top), normaliser)


def _bucket_log_probs(
    student: torch.Tensor, teacher: TopK, temperature: float, normaliser: torch.Tensor, student_top: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k + 1 bucket log-probabilities of student and teacher, from the student's log-normaliser (N, 1) and its
    logits at the teacher's top k (N, k).

    The student's rest bucket costs no second pass over the vocabulary: log Q = log(1 - the top k's probability), in
    float64, where Q is at least :data:`REST_BY_SUBTRACTION`; the exact masked log-sum-exp of the other logits for
    the (few) tokens where it is smaller."""
    share = 1.0 - (student_top - normaliser).double().exp().sum(-1, keepdim=True)
    safe = share >= REST_BY_SUBTRACTION
    log_rest = torch.where(safe, share, 1.0).log().to(student.dtype)
    if not bool(safe.all()):
        rows = (~safe).squeeze(-1).nonzero().squeeze(-1)
        exact = student.index_select(0, rows).scatter(-1, teacher.indices.index_select(0, rows), TOPK_EMPTY_REST)
        exact = exact.logsumexp(dim=-1, keepdim=True) - normaliser.index_select(0, rows)
        log_rest = log_rest.index_put((rows,), exact)
    teacher_rest = _at_least_float32(teacher.rest).clamp_min(TOPK_EMPTY_REST).unsqueeze(-1)
    student_side = torch.cat([student_top, normaliser + log_rest], dim=-1)
    teacher_side = torch.cat([_at_least_float32(teacher.values), teacher_rest], dim=-1)
    return F.log_softmax(student_side / temperature, dim=-1), F.log_softmax(teacher_side / temperature, dim=-1)


class _NormaliserAndPicks(torch.autograd.Function):
    """log-sum-exp over the last axis (N, 1) and the logits at ``ids`` (N, M), in one pass; backward writes
    softmax × the normaliser's gradient and adds the picks' gradients into that one tensor (no zero-filled tensor
    per gather, no second pass for the log-sum-exp)."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        normaliser = logits.logsumexp(dim=-1, keepdim=True)
        ctx.save_for_backward(logits, ids, normaliser)
        return normaliser, logits.gather(-1, ids)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_normaliser: torch.Tensor, grad_picks: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, ids, normaliser = ctx.saved_tensors
        grad = (logits - normaliser).exp_().mul_(grad_normaliser)
        grad.scatter_add_(-1, ids, grad_picks.to(grad.dtype))
        return grad, None


def normaliser_and_picks(logits: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits.logsumexp(-1, keepdim=True), logits.gather(-1, ids))`` with one fused backward (logits (N, vocab),
    ids (N, M) int64): what every top-k token loss reads of the student's logits."""
    return cast("tuple[torch.Tensor, torch.Tensor]", _NormaliserAndPicks.apply(logits, ids))


def check_teacher_fits(student_logits: torch.Tensor, teacher: torch.Tensor | TopK, method: str) -> None:
    """A :class:`ShapeMismatchError` unless dense teacher logits have the student's shape, or a top-k teacher's
    positions are the student's and its ids fall inside the student's vocabulary."""
    if isinstance(teacher, TopK):
        ids = teacher.indices if teacher.tail_ids is None else torch.cat([teacher.indices, teacher.tail_ids], -1)
        largest = int(ids.max()) if ids.numel() else 0
        smallest = int(ids.min()) if ids.numel() else 0
        if teacher.rest.shape != student_logits.shape[:-1] or largest >= student_logits.shape[-1] or smallest < 0:
            raise ShapeMismatchError(
                f"method {method!r}: the teacher's top-k for positions {tuple(teacher.rest.shape)} with token ids "
                f"{smallest}..{largest} does not fit student logits {tuple(student_logits.shape)}",
                hint="student and teacher must share one vocabulary and the same (batch, seq) positions.",
            )
    elif teacher.shape != student_logits.shape:
        raise ShapeMismatchError(
            f"method {method!r}: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher.shape)} differ",
            hint="student and teacher must share one vocabulary (kdistill.lm.check_vocabularies says how) and run on "
            "the same (batch, seq) input_ids.",
        )


def _select(teacher: torch.Tensor | TopK, counted: torch.Tensor) -> torch.Tensor | TopK:
    if isinstance(teacher, TopK):
        return teacher.map(lambda field: field[counted])
    return teacher[counted]


def check_tail_reader(teacher: torch.Tensor | TopK, kind: str, temperature: float, beta: float, skew: float) -> None:
    """A :class:`MethodError` when a top-k teacher with a sampled tail (``"topk16:K+S"``) meets a loss that cannot
    read it: the tail's draws estimate forward KL at the temperature they were drawn at, T = 1, and nothing else."""
    if not isinstance(teacher, TopK) or teacher.tail_ids is None:
        return
    forward = kind == "forward_kl" or (kind == "jsd" and beta == 0.0) or (kind == "skew_forward_kl" and skew == 0.0)
    if not forward or temperature != 1.0:
        raise MethodError(
            f"a sampled tail (topk16:K+S cache) estimates forward KL at temperature 1; got {kind!r} at "
            f"temperature {temperature}",
            hint="use forward_kl with temperature 1, or fill the cache as 'topk16:K' (a rest bucket, read exactly by "
            "every divergence at any temperature).",
        )


def per_token_divergence(
    student_rows: torch.Tensor,
    teacher: torch.Tensor | TopK,
    temperature: float,
    kind: str,
    *,
    beta: float = 0.5,
    skew: float = 0.1,
) -> torch.Tensor:
    r"""(N,): :func:`divergence` ``kind`` per row of student logits (N, vocab) against dense teacher logits or a
    top-k (k + 1 buckets), before :math:`T^2`.

    A top-k with a sampled tail (S ids :math:`s_j` drawn from the teacher's tail, of mass :math:`R`, and
    :math:`\sum_{v\,\text{tail}} p_v\log p_v` stored) gives forward KL over the full vocabulary, its top-k part exact
    and its tail part estimated without bias, in value and in gradient:

    .. math::
        \mathrm{KL}(p\|q) \approx \sum_{i \in \text{top-k}} p_i (\log p_i - \log q_i)
            + \sum_{v\,\text{tail}} p_v \log p_v - \frac{R}{S}\sum_{j=1}^{S} \log q_{s_j}

    (the rest bucket instead gives :math:`R(\log R - \log Q)`, with :math:`Q` the student's mass outside the
    teacher's top k: it fixes that total and leaves its spread free)."""
    return _divergence_and_ce(_at_least_float32(student_rows), teacher, None, temperature, kind, beta, skew)[0]


def _divergence_and_ce(
    student: torch.Tensor,
    teacher: torch.Tensor | TopK,
    target: torch.Tensor | None,
    temperature: float,
    kind: str,
    beta: float,
    skew: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N,) divergences (:func:`per_token_divergence`) and (N,) next-token cross-entropies at T = 1 (None without
    ``target``), of float32 rows. For a top-k teacher every logit the loss reads (the top k, the target, the tail's
    draws) comes from one :func:`normaliser_and_picks`, whose log-normaliser serves the buckets, the cross-entropy
    and the tail."""
    if not isinstance(teacher, TopK):
        student_log_probs, teacher_log_probs, _ = _log_probs(student, teacher, temperature)
        hard = None if target is None else F.cross_entropy(student, target, reduction="none")
        return divergence(student_log_probs, teacher_log_probs, kind, beta=beta, skew=skew), hard
    k, samples = teacher.k, teacher.samples
    picks = [teacher.indices]
    picks += [] if target is None else [target.unsqueeze(-1)]
    picks += [] if teacher.tail_ids is None else [teacher.tail_ids]
    normaliser, picked = normaliser_and_picks(student, torch.cat(picks, dim=-1) if len(picks) > 1 else picks[0])
    student_log_probs, teacher_log_probs = _bucket_log_probs(student, teacher, temperature, normaliser, picked[:, :k])
    hard = None if target is None else normaliser.squeeze(-1) - picked[:, k]
    if teacher.tail_ids is None or teacher.tail_plogp is None:
        return divergence(student_log_probs, teacher_log_probs, kind, beta=beta, skew=skew), hard
    top = _kl(teacher_log_probs[..., :-1], student_log_probs[..., :-1])
    log_q_tail = picked[:, -samples:] - normaliser
    mass = teacher_log_probs[..., -1].exp()
    return top + _at_least_float32(teacher.tail_plogp) - mass * log_q_tail.mean(-1), hard


def token_distill_loss(
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
) -> dict[str, torch.Tensor]:
    r"""A token-level divergence mixed with next-token cross-entropy, averaged over the real tokens.

    .. math::
        \mathcal{L} = \frac{1}{N}\sum_{i \in C}\Big[(1 - w)\,\mathrm{CE}(z_{s,i}, y_i)
                      + w\,T^2\,D\big(p_i^T, q_i^T\big)\Big],\qquad
        p^T = \mathrm{softmax}(z_t/T),\ q^T = \mathrm{softmax}(z_s/T)

    over the counted positions :math:`C` (``mask`` True, target not -100), :math:`N = |C|` or ``normalizer``;
    :math:`D` is :func:`divergence` ``kind``; ``w = soft_weight`` (the explicit mix weight: 1 is the divergence
    alone, as TRL's GKD; 0 is CE alone); the cross-entropy is at T = 1. The temperature divides both the student's
    and the teacher's logits, and the divergence is multiplied by :math:`T^2` so that its gradient keeps its scale
    whatever T (Hinton et al.); TRL applies no :math:`T^2`: divide ``"kd"`` by :math:`T^2` to compare.

    Args:
        student_logits: (batch, seq, vocab) (or (rows, classes)), any float dtype (computed in float32).
        teacher: dense logits of the same shape, or a :class:`~kdistill.teachers.TopK` over the same positions.
        target: (batch, seq) next-token ids with -100 where none counts, or None (then the divergence alone at
            full weight).
        kind, beta, skew: see :func:`divergence`.
        mask: (batch, seq) True / 1 for real tokens, or None (every position counts).
        normalizer: the divisor :math:`N`; pass the whole batch's count of counted positions when summing
            micro-batches, so the sum equals the whole batch's loss.

    Returns:
        ``{"loss": total, "kd": T² D (mean), "ce": CE (mean)}`` (``"ce"`` absent without targets).
    """
    if temperature <= 0:
        raise MethodError(f"temperature must be > 0, got {temperature}", hint="use a temperature such as 1 or 2.")
    _check_unit("soft_weight", soft_weight)
    method = f"token {kind}"
    check_token_shapes(student_logits, mask, target, method=method)
    check_teacher_fits(student_logits, teacher, method)
    check_tail_reader(teacher, kind, temperature, beta, skew)
    counted = counted_positions(
        student_logits.shape[:-1], None if mask is None else mask.bool(), target, student_logits.device
    )
    student_rows = _at_least_float32(student_logits[counted])  # (N, vocab): padding is never computed
    count = token_count(counted, normalizer)
    per_token, per_token_ce = _divergence_and_ce(
        student_rows, _select(teacher, counted), None if target is None else target[counted], temperature, kind,
        beta, skew,
    )  # fmt: skip
    soft = per_token.sum() / count * temperature**2
    if per_token_ce is None:
        return {"loss": soft, "kd": soft}
    hard = per_token_ce.sum() / count
    return {"loss": (1.0 - soft_weight) * hard + soft_weight * soft, "ce": hard, "kd": soft}


@register_loss("token_divergence", "token-level distillation by a named divergence (kind=...), under a padding mask")
class TokenDivergenceLoss(BaseLoss):
    """Class form of :func:`token_distill_loss`: reads the student's logits and mask, and the teacher's dense logits
    or its top-k (``Outputs.topk``, a ``"topk:K"`` cache). ``chunk_size`` (tokens): compute the loss a chunk of
    tokens at a time with the gradient taken chunk by chunk (:func:`kdistill.losses.chunked.chunked_token_loss`),
    so no more than ``chunk_size × vocab`` float32 numbers are alive at once; None: all at once; ``"auto"`` (the
    default): unchunked for small batches, else a sixteenth of the batch's counted tokens
    (:func:`kdistill.losses.chunked.auto_chunk_size`), which keeps the peak under 1/4 of the naive loss's."""

    kind: ClassVar[str | None] = None  # fixed by each subclass; None: the ``kind`` argument (default forward KL)
    at_equal = "zero"
    reads_topk = False
    """Set True by the pipeline when the teacher's outputs come from a ``topk:K`` / ``topk16:K`` cache entry: the
    engine then serves the entry's packed table to this loss as ``Outputs.topk`` (read exactly, as K + 1 buckets)."""
    topk_samples = 0
    """S of a ``topk16:K+S`` entry (set by the pipeline with :attr:`reads_topk`): the packed table then carries the
    sampled tail (:meth:`TopK.from_packed <kdistill.teachers.TopK.from_packed>` ``samples``)."""

    def __init__(
        self,
        kind: str | None = None,
        *,
        temperature: float = 1.0,
        soft_weight: float = 0.5,
        beta: float = 0.5,
        skew: float = 0.1,
        chunk_size: int | str | None = "auto",
    ) -> None:
        chosen = kind if kind is not None else (type(self).kind or "forward_kl")
        if chosen is None or chosen not in DIVERGENCES:
            raise MethodError(f"unknown divergence {chosen!r}", hint=f"use one of {', '.join(DIVERGENCES)}.")
        if kind is not None and type(self).kind not in (None, kind):
            raise MethodError(f"{type(self).__name__} computes {type(self).kind!r}, not {kind!r}")
        if (
            chunk_size != "auto"
            and chunk_size is not None
            and (isinstance(chunk_size, (str, bool)) or not isinstance(chunk_size, int) or chunk_size < 1)
        ):
            raise MethodError(
                f"chunk_size must be >= 1 tokens (a whole number), 'auto' or None; got {chunk_size!r}",
                hint="e.g. 1024; 'auto' chunks large batches only; None never chunks.",
            )
        self.divergence = chosen
        self.temperature = temperature
        self.soft_weight = soft_weight
        self.beta = beta
        self.skew = skew
        self.chunk_size = chunk_size
        token_distill_loss(  # validates the hyper-parameters now, not at the first batch
            torch.zeros(1, 2), torch.zeros(1, 2), None, kind=chosen, temperature=temperature,
            soft_weight=soft_weight, beta=beta, skew=skew,
        )  # fmt: skip

    def _params(self) -> dict[str, Any]:
        return {
            "kind": self.divergence,
            "temperature": self.temperature,
            "soft_weight": self.soft_weight,
            "beta": self.beta,
            "skew": self.skew,
        }

    def __call__(
        self, student: Outputs, teacher: Outputs | None, target: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        teacher = require_teacher(teacher, self.divergence)
        teacher_side: torch.Tensor | TopK = teacher.topk if teacher.topk is not None else teacher.logits
        mask = output_mask(student, teacher)
        chunk_size = self.chunk_size
        if chunk_size == "auto":
            from kdistill.losses.chunked import auto_chunk_size

            vocab = student.logits.shape[-1]
            tokens = student.logits.numel() // max(1, vocab) if mask is None else int(mask.bool().sum())
            chunk_size = auto_chunk_size(tokens, vocab)
        if chunk_size is not None:
            from kdistill.losses.chunked import chunked_token_loss

            assert isinstance(chunk_size, int)
            return chunked_token_loss(
                student.logits, teacher_side, target, mask=mask, chunk_size=chunk_size, **self._params()
            )
        return token_distill_loss(student.logits, teacher_side, target, mask=mask, **self._params())


@register_loss("forward_kl", "token-level forward KL(teacher || student) + CE, mean over real tokens")
class ForwardKL(TokenDivergenceLoss):
    """:class:`TokenDivergenceLoss` with ``kind="forward_kl"``."""

    kind = "forward_kl"


@register_loss("reverse_kl", "token-level reverse KL(student || teacher) + CE, mean over real tokens (MiniLLM)")
class ReverseKL(TokenDivergenceLoss):
    """:class:`TokenDivergenceLoss` with ``kind="reverse_kl"``."""

    kind = "reverse_kl"


@register_loss("gjsd", "token-level generalized JSD with beta (TRL GKD: beta=0 forward KL, beta=1 reverse KL) + CE")
class GeneralizedJSD(TokenDivergenceLoss):
    """:class:`TokenDivergenceLoss` with ``kind="jsd"`` (``beta`` as in :func:`divergence`)."""

    kind = "jsd"


@register_loss("skew_kl", "token-level skew forward KL(p || a p + (1 - a) q) (DistiLLM, skew=a) + CE")
class SkewForwardKL(TokenDivergenceLoss):
    """:class:`TokenDivergenceLoss` with ``kind="skew_forward_kl"`` (``skew`` as in :func:`divergence`)."""

    kind = "skew_forward_kl"


@register_loss("skew_reverse_kl", "token-level skew reverse KL(q || a q + (1 - a) p) (DistiLLM, skew=a) + CE")
class SkewReverseKL(TokenDivergenceLoss):
    """:class:`TokenDivergenceLoss` with ``kind="skew_reverse_kl"``."""

    kind = "skew_reverse_kl"


@register_loss("tvd", "token-level total variation 1/2 sum |p - q| (DistillKit's TVD) + CE, mean over real tokens")
class TotalVariation(TokenDivergenceLoss):
    """:class:`TokenDivergenceLoss` with ``kind="tv"``."""

    kind = "tv"
