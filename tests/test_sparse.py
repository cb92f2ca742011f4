"""Conformance tests for sparse top-k teacher signals: against the dense divergences (k = V)
and naive references of both reductions, values and gradients, and the fused loss fed a
signal against the naive one."""

import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from lmdistill.losses import (
    LOSSES,
    SparseSignal,
    fused_kd_loss,
    naive_kd_loss,
    sparse_divergence,
    topk_signal,
)

ALL_LOSSES = sorted(LOSSES)
CASES: list[tuple[str, dict[str, float]]] = [(name, {}) for name in ALL_LOSSES] + [
    ("generalized_jsd", {"beta": 0.3}),
    ("skew_forward_kl", {"alpha": 0.4}),
]
TAILS = ["renormalize", "bucket"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny tensors: intra-op threads only spin-wait on a busy CPU (see test_losses.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _logits(n: int, v: int, seed: int, dtype: torch.dtype = torch.float64) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (2.0 * torch.randn(n, v, generator=gen)).to(dtype)


def _value_and_grad(fn: Any, student_logits: Tensor) -> tuple[Tensor, Tensor]:
    """fn(student) (N,) and d sum / d student."""
    student = student_logits.clone().requires_grad_()
    value = fn(student)
    (grad,) = torch.autograd.grad(value.sum(), student)
    return value.detach(), grad


def _assert_value_and_grad(got: Any, want: Any, student: Tensor, tol: float = 1e-7) -> None:
    got_value, got_grad = _value_and_grad(got, student)
    want_value, want_grad = _value_and_grad(want, student)
    torch.testing.assert_close(got_value, want_value, rtol=tol, atol=tol)
    torch.testing.assert_close(got_grad, want_grad, rtol=tol, atol=tol)


def _shuffled_full_signal(
    teacher_logits: Tensor, tail: str, temperature: float, seed: int
) -> SparseSignal:
    """k = V: every id once per row, in a random order (not sorted by probability)."""
    gen = torch.Generator().manual_seed(seed)
    n, v = teacher_logits.shape
    ids = torch.stack([torch.randperm(v, generator=gen) for _ in range(n)])  # (N, V)
    logprobs = F.log_softmax(teacher_logits / temperature, dim=-1).gather(1, ids)
    return SparseSignal(ids, logprobs, tail, temperature)  # type: ignore[arg-type]


def _naive_bucket_log_probs(logits: Tensor, ids: Tensor, temperature: float) -> Tensor:
    """fp64 (p[ids], 1 - sum p[ids]), logged: (N, V), (N, k) -> (N, k + 1)."""
    probs = F.softmax(logits.double() / temperature, dim=-1)
    top = probs.gather(1, ids)
    return torch.cat([top, 1.0 - top.sum(-1, keepdim=True)], dim=-1).log()


# ---------------------------------------------------------------- sparse_divergence


@pytest.mark.parametrize(("name", "params"), CASES)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_full_vocabulary_signal_equals_dense(
    name: str, params: dict[str, float], tail: str, temperature: float
) -> None:
    student, teacher = _logits(5, 11, seed=0), _logits(5, 11, seed=1)
    signal = _shuffled_full_signal(teacher, tail, temperature, seed=2)
    _assert_value_and_grad(
        lambda s: sparse_divergence(s, signal, name, temperature=temperature, **params),
        lambda s: LOSSES[name](s, teacher, temperature=temperature, **params),
        student,
    )


@pytest.mark.parametrize("name", ALL_LOSSES)
@pytest.mark.parametrize("tail", TAILS)
def test_full_vocabulary_topk_signal_equals_dense_fp32(name: str, tail: Any) -> None:
    student, teacher = _logits(7, 13, seed=3, dtype=torch.float32), _logits(7, 13, seed=4)
    signal = topk_signal(teacher.float(), 13, tail=tail, temperature=1.5)
    assert signal.logprobs.dtype == torch.float32
    assert (signal.logprobs[:, 1:] <= signal.logprobs[:, :-1]).all()  # sorted, decreasing
    got = sparse_divergence(student, signal, name, temperature=1.5)
    assert got.dtype == torch.float32 and got.shape == (7,)
    _assert_value_and_grad(
        lambda s: sparse_divergence(s, signal, name, temperature=1.5),
        lambda s: LOSSES[name](s, teacher.float(), temperature=1.5),
        student,
        tol=1e-5,
    )


@pytest.mark.parametrize("name", ["forward_kl", "skew_reverse_kl", "tvd"])
def test_full_vocabulary_bucket_tail_is_empty_whatever_the_rounding(name: str) -> None:
    """k = V in bucket mode: the tail bucket holds no id, so its mass is 0 even when the
    stored log-probs sum to 1 - 1e-6 (a low-precision cache), not 1e-6 charged against the
    student's empty tail (log floored at -87: a 7e-5 error on forward KL)."""
    student, teacher = _logits(4, 9, seed=15), _logits(4, 9, seed=16)
    exact = topk_signal(teacher, 9, tail="bucket", temperature=1.0)
    short = SparseSignal(exact.token_ids, exact.logprobs - 1e-6, "bucket")
    _assert_value_and_grad(
        lambda s: sparse_divergence(s, short, name, temperature=1.0),
        lambda s: LOSSES[name](s, teacher),
        student,
    )


@pytest.mark.parametrize(("name", "params"), CASES)
@pytest.mark.parametrize("signal_temperature", [1.0, 0.5])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_renormalize_is_the_dense_divergence_on_the_restricted_distributions(
    name: str, params: dict[str, float], signal_temperature: float, temperature: float
) -> None:
    """p and q restricted to the k ids and renormalised there; the signal may be at another
    temperature (its log-probs are re-tempered exactly)."""
    student, teacher = _logits(6, 13, seed=5), _logits(6, 13, seed=6)
    signal = topk_signal(teacher, 4, tail="renormalize", temperature=signal_temperature)
    ids = signal.token_ids
    _assert_value_and_grad(
        lambda s: sparse_divergence(s, signal, name, temperature=temperature, **params),
        lambda s: LOSSES[name](
            s.gather(1, ids), teacher.gather(1, ids), temperature=temperature, **params
        ),
        student,
    )


@pytest.mark.parametrize(("name", "params"), CASES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_bucket_is_the_dense_divergence_on_the_bucketed_distributions(
    name: str, params: dict[str, float], temperature: float
) -> None:
    """k + 1 buckets: the k ids and the rest, against a naive fp64 1 - sum reference."""
    student, teacher = _logits(6, 13, seed=7), _logits(6, 13, seed=8)
    signal = topk_signal(teacher, 4, tail="bucket", temperature=temperature)
    teacher_buckets = _naive_bucket_log_probs(teacher, signal.token_ids, temperature)
    _assert_value_and_grad(
        lambda s: sparse_divergence(s, signal, name, temperature=temperature, **params),
        lambda s: LOSSES[name](
            _naive_bucket_log_probs(s, signal.token_ids, temperature), teacher_buckets, **params
        ),
        student,
    )


def test_bucket_and_renormalize_golden_values() -> None:
    """p = (0.5, 0.2, 0.2, 0.1), q = (0.1, 0.3, 0.4, 0.2), top-2 ids (0, 1)."""
    student = torch.tensor([[0.1, 0.3, 0.4, 0.2]]).log()
    signal = {
        tail: SparseSignal(torch.tensor([[0, 1]]), torch.tensor([[0.5, 0.2]]).log(), tail)
        for tail in TAILS
    }

    def loss(name: str, tail: str) -> float:
        return sparse_divergence(student, signal[tail], name, temperature=1.0).item()

    # buckets p = (0.5, 0.2, 0.3), q = (0.1, 0.3, 0.6)
    assert loss("tvd", "bucket") == pytest.approx(0.5 * (0.4 + 0.1 + 0.3))
    fkl = 0.5 * math.log(5) + 0.2 * math.log(2 / 3) + 0.3 * math.log(0.5)
    assert loss("forward_kl", "bucket") == pytest.approx(fkl)
    assert loss("ce", "bucket") == pytest.approx(-math.log(0.1))
    # renormalised p = (5/7, 2/7), q = (1/4, 3/4)
    assert loss("tvd", "renormalize") == pytest.approx(5 / 7 - 1 / 4)
    fkl = 5 / 7 * math.log(20 / 7) + 2 / 7 * math.log(8 / 21)
    assert loss("forward_kl", "renormalize") == pytest.approx(fkl)
    assert loss("ce", "renormalize") == pytest.approx(-math.log(1 / 4))


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "tvd"])
def test_bucket_tail_is_accurate_when_the_top_k_holds_almost_all_mass(name: str) -> None:
    """fp32 student whose tail holds ~1e-13 of the mass: 1 - sum(q[ids]) would round to 0
    or 6e-8; the complement logsumexp keeps it, in value and gradient."""
    student = torch.tensor([[10.0, 9.0, 8.0, -20.0, -20.0, -20.0], [3.0, -25.0, 2.0, 1.0, 0, 0]])
    teacher = torch.tensor([[9.0, 9.5, 7.0, 2.0, 1.0, 0.0], [3.0, 1.0, 2.0, -3.0, 0, -1]])
    signal = topk_signal(teacher, 3, tail="bucket", temperature=1.0)
    want = LOSSES[name](
        _naive_bucket_log_probs(student.double(), signal.token_ids, 1.0),
        _naive_bucket_log_probs(teacher.double(), signal.token_ids, 1.0),
    )
    got, grad = _value_and_grad(
        lambda s: sparse_divergence(s, signal, name, temperature=1.0), student
    )
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    _, want_grad = _value_and_grad(
        lambda s: LOSSES[name](
            _naive_bucket_log_probs(s, signal.token_ids, 1.0),
            _naive_bucket_log_probs(teacher.double(), signal.token_ids, 1.0),
        ),
        student.double(),
    )
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-6)


