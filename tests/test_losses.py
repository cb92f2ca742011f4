"""Conformance tests for lmdistill.losses: divergences against plain-python and TRL-style
references, and the fused chunked loss against the naive one (values and gradients)."""

import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from lmdistill.data import IGNORE_INDEX
from lmdistill.losses import (
    LOSSES,
    fused_kd_loss,
    get_loss,
    naive_kd_loss,
    register_loss,
)

# ---------------------------------------------------------------- plain-python references


def _py_softmax(row: list[float], temperature: float = 1.0) -> list[float]:
    top = max(row)
    exps = [math.exp((x - top) / temperature) for x in row]
    return [e / sum(exps) for e in exps]


def _py_kl(a: list[float], b: list[float]) -> float:
    return sum(x * math.log(x / y) for x, y in zip(a, b, strict=True) if x > 0)


def _py_forward_kl(student: list[float], teacher: list[float], temperature: float = 1.0) -> float:
    return _py_kl(_py_softmax(teacher, temperature), _py_softmax(student, temperature))


def _py_reverse_kl(student: list[float], teacher: list[float], temperature: float = 1.0) -> float:
    return _py_kl(_py_softmax(student, temperature), _py_softmax(teacher, temperature))


def _py_jsd(
    student: list[float], teacher: list[float], temperature: float = 1.0, beta: float = 0.5
) -> float:
    p, q = _py_softmax(teacher, temperature), _py_softmax(student, temperature)
    m = [beta * x + (1 - beta) * y for x, y in zip(p, q, strict=True)]
    return beta * _py_kl(p, m) + (1 - beta) * _py_kl(q, m)


def _py_skew_forward_kl(
    student: list[float], teacher: list[float], temperature: float = 1.0, alpha: float = 0.1
) -> float:
    p, q = _py_softmax(teacher, temperature), _py_softmax(student, temperature)
    return _py_kl(p, [alpha * x + (1 - alpha) * y for x, y in zip(p, q, strict=True)])


def _py_skew_reverse_kl(
    student: list[float], teacher: list[float], temperature: float = 1.0, alpha: float = 0.1
) -> float:
    p, q = _py_softmax(teacher, temperature), _py_softmax(student, temperature)
    return _py_kl(q, [alpha * y + (1 - alpha) * x for x, y in zip(p, q, strict=True)])


def _py_tvd(student: list[float], teacher: list[float], temperature: float = 1.0) -> float:
    p, q = _py_softmax(teacher, temperature), _py_softmax(student, temperature)
    return 0.5 * sum(abs(x - y) for x, y in zip(p, q, strict=True))


def _py_ce(student: list[float], teacher: list[float], temperature: float = 1.0) -> float:
    label = teacher.index(max(teacher))  # first maximum
    return -math.log(_py_softmax(student, temperature)[label])


# Every registered loss needs a plain-python reference here (KeyError otherwise).
PY_REFERENCES = {
    "forward_kl": _py_forward_kl,
    "reverse_kl": _py_reverse_kl,
    "generalized_jsd": _py_jsd,
    "skew_forward_kl": _py_skew_forward_kl,
    "skew_reverse_kl": _py_skew_reverse_kl,
    "tvd": _py_tvd,
    "ce": _py_ce,
}
# Losses that are not divergences: CE against the teacher's argmax is not 0 when q = p, and
# the teacher (through an argmax) gets no gradient.
HARD_LABEL_LOSSES = {"ce"}

# 2 tokens, V = 3. Row 0: teacher (1/2, 1/4, 1/4), student uniform.
GOLDEN_STUDENT = [[0.0, 0.0, 0.0], [math.log(0.2), math.log(0.5), math.log(0.3)]]
GOLDEN_TEACHER = [
    [math.log(0.5), math.log(0.25), math.log(0.25)],
    [math.log(0.7), math.log(0.2), math.log(0.1)],
]


