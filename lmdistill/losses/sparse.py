"""Sparse teacher signals: the teacher's top-k log-probabilities instead of its full logits.

A cached or served teacher rarely ships (N, V) logits; it ships, per token, k token ids and
their log-probabilities. ``sparse_divergence`` reduces the student *and* the teacher to the
same small distribution over those ids and evaluates any entry of ``LOSSES`` on it, so every
divergence gets sparse support through one mechanism. Two reductions (``SparseSignal.tail``):

- ``"renormalize"``: both sides restricted to the k ids and renormalised there (k buckets).
  The tail of either distribution is ignored; the signal may be at any temperature.
- ``"bucket"``: k + 1 buckets, the k ids plus one tail bucket holding the remaining mass
  ``1 - sum_k p`` (teacher) and ``1 - sum_k q`` (student), so a student that leaks mass
  outside the teacher's top-k is still penalised. The teacher's tail mass is only known at
  the temperature the signal was computed at, so it must equal the loss temperature.

With k = V (the ids a permutation of the whole vocabulary) both reductions give exactly the
dense divergence. The signal is data (a cache, a server's answer): no gradient flows into it.
"""

import math
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from lmdistill.losses.divergences import get_loss

TailMode = Literal["renormalize", "bucket"]


@dataclass(frozen=True, eq=False)
class SparseSignal:
    """The teacher's top-k per token row: ids, log-probabilities and how to treat the rest.

    Attributes:
        token_ids: (N, k) long, distinct ids per row (checked where the vocabulary is known).
        logprobs: (N, k) float, the teacher's log-probabilities of those ids at
            ``temperature``, i.e. ``log_softmax(teacher_logits / temperature)`` over the
            *full* vocabulary, gathered: each row's mass sums to at most 1.
        tail: ``"renormalize"`` or ``"bucket"`` (see the module docstring).
        temperature: the temperature ``logprobs`` were computed at.
        present: optional (N,) bool; False marks a row the teacher gave no signal for (a
            served teacher returns none for the end-of-turn token, for example). Such a row
            trains on the data label alone (its loss is plain CE); its ids and log-probs are
            placeholders and are never read.
    """

    token_ids: Tensor
    logprobs: Tensor
    tail: TailMode = "bucket"
    temperature: float = 1.0
    present: Tensor | None = None

    def __post_init__(self) -> None:
        if self.token_ids.dim() != 2 or self.token_ids.dtype != torch.long:
            raise ValueError(
                f"token_ids must be an (N, k) long tensor, got {self.token_ids.dtype} "
                f"{tuple(self.token_ids.shape)}"
            )
        if self.logprobs.shape != self.token_ids.shape or not self.logprobs.is_floating_point():
            raise ValueError(
                f"logprobs must be a float tensor shaped like token_ids "
                f"{tuple(self.token_ids.shape)}, got {self.logprobs.dtype} "
                f"{tuple(self.logprobs.shape)}"
            )
        if self.token_ids.shape[1] < 1:
            raise ValueError("token_ids must hold k >= 1 ids per row, got k=0")
        if self.tail not in get_args(TailMode):
            raise ValueError(f"tail must be one of {get_args(TailMode)}, got {self.tail!r}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature}")
        if self.present is not None and (
            self.present.dtype != torch.bool or self.present.shape != self.token_ids.shape[:1]
        ):
            raise ValueError(
                f"present must be an (N,) bool tensor with N={self.token_ids.shape[0]}, got "
                f"{self.present.dtype} {tuple(self.present.shape)}"
            )

    @property
    def num_rows(self) -> int:
        return self.token_ids.shape[0]

    def rows(self, rows: slice) -> "SparseSignal":
        """The signal of a slice of the token rows (a chunk), same tail and temperature."""
        present = None if self.present is None else self.present[rows]
        return SparseSignal(
            self.token_ids[rows], self.logprobs[rows], self.tail, self.temperature, present
        )

    def to(self, device: Any) -> "SparseSignal":
        present = None if self.present is None else self.present.to(device)
        return SparseSignal(
            self.token_ids.to(device),
            self.logprobs.to(device),
            self.tail,
            self.temperature,
            present,
        )

    def mix(self, ce: Tensor, kd: Tensor, alpha: float, temperature: float) -> Tensor:
        """Per-row loss ``alpha * ce + (1 - alpha) * T^2 * kd``; rows without a signal: ``ce``."""
        loss = alpha * ce + (1.0 - alpha) * temperature**2 * kd
        return loss if self.present is None else torch.where(self.present, loss, ce)