def test_bucket_teacher_tail_rounding_past_one_means_an_empty_tail() -> None:
    """bf16 log-probs of a k < V signal can sum a hair above 1: empty tail, not NaN."""
    logprobs = torch.tensor([[math.log(0.6), math.log(0.4005)]], dtype=torch.bfloat16)
    signal = SparseSignal(torch.tensor([[2, 0]]), logprobs, "bucket")
    student = _logits(1, 5, seed=9, dtype=torch.float32)
    for name in ALL_LOSSES:
        got, grad = _value_and_grad(
            lambda s, name=name: sparse_divergence(s, signal, name, temperature=1.0), student
        )
        assert torch.isfinite(got).all() and torch.isfinite(grad).all(), name


@pytest.mark.parametrize("top1", [0.6, 0.3])
def test_ce_in_bucket_mode_takes_the_argmax_bucket(top1: float) -> None:
    """Documented behaviour: the tail bucket is the teacher's argmax when it outweighs every
    top-k token, and CE then targets the student's tail mass, not q[top-1 id]."""
    student = torch.tensor([[0.1, 0.3, 0.4, 0.2]]).log()
    rest = (1 - top1) / 3
    logprobs = torch.tensor([[top1, rest]]).log()  # tail: 1 - top1 - rest
    signal = SparseSignal(torch.tensor([[1, 3]]), logprobs, "bucket")
    got = sparse_divergence(student, signal, "ce", temperature=1.0).item()
    tail_is_argmax = 1 - top1 - rest > top1
    assert got == pytest.approx(-math.log(0.4 + 0.1) if tail_is_argmax else -math.log(0.3))