def _trl_generalized_jsd(
    student_logits: Tensor, teacher_logits: Tensor, beta: float, temperature: float
) -> Tensor:
    """TRL's GKDTrainer.generalized_jsd_loss, per token.

    Note F.kl_div(input, target, log_target=True) = KL(target || input).
    """
    s = F.log_softmax(student_logits / temperature, dim=-1)
    t = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        jsd = F.kl_div(s, t, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(t, s, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=s.dtype)
        m = torch.logsumexp(torch.stack([s + torch.log(1 - b), t + torch.log(b)]), dim=0)
        kl_teacher = F.kl_div(m, t, reduction="none", log_target=True)
        kl_student = F.kl_div(m, s, reduction="none", log_target=True)
        jsd = b * kl_teacher + (1 - b) * kl_student
    return jsd.sum(dim=-1)


def _distillm_skew_kl(
    student_logits: Tensor, teacher_logits: Tensor, lam: float, reverse: bool
) -> Tensor:
    """DistiLLM's skewed_forward_kl / skewed_reverse_kl (jongwooko/distillm, distillm/losses.py)
    per token, without their inf masks (finite logits here). Its forward version is the
    cross-entropy -sum p log m: the KL plus the teacher entropy, which is added back by the test.
    """
    p, q = F.softmax(teacher_logits, dim=-1), F.softmax(student_logits, dim=-1)
    if reverse:
        mixed = (1 - lam) * p + lam * q
        return (q * (torch.log(q) - torch.log(mixed))).sum(-1)
    mixed = lam * p + (1 - lam) * q
    return -(p * torch.log(mixed)).sum(-1)


def _logits(n: int, v: int, seed: int, dtype: torch.dtype = torch.float64) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (2.0 * torch.randn(n, v, generator=gen)).to(dtype)


ALL_LOSSES = sorted(LOSSES)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """These tensors are tiny: with a busy CPU, intra-op threads spin-wait and made this file
    20x slower (34 s vs 1.7 s measured on 2 shared cores), so run it single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- divergences


@pytest.mark.parametrize("name", ALL_LOSSES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_golden_values(name: str, temperature: float) -> None:
    got = get_loss(name)(
        torch.tensor(GOLDEN_STUDENT), torch.tensor(GOLDEN_TEACHER), temperature=temperature
    )
    want = [
        PY_REFERENCES[name](s, t, temperature)
        for s, t in zip(GOLDEN_STUDENT, GOLDEN_TEACHER, strict=True)
    ]
    assert got.dtype == torch.float32 and got.shape == (2,)
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-5, atol=1e-6)


def test_golden_closed_forms() -> None:
    student, teacher = torch.tensor(GOLDEN_STUDENT[:1]), torch.tensor(GOLDEN_TEACHER[:1])
    # KL(p || uniform) = sum p log(3p) = (ln 1.5 + ln 0.75) / 2 = ln(9/8) / 2
    assert LOSSES["forward_kl"](student, teacher).item() == pytest.approx(math.log(9 / 8) / 2)
    # KL(uniform || p) = (ln(2/3) + 2 ln(4/3)) / 3 = ln(32/27) / 3
    assert LOSSES["reverse_kl"](student, teacher).item() == pytest.approx(math.log(32 / 27) / 3)
    # alpha = 0.1: m = 0.1 p + 0.9 / 3 = (0.35, 0.325, 0.325);
    # KL(p || m) = (ln(0.5 / 0.35) + ln(0.25 / 0.325)) / 2 = ln(100 / 91) / 2
    assert LOSSES["skew_forward_kl"](student, teacher).item() == pytest.approx(
        math.log(100 / 91) / 2
    )
    # m = 0.1 / 3 + 0.9 p = (29/60, 31/120, 31/120); KL(uniform || m) = ln(32000 / 27869) / 3
    assert LOSSES["skew_reverse_kl"](student, teacher).item() == pytest.approx(
        math.log(32000 / 27869) / 3
    )
    # 0.5 * (1/6 + 1/12 + 1/12) = 1/6
    assert LOSSES["tvd"](student, teacher).item() == pytest.approx(1 / 6)
    # argmax p = 0: -ln(1/3) for the uniform student; row 1: argmax 0, q = 0.2
    torch.testing.assert_close(
        LOSSES["ce"](torch.tensor(GOLDEN_STUDENT), torch.tensor(GOLDEN_TEACHER)),
        torch.tensor([math.log(3), math.log(5)]),
    )


@pytest.mark.parametrize("name", sorted(set(ALL_LOSSES) - HARD_LABEL_LOSSES))
def test_zero_for_identical_distributions(name: str) -> None:
    logits = _logits(5, 11, seed=0)
    shifted = logits + 3.0  # softmax is shift invariant
    assert torch.allclose(get_loss(name)(logits, shifted), torch.zeros(5, dtype=torch.float64))


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_nonnegative(name: str) -> None:
    assert (get_loss(name)(_logits(64, 7, seed=1), _logits(64, 7, seed=2)) >= 0).all()


def test_forward_kl_is_reverse_kl_with_swapped_arguments() -> None:
    s, t = _logits(6, 13, seed=3), _logits(6, 13, seed=4)
    torch.testing.assert_close(LOSSES["forward_kl"](s, t), LOSSES["reverse_kl"](t, s))
    assert not torch.allclose(LOSSES["forward_kl"](s, t), LOSSES["reverse_kl"](s, t))


def test_generalized_jsd_end_points_and_symmetry() -> None:
    s, t = _logits(6, 13, seed=5), _logits(6, 13, seed=6)
    jsd = LOSSES["generalized_jsd"]
    torch.testing.assert_close(jsd(s, t, beta=0.0), LOSSES["forward_kl"](s, t))
    torch.testing.assert_close(jsd(s, t, beta=1.0), LOSSES["reverse_kl"](s, t))
    torch.testing.assert_close(jsd(s, t, beta=0.5), jsd(t, s, beta=0.5))
    torch.testing.assert_close(jsd(s, t, beta=0.2), jsd(t, s, beta=0.8))
    # JSD(0.5) <= ln 2; the default beta is 0.5
    torch.testing.assert_close(jsd(s, t), jsd(s, t, beta=0.5))
    assert (jsd(s, t) <= math.log(2)).all()


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_generalized_jsd_matches_trl(beta: float, temperature: float) -> None:
    s, t = _logits(9, 17, seed=7), _logits(9, 17, seed=8)
    got = LOSSES["generalized_jsd"](s, t, beta=beta, temperature=temperature)
    torch.testing.assert_close(got, _trl_generalized_jsd(s, t, beta, temperature))


@pytest.mark.parametrize("beta", [-0.1, 1.5, math.nan])
def test_generalized_jsd_rejects_bad_beta(beta: float) -> None:
    with pytest.raises(ValueError, match="beta"):
        LOSSES["generalized_jsd"](_logits(2, 3, 0), _logits(2, 3, 1), beta=beta)


@pytest.mark.parametrize("name", ["skew_forward_kl", "skew_reverse_kl"])
def test_skew_kl_at_alpha_zero_is_plain_kl_and_continuous(name: str) -> None:
    s, t = _logits(6, 13, seed=20), _logits(6, 13, seed=21)
    plain = LOSSES[name.removeprefix("skew_")](s, t, temperature=1.5)
    torch.testing.assert_close(LOSSES[name](s, t, temperature=1.5, alpha=0.0), plain)
    # unlike the JSD, the skew has no jump at its end point
    torch.testing.assert_close(
        LOSSES[name](s, t, temperature=1.5, alpha=1e-7), plain, rtol=1e-5, atol=1e-6
    )
    # ... and the default is DistiLLM's 0.1, strictly below plain KL
    torch.testing.assert_close(LOSSES[name](s, t), LOSSES[name](s, t, alpha=0.1))
    assert (LOSSES[name](s, t, temperature=1.5) < plain).all()


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_skew_kl_matches_distillm(reverse: bool, alpha: float, temperature: float) -> None:
    """Values and student gradients against DistiLLM's formulas."""
    name = "skew_reverse_kl" if reverse else "skew_forward_kl"
    s, t = _logits(7, 11, seed=22), _logits(7, 11, seed=23)
    got_s, want_s = s.clone().requires_grad_(), s.clone().requires_grad_()
    got = LOSSES[name](got_s, t, temperature=temperature, alpha=alpha)
    want = _distillm_skew_kl(want_s / temperature, t / temperature, alpha, reverse)
    if not reverse:  # DistiLLM returns the cross-entropy: subtract the teacher entropy
        log_p = F.log_softmax(t / temperature, dim=-1)
        want = want + (log_p.exp() * log_p).sum(-1)
    torch.testing.assert_close(got, want)
    got.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(got_s.grad, want_s.grad)


@pytest.mark.parametrize("name", ["skew_forward_kl", "skew_reverse_kl"])
@pytest.mark.parametrize("alpha", [0.1, 0.4])
def test_skew_kl_is_at_most_log_inverse_alpha(name: str, alpha: float) -> None:
    """m >= alpha * (first argument), so the skew KL <= log(1 / alpha), with equality for
    disjoint supports, where plain KL is infinite (floored here)."""
    s, t = 4.0 * _logits(64, 7, seed=24), 4.0 * _logits(64, 7, seed=25)
    assert (LOSSES[name](s, t, alpha=alpha) <= math.log(1 / alpha) + 1e-9).all()
    teacher = torch.tensor([[0.0, -math.inf, -math.inf, -math.inf]])  # one-hot on id 0
    student = torch.tensor([[-math.inf, 0.3, -1.0, 2.0]])  # no mass on id 0
    got = _finite_value_and_grads(name, student, teacher, alpha=alpha)
    torch.testing.assert_close(got, torch.tensor([math.log(1 / alpha)]))


@pytest.mark.parametrize("name", ["skew_forward_kl", "skew_reverse_kl"])
@pytest.mark.parametrize("alpha", [1.0, -0.1, 1.5, math.nan])
def test_skew_kl_rejects_bad_alpha(name: str, alpha: float) -> None:
    with pytest.raises(ValueError, match=rf"{name}: alpha must be in \[0, 1\)"):
        LOSSES[name](_logits(2, 3, 0), _logits(2, 3, 1), alpha=alpha)


def test_tvd_bounds_symmetry_and_pinsker() -> None:
    s, t = 3.0 * _logits(64, 9, seed=26), 3.0 * _logits(64, 9, seed=27)
    tvd = LOSSES["tvd"](s, t)
    assert ((tvd > 0) & (tvd < 1)).all()
    torch.testing.assert_close(tvd, LOSSES["tvd"](t, s))
    # TVD = sum_v max(p_v - q_v, 0); Pinsker: TVD <= sqrt(KL / 2)
    p, q = F.softmax(t, dim=-1), F.softmax(s, dim=-1)
    torch.testing.assert_close(tvd, (p - q).clamp(min=0).sum(-1))
    assert (tvd <= (LOSSES["forward_kl"](s, t) / 2).sqrt()).all()
    # disjoint supports: exactly 1, with finite gradients
    student = torch.tensor([[-math.inf, 0.3, 1.0], [0.0, -math.inf, -math.inf]])
    teacher = torch.tensor([[0.0, -math.inf, -math.inf], [-math.inf, 1.0, 2.0]])
    got = _finite_value_and_grads("tvd", student, teacher)
    torch.testing.assert_close(got, torch.ones(2))


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_ce_is_minus_log_student_prob_of_the_teacher_argmax(temperature: float) -> None:
    s, t = _logits(9, 17, seed=28), _logits(9, 17, seed=29)
    got_s, want_s = s.clone().requires_grad_(), s.clone().requires_grad_()
    got = LOSSES["ce"](got_s, t, temperature=temperature)
    want = F.cross_entropy(want_s / temperature, t.argmax(-1), reduction="none")
    torch.testing.assert_close(got, want)
    got.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(got_s.grad, want_s.grad)
    # with a one-hot teacher, CE is forward KL
    one_hot = torch.full_like(t, -math.inf).scatter(1, t.argmax(-1, keepdim=True), 0.0)
    torch.testing.assert_close(got, LOSSES["forward_kl"](s, one_hot, temperature=temperature))


def test_ce_ties_take_the_first_maximum() -> None:
    student = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    teacher = torch.tensor([[0.0, 2.0, 1.0, 2.0]])
    torch.testing.assert_close(LOSSES["ce"](student, teacher), -torch.log(torch.tensor([0.2])))


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_temperature_divides_both_logits(name: str) -> None:
    s, t = _logits(4, 9, seed=9), _logits(4, 9, seed=10)
    fn = get_loss(name)
    torch.testing.assert_close(fn(s, t, temperature=3.0), fn(s / 3.0, t / 3.0))
    with pytest.raises(ValueError, match="temperature"):
        fn(s, t, temperature=0.0)


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_upcasts_low_precision_to_fp32(name: str) -> None:
    s, t = _logits(4, 9, 11, torch.bfloat16), _logits(4, 9, 12, torch.bfloat16)
    got = get_loss(name)(s, t)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, get_loss(name)(s.float(), t.float()))


