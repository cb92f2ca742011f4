"""Task accuracy: exact match on final answers and rationale checks, on known answers."""

from __future__ import annotations

from typing import Any

import pytest

from lmdistill.data import load_examples
from lmdistill.data.gsm8k import final_answer, majority_answer
from lmdistill.eval import task
from lmdistill.eval.reasoning import step_agreement


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
    assert result.exact_match == expected_right / 4
    steps = len(gold[0].splitlines()) - 1
    assert result.annotation_accuracy == pytest.approx((2 * steps) / (2 * steps + 1))
    # answer = last step: yes for 0 and 2 (5 follows <<...=5>>), no for 1 (12345)
    assert result.answer_follows_last_step == pytest.approx(2 / 3)
    assert result.samples[0]["answer"] == gold[0]


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


def test_agreement_with_the_teacher_and_across_sampled_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    examples = load_examples("lab:test:3:0:steps=2:min_steps=2")
    gold = [e.response or "" for e in examples]
    teacher = [gold[0], gold[1], "x <<1+1=2>>2\n#### 2"]
    student = [
        gold[0],  # the teacher's answer and both its calculations
        gold[1].splitlines()[0] + "\n#### 99999",  # one calculation of two, another answer
        "#### 2",  # the teacher's (wrong) answer, none of its calculations
    ]
    drawn = [[gold[0], gold[0], "#### 1", "nothing"], ["#### 7"] * 4, ["#### 2"] * 4]

    def fake_greedy(model: Any, tokenizer: Any, batch: list, max_new_tokens: int) -> list[str]:
        return [student[examples.index(e)] for e in batch]

    def fake_sampled(
        model: Any, tokenizer: Any, prompts: list, max_new_tokens: int, **kwargs: Any
    ) -> list[list[str]]:
        assert kwargs["samples"] == 4
        return [drawn[examples.index(e)] for e in prompts]

    monkeypatch.setattr(task, "greedy_responses", fake_greedy)
    monkeypatch.setattr(task, "sampled_responses", fake_sampled)
    result = task.task_accuracy(
        None,  # type: ignore[arg-type]
        None,
        examples,
        max_new_tokens=8,
        teacher_answers=teacher,
        samples=4,
    )
    assert result.teacher.teacher_answer_agreement == pytest.approx(2 / 3)
    assert result.teacher.teacher_step_agreement == pytest.approx((1 + 0.5 + 0) / 3)
    # majorities: gold 0 (2 of 4), "7" (4 of 4), "2" (4 of 4)
    assert result.consistency.sample_agreement == pytest.approx((0.5 + 1 + 1) / 3)
    right = [True, final_answer(gold[1]) == "7", final_answer(gold[2]) == "2"]
    assert result.consistency.majority_exact_match == pytest.approx(sum(right) / 3)


def test_a_student_that_writes_no_calculations_has_no_step_agreement(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    examples = load_examples("lab:test:2:0:steps=2:min_steps=2")
    teacher = [e.response or "" for e in examples]
    monkeypatch.setattr(task, "greedy_responses", lambda m, t, batch, n: ["#### 1" for _ in batch])
    result = task.task_accuracy(
        None,  # type: ignore[arg-type]
        None,
        examples,
        max_new_tokens=8,
        teacher_answers=teacher,
    )
    assert result.teacher.teacher_step_agreement is None  # label-only: nothing to compare


def test_step_agreement_counts_repeated_calculations_once_each() -> None:
    reference = "<<2+2=4>> <<4*3=12>> <<2+2=4>>"
    assert step_agreement("<<2 + 2 = 4>>", reference) == pytest.approx(1 / 3)
    assert step_agreement("<<2+2=4>><<2+2=4>><<4*3=12>><<9-1=8>>", reference) == 1.0
    assert step_agreement("anything", "no calculations") is None
    assert majority_answer(["#### 3", "#### 3", "#### 4", "none"]) == ("3", 0.5)
    assert majority_answer(["none", "nothing"]) == (None, 0.0)


def test_teacher_calibration_from_a_sparse_signal_equals_the_dense_one() -> None:
    """The teacher's ECE needs only its top-1 id and probability, which a top-k cache keeps."""
    import torch

    from lmdistill.eval.fidelity import Calibration
    from lmdistill.losses import SparseSignal

    torch.manual_seed(0)
    logits = torch.randn(50, 7) * 3
    targets = torch.randint(0, 7, (50,))
    dense = Calibration()
    dense.add(logits, targets)
    logprobs, ids = torch.log_softmax(logits, -1).topk(3, dim=-1)
    signal = SparseSignal(token_ids=ids, logprobs=logprobs)
    sparse = Calibration()
    sparse.add_predictions(signal.logprobs[:, 0].exp(), signal.token_ids[:, 0], targets)
    assert sparse.ece() == pytest.approx(dense.ece(), abs=1e-6) and dense.ece() > 0  # fp32


def test_unreadable_annotations_count_as_wrong(monkeypatch: pytest.MonkeyPatch) -> None:
    """The share is of every annotation written (docs/reasoning.md's definition): one the
    checker cannot read does not leave the denominator (it did, which flattered malformed
    students)."""
    examples = load_examples("lab:test:2:0:steps=2")
    written = ["a <<2+2=4>>4 b <<foo(1)=2>>2\n#### 2", "c <<3*3=9>>9 d <<bar=1>>1\n#### 1"]

    def fake(model: Any, tokenizer: Any, batch: list, max_new_tokens: int) -> list[str]:
        return [written[examples.index(e)] for e in batch]

    monkeypatch.setattr(task, "greedy_responses", fake)
    result = task.task_accuracy(None, None, examples, max_new_tokens=8)  # type: ignore[arg-type]
    assert result.annotation_accuracy == pytest.approx(2 / 4)  # was 2 / 2
    assert result.annotations_readable == pytest.approx(2 / 4)
