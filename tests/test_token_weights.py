"""Per-token loss weights in the fused loss: weighted sums and gradients equal the naive
reference, for the closed-form paths (dense and sparse forward KL, CE) and autograd ones."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from test_sparse import VOCAB, _assert_same, _problem, _run, _teacher_logits

from lmdistill.losses import topk_signal


def _teachers(problem: dict[str, Any]) -> dict[str, dict[str, Any]]:
    signal = topk_signal(_teacher_logits(problem), 8, tail="bucket", temperature=1.5)
    dense = {
        "teacher_hidden": problem["teacher_hidden"],
        "teacher_weight": problem["teacher_weight"],
    }
    return {
        "dense forward_kl": {**dense, "divergence": "forward_kl"},
        "dense reverse_kl": {**dense, "divergence": "reverse_kl"},
        "sparse forward_kl": {"teacher_signal": signal, "divergence": "forward_kl"},
        "sparse tvd": {"teacher_signal": signal, "divergence": "tvd"},
        "ce only": {"alpha": 1.0},
    }


@pytest.mark.parametrize("case", list(_teachers(_problem(1))))
@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_weighted_fused_equals_weighted_naive(case: str, chunk_size: int) -> None:
    problem = _problem(31, seed=6)
    weights = torch.rand(31, generator=torch.Generator().manual_seed(0)) * 2
    weights[::5] = 0.0
    kwargs = {"alpha": 0.3, "temperature": 1.5, **_teachers(problem)[case]}
    got = _run("fused", problem, chunk_size=chunk_size, token_weights=weights, **kwargs)
    _assert_same(got, _run("naive", problem, token_weights=weights, **kwargs))
    # Unit weights change nothing; zero-weight rows get no gradient at all.
    ones = _run("fused", problem, chunk_size=chunk_size, token_weights=torch.ones(31), **kwargs)
    _assert_same(ones, _run("fused", problem, chunk_size=chunk_size, **kwargs))
    assert (got[2][::5] == 0).all()
    assert (got[3][VOCAB:] == 0).all()


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        (torch.ones(4), "N=5"),
        (torch.ones(5, dtype=torch.long), "float"),
        (torch.tensor([1.0, -1.0, 1.0, 1.0, 1.0]), ">= 0"),
        (torch.tensor([1.0, float("nan"), 1.0, 1.0, 1.0]), "finite"),
    ],
)
@pytest.mark.parametrize("fn", ["fused", "naive"])
def test_bad_weights_are_named(fn: str, weights: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _run(fn, _problem(5), alpha=1.0, token_weights=weights)