def _finite_value_and_grads(name: str, student: Tensor, teacher: Tensor, **params: Any) -> Tensor:
    student, teacher = student.clone().requires_grad_(), teacher.clone().requires_grad_()
    value = get_loss(name)(student, teacher, **params)
    value.sum().backward()
    assert torch.isfinite(value).all(), value
    assert student.grad is not None and torch.isfinite(student.grad).all()
    if name in HARD_LABEL_LOSSES:
        assert teacher.grad is None  # an argmax: the teacher is not differentiated
    else:
        assert teacher.grad is not None and torch.isfinite(teacher.grad).all()
    return value.detach()


CASES: list[tuple[str, dict[str, float]]] = [(name, {}) for name in ALL_LOSSES] + [
    ("generalized_jsd", {"beta": 0.3}),
    ("skew_forward_kl", {"alpha": 0.0}),
    ("skew_reverse_kl", {"alpha": 0.0}),
    ("skew_reverse_kl", {"alpha": 0.9}),
]


@pytest.mark.parametrize(("name", "params"), CASES)
def test_shared_minus_inf_ids_are_dropped(name: str, params: dict[str, float]) -> None:
    s, t = _logits(4, 7, seed=13), _logits(4, 7, seed=14)
    keep = torch.tensor([0, 2, 3, 5, 6])
    masked_s, masked_t = torch.full_like(s, -math.inf), torch.full_like(t, -math.inf)
    masked_s[:, keep], masked_t[:, keep] = s[:, keep], t[:, keep]
    got = _finite_value_and_grads(name, masked_s, masked_t, **params)
    torch.testing.assert_close(got, get_loss(name)(s[:, keep], t[:, keep], **params))


