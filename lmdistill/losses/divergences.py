"""Per-token divergences between a teacher and a student next-token distribution.

Every entry of ``LOSSES`` is a pure function

    fn(student_logits (N, V), teacher_logits (N, V), *, temperature=1.0, **params) -> (N,)

returning the *unreduced* per-token divergence. With T the temperature,

    p = softmax(teacher_logits / T)   (teacher)
    q = softmax(student_logits / T)   (student)

Reduction, masking of prompt rows and the ``T**2`` gradient-scale factor of Hinton et al.
(2015) are the caller's job (see ``lmdistill.losses.fused``).

Conventions shared by every entry:

- The math runs in (at least) fp32 whatever the input dtype: a bf16 log-softmax over a
  100k+ vocabulary loses most of the tail mass that distillation is about.
- ``0 * log 0 = 0``: vocabulary ids masked with ``-inf`` logits on both sides (a padded or
  banned id) contribute nothing, and values and gradients stay NaN-free.
- A support mismatch (mass on one side where the other has probability exactly 0, e.g.
  reverse KL against a one-hot teacher) is infinite in exact math. The log of that zero
  probability is floored at ``log(finfo(float32).tiny)`` (about -87.3), so the loss is
  large but finite and its gradient still pushes the mass back onto the support instead
  of an ``inf``/NaN wiping out the whole optimizer step. Finite log-probabilities, however
  small, are never altered.
- Each row needs at least one finite logit on each side (an all ``-inf`` row has no
  distribution).
"""

import math
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from lmdistill.registry import Registry

LossFn = Callable[..., Tensor]
"""``fn(student_logits (N, V), teacher_logits (N, V), *, temperature, **params) -> (N,)``."""

LOSSES: Registry[LossFn] = Registry("divergence", "loss.divergence")
"""Registry of per-token divergences, filled by ``@register_loss("name")``."""

_LossT = TypeVar("_LossT", bound=LossFn)

# log of the smallest normal fp32 number: stands in for log(0) on the side of a KL that
# has no mass where the other side has some (see the module docstring).
_LOG_FLOOR = math.log(torch.finfo(torch.float32).tiny)


def register_loss(name: str) -> Callable[[_LossT], _LossT]:
    """Register ``fn`` in ``LOSSES`` under ``name``; the decorated function is unchanged."""
    return LOSSES.register(name)


def get_loss(name: str) -> LossFn:
    """Return ``LOSSES[name]``; an unknown name raises ``ValueError`` listing the valid ones."""
    return LOSSES.lookup(name)


def _log_probs(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """Return ``(log q_student, log p_teacher)``, each (N, V), in at least fp32."""
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "student_logits and teacher_logits must both be (N, V) with the same shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dtype = torch.promote_types(
        torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32
    )
    log_q = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    return log_q, log_p


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a || b) = sum_v a_v * (log a_v - log b_v) per row: (N, V), (N, V) -> (N,).

    Terms with a_v = 0 are 0. The masking is applied to the *inputs* of the subtraction,
    not only to its output: ``where`` sends a zero gradient to the branch it drops, but the
    dropped branch's own backward would still compute ``0 * inf = NaN``.
    """
    has_mass = torch.isfinite(log_a)  # a_v > 0 (log-probs are never +inf or NaN)
    log_b = torch.where(torch.isneginf(log_b), _LOG_FLOOR, log_b)
    safe_log_a = torch.where(has_mass, log_a, 0.0)
    safe_log_b = torch.where(has_mass, log_b, 0.0)
    return (log_a.exp() * (safe_log_a - safe_log_b)).sum(dim=-1)


def _log_mixture(log_p: Tensor, log_q: Tensor, beta: float) -> Tensor:
    """log m = log(beta * p + (1 - beta) * q), elementwise, for 0 < beta < 1.

    Computed in log space (logaddexp, as TRL's logsumexp). Where both sides are -inf the
    inputs are replaced by 0 before logaddexp, whose gradient there is exp(-inf - -inf) =
    NaN, and -inf is put back in the output.
    """
    both_zero = torch.isneginf(log_p) & torch.isneginf(log_q)
    safe_log_p = torch.where(both_zero, 0.0, log_p) + math.log(beta)
    safe_log_q = torch.where(both_zero, 0.0, log_q) + math.log1p(-beta)
    return torch.where(both_zero, -math.inf, torch.logaddexp(safe_log_p, safe_log_q))


@register_loss("forward_kl")
def forward_kl(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0
) -> Tensor:
    """Forward KL, mean-seeking: KL(p_teacher || q_student) = sum_v p_v (log p_v - log q_v).

    (N, V), (N, V) -> (N,), unreduced, fp32.
    """
    log_q, log_p = _log_probs(student_logits, teacher_logits, temperature)
    return _kl(log_p, log_q)


@register_loss("reverse_kl")
def reverse_kl(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0
) -> Tensor:
    """Reverse KL, mode-seeking: KL(q_student || p_teacher) = sum_v q_v (log q_v - log p_v).

    (N, V), (N, V) -> (N,), unreduced, fp32.
    """
    log_q, log_p = _log_probs(student_logits, teacher_logits, temperature)
    return _kl(log_q, log_p)


@register_loss("generalized_jsd")
def generalized_jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
) -> Tensor:
    """Generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024, arXiv:2306.13649, Eq. 1).

        m   = beta * p_teacher + (1 - beta) * q_student
        JSD = beta * KL(p_teacher || m) + (1 - beta) * KL(q_student || m)

    with the end points replaced, exactly as TRL's ``generalized_jsd_loss``
    (``trl/trainer/gkd_trainer.py``, now ``trl/experimental/gkd/gkd_trainer.py`` and
    ``_jsd_divergence`` in ``trl/experimental/distillation/distillation_trainer.py``):

        beta == 0 -> KL(p_teacher || q_student)   (forward KL)
        beta == 1 -> KL(q_student || p_teacher)   (reverse KL)

    Beware: the mixture formula itself tends to 0 at both ends (like beta * forward KL as
    beta -> 0), so the value jumps at beta in {0, 1}; beta = 1e-3 is *not* close to forward
    KL in magnitude. beta = 0.5 is the symmetric JSD (swapping the arguments gives the
    same value). (N, V), (N, V) -> (N,), unreduced, fp32.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"generalized_jsd: beta must be in [0, 1], got beta={beta}")
    if beta == 0.0:
        return forward_kl(student_logits, teacher_logits, temperature=temperature)
    if beta == 1.0:
        return reverse_kl(student_logits, teacher_logits, temperature=temperature)
    log_q, log_p = _log_probs(student_logits, teacher_logits, temperature)
    log_m = _log_mixture(log_p, log_q, beta)
    return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)


