"""Condensation by matching: losses decrease, gradients are right (finite differences,
autograd through the unrolled steps), and a student learns from the synthetic set."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lmdistill.config import CondenseConfig, TrainConfig
from lmdistill.data import Example, collate, tokenize_examples
from lmdistill.dd import condense as C
from lmdistill.models.tiny import build_tiny_llama


@pytest.fixture
def setup(tiny_tokenizer: Any) -> tuple[list, int, int]:
    data = [
        Example(
            str(i), ({"role": "user", "content": f"{i}+{i}?"},), f"{i}+{i}={2 * i} #### {2 * i}"
        )
        for i in range(24)
    ]
    items, _ = tokenize_examples(data, tiny_tokenizer, 64)
    return items, len(tiny_tokenizer), tiny_tokenizer.pad_token_id


def student(vocab: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> Any:
    model = build_tiny_llama(vocab, layers=1, hidden=16, seed=seed).to(dtype)
    return C.double_backward_ready(model)


def matching_losses(setup: tuple[list, int, int], method: str, steps: int = 25) -> list[float]:
    """Adam on a 4-sequence synthetic set against one student and one real batch."""
    items, vocab, pad = setup
    model = student(vocab)
    real = collate(items[8:24], pad)
    syn = C.init_from_real(items[:4], vocab, pad)
    leaves = [syn.x, syn.y] if method == "dc" else [syn.x]
    for leaf in leaves:
        leaf.requires_grad_(True)
    optimizer = torch.optim.Adam(leaves, lr=0.1)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        dc = method == "dc"
        loss = C.dc_loss(model, real, syn, vocab) if dc else C.dm_loss(model, real, syn)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def test_gradient_matching_loss_decreases(setup: tuple[list, int, int]) -> None:
    losses = matching_losses(setup, "dc")
    assert losses[-1] < 0.7 * losses[0]


def test_gradient_matching_gradient_matches_finite_differences(
    setup: tuple[list, int, int],
) -> None:
    """Directional derivatives of the DC loss wrt the synthetic logits, by central differences.
    (float64 model; Llama's RMSNorm and attention softmax still round through float32, so
    the steps are 1e-3 and the directions long enough to dominate that rounding.)"""
    items, vocab, pad = setup
    model = student(vocab, dtype=torch.float64)
    real = collate(items[8:16], pad)
    syn = C.init_from_real(items[:2], vocab, pad)
    syn.x = syn.x.double().requires_grad_(True)
    syn.y = syn.y.double().requires_grad_(True)
    grads = torch.autograd.grad(C.dc_loss(model, real, syn, vocab), [syn.x, syn.y])
    generator = torch.Generator().manual_seed(0)
    eps = 1e-3
    for leaf, grad in zip((syn.x, syn.y), grads, strict=True):
        random_direction = torch.randn(grad.shape, generator=generator, dtype=grad.dtype)
        for direction in (grad / grad.norm(), random_direction / random_direction.norm()):
            values = []
            for shift in (eps, -2 * eps):
                with torch.no_grad():
                    leaf.add_(shift * direction)
                values.append(float(C.dc_loss(model, real, syn, vocab).detach()))
            with torch.no_grad():
                leaf.add_(eps * direction)
            numeric = (values[0] - values[1]) / (2 * eps)
            analytic = float((grad * direction).sum())
            assert analytic == pytest.approx(numeric, rel=2e-2, abs=2e-4)
    assert float(grads[0].norm()) > 1e-3  # the check is not vacuous


def test_distribution_matching_loss_decreases(setup: tuple[list, int, int]) -> None:
    losses = matching_losses(setup, "dm")
    assert losses[-1] < 0.5 * losses[0]


def test_one_step_trajectory_gradient_is_exact(setup: tuple[list, int, int]) -> None:
    """TESLA's constant-memory gradient equals autograd through the unrolled step (N = 1)."""
    items, vocab, pad = setup
    model = student(vocab, dtype=torch.float64)
    syn = C.init_from_real(items[:3], vocab, pad)
    syn.x = syn.x.double()
    syn.y = syn.y.double()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    target = {n: p + 0.01 * torch.randn_like(p) for n, p in start.items()}
    log_lr = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    syn.x.requires_grad_(True)
    syn.y.requires_grad_(True)
    loss = C.trajectory_loss_and_grads(model, syn, start, target, [[0, 1, 2]], log_lr)
    tesla = (syn.x.grad.clone(), syn.y.grad.clone(), log_lr.grad.clone())

    # Autograd through the same step.
    x = syn.x.detach().clone().requires_grad_(True)
    y = syn.y.detach().clone().requires_grad_(True)
    lr = log_lr.detach().clone().requires_grad_(True)
    params = {n: p.clone().requires_grad_(True) for n, p in start.items()}
    direct = C.SyntheticSet(x, y, syn.mask, syn.attention)
    grads = torch.autograd.grad(
        C.synthetic_loss(model, direct, params=params), list(params.values()), create_graph=True
    )
    end = {n: params[n] - lr.exp() * g for n, g in zip(params, grads, strict=True)}
    span = sum(((target[n] - start[n]) ** 2).sum() for n in start)
    unrolled = sum(((end[n] - target[n]) ** 2).sum() for n in start) / span
    assert float(unrolled) == pytest.approx(loss, rel=1e-9)
    gx, gy, glr = torch.autograd.grad(unrolled, [x, y, lr])
    torch.testing.assert_close(tesla[0], gx, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(tesla[1], gy, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(tesla[2], glr, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("method", ["dc", "dm", "mtt"])
def test_condense_runs_and_a_student_learns_from_the_set(
    setup: tuple[list, int, int], method: str
) -> None:
    items, vocab, pad = setup
    syn = C.init_from_real(items[:4], vocab, pad)
    before = syn.x.clone()
    spec = CondenseConfig(
        method=method,
        iterations=6,
        real_batch=4,
        init_students=2,
        expert_steps=6,
        expert_every=2,
        match_span=4,
        unroll_steps=2,
        student_lr=0.05,
    )
    info = C.condense(
        syn,
        lambda s: student(vocab, s),
        lambda i: collate(items[8 + i % 8 : 16 + i % 8], pad),
        vocab,
        spec,
    )
    assert len(info["history"]) == 6 and all(torch.isfinite(torch.tensor(info["history"])))
    assert not torch.equal(before, syn.x)  # the set moved
    model = student(vocab, seed=7)
    start = float(C.synthetic_loss(model, syn))
    trained = C.train_on_synthetic(
        model, syn, TrainConfig(max_steps=30, batch_size=4, lr=1e-2, warmup_steps=0)
    )
    assert float(C.synthetic_loss(model, syn)) < start
    assert trained["steps"] == 30


def test_too_large_a_set_is_refused(setup: tuple[list, int, int]) -> None:
    items, _, pad = setup
    with pytest.raises(ValueError, match="too many"):
        C.init_from_real(items, 10_000_000, pad)
