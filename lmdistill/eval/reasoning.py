"""Checks of a GSM8K-style rationale's quality that need no ground truth: are its calculator
annotations right, does its answer follow from its last step, does it make the calculations
another rationale (the teacher's) makes. The format itself is read by `data/gsm8k.py`."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from lmdistill.data.gsm8k import calculator_annotations, final_answer, format_number, parse_number


@dataclass(frozen=True)
class RationaleQuality:
    """Checks of one rationale that need no reference answer."""

    annotations: int
    correct_annotations: int  # arithmetically right (of those that can be read)
    readable_annotations: int
    answer_follows: bool | None  # the final answer equals the last annotation's result


def rationale_quality(text: str) -> RationaleQuality:
    found = calculator_annotations(text)
    checked = [a.is_correct() for a in found]
    readable = [c for c in checked if c is not None]
    answer = final_answer(text)
    follows = None
    if found and answer is not None:
        last = parse_number(found[-1].claimed)
        follows = last is not None and format_number(last) == answer
    return RationaleQuality(len(found), sum(readable), len(readable), follows)


def step_agreement(text: str, reference: str) -> float | None:
    """The fraction of `reference`'s calculations (annotation expression and result) that
    `text` also writes, counted as multisets; None when the reference has none. Compares a
    student's rationale with its teacher's without any ground truth."""

    def steps(t: str) -> Counter[tuple[str, str]]:
        return Counter(
            (a.expression.replace(" ", ""), a.claimed.replace(" ", ""))
            for a in calculator_annotations(t)
        )

    wanted = steps(reference)
    if not wanted:
        return None
    return sum((steps(text) & wanted).values()) / sum(wanted.values())