def _check_skew(name: str, alpha: float) -> None:
    if not 0.0 <= alpha < 1.0:
        raise ValueError(
            f"{name}: alpha must be in [0, 1) (alpha = 1 makes the divergence identically 0), "
            f"got alpha={alpha}"
        )


@register_loss("skew_forward_kl")
def skew_forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    alpha: float = 0.1,
) -> Tensor:
    """Skew forward KL of DistiLLM (Ko et al. 2024, arXiv:2402.03898):

        SKL_alpha = KL(p_teacher || alpha * p_teacher + (1 - alpha) * q_student)

    as ``skewed_forward_kl`` in ``distillm/losses.py`` of jongwooko/distillm, whose
    ``lam`` is this ``alpha`` and whose scripts pass ``--skew-alpha 0.1`` (the default here).
    That function returns the cross-entropy ``-sum_v p_v log m_v``, i.e. this value plus the
    teacher entropy H(p): same student gradient, but this one is 0 when q = p.

    alpha in [0, 1): alpha = 0 is plain forward KL; alpha -> 1 shrinks it to 0. Since
    m >= alpha * p, the value is at most log(1 / alpha) and its gradient stays bounded even
    where the student has no mass on the teacher's support. (N, V), (N, V) -> (N,), fp32.
    """
    _check_skew("skew_forward_kl", alpha)
    if alpha == 0.0:
        return forward_kl(student_logits, teacher_logits, temperature=temperature)
    log_q, log_p = _log_probs(student_logits, teacher_logits, temperature)
    return _kl(log_p, _log_mixture(log_p, log_q, alpha))


@register_loss("skew_reverse_kl")
def skew_reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    alpha: float = 0.1,
) -> Tensor:
    """Skew reverse KL of DistiLLM (Ko et al. 2024, arXiv:2402.03898):

        SRKL_alpha = KL(q_student || alpha * q_student + (1 - alpha) * p_teacher)

    as ``skewed_reverse_kl`` in ``distillm/losses.py`` of jongwooko/distillm (``lam`` there,
    default 0.1). alpha in [0, 1): alpha = 0 is plain reverse KL; the value is at most
    log(1 / alpha), so a one-hot teacher no longer needs the log floor to stay finite.
    (N, V), (N, V) -> (N,), unreduced, fp32.
    """
    _check_skew("skew_reverse_kl", alpha)
    if alpha == 0.0:
        return reverse_kl(student_logits, teacher_logits, temperature=temperature)
    log_q, log_p = _log_probs(student_logits, teacher_logits, temperature)
    return _kl(log_q, _log_mixture(log_q, log_p, alpha))


@register_loss("tvd")
def tvd(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Total variation distance: TVD = 0.5 * sum_v |p_v - q_v|, in [0, 1] and symmetric.

    (Used by DistiLLM's ``tv_distance`` and by Wen et al. 2023, "f-Divergence Minimization
    for Sequence-Level KD".) The gradient of |x| at x = 0 is taken as 0.
    (N, V), (N, V) -> (N,), unreduced, fp32.
    """
    log_q, log_p = _log_probs(student_logits, teacher_logits, temperature)
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(dim=-1)


@register_loss("ce")
def ce(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Cross-entropy of the student against the teacher's hard label (its argmax token):

        CE = -log q_student[argmax_v p_teacher]       (first maximum on ties)

    Plain CE on the teacher's hard labels, for mixing with a soft divergence (sequence-level
    KD style). Not a divergence: it is not 0 when q = p. The CE against the *dataset* labels
    is not this: it is the ``alpha`` term of ``lmdistill.losses.fused.fused_kd_loss``.
    The teacher gets no gradient. A student log-probability of -inf at the label is floored
    (see the module docstring). (N, V), (N, V) -> (N,), unreduced, fp32.
    """
    log_q, log_p = _log_probs(student_logits, teacher_logits, temperature)
    labels = log_p.argmax(dim=-1, keepdim=True)  # (N, 1)
    label_log_q = log_q.gather(-1, labels).squeeze(-1)  # (N, 1) -> (N,)
    return -torch.where(torch.isneginf(label_log_q), _LOG_FLOOR, label_log_q)
