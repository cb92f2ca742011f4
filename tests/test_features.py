"""Feature losses: layer maps, hidden-state matching and attention KL, against naive loops."""

from __future__ import annotations

import math
from typing import cast

import pytest
import torch
from torch import Tensor, nn

from lmdistill.losses.features import HiddenStateMatcher, attention_kl, layer_map
from lmdistill.models.tiny import build_tiny_llama

# (rtol, atol) of a gradient computed from inputs in this dtype vs the fp64 naive loop
TOL = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (2e-2, 2e-2)}


def assert_grad_close(got: Tensor | None, want: Tensor | None, dtype: torch.dtype) -> None:
    assert got is not None and want is not None
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(got, want.to(got.dtype), rtol=rtol, atol=atol)


def padding_mask(batch: int, length: int, pad: list[int], left: bool = True) -> Tensor:
    """(B, T) bool, True on tokens; row b has pad[b] padding positions on the left (or right)."""
    mask = torch.ones(batch, length, dtype=torch.bool)
    for b, n in enumerate(pad):
        if left:
            mask[b, :n] = False
        elif n:
            mask[b, length - n :] = False
    return mask


def projection_weights(matcher: HiddenStateMatcher) -> list[Tensor]:
    """The (H_t, H_s) weight of each pair's projection; empty without projections."""
    return [cast(nn.Linear, p).weight for p in matcher.projections]


def hidden_tuple(layers: int, mask: Tensor, width: int, seed: int) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    b, t = mask.shape
    return tuple(torch.randn(b, t, width, generator=g) for _ in range(layers + 1))


def attention_tuple(layers: int, mask: Tensor, heads: int, seed: int) -> tuple[Tensor, ...]:
    """Softmax maps as eager attention makes them: causal, padded keys exactly 0."""
    g = torch.Generator().manual_seed(seed)
    b, t = mask.shape
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    allowed = causal[None, None] & mask[:, None, None, :]  # (B, 1, T, T)
    maps = []
    for _ in range(layers):
        logits = 2.0 * torch.randn(b, heads, t, t, generator=g)
        # finfo.min (not -inf) as Hugging Face does: padded query rows come out uniform
        logits = logits.masked_fill(~allowed, torch.finfo(torch.float32).min)
        maps.append(logits.softmax(dim=-1))
    return tuple(maps)


def with_garbage_rows(states: tuple[Tensor, ...], mask: Tensor, query_dim: int) -> tuple:
    """Copy of `states` with NaN at every (batch, query) position the mask excludes."""
    out = []
    for s in states:
        s = s.clone()
        s.movedim(query_dim, 1)[~mask] = float("nan")  # a view: (B, T, ...) writes into s
        out.append(s)
    return tuple(out)


# --- naive references -------------------------------------------------------------------


def naive_hidden(student, teacher, pairs, mask, kind, weights=None) -> tuple[Tensor, int]:
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    for k, (i, j) in enumerate(pairs):
        for b in range(mask.shape[0]):
            for t in range(mask.shape[1]):
                if not mask[b, t]:
                    continue
                s = student[i][b, t].double()
                h = teacher[j][b, t].double()
                if weights is not None:
                    s = weights[k].double() @ s
                if kind == "mse":
                    total = total + ((s - h) ** 2).mean()
                else:
                    total = total + 1 - (s @ h) / (s.norm() * h.norm())
                count += 1
    return total, count


def naive_attention(student, teacher, pairs, mask) -> tuple[Tensor, int]:
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    for i, j in pairs:
        s_map, t_map = student[i - 1].double(), teacher[j - 1].double()
        if s_map.shape[1] != t_map.shape[1]:
            s_map, t_map = s_map.mean(1, keepdim=True), t_map.mean(1, keepdim=True)
        for b in range(mask.shape[0]):
            for q in range(mask.shape[1]):
                if not mask[b, q]:
                    continue
                per_head = []
                for h in range(s_map.shape[1]):
                    kl = torch.zeros((), dtype=torch.float64)
                    for k in range(mask.shape[1]):
                        p, r = t_map[b, h, q, k], s_map[b, h, q, k]
                        if p > 0:
                            kl = kl + p * (p.log() - r.log())
                    per_head.append(kl)
                total = total + torch.stack(per_head).mean()
                count += 1
    return total, count


# --- layer_map ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("student", "teacher", "expected"),
    [
        (4, 12, [(1, 3), (2, 6), (3, 9), (4, 12)]),
        (3, 4, [(1, 1), (2, 3), (3, 4)]),
        (2, 5, [(1, 3), (2, 5)]),  # 2.5 rounds up, not to even
        (4, 10, [(1, 3), (2, 5), (3, 8), (4, 10)]),
        (3, 3, [(1, 1), (2, 2), (3, 3)]),
        (4, 1, [(1, 1), (2, 1), (3, 1), (4, 1)]),  # deeper student: never the embeddings
    ],
)
def test_layer_map_uniform(student: int, teacher: int, expected: list[tuple[int, int]]) -> None:
    pairs = layer_map(student, teacher)
    assert pairs == expected
    assert pairs[-1] == (student, teacher)


