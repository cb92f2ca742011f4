"""A verifiable reasoning lab: GSM8K-style multi-step arithmetic word problems, generated.

Every problem comes with an exact rationale in GSM8K's format (one step per line, calculator
annotations `<<a*b=c>>`, `#### answer`), so answers and rationales can be checked exactly and
a small model can learn the task on a laptop CPU. Knobs: the number of steps, operand size,
which operations appear, and distractor sentences (numbers that play no part). Splits are
deterministic functions of (seed, split, index); the test split never repeats a training
question, and the out-of-distribution split has more steps than training.

    Ana has 7 shells. Ana finds 5 more shells. Ben has 3 cards. Ana then has 3 times as
    many shells. How many shells does Ana have now?

    Ana has 7+5=<<7+5=12>>12 shells.
    Ana has 12*3=<<12*3=36>>36 shells.
    #### 36
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from lmdistill.data.example import Example

NAMES = ("Ana", "Ben", "Cal", "Dia", "Eve", "Finn", "Gus", "Hana")
ITEMS = ("apples", "books", "coins", "eggs", "pens", "shells", "stamps", "cards")
OPERATIONS = ("add", "subtract", "multiply", "divide")
SPLITS = ("train", "test", "ood")


@dataclass(frozen=True)
class LabSpec:
    """Difficulty knobs.

    steps: operations per problem; with `min_steps`, train and test problems take between
        min_steps and steps (uniformly), and the out-of-distribution split has
        steps + 1 .. steps + ood_extra_steps, longer than anything in training.
    start_max / operand_max: largest starting amount and largest number added or removed.
    factor_max: largest multiplier or divisor (2..factor_max).
    value_max: no intermediate amount exceeds this (keeps products short).
    operations: which of add, subtract, multiply, divide appear.
    distractors: sentences about other people's things, with numbers that play no part.
    groups: 0, or 2..4 groups of problems that differ in surface form only: group k draws
        its names and items from its own share of the lab's (the arithmetic is the same);
        each row carries its `group` ("g0", ...).
    minority: the share, in percent, of problems in the last group (the others share the
        rest equally); 50 with 2 groups is balanced.
    shortcut: a spurious feature for the majority groups (all but the last): in that
        percentage of their problems, the first distractor's number is the answer (needs
        distractors >= 1), so "copy the other person's number" works on them and on no
        problem of the last group.
    counter: 1 makes every distractor's number differ from the answer (counter-shortcut
        problems: the shortcut fails on all of them).
    """

    steps: int = 2
    min_steps: int | None = None
    start_max: int = 20
    operand_max: int = 9
    factor_max: int = 3
    value_max: int = 99
    operations: tuple[str, ...] = ("add", "subtract", "multiply")
    distractors: int = 0
    ood_extra_steps: int = 2
    groups: int = 0
    minority: int = 50
    shortcut: int = 0
    counter: int = 0

    def __post_init__(self) -> None:
        unknown = sorted(set(self.operations) - set(OPERATIONS))
        if unknown or not self.operations:
            raise ValueError(f"lab operations {unknown or '()'}: choose from {OPERATIONS}")
        if self.steps < 1 or self.distractors < 0 or self.ood_extra_steps < 1:
            raise ValueError("lab steps >= 1, distractors >= 0, ood_extra_steps >= 1")
        if self.min_steps is not None and not 1 <= self.min_steps <= self.steps:
            raise ValueError("lab min_steps in [1, steps]")
        if not (1 <= self.start_max <= self.value_max and self.factor_max >= 2):
            raise ValueError("lab start_max in [1, value_max], factor_max >= 2")
        if self.groups not in (0, 2, 3, 4) or not 0 < self.minority < 100:
            raise ValueError("lab groups: 0 or 2..4; minority: a percentage in (0, 100)")
        if not 0 <= self.shortcut <= 100 or self.counter not in (0, 1):
            raise ValueError("lab shortcut: a percentage in [0, 100]; counter: 0 or 1")
        if (self.shortcut or self.counter) and self.distractors < 1:
            raise ValueError("lab shortcut and counter need distractors >= 1")

    def draw_group(self, rng: random.Random) -> int | None:
        """The group of one problem (None without groups): the last with `minority` percent."""
        if not self.groups:
            return None
        if rng.random() * 100 < self.minority:
            return self.groups - 1
        return rng.randrange(self.groups - 1)

    def draw_steps(self, rng: random.Random, split: str) -> int:
        """Steps of one problem: fixed, or uniform in a range; OOD is always longer."""
        if split == "ood":
            longest = self.steps + self.ood_extra_steps
            return rng.randint(self.steps + 1 if self.min_steps else longest, longest)
        return rng.randint(self.min_steps or self.steps, self.steps)


@dataclass(frozen=True)
class LabProblem:
    question: str
    steps: tuple[str, ...]  # rationale lines, each with one calculator annotation
    answer: int
    group: str | None = None  # "g0", ... with LabSpec.groups

    @property
    def rationale(self) -> str:
        return "\n".join(self.steps)

    @property
    def solution(self) -> str:
        """The GSM8K-format answer: rationale lines, then `#### answer`."""
        return f"{self.rationale}\n#### {self.answer}"


def make_problem(
    rng: random.Random, spec: LabSpec, steps: int, group: int | None = None
) -> LabProblem:
    names: tuple[str, ...] = NAMES
    items: tuple[str, ...] = ITEMS
    if group is not None:  # the group's own share of the names and items
        share = len(NAMES) // spec.groups
        names = NAMES[group * share : (group + 1) * share]
        items = ITEMS[group * share : (group + 1) * share]
    name, other = rng.sample(names, 2)
    item, other_item = rng.sample(items, 2)
    value = rng.randint(1, spec.start_max)
    sentences = [f"{name} has {value} {item}."]
    lines = []
    for _ in range(steps):
        sentence, line, value = _step(rng, spec, name, item, value)
        sentences.append(sentence)
        lines.append(line)
    numbers = [0] * spec.distractors
    for d in range(spec.distractors):
        where = rng.randint(1, len(sentences))  # never before the opening sentence
        numbers[d] = rng.randint(1, spec.start_max)
        sentences.insert(where, f"{other} has {numbers[d]} {other_item}.")
    majority = group is not None and group < spec.groups - 1
    if spec.shortcut and majority and rng.random() * 100 < spec.shortcut:
        _renumber(sentences, other, other_item, numbers[0], value)  # the spurious feature
    if spec.counter:
        for number in numbers:
            if number == value:  # another number for it, never the answer
                _renumber(sentences, other, other_item, number, value + 1 + rng.randrange(9))
    question = " ".join(sentences) + f" How many {item} does {name} have now?"
    return LabProblem(question, tuple(lines), value, None if group is None else f"g{group}")


def _renumber(sentences: list[str], other: str, item: str, old: int, new: int) -> None:
    """The first distractor sentence that says `old` says `new` instead."""
    said = f"{other} has {old} {item}."
    sentences[sentences.index(said)] = f"{other} has {new} {item}."


def _step(
    rng: random.Random, spec: LabSpec, name: str, item: str, value: int
) -> tuple[str, str, int]:
    """One operation that keeps the amount a whole number in [0, value_max]."""
    choices = []
    if "add" in spec.operations and value + 1 <= spec.value_max:
        choices.append("add")
    if "subtract" in spec.operations and value >= 1:
        choices.append("subtract")
    if "multiply" in spec.operations and value * 2 <= spec.value_max and value > 0:
        choices.append("multiply")
    divisors = [k for k in range(2, spec.factor_max + 1) if value and value % k == 0]
    if "divide" in spec.operations and divisors:
        choices.append("divide")
    if not choices:  # e.g. only multiply allowed and the amount is at its cap
        choices = ["subtract"] if value >= 1 else ["add"]
    operation = rng.choice(choices)
    if operation == "add":
        b = rng.randint(1, min(spec.operand_max, spec.value_max - value))
        new = value + b
        return f"{name} finds {b} more {item}.", _line(name, f"{value}+{b}", new, item), new
    if operation == "subtract":
        b = rng.randint(1, min(spec.operand_max, value))
        new = value - b
        return f"{name} gives away {b} {item}.", _line(name, f"{value}-{b}", new, item), new
    if operation == "multiply":
        k = rng.randint(2, max(2, min(spec.factor_max, spec.value_max // value)))
        new = value * k
        sentence = f"{name} then has {k} times as many {item}."
        return sentence, _line(name, f"{value}*{k}", new, item), new
    k = rng.choice(divisors)
    new = value // k
    sentence = f"{name} shares the {item} equally among {k} friends and keeps one share."
    return sentence, _line(name, f"{value}/{k}", new, item), new


def _line(name: str, expression: str, value: int, item: str) -> str:
    return f"{name} has {expression}=<<{expression}={value}>>{value} {item}."


def lab_problems(split: str, n: int, *, seed: int, spec: LabSpec) -> list[LabProblem]:
    """`n` problems of `split` ("train", "test" or "ood"), a pure function of the arguments.
    Test problems never repeat a training question of the same seed and spec (up to the
    first 100,000 training problems)."""
    if split not in SPLITS:
        raise ValueError(f"lab split {split!r}: choose one of {SPLITS}")
    rng = random.Random(f"lmdistill-lab:{seed}:{split}")
    seen = set()
    if split != "train":
        train_rng = random.Random(f"lmdistill-lab:{seed}:train")
        seen = {draw(train_rng, spec, "train").question for _ in range(min(n * 20, 100_000))}
    out: list[LabProblem] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(
                f"lab: could not draw {n} distinct {split} problems; the spec allows too few"
            )
        problem = draw(rng, spec, split)
        if problem.question not in seen:
            seen.add(problem.question)
            out.append(problem)
    return out


def draw(rng: random.Random, spec: LabSpec, split: str) -> LabProblem:
    """One problem of `split`: its group (with groups), its steps, then its text."""
    group = spec.draw_group(rng)
    return make_problem(rng, spec, spec.draw_steps(rng, split), group)


def lab_examples(
    split: str, n: int, *, seed: int = 0, spec: LabSpec | None = None
) -> list[Example]:
    """The problems as training/eval examples: question -> GSM8K-format solution."""
    spec = spec or LabSpec()
    return [
        Example(
            f"lab-{split}-{seed}-{i}",
            ({"role": "user", "content": p.question},),
            p.solution,
            f"lab:{split}:{i}",
            group=p.group,
        )
        for i, p in enumerate(lab_problems(split, n, seed=seed, spec=spec))
    ]


_OPENING = re.compile(r"^(\w+) has (\d+) (\w+)$")
_STEPS = (
    (re.compile(r"^(\w+) finds (\d+) more (\w+)$"), lambda v, n: v + n),
    (re.compile(r"^(\w+) gives away (\d+) (\w+)$"), lambda v, n: v - n),
    (re.compile(r"^(\w+) then has (\d+) times as many (\w+)$"), lambda v, n: v * n),
    (
        re.compile(r"^(\w+) shares the (\w+) equally among (\d+) friends and keeps one share$"),
        None,
    ),
)
_QUESTION = re.compile(r"^How many (\w+) does (\w+) have now\?$")


def solve_question(question: str) -> int | None:
    """The exact answer to a question in the lab's grammar (any names, items and numbers),
    or None when a sentence is outside it or an amount stops being a whole number >= 0.
    Sentences about other people (distractors) are allowed and ignored."""
    text = question.strip()
    head, sep, tail = text.rpartition(". ")
    if not sep:
        return None
    asked = _QUESTION.match(tail.strip())
    if asked is None:
        return None
    item, name = asked.group(1), asked.group(2)
    value: int | None = None
    for sentence in (s.strip() for s in head.split(". ")):
        sentence = sentence.removesuffix(".")
        opening = _OPENING.match(sentence)
        if opening:
            if opening.group(1) == name and opening.group(3) == item:
                if value is not None:
                    return None  # a second opening for the same person and thing
                value = int(opening.group(2))
            continue  # a distractor
        if value is None:
            return None
        for pattern, apply in _STEPS:
            step = pattern.match(sentence)
            if step is None:
                continue
            if step.group(1) != name:
                return None
            if apply is None:  # shares ... among k friends
                if step.group(2) != item:
                    return None
                k = int(step.group(3))
                if k == 0 or value % k:
                    return None
                value //= k
            else:
                if step.group(3) != item:
                    return None
                value = apply(value, int(step.group(2)))
            break
        else:
            return None
        if value < 0:
            return None
    return value
