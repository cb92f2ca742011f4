"""Reading GSM8K-style rationales: the steps, the final answer and the calculator annotations.

GSM8K answers look like

    Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.
    She makes 9 * 2 = $<<9*2=18>>18 every day at the farmer's market.
    #### 18

`<<expr=value>>` is a calculator annotation (the expression and what the writer claims it
equals) and `#### 18` the final answer. A model's output may lack both; `final_answer` then
falls back to the last number in the text, as the GSM8K evaluation scripts do.
"""

from __future__ import annotations

import ast
import operator
import re
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction

ANSWER_MARK = "####"
_ANNOTATION = re.compile(r"<<([^<>=]*)=([^<>]*)>>")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_OPERATORS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}


@dataclass(frozen=True)
class Rationale:
    """A worked answer split into its parts."""

    steps: tuple[str, ...]  # the lines before the answer mark, stripped, non-empty
    answer: str | None  # the text after `####`, normalised; None when there is no mark

    @property
    def text(self) -> str:
        return "\n".join(self.steps)


@dataclass(frozen=True)
class Annotation:
    expression: str
    claimed: str  # what the writer says it equals

    def value(self) -> Fraction | None:
        """The expression's exact value, or None when it is not plain arithmetic."""
        return evaluate(self.expression)

    def is_correct(self) -> bool | None:
        """True/False when both sides are numbers, None when either cannot be read."""
        value, claimed = self.value(), parse_number(self.claimed)
        if value is None or claimed is None:
            return None
        return value == claimed


def split_rationale(text: str) -> Rationale:
    """`"steps...\\n#### 72"` -> Rationale(steps, "72")."""
    head, mark, tail = text.partition(ANSWER_MARK)
    steps = tuple(line.strip() for line in head.splitlines() if line.strip())
    return Rationale(steps, normalise_answer(tail) if mark else None)


def normalise_answer(text: str) -> str | None:
    """The first number in `text` without commas, `$` or trailing zeros; None if none."""
    match = _NUMBER.search(text.replace("$", ""))
    if match is None:
        return None
    number = parse_number(match.group())
    return None if number is None else format_number(number)


def final_answer(text: str) -> str | None:
    """The answer after `####`, else the last number in the text (GSM8K's fallback)."""
    marked = split_rationale(text).answer
    if marked is not None:
        return marked
    numbers = _NUMBER.findall(_ANNOTATION.sub("", text).replace("$", ""))
    return normalise_answer(numbers[-1]) if numbers else None


def calculator_annotations(text: str) -> list[Annotation]:
    return [Annotation(a.strip(), b.strip()) for a, b in _ANNOTATION.findall(text)]


def parse_number(text: str) -> Fraction | None:
    cleaned = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        return Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def format_number(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    return f"{float(value):.6g}"


def evaluate(expression: str) -> Fraction | None:
    """Exact value of + - * / arithmetic on numbers (parentheses allowed); None otherwise.
    Parsed with `ast`, never `eval`: the text comes from a model."""
    cleaned = expression.replace(",", "").replace("$", "").replace("x", "*").strip()
    try:
        tree = ast.parse(cleaned, mode="eval")
        return _evaluate(tree.body)
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
        return None


def _evaluate(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return Fraction(str(node.value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Div):
            return left / right  # Fraction division: exact, raises on zero
        return Fraction(_OPERATORS[type(node.op)](left, right))
    raise ValueError(f"not plain arithmetic: {ast.dump(node)}")


def majority_answer(texts: list[str]) -> tuple[str | None, float]:
    """The most common final answer among sampled rationales and the fraction of samples that
    give it (texts with no answer count against it); (None, 0.0) when none has one."""
    counts = Counter(a for a in map(final_answer, texts) if a is not None)
    if not counts:
        return None, 0.0
    answer, votes = counts.most_common(1)[0]
    return answer, votes / len(texts)
