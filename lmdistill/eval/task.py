"""Task accuracy on GSM8K-format problems: greedy answers, exact match of the final answer,
and the quality of the rationales the model writes (no ground truth needed for those)."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedModel

from lmdistill.data import Example
from lmdistill.eval.reasoning import final_answer, rationale_quality
from lmdistill.teachers.generate import greedy_responses


def task_accuracy(
    model: PreTrainedModel,
    tokenizer: Any,
    examples: list[Example],
    *,
    max_new_tokens: int,
    batch_size: int = 32,
    keep: int = 3,
) -> dict[str, Any]:
    """Exact match of the final answer (`####`, else the last number) against each example's
    reference response, plus rationale checks over the model's own answers: the fraction of
    calculator annotations that are arithmetically right and the fraction of answers that
    equal the last step's result. `keep` answers are returned for the report."""
    if not examples:
        raise ValueError("task evaluation needs at least one example")
    answers: list[str] = []
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        answers += greedy_responses(model, tokenizer, batch, max_new_tokens)
    correct = annotated = readable = right = follows = judged = 0
    for example, answer in zip(examples, answers, strict=True):
        gold = final_answer(example.response or "")
        correct += gold is not None and final_answer(answer) == gold
        quality = rationale_quality(answer)
        annotated += quality.annotations
        readable += quality.readable_annotations
        right += quality.correct_annotations
        if quality.answer_follows is not None:
            judged += 1
            follows += quality.answer_follows
    return {
        "examples": len(examples),
        "exact_match": correct / len(examples),
        "annotations_per_answer": annotated / len(examples),
        "annotation_accuracy": right / readable if readable else None,
        "answer_follows_last_step": follows / judged if judged else None,
        "samples": [
            {"prompt": e.messages[-1]["content"], "answer": a, "reference": e.response}
            for e, a in zip(examples[:keep], answers[:keep], strict=True)
        ],
    }
