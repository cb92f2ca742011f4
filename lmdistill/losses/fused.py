"""CE + KD loss straight from hidden states, chunked so the (N, V) logits never exist.

For each of the N (already selected, response-only) token rows::

    logits_i = hidden_i @ weight[:vocab_size].T
    loss_i   = alpha * CE(student_logits_i, target_i)
               + (1 - alpha) * T**2 * D(teacher_logits_i || student_logits_i)

where D is ``LOSSES[divergence]`` at temperature T (CE is at temperature 1). The teacher
comes either dense (``teacher_hidden`` @ ``teacher_weight``, chunk by chunk) or as a sparse
top-k ``SparseSignal`` (``lmdistill.losses.sparse``), sliced per chunk. Only the first
``vocab_size`` rows of each output projection are used: this is how a padded vocabulary is
reconciled, the padding ids are dropped on both sides. The loss is a *sum* over tokens;
the caller divides once by the global token count, so gradient accumulation and several
processes give the same gradient as one big batch.

The (tokens x vocab) logits are the memory wall of LLM distillation. ``fused_kd_loss``
follows Liger-Kernel's fused-linear approach: its forward walks over ``chunk_size`` rows at
a time, computes the chunk's loss and, right away, the gradients w.r.t. the hidden chunk and
the output projection, and keeps only those; backward merely scales them by grad_output.
The gradient w.r.t. the chunk's logits is in closed form for every built-in divergence,
dense or sparse (``lmdistill.losses.closed_form``); a divergence registered without one
goes through autograd on its per-token formula. ``naive_kd_loss`` is the unchunked
reference the tests hold it to.
"""

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lmdistill.data.tokenize import IGNORE_INDEX
from lmdistill.losses.closed_form import CLOSED_FORMS, FINITE, ClosedForm
from lmdistill.losses.divergences import _kl, get_loss
from lmdistill.losses.sparse import (
    SparseSignal,
    _reduce,
    _reduce_log_q,
    _sparse_token_divergence,
    check_signal,
    sparse_divergence,
)


@dataclass(frozen=True)
class _KDSpec:
    """Tensor-free settings of one loss call; checked on construction, errors name the field."""

    divergence: str
    divergence_params: dict[str, Any]
    alpha: float
    temperature: float
    vocab_size: int
    chunk_size: int

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {self.vocab_size}")
        empty = torch.zeros(0, self.vocab_size)
        self.token_divergence(empty, empty)  # fail fast on a bad name or params, even if N == 0

    def token_divergence(self, student_logits: Tensor, teacher: Tensor | SparseSignal) -> Tensor:
        """(C, V) and (C, V) teacher logits or a (C, k) signal -> (C,): ``LOSSES[divergence]``
        at this temperature and params (the signal's data were checked once, up front)."""
        if isinstance(teacher, SparseSignal):
            return _sparse_token_divergence(
                student_logits, teacher, self.divergence, self.temperature, self.divergence_params
            )
        fn = get_loss(self.divergence)
        return fn(student_logits, teacher, temperature=self.temperature, **self.divergence_params)