@pytest.mark.parametrize(("name", "params"), CASES)
@pytest.mark.parametrize("one_hot_side", ["teacher", "student"])
def test_one_hot_side_is_finite(name: str, params: dict[str, float], one_hot_side: str) -> None:
    dense, ids = _logits(4, 7, seed=15), torch.tensor([0, 3, 6, 3])
    one_hot = torch.full_like(dense, -math.inf).scatter(1, ids[:, None], 0.0)
    if one_hot_side == "teacher":
        got = _finite_value_and_grads(name, dense, one_hot, **params)
    else:
        got = _finite_value_and_grads(name, one_hot, dense, **params)
    assert (got > 0).all()
    if (name, one_hot_side) == ("forward_kl", "teacher"):  # KL(one-hot || q) = -log q[id]
        torch.testing.assert_close(got, F.cross_entropy(dense, ids, reduction="none"))


@pytest.mark.parametrize(("name", "params"), CASES)
def test_one_hot_student_is_pulled_towards_one_hot_teacher(
    name: str, params: dict[str, float]
) -> None:
    student = _logits(3, 5, seed=16).requires_grad_()
    teacher = torch.full((3, 5), -math.inf, dtype=torch.float64).scatter(
        1, torch.tensor([[1], [4], [0]]), 0.0
    )
    get_loss(name)(student, teacher, **params).sum().backward()
    assert student.grad is not None
    assert (student.grad.gather(1, torch.tensor([[1], [4], [0]])) < 0).all()