def topk_signal(
    teacher_logits: Tensor, k: int, *, tail: TailMode, temperature: float
) -> SparseSignal:
    """Keep the teacher's k most likely ids per row: (N, V) logits -> (N, k) SparseSignal.

    ``logprobs`` are (at least) fp32 ``log_softmax(teacher_logits / temperature)`` over the full
    vocabulary, in decreasing order.
    """
    if teacher_logits.dim() != 2:
        raise ValueError(f"teacher_logits must be (N, V), got {tuple(teacher_logits.shape)}")
    if not 1 <= k <= teacher_logits.shape[1]:
        raise ValueError(f"k must be in [1, V={teacher_logits.shape[1]}], got k={k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    with torch.no_grad():
        dtype = torch.promote_types(teacher_logits.dtype, torch.float32)
        logprobs = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)  # (N, V)
        top = logprobs.topk(k, dim=-1)  # values, indices: (N, k)
    return SparseSignal(top.indices, top.values, tail, temperature)


def check_signal(signal: SparseSignal, num_rows: int, vocab_size: int, temperature: float) -> None:
    """Check a signal against the loss it feeds; errors name what is wrong.

    Rows must match, ids lie in [0, vocab_size) and be distinct within a row, and in bucket
    mode the signal must be at the loss temperature. One host sync (the id checks).
    """
    if signal.num_rows != num_rows:
        raise ValueError(f"teacher_signal has {signal.num_rows} rows, the student {num_rows}")
    if signal.tail == "bucket" and signal.temperature != temperature:
        raise ValueError(
            f"a bucket-mode SparseSignal must be computed at the loss temperature: signal "
            f"temperature={signal.temperature}, loss temperature={temperature}. The tail "
            "bucket's mass, 1 - sum of the top-k probabilities, depends on the teacher's "
            "logits outside the top-k, which the signal does not hold, so it cannot be "
            "re-tempered; use tail='renormalize' or recompute the signal at this temperature"
        )
    if num_rows == 0:
        return
    ids = signal.token_ids
    if bool(((ids < 0) | (ids >= vocab_size)).any()):
        raise ValueError(f"teacher_signal token_ids must lie in [0, vocab_size={vocab_size})")
    sorted_ids = ids.sort(dim=-1).values  # (N, k)
    if bool((sorted_ids[:, 1:] == sorted_ids[:, :-1]).any()):
        raise ValueError("teacher_signal token_ids repeat an id within a row; ids must be distinct")


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0 (Maechler 2012: expm1 near 0, log1p further away).

    x is clamped to <= 0 first: rounding can push the summed top-k mass a hair above 1,
    which means an empty tail (-inf), not a NaN. No gradient (teacher data only).
    """
    x = x.clamp(max=0.0)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _student_tail(log_q: Tensor, token_ids: Tensor) -> Tensor:
    """log of the student mass *outside* the ids: (N, V), (N, k) -> (N, 1); -inf if none.

    A logsumexp over the complement, not log(1 - sum_k q): with k = V, or a top-k holding
    nearly all the mass, 1 - sum_k q is pure rounding noise, and its gradient (divided by
    that noise) is O(1) wrong. The complement sum is exact in value and gradient.
    """
    outside = torch.ones_like(log_q, dtype=torch.bool).scatter(-1, token_ids, False)  # (N, V)
    outside_log_q = torch.where(outside, log_q, -math.inf)
    # An all -inf row has no logsumexp gradient (exp(-inf - -inf) = NaN): feed it zeros.
    empty = torch.isneginf(outside_log_q).all(dim=-1, keepdim=True)  # (N, 1)
    safe = torch.where(empty, 0.0, outside_log_q)
    return torch.where(empty, -math.inf, torch.logsumexp(safe, dim=-1, keepdim=True))


def _reduce(
    student_logits: Tensor, signal: SparseSignal, temperature: float
) -> tuple[Tensor, Tensor]:
    """(N, V) student logits and an (N, k) signal -> student and teacher log-probabilities
    over the same small support: (N, k) in renormalize mode, (N, k + 1) in bucket mode."""
    dtype = torch.promote_types(
        torch.promote_types(student_logits.dtype, signal.logprobs.dtype), torch.float32
    )
    student = student_logits.to(dtype) / temperature  # (N, V)
    teacher = signal.logprobs.detach().to(dtype)  # (N, k)
    ids = signal.token_ids
    if signal.tail == "renormalize":
        # logprobs * T_signal are the teacher logits up to a per-row constant: re-temper them.
        teacher_small = F.log_softmax(teacher * signal.temperature / temperature, dim=-1)
        return F.log_softmax(student.gather(-1, ids), dim=-1), teacher_small  # (N, k) each
    return _reduce_log_q(F.log_softmax(student, dim=-1), signal)  # (N, k + 1) each


def _reduce_log_q(log_q: Tensor, signal: SparseSignal) -> tuple[Tensor, Tensor]:
    """Bucket mode from the student's (N, V) log-probs at the loss temperature: student and
    teacher log-probs over the k ids and the tail, (N, k + 1) each (no autograd needed)."""
    ids = signal.token_ids
    teacher = signal.logprobs.detach().to(log_q.dtype)
    student_small = torch.cat([log_q.gather(-1, ids), _student_tail(log_q, ids)], dim=-1)
    if ids.shape[1] == log_q.shape[1]:
        teacher_tail = torch.full_like(teacher[:, :1], -math.inf)
    else:
        teacher_tail = _log1mexp(torch.logsumexp(teacher, dim=-1, keepdim=True))
    return student_small, torch.cat([teacher, teacher_tail], dim=-1)


def _sparse_token_divergence(
    student_logits: Tensor,
    signal: SparseSignal,
    name: str,
    temperature: float,
    params: dict[str, Any],
) -> Tensor:
    """``sparse_divergence`` without the data checks (the fused loss checks once, up front)."""
    student_small, teacher_small = _reduce(student_logits, signal, temperature)
    # Both sides are already at temperature T: the divergence runs at temperature 1.
    return get_loss(name)(student_small, teacher_small, temperature=1.0, **params)


def sparse_divergence(
    student_logits: Tensor,
    signal: SparseSignal,
    name: str,
    *,
    temperature: float,
    **params: Any,
) -> Tensor:
    """``LOSSES[name]`` between a sparse teacher signal and the dense student: (N, V) -> (N,).

    Both sides are reduced to the same small distribution, which ``LOSSES[name]`` then sees
    as logits at temperature 1 (so every registered loss works unchanged), with
    q = softmax(student_logits / T) and p the teacher at T:

    - ``tail="renormalize"``: p_S = p[ids] / sum p[ids] from ``log_softmax(logprobs *
      signal.temperature / T)`` (exact re-tempering: logprobs * T_signal are the teacher
      logits up to a constant), q_S = softmax over the gathered ``student_logits[ids] / T``.
    - ``tail="bucket"``: (p[ids], 1 - sum p[ids]) against (q[ids], 1 - sum q[ids]); needs
      ``signal.temperature == T``. The student tail is a logsumexp over the ids outside the
      signal (exact), the teacher's ``log1mexp(logsumexp(logprobs))``, -inf when k = V.

    ``ce`` uses the teacher's argmax over the buckets. In bucket mode that is the tail
    bucket when the tail outweighs every top-k token (a flat teacher), and the loss is then
    -log(student tail mass), not -log q[top-1 id]; use ``tail="renormalize"`` or a large
    enough k if that matters.

    Args:
        student_logits: (N, V) student logits; the ids of ``signal`` index its columns.
        signal: (N, k) teacher signal, ids distinct per row and in [0, V).
        name: a key of ``LOSSES``; ``params`` are its keyword parameters.
        temperature: T of the divergence.

    Returns:
        (N,) unreduced, in at least fp32. Requires, in renormalize mode, a finite student
        logit among each row's ids.
    """
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be (N, V), got {tuple(student_logits.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    check_signal(signal, student_logits.shape[0], student_logits.shape[1], temperature)
    return _sparse_token_divergence(student_logits, signal, name, temperature, params)
