"""Closed-form student gradients of the divergences, computed in the forward pass.

For a divergence D(p || q) with q = softmax(z), the gradient w.r.t. the logits z is

    dD/dz = q * (g - <q, g>),    g = dD/dq  (p held fixed)

and each entry of ``LOSSES`` has a short g:

    forward_kl       g = -p / q                      ->  dD/dz = q - p
    reverse_kl       g = log q - log p + 1           ->  q * (log q - log p - D)
    generalized_jsd  g = (1 - beta) log(q / m),      m = beta p + (1 - beta) q
    skew_forward_kl  g = -(1 - a) p / m,             m = a p + (1 - a) q
    skew_reverse_kl  g = log q - log m + 1 - a q / m, m = a q + (1 - a) p
    tvd              g = sign(q - p) / 2             (0 at q = p)
    ce               dD/dz = q - onehot(argmax p)

(the generalized JSD's g is short because the two KL terms' mixture derivatives cancel).
Each function here takes log q and log p at the loss temperature (dense (C, V), or the small
(C, k [+ 1]) distributions of a sparse signal) and returns the per-row value, equal to
``LOSSES[name]`` (same helpers, same log floor), and dD/dz. The fused loss uses them instead
of autograd: no graph, fewer (C, V) temporaries. A divergence registered without a closed
form here still works through autograd.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lmdistill.losses.divergences import _LOG_FLOOR, _kl, _log_mixture

ClosedForm = Callable[[Tensor, Tensor, dict[str, Any]], tuple[Tensor, Tensor]]
"""``fn(log_q (C, V), log_p (C, V), params) -> (value (C,), dD/dz (C, V))``."""

CLOSED_FORMS: dict[str, ClosedForm] = {}


def closed_form(name: str, table: dict[str, ClosedForm] = CLOSED_FORMS) -> Callable[..., Any]:
    """Put the decorated function in `table` (`CLOSED_FORMS`, or `FINITE`) under `name`."""

    def add(fn: ClosedForm) -> ClosedForm:
        table[name] = fn
        return fn

    return add


def _centred(q: Tensor, g: Tensor) -> Tensor:
    """q * (g - <q, g>) per row, g already 0 where q is 0; g is overwritten."""
    g.sub_((q * g).sum(dim=-1, keepdim=True))
    return g.mul_(q)


def _where_mass(log_q: Tensor, values: Tensor) -> Tensor:
    """`values` where q > 0, else 0 (no -inf arithmetic reaches a gradient)."""
    return torch.where(torch.isfinite(log_q), values, torch.zeros((), dtype=values.dtype))


@closed_form("forward_kl")
def _forward_kl(log_q: Tensor, log_p: Tensor, params: dict[str, Any]) -> tuple[Tensor, Tensor]:
    return _kl(log_p, log_q), log_q.exp() - log_p.exp()


@closed_form("reverse_kl")
def _reverse_kl(log_q: Tensor, log_p: Tensor, params: dict[str, Any]) -> tuple[Tensor, Tensor]:
    floored = torch.where(torch.isneginf(log_p), _LOG_FLOOR, log_p)
    diff = _where_mass(log_q, log_q - floored)
    q = log_q.exp()
    value = (q * diff).sum(dim=-1)
    return value, _centred(q, diff)


@closed_form("generalized_jsd")
def _generalized_jsd(log_q: Tensor, log_p: Tensor, params: dict[str, Any]) -> tuple[Tensor, Tensor]:
    beta = float(params.get("beta", 0.5))
    if beta == 0.0:
        return _forward_kl(log_q, log_p, params)
    if beta == 1.0:
        return _reverse_kl(log_q, log_p, params)
    log_m = _log_mixture(log_p, log_q, beta)
    value = beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)
    g = _where_mass(log_q, (1.0 - beta) * (log_q - log_m))
    return value, _centred(log_q.exp(), g)


@closed_form("skew_forward_kl")
def _skew_forward_kl(log_q: Tensor, log_p: Tensor, params: dict[str, Any]) -> tuple[Tensor, Tensor]:
    alpha = float(params.get("alpha", 0.1))
    if alpha == 0.0:
        return _forward_kl(log_q, log_p, params)
    log_m = _log_mixture(log_p, log_q, alpha)
    # p / m <= 1 / alpha; 0 where the teacher has no mass.
    ratio = torch.where(torch.isneginf(log_p), 0.0, (log_p - log_m).exp())
    return _kl(log_p, log_m), _centred(log_q.exp(), ratio.mul_(-(1.0 - alpha)))


@closed_form("skew_reverse_kl")
def _skew_reverse_kl(log_q: Tensor, log_p: Tensor, params: dict[str, Any]) -> tuple[Tensor, Tensor]:
    alpha = float(params.get("alpha", 0.1))
    if alpha == 0.0:
        return _reverse_kl(log_q, log_p, params)
    log_m = _log_mixture(log_q, log_p, alpha)
    g = _where_mass(log_q, log_q - log_m - alpha * (log_q - log_m).exp())
    return _kl(log_q, log_m), _centred(log_q.exp(), g)


@closed_form("tvd")
def _tvd(log_q: Tensor, log_p: Tensor, params: dict[str, Any]) -> tuple[Tensor, Tensor]:
    q, p = log_q.exp(), log_p.exp()
    diff = q - p
    value = 0.5 * diff.abs().sum(dim=-1)
    return value, _centred(q, diff.sign_().mul_(0.5))


@closed_form("ce")
def _ce(log_q: Tensor, log_p: Tensor, params: dict[str, Any]) -> tuple[Tensor, Tensor]:
    labels = log_p.argmax(dim=-1, keepdim=True)  # (C, 1)
    label_log_q = log_q.gather(-1, labels).squeeze(-1)
    value = -torch.where(torch.isneginf(label_log_q), _LOG_FLOOR, label_log_q)
    grad = log_q.exp()
    grad.scatter_add_(-1, labels, torch.full_like(labels, -1.0, dtype=grad.dtype))
    return value, grad


# ---------------------------------------------------------------------------------------------
# Dense rows whose logits are all finite (the fused loss's: both sides come from a matmul):
# the same values and gradients with no masking, in place, in fewer (C, V) passes.

FINITE: dict[str, ClosedForm] = {}


def finite_form(name: str) -> Callable[..., Any]:
    return closed_form(name, FINITE)


@finite_form("reverse_kl")
def _reverse_kl_finite(
    log_q: Tensor, log_p: Tensor, params: dict[str, Any]
) -> tuple[Tensor, Tensor]:
    q = log_q.exp()
    diff = log_q - log_p
    value = torch.linalg.vecdot(q, diff)
    return value, diff.sub_(value[:, None]).mul_(q)


@finite_form("generalized_jsd")
def _generalized_jsd_finite(
    log_q: Tensor, log_p: Tensor, params: dict[str, Any]
) -> tuple[Tensor, Tensor]:
    beta = float(params.get("beta", 0.5))
    if beta == 0.0:
        return _forward_kl(log_q, log_p, params)
    if beta == 1.0:
        return _reverse_kl_finite(log_q, log_p, params)
    q, p = log_q.exp(), log_p.exp()
    # In log space: where both q and p underflow, log m stays finite (no 0 * inf).
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    teacher_part = torch.linalg.vecdot(p, log_p - log_m)  # KL(p || m)
    d = log_m.neg_().add_(log_q)  # log q - log m, in log_m's buffer
    student_part = torch.linalg.vecdot(q, d)  # KL(q || m)
    value = beta * teacher_part + (1.0 - beta) * student_part
    # g = (1 - beta) d; q * (g - <q, g>) = (1 - beta) q (d - KL(q || m))
    return value, d.sub_(student_part[:, None]).mul_(q).mul_(1.0 - beta)


@finite_form("skew_forward_kl")
def _skew_forward_kl_finite(
    log_q: Tensor, log_p: Tensor, params: dict[str, Any]
) -> tuple[Tensor, Tensor]:
    alpha = float(params.get("alpha", 0.1))
    if alpha == 0.0:
        return _forward_kl(log_q, log_p, params)
    log_m = torch.logaddexp(log_p + math.log(alpha), log_q + math.log1p(-alpha))
    p_over_m = (log_p - log_m).exp_()  # <= 1 / alpha
    value = torch.linalg.vecdot(log_p.exp(), log_p - log_m)
    return value, _centred(log_q.exp(), p_over_m.mul_(-(1.0 - alpha)))


@finite_form("skew_reverse_kl")
def _skew_reverse_kl_finite(
    log_q: Tensor, log_p: Tensor, params: dict[str, Any]
) -> tuple[Tensor, Tensor]:
    alpha = float(params.get("alpha", 0.1))
    if alpha == 0.0:
        return _reverse_kl_finite(log_q, log_p, params)
    q = log_q.exp()
    log_m = torch.logaddexp(log_q + math.log(alpha), log_p + math.log1p(-alpha))
    d = log_m.neg_().add_(log_q)  # log q - log m, in log_m's buffer
    value = torch.linalg.vecdot(q, d)
    g = d - d.exp().mul_(alpha)  # log q - log m - alpha q / m (+1 cancels)
    return value, _centred(q, g)


@finite_form("tvd")
def _tvd_finite(log_q: Tensor, log_p: Tensor, params: dict[str, Any]) -> tuple[Tensor, Tensor]:
    return _tvd(log_q, log_p, params)


@finite_form("forward_kl")
def _forward_kl_finite(
    log_q: Tensor, log_p: Tensor, params: dict[str, Any]
) -> tuple[Tensor, Tensor]:
    return _forward_kl(log_q, log_p, params)


@finite_form("ce")
def _ce_finite(log_q: Tensor, log_p: Tensor, params: dict[str, Any]) -> tuple[Tensor, Tensor]:
    return _ce(log_q, log_p, params)