@pytest.mark.parametrize(("name", "params"), CASES)
def test_identical_one_hot_is_zero(name: str, params: dict[str, float]) -> None:
    one_hot = torch.full((3, 5), -math.inf).scatter(1, torch.tensor([[1], [4], [0]]), 0.0)
    got = _finite_value_and_grads(name, one_hot, one_hot, **params)
    torch.testing.assert_close(got, torch.zeros(3), rtol=0, atol=1e-6)  # fp32 rounding of log m


@pytest.mark.parametrize(("name", "params"), CASES)
def test_gradcheck_fp64(name: str, params: dict[str, float]) -> None:
    """Finite differences, w.r.t. both sides (the student only for hard-label losses)."""
    s = _logits(3, 5, seed=30).requires_grad_()
    t = _logits(3, 5, seed=31).requires_grad_(name not in HARD_LABEL_LOSSES)

    def loss(s: Tensor, t: Tensor) -> Tensor:
        return get_loss(name)(s, t, temperature=1.3, **params)

    assert torch.autograd.gradcheck(loss, (s, t))


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_empty_rows(name: str) -> None:
    got = get_loss(name)(torch.zeros(0, 7), torch.zeros(0, 7))
    assert got.shape == (0,) and got.dtype == torch.float32


def test_registry_errors() -> None:
    valid = (
        "'ce', 'forward_kl', 'generalized_jsd', 'reverse_kl', 'skew_forward_kl', "
        "'skew_reverse_kl', 'tvd'"
    )
    with pytest.raises(ValueError, match=rf"'kl_forward' is unknown; expected one of \[{valid}\]$"):
        get_loss("kl_forward")
    with pytest.raises(ValueError, match="already registered"):
        register_loss("forward_kl")(LOSSES["reverse_kl"])
    with pytest.raises(ValueError, match=r"\(N, V\)"):
        LOSSES["forward_kl"](torch.zeros(2, 3), torch.zeros(2, 4))


# ---------------------------------------------------------------- fused == naive