def _upcast(x: Tensor) -> Tensor:
    """Cast to at least fp32 (fp64 stays fp64, so gradcheck can run on these losses)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check_targets(targets: Tensor, n: int, vocab_size: int) -> None:
    if targets.shape != (n,) or targets.dtype != torch.long:
        raise ValueError(
            f"targets must be a ({n},) long tensor, got {targets.dtype} {tuple(targets.shape)}"
        )
    if n == 0:
        return
    if bool(((targets < 0) | (targets >= vocab_size)).any()):
        if bool((targets == IGNORE_INDEX).any()):
            raise ValueError(
                f"targets contain IGNORE_INDEX ({IGNORE_INDEX}): select the response rows before "
                "calling; this loss sums over every row it is given"
            )
        raise ValueError(f"targets must lie in [0, vocab_size={vocab_size})")


def _check_teacher(
    spec: _KDSpec,
    teacher_hidden: Tensor | None,
    teacher_weight: Tensor | None,
    teacher_signal: SparseSignal | None,
    n: int,
) -> None:
    """At most one teacher form, and one when alpha < 1; then check that form."""
    if teacher_signal is not None and (teacher_hidden is not None or teacher_weight is not None):
        raise ValueError(
            "pass one teacher form: teacher_hidden and teacher_weight, or teacher_signal, not both"
        )
    if (teacher_hidden is None) != (teacher_weight is None):
        raise ValueError("pass both teacher_hidden and teacher_weight, or neither")
    if teacher_signal is not None:
        check_signal(teacher_signal, n, spec.vocab_size, spec.temperature)
        return
    if teacher_hidden is None or teacher_weight is None:
        if spec.alpha < 1.0:
            raise ValueError(
                f"alpha={spec.alpha} < 1 needs a teacher: teacher_hidden and teacher_weight, "
                "or teacher_signal"
            )
        return
    if teacher_hidden.dim() != 2 or teacher_weight.dim() != 2:
        raise ValueError("teacher_hidden must be (N, H_t) and teacher_weight (V_t, H_t)")
    if teacher_hidden.shape[0] != n or teacher_hidden.shape[1] != teacher_weight.shape[1]:
        raise ValueError(
            f"teacher_hidden {tuple(teacher_hidden.shape)} does not match N={n} and "
            f"teacher_weight {tuple(teacher_weight.shape)}"
        )
    if teacher_weight.shape[0] < spec.vocab_size:
        raise ValueError(
            f"teacher_weight has {teacher_weight.shape[0]} rows < vocab_size={spec.vocab_size}"
        )


def _check_weights(token_weights: Tensor | None, n: int) -> None:
    if token_weights is None:
        return
    if token_weights.shape != (n,) or not token_weights.is_floating_point():
        raise ValueError(
            f"token_weights must be a float (N,) tensor with N={n}, got "
            f"{token_weights.dtype} {tuple(token_weights.shape)}"
        )
    if n and not bool((torch.isfinite(token_weights) & (token_weights >= 0)).all()):
        raise ValueError("token_weights must be finite and >= 0")


def _check_tensors(
    spec: _KDSpec,
    student_hidden: Tensor,
    student_weight: Tensor,
    targets: Tensor,
    teacher_hidden: Tensor | None,
    teacher_weight: Tensor | None,
    teacher_signal: SparseSignal | None,
) -> None:
    """Check shapes, the teacher's presence and the targets, with errors that name them."""
    if student_hidden.dim() != 2 or student_weight.dim() != 2:
        raise ValueError("student_hidden must be (N, H) and student_weight (V_s, H)")
    if student_hidden.shape[1] != student_weight.shape[1]:
        raise ValueError(
            f"hidden size mismatch: student_hidden {tuple(student_hidden.shape)}, "
            f"student_weight {tuple(student_weight.shape)}"
        )
    if spec.vocab_size > student_weight.shape[0]:
        raise ValueError(
            f"vocab_size={spec.vocab_size} > student_weight rows {student_weight.shape[0]}"
        )
    n = student_hidden.shape[0]
    _check_teacher(spec, teacher_hidden, teacher_weight, teacher_signal, n)
    _check_targets(targets, n, spec.vocab_size)