@pytest.mark.parametrize(("name", "params"), CASES)
@pytest.mark.parametrize("tail", TAILS)
def test_minus_inf_logits_give_finite_values_and_grads(
    name: str, params: dict[str, float], tail: str
) -> None:
    """-inf student logits inside and outside the signal, a student with no mass outside it
    (row 2), and a teacher with fewer finite logits than k (-inf log-probs in the signal)."""
    student, teacher = _logits(3, 9, seed=10), _logits(3, 9, seed=11)
    teacher[0, 3:] = -math.inf  # 3 finite ids < k = 5
    teacher[1, [0, 4]] = -math.inf
    signal = topk_signal(teacher, 5, tail=tail, temperature=1.0)  # type: ignore[arg-type]
    assert torch.isneginf(signal.logprobs[0, 3:]).all()
    student[0, 1] = -math.inf  # inside the signal
    student[1, signal.token_ids[1, 0]] = -math.inf  # the teacher's top-1
    student[1, 0] = -math.inf  # outside
    outside = torch.ones(9, dtype=torch.bool).scatter(0, signal.token_ids[2], False)
    student[2, outside] = -math.inf  # no student mass outside the signal; teacher has some
    got, grad = _value_and_grad(
        lambda s: sparse_divergence(s, signal, name, temperature=1.0, **params), student
    )
    assert torch.isfinite(got).all(), got
    assert torch.isfinite(grad).all(), grad
    assert (grad[torch.isneginf(student)] == 0).all()


