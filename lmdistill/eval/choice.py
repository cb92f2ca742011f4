"""Multiple choice by log-likelihood: each choice scored as a continuation of the question.

Rows (JSONL) look like `{"question": ..., "choices": ["A text", "B text", ...], "answer": 1}`
(`answer` an index, or a letter A, B, ...). The prompt is the question rendered with the
chat template, and each choice is scored as the assistant's response (its tokens, without
an end of turn). Three measures, named as lm-evaluation-harness names its own:

- `accuracy`: the choice with the highest sum of log-probabilities (lm-eval's `acc`);
- `accuracy_norm`: that sum divided by the choice's length in characters (lm-eval's
  `acc_norm`: `len(choice)` of the choice string);
- `accuracy_per_token`: the sum divided by the choice's number of tokens (lmdistill's own;
  it depends on the tokenizer, so it is not comparable across model families).

The question's context is computed once per question: one forward of the tokens all its
choices share, then every choice's remaining tokens in one batch, from that forward's
key/value cache (docs/usage.md, "Multiple choice").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from lmdistill.data import DataError, Example, tokenize_examples
from lmdistill.io import read_utf8
from lmdistill.metrics import ChoiceMetrics
from lmdistill.models.forward import kv_cache


@dataclass(frozen=True)
class ChoiceQuestion:
    id: str
    question: str
    choices: tuple[str, ...]
    answer: int  # index into choices


def load_choice_questions(path: str | Path) -> list[ChoiceQuestion]:
    """Read multiple-choice rows; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"multiple-choice file not found: {path}")
    out = []
    for number, line in enumerate(read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: invalid JSON ({error.msg})") from None
        choices = row.get("choices") if isinstance(row, dict) else None
        if (
            not isinstance(choices, list)
            or len(choices) < 2
            or not isinstance(row.get("question"), str)
        ):
            raise DataError(f"{where}: needs a `question` string and a `choices` list of >= 2")
        answer = row.get("answer")
        if isinstance(answer, str) and len(answer) == 1 and answer.isalpha():
            answer = ord(answer.upper()) - ord("A")
        if not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise DataError(
                f"{where}: `answer` must index `choices` (0..{len(choices) - 1} or a letter)"
            )
        out.append(
            ChoiceQuestion(
                str(row.get("id", number)), row["question"], tuple(map(str, choices)), answer
            )
        )
    if not out:
        raise DataError(f"{path}: no questions")
    return out


@torch.no_grad()
def choice_logprobs(
    model: PreTrainedModel, tokenizer: Any, question: ChoiceQuestion, max_length: int = 1024
) -> list[tuple[float, int]]:
    """(sum of log-probs, number of tokens) of each choice as the answer to the question: the
    shared context once, the choices' own tokens in one batch from its key/value cache."""
    examples = [
        Example(f"{question.id}:{i}", ({"role": "user", "content": question.question},), choice,
                response_complete=False)
        for i, choice in enumerate(question.choices)
    ]  # fmt: skip
    items, _ = tokenize_examples(examples, tokenizer, max_length, "error", on_empty="error")
    sequences = [item.input_ids for item in items]
    # Every choice keeps one token of its own (two equal choices would share all of them).
    shared = min(common_prefix(sequences), min(len(s) for s in sequences) - 1)
    device = model.device
    context = model(input_ids=torch.tensor([sequences[0][:shared]], device=device), use_cache=True)
    cached = kv_cache(model, context)
    (cache,) = cached.values()
    rest = [s[shared:] for s in sequences]
    longest = max(len(r) for r in rest)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (longest - len(r)) for r in rest], device=device)
    mask = torch.tensor(
        [[1] * (shared + len(r)) + [0] * (longest - len(r)) for r in rest], device=device
    )
    cache.batch_repeat_interleave(len(rest))
    positions = torch.arange(shared, shared + longest, device=device).expand(len(rest), -1)
    own = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, **cached).logits
    context_logprobs = torch.log_softmax(context.logits[0].float(), dim=-1)  # (shared, V)
    own_logprobs = torch.log_softmax(own.float(), dim=-1)  # (B, longest, V)
    found = []
    for b, item in enumerate(items):
        total, count = 0.0, 0
        for t in range(1, len(item.input_ids)):  # position t - 1 predicts token t
            if item.labels[t] < 0:
                continue
            row = context_logprobs[t - 1] if t - 1 < shared else own_logprobs[b, t - 1 - shared]
            total += float(row[item.input_ids[t]])
            count += 1
        found.append((total, count))
    return found


def common_prefix(sequences: list[list[int]]) -> int:
    """The number of leading tokens all `sequences` share."""
    length = 0
    for column in zip(*sequences, strict=False):
        if any(token != column[0] for token in column):
            break
        length += 1
    return length


def picks(question: ChoiceQuestion, scores: list[tuple[float, int]]) -> dict[str, int]:
    """The choice each measure picks from (sum of log-probs, tokens) per choice: the highest
    sum, per character, per token (ties: the first choice, as lm-eval's argmax)."""
    options = range(len(scores))
    chars = [max(len(c), 1) for c in question.choices]
    return {
        "accuracy": max(options, key=lambda i: scores[i][0]),
        "accuracy_norm": max(options, key=lambda i: scores[i][0] / chars[i]),
        "accuracy_per_token": max(options, key=lambda i: scores[i][0] / max(scores[i][1], 1)),
    }


def multiple_choice(
    model: PreTrainedModel, tokenizer: Any, questions: list[ChoiceQuestion]
) -> ChoiceMetrics:
    """`accuracy`, `accuracy_norm` (per character) and `accuracy_per_token` over
    `questions`."""
    model.eval()
    right = dict.fromkeys(("accuracy", "accuracy_norm", "accuracy_per_token"), 0)
    for question in questions:
        for measure, pick in picks(question, choice_logprobs(model, tokenizer, question)).items():
            right[measure] += pick == question.answer
    n = len(questions)
    return ChoiceMetrics(
        n, right["accuracy"] / n, right["accuracy_norm"] / n, right["accuracy_per_token"] / n
    )