def _token_losses(
    student_logits: Tensor, teacher: Tensor | SparseSignal | None, targets: Tensor, spec: _KDSpec
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token ``(loss, ce, kd)``, each (C,), from (C, V) logits; kd is 0 without a teacher."""
    ce = F.cross_entropy(student_logits, targets, reduction="none")
    kd = torch.zeros_like(ce) if teacher is None else spec.token_divergence(student_logits, teacher)
    if isinstance(teacher, SparseSignal) and teacher.present is not None:
        kd = torch.where(teacher.present, kd, torch.zeros_like(kd))
        return teacher.mix(ce, kd, spec.alpha, spec.temperature), ce, kd
    loss = spec.alpha * ce + (1.0 - spec.alpha) * spec.temperature**2 * kd
    return loss, ce, kd


def _closed_form_applies(teacher: Tensor | SparseSignal | None, spec: _KDSpec) -> bool:
    """Dense forward KL (the default) and pure CE have textbook gradients; every other
    divergence, and sparse signals, go through autograd on the per-token formula."""
    return teacher is None or (isinstance(teacher, Tensor) and spec.divergence == "forward_kl")


def _sparse_closed_form_applies(signal: SparseSignal, spec: _KDSpec) -> bool:
    return spec.divergence == "forward_kl" and signal.tail == "bucket"


def _forward_kl_losses_and_grad(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    targets: Tensor,
    spec: _KDSpec,
    need_grad: bool,
) -> tuple[tuple[Tensor, Tensor, Tensor], Tensor | None]:
    """Closed form of ``_token_losses_and_grad`` for forward KL + CE, with fewer (C, V) passes
    and temporaries than autograd (the benchmark's time target rests on this):

        d/ds [alpha * CE]                       = alpha * (softmax(s) - onehot(y))
        d/ds [(1-alpha) T^2 KL(p_T || q_T)]     = (1-alpha) * T * (q_T - p_T)

    Student logits are finite here (a matmul), so log q never needs the log(0) cap of
    ``divergences``; teacher -inf logits give p = 0 and contribute nothing (xlogy)."""
    T, alpha = spec.temperature, spec.alpha
    log_q1 = torch.log_softmax(student_logits, dim=-1)  # (C, V), temperature 1 for CE
    ce = -log_q1.gather(1, targets[:, None]).squeeze(1)  # (C,)
    kd = torch.zeros_like(ce)
    grad = torch.zeros_like(student_logits) if need_grad else None
    if grad is not None and alpha > 0:
        grad.add_(log_q1.exp(), alpha=alpha)
        grad[torch.arange(len(targets), device=grad.device), targets] -= alpha
    if teacher_logits is not None:
        log_q = log_q1 if T == 1.0 else torch.log_softmax(student_logits / T, dim=-1)
        p = torch.softmax(teacher_logits if T == 1.0 else teacher_logits / T, dim=-1)
        kd = torch.xlogy(p, p).sum(-1) - (p * log_q).sum(-1)  # sum p (log p - log q)
        if grad is not None and alpha < 1:
            grad.add_(log_q.exp().sub_(p), alpha=(1.0 - alpha) * T)
    loss = alpha * ce + (1.0 - alpha) * T**2 * kd
    return (loss, ce, kd), grad


def _sparse_forward_kl_losses_and_grad(
    student_logits: Tensor,
    signal: SparseSignal,
    targets: Tensor,
    spec: _KDSpec,
    need_grad: bool,
) -> tuple[tuple[Tensor, Tensor, Tensor], Tensor | None]:
    """Closed form for forward KL + CE against a bucket-mode sparse signal (the cache's and a
    served teacher's), as fast as CE alone plus two (C, V) passes. On the k ids S and the tail
    bucket t, with p_t = 1 - sum_S p and q_t = sum over ids outside S of q:

        d/ds [T^2 KL_buckets(p || q_T)] = T * (q_T - p~),
        p~_j = p_j for j in S, and q_T,j * p_t / q_t outside S

    (the teacher's tail mass spread over the tail in the student's proportions). Rows with
    ``present`` False train on CE alone."""
    T, alpha = spec.temperature, spec.alpha
    log_q1 = torch.log_softmax(student_logits, dim=-1)  # (C, V)
    ce = -log_q1.gather(1, targets[:, None]).squeeze(1)  # (C,)
    log_q = log_q1 if T == 1.0 else torch.log_softmax(student_logits / T, dim=-1)
    ids = signal.token_ids
    student_small, teacher_small = _reduce_log_q(log_q, signal)  # (C, k + 1) each
    kd = _kl(teacher_small, student_small)  # (C,)
    present = signal.present
    if present is not None:
        kd = torch.where(present, kd, torch.zeros_like(kd))
    loss = signal.mix(ce, kd, alpha, T)
    grad = None
    if need_grad:
        kd_weight = torch.full_like(ce, (1.0 - alpha) * T)  # (C,)
        ce_weight = torch.full_like(ce, alpha)
        if present is not None:
            kd_weight = torch.where(present, kd_weight, torch.zeros_like(kd_weight))
            ce_weight = torch.where(present, ce_weight, torch.ones_like(ce_weight))
        # tail ratio r = p_t / q_t (0 where the teacher's tail is empty)
        log_ratio = teacher_small[:, -1] - student_small[:, -1]
        ratio = torch.where(torch.isneginf(teacher_small[:, -1]), 0.0, log_ratio.exp())
        q = log_q.exp()  # (C, V)
        grad = q * (kd_weight * (1.0 - ratio))[:, None]  # outside S: w * q * (1 - r)
        inside = (q.gather(1, ids) - teacher_small[:, :-1].exp()) * kd_weight[:, None]
        grad.scatter_(1, ids, inside)  # inside S: w * (q_j - p_j)
        if T == 1.0:
            grad.addcmul_(q, ce_weight[:, None])
        else:
            grad.addcmul_(log_q1.exp(), ce_weight[:, None])
        rows = torch.arange(len(targets), device=grad.device)
        grad[rows, targets] -= ce_weight
    return (loss, ce, kd), grad


def _closed_form_losses_and_grad(
    student_logits: Tensor, teacher: Tensor | SparseSignal, targets: Tensor, spec: _KDSpec
) -> tuple[tuple[Tensor, Tensor, Tensor], Tensor]:
    """Per-token losses and their logit gradient for any divergence of ``CLOSED_FORMS``,
    against dense teacher logits or a sparse signal (either tail mode):

        d/ds [alpha CE + (1 - alpha) T^2 D] = alpha (q - onehot(y)) + (1 - alpha) T dD/dz

    with z = s / T. A sparse signal's divergence is over the small distributions (the k ids,
    plus the tail bucket in bucket mode); its gradient reaches a tail id v through the tail's
    share: dD/dz_v = q_v / q_tail * dD/dz_tail."""
    T, alpha = spec.temperature, spec.alpha
    fn = CLOSED_FORMS[spec.divergence]
    log_q1 = torch.log_softmax(student_logits, dim=-1)  # (C, V), CE at temperature 1
    ce = -log_q1.gather(1, targets[:, None]).squeeze(1)
    log_q = log_q1 if T == 1.0 else torch.log_softmax(student_logits / T, dim=-1)
    kd_weight = torch.full_like(ce, (1.0 - alpha) * T)
    ce_weight = torch.full_like(ce, alpha)
    if isinstance(teacher, SparseSignal):
        kd, dz = _sparse_closed_form(student_logits, log_q, teacher, spec, fn)
        if teacher.present is not None:
            kd = torch.where(teacher.present, kd, torch.zeros_like(kd))
            kd_weight = torch.where(teacher.present, kd_weight, torch.zeros_like(kd_weight))
            ce_weight = torch.where(teacher.present, ce_weight, torch.ones_like(ce_weight))
        loss = teacher.mix(ce, kd, alpha, T)
    else:
        teacher = _upcast(teacher)
        if spec.divergence in FINITE and bool(torch.isfinite(teacher).all()):
            fn = FINITE[spec.divergence]  # a matmul's logits: no masking needed
        log_p = torch.log_softmax(teacher if T == 1.0 else teacher / T, dim=-1)
        kd, dz = fn(log_q, log_p, spec.divergence_params)
        loss = alpha * ce + (1.0 - alpha) * T**2 * kd
    grad = dz.mul_(kd_weight[:, None])
    grad.addcmul_(log_q1.exp(), ce_weight[:, None])
    grad[torch.arange(len(targets), device=grad.device), targets] -= ce_weight
    return (loss, ce, kd), grad


def _sparse_closed_form(
    student_logits: Tensor, log_q: Tensor, signal: SparseSignal, spec: _KDSpec, fn: ClosedForm
) -> tuple[Tensor, Tensor]:
    """The divergence against a sparse signal and dD/dz over the whole vocabulary."""
    ids = signal.token_ids
    if signal.tail == "renormalize":
        student_small, teacher_small = _reduce(student_logits, signal, spec.temperature)
        kd, dz_small = fn(student_small, teacher_small, spec.divergence_params)
        return kd, torch.zeros_like(log_q).scatter_(1, ids, dz_small)
    student_small, teacher_small = _reduce_log_q(log_q, signal)  # (C, k + 1)
    kd, dz_small = fn(student_small, teacher_small, spec.divergence_params)
    q_tail = student_small[:, -1:].exp()  # 0 when the ids hold every token (or underflow)
    share = torch.where(q_tail > 0, dz_small[:, -1:] / q_tail.clamp(min=1e-300), 0.0)
    return kd, log_q.exp().mul_(share).scatter_(1, ids, dz_small[:, :-1])


def _chunk_sums_and_grad(
    student_logits: Tensor,
    teacher: Tensor | SparseSignal | None,
    targets: Tensor,
    spec: _KDSpec,
    need_grad: bool,
    weights: Tensor | None = None,
    row_out: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Return ``[loss_sum, ce_sum, kd_sum]`` (3,) of one chunk and d loss_sum / d logits (C, V).

    ``weights`` (C,) scale each token's loss; a token's logits feed only its own loss, so
    scaling the rows of the unweighted gradient is exact. ``row_out`` (C,) receives each
    token's unweighted loss."""
    per_token, grad = _token_losses_and_grad(student_logits, teacher, targets, spec, need_grad)
    if row_out is not None:
        row_out.copy_(per_token[0].detach())
    if weights is not None:
        per_token = (per_token[0] * weights, per_token[1] * weights, per_token[2] * weights)
        if grad is not None:
            grad.mul_(weights[:, None].to(grad.dtype))
    return torch.stack([part.sum() for part in per_token]), grad


def _token_losses_and_grad(
    student_logits: Tensor,
    teacher: Tensor | SparseSignal | None,
    targets: Tensor,
    spec: _KDSpec,
    need_grad: bool,
) -> tuple[tuple[Tensor, Tensor, Tensor], Tensor | None]:
    """Per-token ``(loss, ce, kd)`` (C,) each, and d sum(loss) / d logits (C, V): in closed
    form for every divergence of ``CLOSED_FORMS``, through autograd for any other."""
    if isinstance(teacher, SparseSignal) and _sparse_closed_form_applies(teacher, spec):
        return _sparse_forward_kl_losses_and_grad(student_logits, teacher, targets, spec, need_grad)
    if _closed_form_applies(teacher, spec):
        assert not isinstance(teacher, SparseSignal)
        return _forward_kl_losses_and_grad(student_logits, teacher, targets, spec, need_grad)
    if need_grad and teacher is not None and spec.divergence in CLOSED_FORMS:
        return _closed_form_losses_and_grad(student_logits, teacher, targets, spec)
    with torch.enable_grad():
        student_logits = student_logits.detach().requires_grad_(need_grad)
        loss, ce, kd = _token_losses(student_logits, teacher, targets, spec)
        grad = torch.autograd.grad(loss.sum(), student_logits)[0] if need_grad else None
    return (loss.detach(), ce.detach(), kd.detach()), grad


def _chunked_forward(
    student_hidden: Tensor,
    student_weight: Tensor,
    targets: Tensor,
    teacher_hidden: Tensor | None,
    teacher_weight: Tensor | None,
    teacher_signal: SparseSignal | None,
    spec: _KDSpec,
    needs_grad: tuple[bool, bool],
    token_weights: Tensor | None = None,
    row_losses: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Loop over row chunks; return sums (3,), grad_hidden (N, H) and grad_weight (V, H);
    fill `row_losses` (N,), when given, with each token's unweighted loss."""
    w = _upcast(student_weight[: spec.vocab_size])  # (V_s, H) -> (V, H), padding rows dropped
    tw = None if teacher_weight is None else _upcast(teacher_weight[: spec.vocab_size])
    sums = torch.zeros(3, dtype=w.dtype, device=w.device)
    grad_hidden = torch.zeros_like(student_hidden) if needs_grad[0] else None
    grad_w = torch.zeros_like(w) if needs_grad[1] else None  # accumulated in fp32
    for start in range(0, student_hidden.shape[0], spec.chunk_size):
        rows = slice(start, start + spec.chunk_size)
        h = _upcast(student_hidden[rows])  # (C, H)
        teacher: Tensor | SparseSignal | None = None
        if teacher_signal is not None:
            teacher = teacher_signal.rows(rows)  # (C, k)
        elif teacher_hidden is not None and tw is not None:
            with torch.no_grad():
                teacher = _upcast(teacher_hidden[rows]) @ tw.T  # (C, H_t) @ (H_t, V)
        weights = None if token_weights is None else _upcast(token_weights[rows])
        chunk_sums, grad_logits = _chunk_sums_and_grad(
            h @ w.T,
            teacher,
            targets[rows],
            spec,
            any(needs_grad),
            weights,
            None if row_losses is None else row_losses[rows],
        )  # logits: (C, H) @ (H, V) -> (C, V)
        sums += chunk_sums
        if grad_hidden is not None and grad_logits is not None:
            grad_hidden[rows] = grad_logits @ w  # (C, V) @ (V, H) -> (C, H), cast to input dtype
        if grad_w is not None and grad_logits is not None:
            grad_w.addmm_(grad_logits.T, h)  # (V, C) @ (C, H) -> (V, H)
    return sums, grad_hidden, None if grad_w is None else _full_weight_grad(grad_w, student_weight)


def _full_weight_grad(grad_w: Tensor, student_weight: Tensor) -> Tensor:
    """(V, H) fp32 -> (V_s, H) in the weight's dtype; padding rows get exactly 0."""
    if grad_w.shape == student_weight.shape and grad_w.dtype == student_weight.dtype:
        return grad_w
    full = torch.zeros_like(student_weight)
    full[: grad_w.shape[0]] = grad_w
    return full


class _FusedKDFunction(torch.autograd.Function):
    """Forward computes the loss *and* the student gradients chunk by chunk; backward scales."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        student_hidden: Tensor,
        student_weight: Tensor,
        targets: Tensor,
        teacher_hidden: Tensor | None,
        teacher_weight: Tensor | None,
        teacher_signal: SparseSignal | None,
        spec: _KDSpec,
        needs_grad: tuple[bool, bool],
        token_weights: Tensor | None,
        row_losses: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        sums, grad_hidden, grad_weight = _chunked_forward(
            student_hidden,
            student_weight,
            targets,
            teacher_hidden,
            teacher_weight,
            teacher_signal,
            spec,
            needs_grad,
            token_weights,
            row_losses,
        )
        ctx.save_for_backward(grad_hidden, grad_weight)
        loss_sum, ce_sum, kd_sum = sums[0].clone(), sums[1].clone(), sums[2].clone()
        ctx.mark_non_differentiable(ce_sum, kd_sum)
        return loss_sum, ce_sum, kd_sum

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_loss: Tensor, _grad_ce: Tensor, _grad_kd: Tensor
    ) -> tuple[Tensor | None, ...]:
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight * grad_loss.to(grad_weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None


def fused_kd_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    targets: Tensor,
    *,
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    teacher_signal: SparseSignal | None = None,
    vocab_size: int,
    divergence: str = "forward_kl",
    alpha: float = 0.0,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    divergence_params: dict[str, Any] | None = None,
    token_weights: Tensor | None = None,
    row_losses: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Sum over N tokens of ``alpha * CE + (1 - alpha) * T**2 * D(teacher || student)``, chunked.

    Args:
        student_hidden: (N, H) final hidden states of the N supervised tokens.
        student_weight: (V_s, H) student output projection (may be a tied embedding); its
            gradient has zeros in rows >= vocab_size.
        targets: (N,) long next-token ids in [0, vocab_size); no IGNORE_INDEX (select rows first).
        teacher_hidden: (N, H_t) teacher hidden states; no teacher is needed when alpha == 1.
        teacher_weight: (V_t, H_t) teacher output projection, V_t >= vocab_size; no gradient.
        teacher_signal: instead of teacher_hidden/teacher_weight, the teacher's sparse top-k
            (N, k) signal; D is then ``sparse_divergence`` (ids must be < vocab_size and, in
            bucket mode, the signal computed at ``temperature``).
        vocab_size: ids >= vocab_size (vocabulary padding) are dropped on both sides.
        divergence: a name in ``LOSSES``; ``divergence_params`` are its keyword parameters.
        alpha: weight of the hard-label CE (at temperature 1); 1 - alpha weighs the KD term.
        temperature: T of the divergence; the KD term is multiplied by T**2.
        chunk_size: rows per chunk. Extra memory: a few chunk_size x vocab_size fp32 tensors,
            plus, for non-fp32 weights, fp32 copies of the projections and of its gradient.
        token_weights: optional (N,) non-negative weights, one per token: the sums (loss, ce
            and kd alike) become weighted sums (rationale vs label terms, KPOD weights, a
            curriculum that masks steps with weight 0). No gradient flows into them.
        row_losses: optional (N,) fp32 tensor that receives each token's unweighted loss
            (detached): per-group losses are sums over its rows (group objectives).

    Returns:
        ``(loss_sum, {"ce": ce_sum, "kd": kd_sum})``: an fp32 scalar to divide by the global
        token count, and detached unweighted sums for logging.
    """
    spec = _KDSpec(
        divergence, dict(divergence_params or {}), alpha, temperature, vocab_size, chunk_size
    )
    # The fused path and its naive reference validate identically (the tests rely on it).
    tensors = (student_hidden, student_weight, targets, teacher_hidden, teacher_weight)
    _check_tensors(spec, *tensors, teacher_signal)
    _check_weights(token_weights, targets.shape[0])
    grad_on = torch.is_grad_enabled()
    needs_grad = (
        grad_on and student_hidden.requires_grad,
        grad_on and student_weight.requires_grad,
    )
    # Under mixed precision (train.precision) autocast would run the chunks' matmuls in
    # bf16/fp16 although their inputs are upcast, and the gradients computed here would meet
    # fp16's range before loss scaling: the loss head computes in fp32, outside autocast.
    with torch.autocast(student_hidden.device.type, enabled=False):
        loss_sum, ce_sum, kd_sum = _FusedKDFunction.apply(
            student_hidden,
            student_weight,
            targets,
            teacher_hidden,
            teacher_weight,
            teacher_signal,
            spec,
            needs_grad,
            None if token_weights is None else token_weights.detach(),
            row_losses,
        )
    return loss_sum, {"ce": ce_sum, "kd": kd_sum}


def naive_kd_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    targets: Tensor,
    *,
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    teacher_signal: SparseSignal | None = None,
    vocab_size: int,
    divergence: str = "forward_kl",
    alpha: float = 0.0,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    divergence_params: dict[str, Any] | None = None,
    token_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Reference for ``fused_kd_loss``: full (N, V) logits and plain autograd.

    Same arguments and returns (``chunk_size`` is validated but unused); for tests and
    debugging only, it materialises the logits the fused path exists to avoid.
    """
    spec = _KDSpec(
        divergence, dict(divergence_params or {}), alpha, temperature, vocab_size, chunk_size
    )
    # The fused path and its naive reference validate identically (the tests rely on it).
    tensors = (student_hidden, student_weight, targets, teacher_hidden, teacher_weight)
    _check_tensors(spec, *tensors, teacher_signal)
    _check_weights(token_weights, targets.shape[0])
    student_logits = _upcast(student_hidden) @ _upcast(student_weight[:vocab_size]).T  # (N, V)
    ce = F.cross_entropy(student_logits, targets, reduction="none")  # (N,)
    kd = torch.zeros_like(ce)
    if teacher_signal is not None:
        kd = sparse_divergence(
            student_logits,
            teacher_signal,
            divergence,
            temperature=temperature,
            **spec.divergence_params,
        )
    elif teacher_hidden is not None and teacher_weight is not None:
        with torch.no_grad():
            teacher_logits = _upcast(teacher_hidden) @ _upcast(teacher_weight[:vocab_size]).T
        kd = get_loss(divergence)(
            student_logits, teacher_logits, temperature=temperature, **spec.divergence_params
        )
    if teacher_signal is not None and teacher_signal.present is not None:
        kd = torch.where(teacher_signal.present, kd, torch.zeros_like(kd))
        loss = teacher_signal.mix(ce, kd, alpha, temperature)
    else:
        loss = alpha * ce + (1.0 - alpha) * temperature**2 * kd
    if token_weights is not None:
        w = token_weights.detach().to(loss.dtype)
        loss, ce, kd = loss * w, ce * w, kd * w
    return loss.sum(), {"ce": ce.sum().detach(), "kd": kd.sum().detach()}