H_S, H_T, V_S, V_T, VOCAB = 16, 12, 101, 99, 97  # both projections padded past VOCAB
LOSS_FNS = {"fused": fused_kd_loss, "naive": naive_kd_loss}


def _problem(n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> Tensor:
        return (scale * torch.randn(*shape, generator=gen)).to(dtype)

    return {
        "student_hidden": randn(n, H_S).requires_grad_(),
        "student_weight": randn(V_S, H_S, scale=0.5).requires_grad_(),
        "targets": torch.randint(0, VOCAB, (n,), generator=gen),
        "teacher_hidden": randn(n, H_T),
        "teacher_weight": randn(V_T, H_T, scale=0.7),
    }


def _run(
    fn: str, problem: dict[str, Tensor], **kwargs: Any
) -> tuple[Tensor, dict[str, Tensor], Tensor, Tensor]:
    """Loss, parts and the gradients w.r.t. (student_hidden, student_weight)."""
    kwargs = {"vocab_size": VOCAB, "temperature": 2.0, **kwargs}
    loss, parts = LOSS_FNS[fn](
        problem["student_hidden"],
        problem["student_weight"],
        problem["targets"],
        teacher_hidden=kwargs.pop("teacher_hidden", problem["teacher_hidden"]),
        teacher_weight=kwargs.pop("teacher_weight", problem["teacher_weight"]),
        **kwargs,
    )
    grad_h, grad_w = torch.autograd.grad(
        loss, [problem["student_hidden"], problem["student_weight"]]
    )
    return loss, parts, grad_h, grad_w


def _assert_same(got: tuple[Any, ...], want: tuple[Any, ...], tol: float) -> None:
    loss, parts, grad_h, grad_w = got
    torch.testing.assert_close(loss, want[0], rtol=tol, atol=tol)
    for key in ("ce", "kd"):
        torch.testing.assert_close(parts[key], want[1][key], rtol=tol, atol=tol)
        assert not parts[key].requires_grad
    torch.testing.assert_close(grad_h, want[2], rtol=tol, atol=tol)
    torch.testing.assert_close(grad_w, want[3], rtol=tol, atol=tol)


DIVERGENCES: list[tuple[str, dict[str, float]]] = [(name, {}) for name in ALL_LOSSES] + [
    ("generalized_jsd", {"beta": 0.1}),
    ("skew_reverse_kl", {"alpha": 0.5}),
]


@pytest.mark.parametrize(("divergence", "params"), DIVERGENCES)
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1000])
def test_fused_matches_naive_fp32(
    divergence: str, params: dict[str, float], alpha: float, chunk_size: int
) -> None:
    problem = _problem(37)
    kwargs = {"divergence": divergence, "divergence_params": params, "alpha": alpha}
    got = _run("fused", problem, chunk_size=chunk_size, **kwargs)
    want = _run("naive", problem, **kwargs)
    _assert_same(got, want, tol=1e-5)
    assert got[0].dtype == torch.float32 and got[2].dtype == got[3].dtype == torch.float32
    assert (got[3][VOCAB:] == 0).all()  # padding rows of the projection get no gradient
    assert got[1]["kd"] > 0 and got[1]["ce"] > 0


@pytest.mark.parametrize(("divergence", "params"), DIVERGENCES)
def test_fused_matches_naive_bf16(divergence: str, params: dict[str, float]) -> None:
    problem = _problem(37, dtype=torch.bfloat16)
    kwargs = {"divergence": divergence, "divergence_params": params, "alpha": 0.5}
    got = _run("fused", problem, chunk_size=7, **kwargs)
    _assert_same(got, _run("naive", problem, **kwargs), tol=2e-2)
    assert got[0].dtype == torch.float32
    assert got[2].dtype == got[3].dtype == torch.bfloat16


@pytest.mark.parametrize(("divergence", "params"), DIVERGENCES)
def test_fused_gradcheck_fp64(divergence: str, params: dict[str, float]) -> None:
    """Finite differences check the hand-written backward independently of naive_kd_loss."""
    gen = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(5, 3, generator=gen), torch.randn(8, 3, generator=gen)
    teacher_hidden, teacher_weight = (
        torch.randn(5, 2, generator=gen),
        torch.randn(7, 2, generator=gen),
    )
    targets = torch.tensor([0, 5, 2, 2, 4])

    def loss(hidden: Tensor, weight: Tensor) -> Tensor:
        return fused_kd_loss(
            hidden,
            weight,
            targets,
            teacher_hidden=teacher_hidden.double(),
            teacher_weight=teacher_weight.double(),
            vocab_size=6,
            divergence=divergence,
            divergence_params=params,
            alpha=0.3,
            temperature=1.5,
            chunk_size=2,
        )[0]

    inputs = (hidden.double().requires_grad_(), weight.double().requires_grad_())
    assert torch.autograd.gradcheck(loss, inputs)