def test_layer_map_spec_and_errors() -> None:
    assert layer_map(3, 6, [0, 4, 6]) == [(1, 0), (2, 4), (3, 6)]
    with pytest.raises(ValueError, match=r"loss\.layer_map must list one .* \(3 entries\), got 2"):
        layer_map(3, 6, [2, 6])
    with pytest.raises(ValueError, match=r"loss\.layer_map\[2\] = 7 is out of range.*0\.\.6"):
        layer_map(3, 6, [2, 4, 7])
    with pytest.raises(ValueError, match=r"loss\.layer_map\[0\] = -1"):
        layer_map(3, 6, [-1, 4, 6])
    with pytest.raises(ValueError, match=r"loss\.layer_map\[1\] must be an int"):
        layer_map(3, 6, [2, 4.0, 6])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"loss\.layer_map\[0\] must be an int"):
        layer_map(1, 6, [True])
    with pytest.raises(ValueError, match="layer counts must be >= 1"):
        layer_map(0, 6)


# --- HiddenStateMatcher ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mse", "cosine"])
@pytest.mark.parametrize(("student_width", "teacher_width"), [(12, 12), (6, 10), (10, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hidden_matches_naive_reference(
    kind: str, student_width: int, teacher_width: int, dtype: torch.dtype
) -> None:
    torch.manual_seed(0)
    mask = padding_mask(3, 7, [0, 2, 5])
    pairs = layer_map(2, 4)
    student = [s.to(dtype).requires_grad_() for s in hidden_tuple(2, mask, student_width, 1)]
    teacher = [t.to(dtype) for t in hidden_tuple(4, mask, teacher_width, 2)]
    matcher = HiddenStateMatcher(student_width, teacher_width, pairs, kind)  # type: ignore[arg-type]
    loss, count = matcher(tuple(student), tuple(teacher), mask)
    assert loss.dtype == torch.float32 and count == len(pairs) * int(mask.sum())

    ref_student = [s.detach().clone().requires_grad_() for s in student]
    weights = [w.detach().clone().requires_grad_() for w in projection_weights(matcher)] or None
    ref, ref_count = naive_hidden(ref_student, teacher, pairs, mask, kind, weights)
    assert count == ref_count
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)

    loss.backward()
    ref.backward()
    for got, want in zip(student, ref_student, strict=True):
        if got.grad is None:  # a layer no pair uses
            assert want.grad is None
            continue
        assert_grad_close(got.grad, want.grad, dtype)
    for got_weight, weight in zip(projection_weights(matcher), weights or [], strict=True):
        assert_grad_close(got_weight.grad, weight.grad, dtype)


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_hidden_ignores_masked_positions(kind: str) -> None:
    mask = padding_mask(2, 6, [2, 0]) & padding_mask(2, 6, [0, 1], left=False)
    pairs = layer_map(2, 3)
    student = hidden_tuple(2, mask, 8, 1)
    teacher = hidden_tuple(3, mask, 12, 2)
    matcher = HiddenStateMatcher(8, 12, pairs, kind)  # type: ignore[arg-type]
    clean, count = matcher(student, teacher, mask)

    noisy_student = tuple(s.clone().requires_grad_() for s in with_garbage_rows(student, mask, 1))
    noisy_teacher = with_garbage_rows(teacher, mask, 1)
    assert torch.isnan(noisy_teacher[0]).any() and torch.isnan(noisy_student[0]).any()
    noisy, noisy_count = matcher(noisy_student, noisy_teacher, mask)
    torch.testing.assert_close(noisy, clean)
    assert noisy_count == count == len(pairs) * 9
    noisy.backward()
    for s in noisy_student[1:]:
        assert s.grad is not None and torch.isfinite(s.grad).all()
        assert (s.grad[~mask] == 0).all()


def test_hidden_zero_for_identical_states() -> None:
    mask = padding_mask(2, 5, [1, 0])
    states = hidden_tuple(3, mask, 16, 0)
    for kind in ("mse", "cosine"):
        for project in (None, True):  # project=True starts as the identity
            matcher = HiddenStateMatcher(16, 16, layer_map(3, 3), kind, project)  # type: ignore[arg-type]
            assert len(matcher.projections) == (3 if project else 0)
            loss, count = matcher(states, states, mask)
            assert count == 3 * 9
            torch.testing.assert_close(loss, torch.tensor(0.0), atol=1e-5, rtol=0)


def test_projection_init_and_config_errors() -> None:
    wide = HiddenStateMatcher(6, 10, [(1, 2)])
    weight = projection_weights(wide)[0].detach()  # (10, 6): orthonormal columns
    torch.testing.assert_close(weight.T @ weight, torch.eye(6), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="project=False needs equal widths"):
        HiddenStateMatcher(6, 10, [(1, 2)], project=False)
    with pytest.raises(ValueError, match=r"kind must be one of \['mse', 'cosine'\]"):
        HiddenStateMatcher(6, 6, [(1, 2)], kind="l1")  # type: ignore[arg-type]
    mask = padding_mask(2, 5, [0, 0])
    matcher = HiddenStateMatcher(6, 6, [(3, 1)])
    with pytest.raises(ValueError, match=r"layer pair \(3, 1\) is out of range"):
        matcher(hidden_tuple(2, mask, 6, 0), hidden_tuple(2, mask, 6, 0), mask)
    with pytest.raises(ValueError, match="mask must be a \\(B, T\\) bool tensor"):
        matcher(hidden_tuple(3, mask, 6, 0), hidden_tuple(2, mask, 6, 0), mask.long())
    with pytest.raises(ValueError, match=r"teacher_hidden_states\[1\] has width 8, expected 6"):
        matcher(hidden_tuple(3, mask, 6, 0), hidden_tuple(2, mask, 8, 0), mask)


def test_projection_learns_true_map() -> None:
    """teacher = student @ W_true with a wider teacher: MSE training recovers W_true."""
    torch.manual_seed(0)
    student_width, teacher_width = 6, 10
    mask = padding_mask(4, 16, [0, 3, 0, 7])
    w_true = torch.randn(student_width, teacher_width) / math.sqrt(student_width)
    student = hidden_tuple(1, mask, student_width, 1)
    teacher = tuple(s @ w_true for s in student)
    matcher = HiddenStateMatcher(student_width, teacher_width, [(1, 1)], "mse")
    optimizer = torch.optim.Adam(matcher.parameters(), lr=3e-2)
    losses = []
    for _ in range(200):
        loss_sum, count = matcher(student, teacher, mask)
        loss = loss_sum / count
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 100
    learned = projection_weights(matcher)[0].detach().T  # (H_s, H_t), as W_true
    torch.testing.assert_close(learned, w_true, atol=1e-3, rtol=0)


def test_gradient_reaches_student_and_projection_not_teacher() -> None:
    mask = padding_mask(2, 5, [0, 2])
    student = tuple(s.requires_grad_() for s in hidden_tuple(2, mask, 6, 0))
    teacher = tuple(t.requires_grad_() for t in hidden_tuple(4, mask, 8, 1))
    matcher = HiddenStateMatcher(6, 8, layer_map(2, 4), "cosine")
    loss, _ = matcher(student, teacher, mask)
    loss.backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in student[1:])
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in projection_weights(matcher))
    assert all(t.grad is None for t in teacher)

    s_maps = tuple(a.requires_grad_() for a in attention_tuple(2, mask, 2, 2))
    t_maps = tuple(a.requires_grad_() for a in attention_tuple(4, mask, 4, 3))
    kl, _ = attention_kl(s_maps, t_maps, layer_map(2, 4), mask)
    kl.backward()
    assert all(a.grad is not None and a.grad.abs().sum() > 0 for a in s_maps)
    assert all(a.grad is None for a in t_maps)


