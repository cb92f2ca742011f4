"""Task accuracy: exact match on final answers and rationale checks, on known answers."""

from __future__ import annotations

from typing import Any

import pytest

from lmdistill.data import load_examples
from lmdistill.eval import task


def test_exact_match_and_rationale_checks_on_known_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    examples = load_examples("lab:test:4:0:steps=2")
    gold = [e.response or "" for e in examples]
    written = [
        gold[0],  # right, with a right rationale
        gold[1].rsplit("####", 1)[0] + "#### 12345",  # right steps, wrong final answer
        "a <<2+2=5>>5\n#### 5",  # wrong arithmetic, and wrong unless the answer is 5
        "I do not know",  # no annotation, no number
    ]

    def fake(model: Any, tokenizer: Any, batch: list, max_new_tokens: int) -> list[str]:
        return [written[examples.index(e)] for e in batch]

    monkeypatch.setattr(task, "greedy_responses", fake)
    result = task.task_accuracy(None, None, examples, max_new_tokens=8, batch_size=3)  # type: ignore[arg-type]
    expected_right = 1 + (examples[2].response or "").endswith("#### 5")
    assert result["exact_match"] == expected_right / 4
    steps = len(gold[0].splitlines()) - 1
    assert result["annotation_accuracy"] == pytest.approx((2 * steps) / (2 * steps + 1))
    # answer = last step: yes for 0 and 2 (5 follows <<...=5>>), no for 1 (12345)
    assert result["answer_follows_last_step"] == pytest.approx(2 / 3)
    assert result["samples"][0]["answer"] == gold[0]


def test_an_empty_task_set_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one example"):
        task.task_accuracy(None, None, [], max_new_tokens=8)  # type: ignore[arg-type]


def test_expected_calibration_error_by_hand() -> None:
    import torch

    from lmdistill.eval.fidelity import Calibration

    calibration = Calibration(bins=10)
    # Two tokens at confidence 0.9 (one right), one at 0.55 (right).
    logits = torch.log(torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.45, 0.55]]))
    calibration.add(logits, torch.tensor([0, 1, 1]))
    # bin 9: 2 tokens, acc 0.5, conf 0.9 -> 2 * 0.4; bin 5: 1 token, acc 1, conf 0.55 -> 0.45
    assert calibration.ece() == pytest.approx((2 * 0.4 + 0.45) / 3)
    perfect = Calibration()
    perfect.add(torch.log(torch.tensor([[1.0, 1e-9]])), torch.tensor([0]))
    assert perfect.ece() == pytest.approx(0.0, abs=1e-6)