@pytest.mark.parametrize("fn", ["fused", "naive"])
def test_empty_batch_gives_zero_loss_and_zero_grads(fn: str) -> None:
    loss, parts, grad_h, grad_w = _run(fn, _problem(0), alpha=0.5)
    assert loss.item() == 0.0 and parts["ce"].item() == 0.0 and parts["kd"].item() == 0.0
    assert grad_h.shape == (0, H_S)
    assert grad_w.shape == (V_S, H_S) and (grad_w == 0).all()


def test_gradient_accumulation_invariance() -> None:
    whole = _problem(37, seed=2)
    per_row = ("student_hidden", "targets", "teacher_hidden")
    halves = [
        {**whole, **{k: whole[k].detach()[rows] for k in per_row}}  # weights are shared
        for rows in (slice(0, 20), slice(20, None))
    ]
    loss, _, grad_h, grad_w = _run("fused", whole, chunk_size=8, alpha=0.5)
    part_losses, part_grad_h, part_grad_w = [], [], []
    for half in halves:
        half["student_hidden"].requires_grad_()
        half_loss, _, half_grad_h, half_grad_w = _run("fused", half, chunk_size=8, alpha=0.5)
        part_losses.append(half_loss)
        part_grad_h.append(half_grad_h)
        part_grad_w.append(half_grad_w)
    torch.testing.assert_close(part_losses[0] + part_losses[1], loss)
    torch.testing.assert_close(torch.cat(part_grad_h), grad_h)
    torch.testing.assert_close(part_grad_w[0] + part_grad_w[1], grad_w)


def test_backward_scales_by_grad_output_and_flows_through_tied_embedding() -> None:
    """The projection is also the input embedding: both uses must add into weight.grad."""
    grads = {}
    for fn in ("fused", "naive"):
        problem = _problem(9, seed=3)
        weight = problem["student_weight"]
        ids = torch.arange(9) * 7
        hidden = torch.tanh(F.embedding(ids, weight))  # (9,) -> (9, H_S)
        loss, _ = LOSS_FNS[fn](
            hidden,
            weight,
            problem["targets"],
            teacher_hidden=problem["teacher_hidden"],
            teacher_weight=problem["teacher_weight"],
            vocab_size=VOCAB,
            divergence="reverse_kl",
            alpha=0.2,
            chunk_size=4,
        )
        (3.0 * loss).backward()
        grads[fn] = weight.grad
    torch.testing.assert_close(grads["fused"], grads["naive"], rtol=1e-5, atol=1e-5)


def test_frozen_projection_gets_no_gradient() -> None:
    """LoRA-style: a frozen lm_head; only the hidden states need (and get) a gradient."""
    problem = _problem(9, seed=8)
    problem["student_weight"].requires_grad_(False)
    losses, grads = {}, {}
    for fn in ("fused", "naive"):
        losses[fn], _ = LOSS_FNS[fn](
            problem["student_hidden"],
            problem["student_weight"],
            problem["targets"],
            teacher_hidden=problem["teacher_hidden"],
            teacher_weight=problem["teacher_weight"],
            vocab_size=VOCAB,
            chunk_size=4,
        )
        (grads[fn],) = torch.autograd.grad(losses[fn], [problem["student_hidden"]])
    torch.testing.assert_close(losses["fused"], losses["naive"])
    torch.testing.assert_close(grads["fused"], grads["naive"])


def test_pure_ce_needs_no_teacher() -> None:
    problem = _problem(11, seed=4)
    kwargs = {"alpha": 1.0, "teacher_hidden": None, "teacher_weight": None}
    loss, parts, grad_h, grad_w = _run("fused", problem, chunk_size=4, **kwargs)
    _assert_same((loss, parts, grad_h, grad_w), _run("naive", problem, **kwargs), tol=1e-5)
    logits = problem["student_hidden"] @ problem["student_weight"][:VOCAB].T
    torch.testing.assert_close(loss, F.cross_entropy(logits, problem["targets"], reduction="sum"))
    assert parts["kd"].item() == 0.0