@pytest.mark.parametrize("name", ALL_LOSSES)
@pytest.mark.parametrize("tail", TAILS)
def test_empty_rows_give_zero_and_zero_grads(name: str, tail: Any) -> None:
    signal = topk_signal(torch.zeros(0, 7), 3, tail=tail, temperature=1.0)
    student = torch.zeros(0, 7, requires_grad=True)
    got = sparse_divergence(student, signal, name, temperature=1.0)
    assert got.shape == (0,) and got.dtype == torch.float32
    (grad,) = torch.autograd.grad(got.sum(), student)
    assert got.sum().item() == 0.0 and grad.shape == (0, 7)


def test_bucket_mode_needs_the_loss_temperature() -> None:
    student, teacher = _logits(2, 7, seed=12), _logits(2, 7, seed=13)
    bucket = topk_signal(teacher, 3, tail="bucket", temperature=1.0)
    with pytest.raises(ValueError, match=r"signal temperature=1.0, loss temperature=2.0.*tail"):
        sparse_divergence(student, bucket, "forward_kl", temperature=2.0)
    renormalize = topk_signal(teacher, 3, tail="renormalize", temperature=1.0)
    assert torch.isfinite(sparse_divergence(student, renormalize, "ce", temperature=2.0)).all()


def test_the_signal_gets_no_gradient() -> None:
    logprobs = torch.tensor([[-0.5, -1.5]], requires_grad=True)
    signal = SparseSignal(torch.tensor([[0, 2]]), logprobs, "bucket")
    student = torch.zeros(1, 4, requires_grad=True)
    sparse_divergence(student, signal, "forward_kl", temperature=1.0).sum().backward()
    assert logprobs.grad is None and student.grad is not None


def test_rows_slices_the_signal() -> None:
    signal = topk_signal(_logits(5, 7, seed=14), 3, tail="renormalize", temperature=0.5)
    part = signal.rows(slice(1, 4))
    assert torch.equal(part.token_ids, signal.token_ids[1:4])
    assert torch.equal(part.logprobs, signal.logprobs[1:4])
    assert (part.tail, part.temperature) == ("renormalize", 0.5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"token_ids": torch.tensor([[0, 1, 0]])}, "distinct"),
        ({"token_ids": torch.tensor([[0, 1, 7]])}, r"\[0, vocab_size=7\)"),
        ({"token_ids": torch.tensor([[0, -1, 2]])}, r"\[0, vocab_size=7\)"),
        ({"token_ids": torch.tensor([[0, 1, 2], [3, 4, 5]])}, "2 rows, the student 1"),
    ],
)
def test_bad_signal_data_raise(change: dict[str, Tensor], message: str) -> None:
    ids = change["token_ids"]
    signal = SparseSignal(ids, torch.full(ids.shape, -2.0), "renormalize")
    with pytest.raises(ValueError, match=message):
        sparse_divergence(torch.zeros(1, 7), signal, "forward_kl", temperature=1.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"token_ids": torch.zeros(2, 3, dtype=torch.int32)}, "long"),
        ({"token_ids": torch.zeros(2, dtype=torch.long)}, r"\(N, k\)"),
        ({"logprobs": torch.zeros(2, 4)}, "shaped like token_ids"),
        ({"logprobs": torch.zeros(2, 3, dtype=torch.long)}, "float"),
        ({"token_ids": torch.zeros(2, 0, dtype=torch.long), "logprobs": torch.zeros(2, 0)}, "k"),
        ({"tail": "truncate"}, r"tail must be one of \('renormalize', 'bucket'\)"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
    ],
)
def test_bad_signal_construction_raises(kwargs: dict[str, Any], message: str) -> None:
    args = {"token_ids": torch.tensor([[0, 1, 2], [2, 1, 0]]), "logprobs": torch.zeros(2, 3)}
    with pytest.raises(ValueError, match=message):
        SparseSignal(**{**args, **kwargs})


def test_topk_signal_and_sparse_divergence_argument_errors() -> None:
    with pytest.raises(ValueError, match=r"k must be in \[1, V=5\]"):
        topk_signal(torch.zeros(2, 5), 6, tail="bucket", temperature=1.0)
    signal = topk_signal(torch.zeros(2, 5), 2, tail="renormalize", temperature=1.0)
    with pytest.raises(ValueError, match="temperature"):
        sparse_divergence(torch.zeros(2, 5), signal, "forward_kl", temperature=0.0)
    with pytest.raises(ValueError, match="is unknown; expected one of"):
        sparse_divergence(torch.zeros(2, 5), signal, "kl", temperature=1.0)
    with pytest.raises(ValueError, match="beta"):
        sparse_divergence(torch.zeros(2, 5), signal, "generalized_jsd", temperature=1.0, beta=2.0)