# --- attention_kl ---------------------------------------------------------------------------


@pytest.mark.parametrize(("student_heads", "teacher_heads"), [(3, 3), (2, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_kl_matches_naive_loop(
    student_heads: int, teacher_heads: int, dtype: torch.dtype
) -> None:
    mask = padding_mask(3, 5, [0, 2, 1]) & padding_mask(3, 5, [0, 0, 1], left=False)
    pairs = layer_map(2, 3)
    student = [a.to(dtype).requires_grad_() for a in attention_tuple(2, mask, student_heads, 0)]
    teacher = [a.to(dtype) for a in attention_tuple(3, mask, teacher_heads, 1)]
    loss, count = attention_kl(tuple(student), tuple(teacher), pairs, mask)
    ref_student = [a.detach().clone().requires_grad_() for a in student]
    ref, ref_count = naive_attention(ref_student, teacher, pairs, mask)
    assert count == ref_count == 2 * int(mask.sum())
    assert ref > 0.1
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    loss.backward()
    ref.backward()
    for got, want in zip(student, ref_student, strict=True):
        assert_grad_close(got.grad, want.grad, dtype)


def test_attention_kl_zero_for_identical_maps_and_ignores_padded_rows() -> None:
    mask = padding_mask(2, 6, [3, 0])
    maps = attention_tuple(2, mask, 4, 0)
    loss, count = attention_kl(maps, maps, [(1, 1), (2, 2)], mask)
    assert count == 2 * 9
    assert loss.item() == 0.0

    student = attention_tuple(2, mask, 4, 1)
    clean, _ = attention_kl(student, maps, [(1, 2), (2, 2)], mask)
    noisy_student = with_garbage_rows(student, mask, 2)
    noisy_teacher = with_garbage_rows(maps, mask, 2)
    assert torch.isnan(noisy_teacher[0][0, :, :3]).all()
    noisy, _ = attention_kl(noisy_student, noisy_teacher, [(1, 2), (2, 2)], mask)
    torch.testing.assert_close(noisy, clean)
    assert torch.isfinite(clean) and clean > 0


def test_attention_kl_golden_and_underflowed_student() -> None:
    """Query row 1, one head: KL([1/4, 3/4, 0] || [1/2, 1/2, 0]); the 0 * log 0 key adds 0."""
    mask = torch.tensor([[False, True, False]])
    teacher = torch.zeros(1, 1, 3, 3)  # (B, H, T, T); rows 0 and 2 are not counted
    student = torch.zeros(1, 1, 3, 3)
    teacher[0, 0, 1] = torch.tensor([0.25, 0.75, 0.0])
    student[0, 0, 1] = torch.tensor([0.5, 0.5, 0.0])
    loss, count = attention_kl((student,), (teacher,), [(1, 1)], mask)
    assert count == 1
    torch.testing.assert_close(loss, torch.tensor(0.25 * math.log(0.5) + 0.75 * math.log(1.5)))

    # a student probability that underflowed to 0 under teacher mass: large but finite
    student[0, 0, 1] = torch.tensor([1.0, 0.0, 0.0])
    student.requires_grad_()
    loss, _ = attention_kl((student,), (teacher,), [(1, 1)], mask)
    loss.backward()
    assert torch.isfinite(loss) and loss > 50
    assert student.grad is not None and torch.isfinite(student.grad).all()


def test_attention_kl_errors() -> None:
    mask = padding_mask(2, 4, [0, 1])
    maps = attention_tuple(2, mask, 2, 0)
    with pytest.raises(ValueError, match="attn_implementation='eager'"):
        attention_kl((), maps, [(1, 1)], mask)
    with pytest.raises(ValueError, match=r"layer pair \(0, 1\) is out of range for attentions"):
        attention_kl(maps, maps, [(0, 1)], mask)
    with pytest.raises(ValueError, match=r"student_attentions\[0\] must be \(B, H, T, T\)"):
        attention_kl((maps[0][:, :, :3],), maps, [(1, 1)], mask)


# --- a real model ---------------------------------------------------------------------------


def test_tiny_llama_outputs_feed_both_losses() -> None:
    """Eager attention, left padding, a narrower student with fewer heads."""
    teacher = build_tiny_llama(260, layers=4, hidden=64, seed=0).eval()
    student = build_tiny_llama(260, layers=2, hidden=32, seed=1)
    input_ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones(2, 7, dtype=torch.long)
    attention_mask[1, :3] = 0
    mask = attention_mask.bool()
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)

    sdpa_out = student(**kwargs, output_attentions=True)  # the default backend returns ()
    with pytest.raises(ValueError, match="attn_implementation='eager'"):
        attention_kl(sdpa_out.attentions, sdpa_out.attentions, [(1, 1)], mask)

    for model in (teacher, student):
        model.set_attn_implementation("eager")
        assert model.config._attn_implementation == "eager"
    with torch.no_grad():
        t_out = teacher(**kwargs, output_attentions=True)
    s_out = student(**kwargs, output_attentions=True)
    assert len(s_out.hidden_states) == 3 and len(s_out.attentions) == 2
    assert s_out.attentions[0].shape == (2, 2, 7, 7) and t_out.attentions[0].shape == (2, 4, 7, 7)

    pairs = layer_map(2, 4)
    matcher = HiddenStateMatcher(32, 64, pairs, "mse")
    hidden_sum, hidden_count = matcher(s_out.hidden_states, t_out.hidden_states, mask)
    attn_sum, attn_count = attention_kl(s_out.attentions, t_out.attentions, pairs, mask)
    assert hidden_count == attn_count == 2 * 11
    assert torch.isfinite(hidden_sum) and hidden_sum > 0
    assert torch.isfinite(attn_sum) and attn_sum > 0
    (hidden_sum / hidden_count + attn_sum / attn_count).backward()
    q_proj = student.model.layers[0].self_attn.q_proj.weight
    assert q_proj.grad is not None and torch.isfinite(q_proj.grad).all() and q_proj.grad.any()
    assert projection_weights(matcher)[0].grad is not None
