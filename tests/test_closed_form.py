"""Every divergence's closed-form gradient against autograd on its per-token formula: dense
and sparse (both tail modes, rows without a signal, k = V), at several temperatures and CE
mixes, in fp64; and its value against ``LOSSES``."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from lmdistill.losses import LOSSES, SparseSignal, topk_signal
from lmdistill.losses.closed_form import CLOSED_FORMS, FINITE
from lmdistill.losses.fused import _closed_form_losses_and_grad, _KDSpec, _token_losses

CASES: list[tuple[str, dict[str, Any]]] = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("generalized_jsd", {"beta": 0.5}),
    ("generalized_jsd", {"beta": 0.1}),
    ("generalized_jsd", {"beta": 0.9}),
    ("generalized_jsd", {"beta": 0.0}),
    ("generalized_jsd", {"beta": 1.0}),
    ("skew_forward_kl", {"alpha": 0.1}),
    ("skew_reverse_kl", {"alpha": 0.3}),
    ("skew_forward_kl", {"alpha": 0.0}),
    ("tvd", {}),
    ("ce", {}),
]
ROWS, VOCAB = 7, 40


def test_every_built_in_divergence_has_a_closed_form() -> None:
    assert set(LOSSES) <= set(CLOSED_FORMS) and set(LOSSES) <= set(FINITE)


def teacher_of(kind: str, logits: torch.Tensor, temperature: float) -> torch.Tensor | SparseSignal:
    if kind == "dense":
        return logits
    if kind == "dense, finite":  # the fused loss's own case: unmasked, in place
        return torch.where(torch.isinf(logits), -30.0, logits)
    tail = "renormalize" if kind == "renormalize" else "bucket"
    k = VOCAB if kind == "k=V" else 6
    signal = topk_signal(logits, k, tail=tail, temperature=temperature)  # type: ignore[arg-type]
    if kind == "absent rows":
        present = torch.tensor([True, False, True, True, False, True, True])
        signal = dataclasses.replace(signal, present=present)
    return signal


@pytest.mark.parametrize(("name", "params"), CASES, ids=lambda c: str(c))
@pytest.mark.parametrize(
    "kind", ["dense", "dense, finite", "bucket", "renormalize", "absent rows", "k=V"]
)
@pytest.mark.parametrize(("temperature", "alpha"), [(1.0, 0.0), (2.0, 0.3), (0.7, 0.9)])
def test_the_closed_form_equals_autograd(
    name: str, params: dict[str, Any], kind: str, temperature: float, alpha: float
) -> None:
    generator = torch.Generator().manual_seed(sum(map(ord, name + kind)))
    student = 3 * torch.randn(ROWS, VOCAB, generator=generator, dtype=torch.float64)
    teacher_logits = 3 * torch.randn(ROWS, VOCAB, generator=generator, dtype=torch.float64)
    teacher_logits[0, :5] = -torch.inf  # ids the teacher never writes
    targets = torch.randint(0, VOCAB, (ROWS,), generator=generator)
    teacher = teacher_of(kind, teacher_logits, temperature)
    spec = _KDSpec(name, params, alpha, temperature, VOCAB, chunk_size=ROWS)

    (loss, ce, kd), grad = _closed_form_losses_and_grad(student, teacher, targets, spec)
    leaf = student.clone().requires_grad_(True)
    ref_loss, ref_ce, ref_kd = _token_losses(leaf, teacher, targets, spec)
    torch.testing.assert_close(ce, ref_ce.detach(), rtol=1e-12, atol=1e-12)
    (ref_grad,) = torch.autograd.grad(ref_loss.sum(), leaf)
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(kd, ref_kd.detach(), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-9)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize(("name", "params"), CASES, ids=lambda c: str(c))
def test_the_value_is_the_registered_divergence(name: str, params: dict[str, Any]) -> None:
    generator = torch.Generator().manual_seed(1)
    student = torch.randn(ROWS, VOCAB, generator=generator)
    teacher = torch.randn(ROWS, VOCAB, generator=generator)
    log_q, log_p = student.log_softmax(-1), teacher.log_softmax(-1)
    value, _ = CLOSED_FORMS[name](log_q, log_p, params)
    torch.testing.assert_close(value, LOSSES[name](student, teacher, **params))


def test_a_student_with_no_mass_where_the_teacher_has_some_stays_finite() -> None:
    """A near one-hot student against a one-hot teacher elsewhere: reverse KL's log floor."""
    student = torch.full((1, 8), -200.0, dtype=torch.float64)
    student[0, 0] = 0.0
    teacher = torch.full((1, 8), -torch.inf, dtype=torch.float64)
    teacher[0, 3] = 0.0
    targets = torch.tensor([3])
    for name, params in CASES:
        spec = _KDSpec(name, params, 0.0, 1.0, 8, chunk_size=1)
        _, grad = _closed_form_losses_and_grad(student, teacher, targets, spec)
        assert torch.isfinite(grad).all(), name


@pytest.mark.parametrize(("name", "params"), CASES, ids=lambda c: str(c))
def test_a_token_neither_side_can_write_stays_finite_in_fp32(
    name: str, params: dict[str, Any]
) -> None:
    """Both sides put ~e^-130 on one token: exp underflows to 0 in fp32 on both sides, and
    the in-place forms must not turn the mixture's log 0 into NaN."""
    generator = torch.Generator().manual_seed(2)
    student = torch.randn(3, VOCAB, generator=generator)
    teacher = torch.randn(3, VOCAB, generator=generator)
    student[:, 7] -= 130.0
    teacher[:, 7] -= 130.0
    log_q, log_p = student.log_softmax(-1), teacher.log_softmax(-1)
    fast_value, fast_grad = FINITE[name](log_q, log_p, params)
    value, grad = CLOSED_FORMS[name](log_q, log_p, params)
    assert torch.isfinite(fast_value).all() and torch.isfinite(fast_grad).all()
    torch.testing.assert_close(fast_value, value)
    torch.testing.assert_close(fast_grad, grad)
