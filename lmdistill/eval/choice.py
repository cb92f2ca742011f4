"""Multiple choice by log-likelihood: each choice scored as a continuation of the question.

Rows (JSONL) look like `{"question": ..., "choices": ["A text", "B text", ...], "answer": 1}`
(`answer` an index, or a letter A, B, ...). The prompt is the question rendered with the
chat template, and each choice is scored as the assistant's response: the sum of its tokens'
log-probabilities (`accuracy`) and that sum divided by the number of tokens
(`accuracy_norm`, which does not favour short choices), as lm-evaluation-harness reports
`acc` and `acc_norm`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from lmdistill.data import DataError, Example, collate, tokenize_examples
from lmdistill.io import read_utf8
from lmdistill.metrics import ChoiceMetrics


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
    """(sum of log-probs, number of tokens) of each choice as the answer to the question."""
    examples = [
        Example(f"{question.id}:{i}", ({"role": "user", "content": question.question},), choice,
                response_complete=False)
        for i, choice in enumerate(question.choices)
    ]  # fmt: skip
    items, _ = tokenize_examples(examples, tokenizer, max_length, "error", on_empty="error")
    batch = collate(items, tokenizer.pad_token_id)
    batch = {k: v.to(model.device) for k, v in batch.items() if k != "weights"}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    labels = batch["labels"][:, 1:]  # position t predicts token t + 1
    mask = labels >= 0
    picked = logprobs.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)  # (B, T-1)
    sums = (picked * mask).sum(dim=1)
    counts = mask.sum(dim=1)
    return [(float(s), int(c)) for s, c in zip(sums, counts, strict=True)]


def multiple_choice(
    model: PreTrainedModel, tokenizer: Any, questions: list[ChoiceQuestion]
) -> ChoiceMetrics:
    """`accuracy` (highest total log-prob) and `accuracy_norm` (per token) over `questions`."""
    model.eval()
    right = right_norm = 0
    for question in questions:
        scores = choice_logprobs(model, tokenizer, question)
        right += max(range(len(scores)), key=lambda i: scores[i][0]) == question.answer
        right_norm += (
            max(range(len(scores)), key=lambda i: scores[i][0] / max(scores[i][1], 1))
            == question.answer
        )
    return ChoiceMetrics(len(questions), right / len(questions), right_norm / len(questions))
