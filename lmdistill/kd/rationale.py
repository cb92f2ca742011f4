"""Rationale objectives: what a reasoning student trains on, token by token.

Each objective turns (question, rationale, answer) examples, GSM8K-formatted
(`steps...\\n#### answer`), into training examples with loss weights, and says how the student
is prompted at evaluation:

- `cot` (the default): the response as it is; on GSM8K-format data the whole rationale, then
  the answer, in one output (chain-of-thought SFT / KD).
- `label_only`: the answer alone (`#### 72`): the student must reason silently.
- `step_by_step` (Hsieh et al. 2023, "Distilling step-by-step"): two tasks with prefixes on
  the same question, `[label]` -> `#### answer` and `[rationale]` -> the rationale, trained
  together as L = L_label + lambda * L_rationale (`rationale_weight`); at inference the
  student gets the `[label]` prompt and answers without writing a rationale.
- `step_by_step_kpod`: `step_by_step` whose rationale task weights its keypoints as `kpod`
  does (the survey's "step-by-step + KPOD" arm).
- `kpod`: `cot` with keypoint tokens weighted up (after Feng et al. 2024, KPOD): here the
  keypoints are the calculations, the `<<a*b=c>>` annotations and the numbers they produce,
  weighted `keypoint_weight`, the connecting words 1. (KPOD learns its token mask; the lab's
  rationales mark their calculations, so the rule is exact there.) Both KPOD objectives
  mark each rationale line's rank from the end, which `train.curriculum: progressive_steps`
  uses: KPOD's progressive schedule, the last steps first, earlier ones added over
  `train.curriculum_steps`.

`OBJECTIVES` maps names to functions; `@register_objective("name")` adds one.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

from lmdistill.config import ObjectiveConfig
from lmdistill.data import Example
from lmdistill.data.gsm8k import ANSWER_MARK
from lmdistill.registry import Registry

Objective = Callable[[list[Example], ObjectiveConfig], list[Example]]
OBJECTIVES: Registry[Objective] = Registry("objective", "objective.kind")
_KEYPOINT = re.compile(r"-?\d[\d,.]*|<<[^<>]*>>")


def register_objective(name: str) -> Callable[[Objective], Objective]:
    return OBJECTIVES.register(name)


def apply_objective(examples: list[Example], config: ObjectiveConfig) -> list[Example]:
    """The training examples `config.kind` makes of `examples`."""
    return OBJECTIVES.lookup(config.kind)(examples, config)


def eval_prompts(examples: list[Example], config: ObjectiveConfig) -> list[Example]:
    """How the student is asked at evaluation: `step_by_step` adds the label prefix."""
    if not config.kind.startswith("step_by_step"):
        return examples
    return [_prefixed(e, config.label_prefix) for e in examples]


def split_answer(example: Example) -> tuple[str, str]:
    """(rationale, answer line) of a GSM8K-format response; an error names the example."""
    text = example.response or ""
    head, mark, tail = text.partition(ANSWER_MARK)  # the first mark, as final_answer reads it
    if not mark:
        raise ValueError(
            f"{example.source}: example {example.id!r} has no '{ANSWER_MARK} answer' line; "
            "rationale objectives need GSM8K-format responses"
        )
    return head.rstrip("\n"), f"{ANSWER_MARK}{tail.split(chr(10), 1)[0]}".strip()


@register_objective("cot")
def chain_of_thought(examples: list[Example], config: ObjectiveConfig) -> list[Example]:
    """The response as it is (the default, for any data): on GSM8K-format data that is the
    rationale, then the answer."""
    return examples


@register_objective("label_only")
def label_only(examples: list[Example], config: ObjectiveConfig) -> list[Example]:
    return [dataclasses.replace(e, response=split_answer(e)[1]) for e in examples]


@register_objective("step_by_step")
def step_by_step(examples: list[Example], config: ObjectiveConfig) -> list[Example]:
    return _two_tasks(examples, config, keypoints=False)


@register_objective("step_by_step_kpod")
def step_by_step_keypoints(examples: list[Example], config: ObjectiveConfig) -> list[Example]:
    return _two_tasks(examples, config, keypoints=True)


@register_objective("kpod")
def keypoint_weighted(examples: list[Example], config: ObjectiveConfig) -> list[Example]:
    out = []
    for example in examples:
        split_answer(example)
        text = example.response or ""
        spans = _keypoint_spans(text, config.keypoint_weight, 1.0)
        out.append(dataclasses.replace(example, weight_spans=spans, step_spans=step_spans(text)))
    return out


def _two_tasks(
    examples: list[Example], config: ObjectiveConfig, *, keypoints: bool
) -> list[Example]:
    """`[label]` -> answer and `[rationale]` -> rationale (weighted `rationale_weight`, its
    keypoints `rationale_weight * keypoint_weight` when `keypoints`)."""
    out = []
    for example in examples:
        rationale, answer = split_answer(example)
        weight = config.rationale_weight
        spans = (
            _keypoint_spans(rationale, weight * config.keypoint_weight, weight)
            if keypoints
            else ((0, weight),)
        )
        out.append(
            dataclasses.replace(
                _prefixed(example, config.label_prefix), id=f"{example.id}:label", response=answer
            )
        )
        out.append(
            dataclasses.replace(
                _prefixed(example, config.rationale_prefix),
                id=f"{example.id}:rationale",
                response=rationale,
                weight_spans=spans,
                step_spans=step_spans(rationale) if keypoints else None,
            )
        )
    return out


def step_spans(text: str) -> tuple[tuple[int, int], ...]:
    """Each non-empty line's rank counted from the end (the last one, e.g. `#### answer`, is
    0), as (start_char, rank) breakpoints; a blank line takes the rank of the line after it
    (a trailing one 0). The progressive curriculum reads them."""
    lines = text.split("\n")
    spans, start = [], 0
    for i, line in enumerate(lines):
        after = sum(1 for later in lines[i + 1 :] if later.strip())  # non-empty lines after
        spans.append((start, after if line.strip() else max(after - 1, 0)))
        start += len(line) + 1
    return tuple(spans)


def _keypoint_spans(text: str, heavy: float, light: float) -> tuple[tuple[int, float], ...]:
    """Weight breakpoints: `heavy` on numbers and calculator annotations, `light` elsewhere."""
    spans: list[tuple[int, float]] = [(0, light)]
    for match in _KEYPOINT.finditer(text):
        spans += [(match.start(), heavy), (match.end(), light)]
    return tuple(spans)


def _prefixed(example: Example, prefix: str) -> Example:
    *history, last = example.messages
    turn = {**last, "content": prefix + last["content"]}
    return dataclasses.replace(example, messages=(*history, turn))
