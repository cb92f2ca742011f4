"""Reading GSM8K rationales: answers, calculator annotations, quality checks (real GSM8K lines
from ../shared in tests only; the package never needs it)."""

from __future__ import annotations

import json
from fractions import Fraction

import pytest
from conftest import GSM8K

from lmdistill.data.gsm8k import calculator_annotations, evaluate, final_answer, split_rationale
from lmdistill.eval.reasoning import rationale_quality

JANET = (
    "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n"
    "She makes 9 * 2 = $<<9*2=18>>18 every day at the farmer\u2019s market.\n#### 18"
)


def test_a_gsm8k_answer_splits_into_steps_annotations_and_answer() -> None:
    rationale = split_rationale(JANET)
    assert rationale.answer == "18" and len(rationale.steps) == 2
    found = calculator_annotations(JANET)
    assert [(a.expression, a.claimed) for a in found] == [("16-3-4", "9"), ("9*2", "18")]
    assert all(a.is_correct() for a in found)
    quality = rationale_quality(JANET)
    assert (quality.annotations, quality.correct_annotations, quality.answer_follows) == (
        2,
        2,
        True,
    )


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("so the total is 1,250 dollars.\n#### 1,250", "1250"),
        ("#### $18.00", "18"),
        ("He pays 3 * 4 = <<3*4=12>>12, then 12 - 5 = 7 left.", "7"),  # last number
        ("The answer is 0.5", "0.5"),
        ("no number here", None),
        ("#### -3", "-3"),
    ],
)
def test_final_answer(text: str, answer: str | None) -> None:
    assert final_answer(text) == answer


def test_wrong_and_unreadable_annotations_are_told_apart() -> None:
    quality = rationale_quality("a <<2+2=5>>5 b <<7/2=3.5>>3.5 c <<foo(1)=2>>2\n#### 4")
    assert (quality.annotations, quality.readable_annotations, quality.correct_annotations) == (
        3,
        2,
        1,
    )
    assert quality.answer_follows is False  # 4 is not what the last step claims


def test_evaluate_is_exact_and_never_runs_code() -> None:
    assert evaluate("1/3+1/6") == Fraction(1, 2)
    assert evaluate("(2+3)*4") == 20 and evaluate("-2*3") == -6
    assert evaluate("__import__('os').getcwd()") is None
    assert evaluate("1/0") is None and evaluate("2**10") is None


@pytest.mark.skipif(not GSM8K.is_dir(), reason="../shared/data/gsm8k is not beside this clone")
def test_every_real_gsm8k_test_answer_parses_and_its_arithmetic_checks() -> None:
    rows = [json.loads(line) for line in (GSM8K / "test.jsonl").open()]
    assert len(rows) == 1319
    assert all(split_rationale(r["answer"]).answer is not None for r in rows)
    quality = [rationale_quality(r["answer"]) for r in rows]
    readable = sum(q.readable_annotations for q in quality)
    assert readable == sum(q.annotations for q in quality) == 4282
    assert sum(q.correct_annotations for q in quality) == readable  # GSM8K's calculator
    follows = [q.answer_follows for q in quality if q.answer_follows is not None]
    assert sum(follows) / len(follows) > 0.9