# ---------------------------------------------------------------- fused loss with a signal

H_S, H_T, V_S, V_T, VOCAB = 16, 12, 101, 99, 97  # projections padded past VOCAB
LOSS_FNS = {"fused": fused_kd_loss, "naive": naive_kd_loss}


def _problem(n: int, seed: int = 0) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "student_hidden": torch.randn(n, H_S, generator=gen).requires_grad_(),
        "student_weight": (0.5 * torch.randn(V_S, H_S, generator=gen)).requires_grad_(),
        "targets": torch.randint(0, VOCAB, (n,), generator=gen),
        "teacher_hidden": torch.randn(n, H_T, generator=gen),
        "teacher_weight": 0.7 * torch.randn(V_T, H_T, generator=gen),
    }


def _teacher_logits(problem: dict[str, Tensor]) -> Tensor:
    return problem["teacher_hidden"] @ problem["teacher_weight"][:VOCAB].T  # (N, VOCAB)


def _run(
    fn: str, problem: dict[str, Tensor], **kwargs: Any
) -> tuple[Tensor, dict[str, Tensor], Tensor, Tensor]:
    """Loss, parts and the gradients w.r.t. (student_hidden, student_weight)."""
    loss, parts = LOSS_FNS[fn](
        problem["student_hidden"],
        problem["student_weight"],
        problem["targets"],
        vocab_size=VOCAB,
        **kwargs,
    )
    grad_h, grad_w = torch.autograd.grad(
        loss, [problem["student_hidden"], problem["student_weight"]]
    )
    return loss, parts, grad_h, grad_w


def _assert_same(got: tuple[Any, ...], want: tuple[Any, ...], tol: float = 1e-5) -> None:
    loss, parts, grad_h, grad_w = got
    torch.testing.assert_close(loss, want[0], rtol=tol, atol=tol)
    for key in ("ce", "kd"):
        torch.testing.assert_close(parts[key], want[1][key], rtol=tol, atol=tol)
    torch.testing.assert_close(grad_h, want[2], rtol=tol, atol=tol)
    torch.testing.assert_close(grad_w, want[3], rtol=tol, atol=tol)


@pytest.mark.parametrize(("divergence", "params"), CASES)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("chunk_size", [1, 6, 64])
def test_fused_with_a_signal_matches_naive(
    divergence: str, params: dict[str, float], tail: Any, chunk_size: int
) -> None:
    problem = _problem(37)
    signal = topk_signal(_teacher_logits(problem), 8, tail=tail, temperature=2.0)
    kwargs = {
        "teacher_signal": signal,
        "divergence": divergence,
        "divergence_params": params,
        "alpha": 0.3,
        "temperature": 2.0,
    }
    got = _run("fused", problem, chunk_size=chunk_size, **kwargs)
    _assert_same(got, _run("naive", problem, **kwargs))
    assert (got[3][VOCAB:] == 0).all()
    assert got[1]["kd"] > 0


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl"])  # autograd, closed form
@pytest.mark.parametrize("tail", TAILS)
def test_fused_with_a_full_vocabulary_signal_matches_the_dense_teacher(
    tail: Any, divergence: str
) -> None:
    problem = _problem(23, seed=1)
    signal = topk_signal(_teacher_logits(problem), VOCAB, tail=tail, temperature=1.5)
    common = {"divergence": divergence, "alpha": 0.2, "temperature": 1.5, "chunk_size": 5}
    got = _run("fused", problem, teacher_signal=signal, **common)
    dense = {"teacher_hidden": problem["teacher_hidden"]}
    want = _run("fused", problem, teacher_weight=problem["teacher_weight"], **dense, **common)
    _assert_same(got, want)


