"""Multiple choice by log-likelihood: seconds per question, the shared context once (the
key/value cache path, lmdistill/eval/choice.py) against one forward of every choice's whole
text (the earlier path), on SmolLM2-135M-Instruct and 4-choice questions made from the
builtin GSM8K problems; both paths on the same questions, alternating, in one run.

    python benchmarks/choice_speed.py [--questions 24] [--out benchmarks/results/choice_speed.json]

The question is a GSM8K problem; its four choices are sentences that differ only in the
number ("The answer is 18."), the right one being GSM8K's answer. Also checks that both
paths give the same scores (max |difference| reported) and the same three accuracies.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from losses import code_info, machine_info

import lmdistill  # noqa: F401  (threading defaults before torch loads)
from lmdistill.config import ModelConfig
from lmdistill.data import Example, collate, load_examples, tokenize_examples
from lmdistill.eval.choice import ChoiceQuestion, choice_logprobs, picks
from lmdistill.models import load_model

DEFAULT_OUT = Path(__file__).parent / "results" / "choice_speed.json"


def questions_from_gsm8k(count: int) -> list[ChoiceQuestion]:
    """Four choices per problem: the answer and three numbers near it, in a fixed order."""
    found = []
    for example in load_examples("builtin:gsm8k-demo")[:count]:
        answer = int(float((example.response or "").rsplit("####", 1)[-1].strip().replace(",", "")))
        order = sorted({answer, answer + 1, answer + 10, 2 * answer + 3})
        while len(order) < 4:
            order.append(order[-1] + 7)
        found.append(
            ChoiceQuestion(
                example.id,
                example.messages[-1]["content"],
                tuple(f"The answer is {n}." for n in order),
                order.index(answer),
            )
        )
    return found


@torch.no_grad()
def whole_text_logprobs(
    model: Any, tokenizer: Any, question: ChoiceQuestion
) -> list[tuple[float, int]]:
    """The earlier path: every choice's whole text (prompt and choice) in one batch."""
    examples = [
        Example(f"{question.id}:{i}", ({"role": "user", "content": question.question},), choice,
                response_complete=False)
        for i, choice in enumerate(question.choices)
    ]  # fmt: skip
    items, _ = tokenize_examples(examples, tokenizer, 1024, "error", on_empty="error")
    batch = collate(items, tokenizer.pad_token_id)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    labels = batch["labels"][:, 1:]
    mask = labels >= 0
    picked = logprobs.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return [(float(s), int(c)) for s, c in zip((picked * mask).sum(1), mask.sum(1), strict=True)]


def accuracies(
    questions: list[ChoiceQuestion], scores: list[list[tuple[float, int]]]
) -> dict[str, float]:
    """The three measures over `questions`, picked as lmdistill's evaluation picks."""
    found = {"accuracy": 0.0, "accuracy_norm": 0.0, "accuracy_per_token": 0.0}
    for question, score in zip(questions, scores, strict=True):
        for key, pick in picks(question, score).items():
            found[key] += (pick == question.answer) / len(questions)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=24)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    model, tokenizer = load_model(ModelConfig(path="smollm2-135m-instruct"))
    questions = questions_from_gsm8k(args.questions)
    paths = {"whole texts": whole_text_logprobs, "shared context": choice_logprobs}
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    scores: dict[str, list[list[tuple[float, int]]]] = {name: [] for name in paths}
    whole_text_logprobs(model, tokenizer, questions[0])  # warm-up, not timed
    for i, question in enumerate(questions):
        names = list(paths) if i % 2 == 0 else list(reversed(paths))  # alternate the order
        for name in names:
            started = time.perf_counter()
            scores[name].append(paths[name](model, tokenizer, question))
            seconds[name].append(time.perf_counter() - started)
    difference = max(
        abs(a[0] - b[0])
        for qa, qb in zip(scores["whole texts"], scores["shared context"], strict=True)
        for a, b in zip(qa, qb, strict=True)
    )
    prompt_tokens = [
        len(tokenizer(tokenizer.apply_chat_template(
            [{"role": "user", "content": q.question}], add_generation_prompt=True, tokenize=False
        ))["input_ids"])
        for q in questions
    ]  # fmt: skip
    per_question = {name: statistics.fmean(values) for name, values in seconds.items()}
    report = {
        "benchmark": "multiple choice: shared context vs whole texts",
        "command": f"python benchmarks/choice_speed.py --questions {args.questions}",
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to fp32)",
        "questions": len(questions),
        "choices_per_question": 4,
        "mean_prompt_tokens": statistics.fmean(prompt_tokens),
        "seconds_per_question": per_question,
        "speedup": per_question["whole texts"] / per_question["shared context"],
        "max_abs_score_difference": difference,
        "accuracies": {name: accuracies(questions, found) for name, found in scores.items()},
        "code": code_info(),
        "machine": machine_info(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        json.dumps(
            {k: report[k] for k in ("seconds_per_question", "speedup", "max_abs_score_difference")},
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