def test_no_grad_mode_gives_the_same_loss() -> None:
    problem = _problem(13, seed=5)
    with torch.no_grad():
        loss, _ = fused_kd_loss(
            problem["student_hidden"],
            problem["student_weight"],
            problem["targets"],
            teacher_hidden=problem["teacher_hidden"],
            teacher_weight=problem["teacher_weight"],
            vocab_size=VOCAB,
            chunk_size=5,
        )
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, _run("naive", problem, temperature=1.0)[0].detach())


def test_the_chunking_is_generic_over_registered_losses() -> None:
    """A newly registered divergence gets the fused path for free; chunks stay chunk-sized."""
    seen_shapes = []

    def squared_logprob_gap(
        student: Tensor, teacher: Tensor, *, temperature: float = 1.0
    ) -> Tensor:
        seen_shapes.append(tuple(student.shape))
        gap = F.log_softmax(student / temperature, -1) - F.log_softmax(teacher / temperature, -1)
        return gap.square().sum(-1)

    register_loss("squared_logprob_gap")(squared_logprob_gap)
    try:
        problem = _problem(37, seed=6)
        kwargs = {"divergence": "squared_logprob_gap", "alpha": 0.25}
        got = _run("fused", problem, chunk_size=10, **kwargs)
        assert max(rows for rows, _ in seen_shapes[1:]) == 10  # [0]: the empty validation call
        assert {vocab for _, vocab in seen_shapes} == {VOCAB}
        _assert_same(got, _run("naive", problem, **kwargs), tol=1e-5)
    finally:
        LOSSES.unregister("squared_logprob_gap")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"targets": torch.full((5,), IGNORE_INDEX)}, "IGNORE_INDEX"),
        ({"targets": torch.full((5,), VOCAB)}, "vocab_size"),
        ({"teacher_hidden": None, "teacher_weight": None}, "teacher"),
        ({"teacher_weight": torch.zeros(VOCAB - 1, H_T)}, "teacher_weight"),
        ({"vocab_size": V_S + 1}, "vocab_size"),
        ({"alpha": 1.5}, "alpha"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"divergence": "kl"}, "forward_kl"),
        ({"divergence": "generalized_jsd", "divergence_params": {"beta": 2.0}}, "beta"),
    ],
)
@pytest.mark.parametrize("fn", ["fused", "naive"])
def test_bad_arguments_raise(fn: str, change: dict[str, Any], message: str) -> None:
    problem = _problem(5, seed=7)
    kwargs: dict[str, Any] = {
        "teacher_hidden": problem["teacher_hidden"],
        "teacher_weight": problem["teacher_weight"],
        "vocab_size": VOCAB,
        "alpha": 0.5,
        **change,
    }
    targets = kwargs.pop("targets", problem["targets"])
    with pytest.raises(ValueError, match=message):
        LOSS_FNS[fn](problem["student_hidden"], problem["student_weight"], targets, **kwargs)


def test_bad_divergence_params_fail_even_on_an_empty_batch() -> None:
    problem = _problem(0)
    with pytest.raises(ValueError, match="beta"):
        _run("fused", problem, divergence="generalized_jsd", divergence_params={"beta": -1.0})


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_forward_kl_closed_form_equals_autograd(
    temperature: float, alpha: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fused path's textbook gradient for forward KL + CE agrees with autograd on the
    per-token formula (the path every other divergence takes)."""
    import lmdistill.losses.fused as fused

    gen = torch.Generator().manual_seed(3)
    h = torch.randn(29, 16, generator=gen, requires_grad=True)
    w = torch.randn(53, 16, generator=gen, requires_grad=True)
    th, tw = torch.randn(29, 12, generator=gen), torch.randn(53, 12, generator=gen)
    y = torch.randint(0, 50, (29,), generator=gen)
    kwargs: dict[str, Any] = dict(
        teacher_hidden=th,
        teacher_weight=tw,
        vocab_size=50,
        alpha=alpha,
        temperature=temperature,
        chunk_size=8,
    )
    results = []
    for closed in (True, False):
        if not closed:
            monkeypatch.setattr(fused, "_closed_form_applies", lambda teacher, spec: False)
        loss, parts = fused_kd_loss(h, w, y, **kwargs)
        grads = torch.autograd.grad(loss, (h, w))
        results.append((loss, parts["kd"], *grads))
    for closed_value, autograd_value in zip(*results, strict=True):
        torch.testing.assert_close(closed_value, autograd_value, rtol=1e-5, atol=1e-6)