@pytest.mark.parametrize("fn", ["fused", "naive"])
def test_fused_empty_batch_with_a_signal(fn: str) -> None:
    problem = _problem(0)
    signal = topk_signal(torch.zeros(0, VOCAB), 4, tail="bucket", temperature=1.0)
    loss, parts, grad_h, grad_w = _run(fn, problem, teacher_signal=signal, alpha=0.5)
    assert loss.item() == 0.0 and parts["kd"].item() == 0.0
    assert grad_h.shape == (0, H_S) and (grad_w == 0).all()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"dense_teacher_too": True}, "one teacher form"),
        ({"teacher_signal": None}, "needs a teacher"),
        ({"ids_past_vocab": True}, r"vocab_size=97"),
        ({"temperature": 2.0}, "loss temperature=2.0"),
        ({"rows": 4}, "4 rows, the student 5"),
    ],
)
@pytest.mark.parametrize("fn", ["fused", "naive"])
def test_fused_signal_errors(fn: str, change: dict[str, Any], message: str) -> None:
    problem, change = _problem(5, seed=2), dict(change)  # parameters are shared: copy
    signal = topk_signal(_teacher_logits(problem), 4, tail="bucket", temperature=1.0)
    kwargs: dict[str, Any] = {"teacher_signal": signal, "alpha": 0.5}
    if change.pop("dense_teacher_too", False):
        kwargs["teacher_hidden"] = problem["teacher_hidden"]
        kwargs["teacher_weight"] = problem["teacher_weight"]
    if change.pop("ids_past_vocab", False):  # a padding id: < V_S but >= vocab_size
        ids = torch.tensor([[0, 1, VOCAB]]).repeat(5, 1)
        kwargs["teacher_signal"] = SparseSignal(ids, torch.full((5, 3), -2.0))
    if "rows" in change:
        kwargs["teacher_signal"] = signal.rows(slice(0, change.pop("rows")))
    with pytest.raises(ValueError, match=message):
        _run(fn, problem, **{**kwargs, **change})


def test_fused_pure_ce_ignores_a_missing_teacher_and_accepts_a_signal() -> None:
    problem = _problem(9, seed=3)
    signal = topk_signal(_teacher_logits(problem), 4, tail="bucket", temperature=1.0)
    with_signal = _run("fused", problem, teacher_signal=signal, alpha=1.0, chunk_size=4)
    without = _run("fused", problem, alpha=1.0, chunk_size=4)
    torch.testing.assert_close(with_signal[0], without[0])
    torch.testing.assert_close(with_signal[2], without[2])
    assert with_signal[1]["kd"] > 0 and without[1]["kd"] == 0


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("divergence", ["forward_kl", "skew_forward_kl", "tvd", "ce"])
def test_fused_with_a_signal_gradcheck_fp64(tail: Any, divergence: str) -> None:
    """Finite differences check the chunked backward with a signal, apart from naive_kd_loss."""
    gen = torch.Generator().manual_seed(4)
    hidden, weight = torch.randn(5, 3, generator=gen), torch.randn(8, 3, generator=gen)
    signal = topk_signal(torch.randn(5, 6, generator=gen), 3, tail=tail, temperature=1.5)
    targets = torch.tensor([0, 5, 2, 2, 4])

    def loss(hidden: Tensor, weight: Tensor) -> Tensor:
        return fused_kd_loss(
            hidden,
            weight,
            targets,
            teacher_signal=signal,
            vocab_size=6,
            divergence=divergence,
            alpha=0.3,
            temperature=1.5,
            chunk_size=2,
        )[0]

    inputs = (hidden.double().requires_grad_(), weight.double().requires_grad_())
    assert torch.autograd.gradcheck(loss, inputs)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])  # closed form, autograd
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_rows_without_a_signal_train_on_ce_alone(divergence: str, temperature: float) -> None:
    problem = _problem(29, seed=5)
    full = topk_signal(_teacher_logits(problem), 8, tail="bucket", temperature=temperature)
    present = torch.arange(29) % 3 != 0
    masked = SparseSignal(full.token_ids, full.logprobs, "bucket", temperature, present)
    kwargs = {"divergence": divergence, "alpha": 0.25, "temperature": temperature}
    got = _run("fused", problem, teacher_signal=masked, chunk_size=7, **kwargs)
    _assert_same(got, _run("naive", problem, teacher_signal=masked, **kwargs))
    # By hand: the KD rows as usual, the others plain CE.
    keep = _run("fused", _subset(problem, present), teacher_signal=full.rows(present), **kwargs)
    ce_rows = _run("fused", _subset(problem, ~present), alpha=1.0)
    torch.testing.assert_close(got[0], keep[0] + ce_rows[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1]["kd"], keep[1]["kd"], rtol=1e-5, atol=1e-5)


def _subset(problem: dict[str, Tensor], rows: Tensor) -> dict[str, Tensor]:
    out = dict(problem)
    out["student_hidden"] = problem["student_hidden"].detach()[rows].requires_grad_()
    out["targets"] = problem["targets"][rows]
    out["teacher_hidden"] = problem["teacher_hidden"][rows]
    return out
