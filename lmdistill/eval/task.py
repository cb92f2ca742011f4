"""Task accuracy on GSM8K-format problems: greedy answers, exact match of the final answer,
and the quality of the rationales the model writes (no ground truth needed for those)."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedModel

from lmdistill.data import Example
from lmdistill.data.example import NO_GROUP
from lmdistill.data.gsm8k import calculator_annotations, final_answer, majority_answer
from lmdistill.eval.reasoning import rationale_quality, step_agreement
from lmdistill.metrics import SelfConsistency, TaskMetrics, TeacherAgreement
from lmdistill.models.generate import greedy_responses, sampled_responses


def task_accuracy(
    model: PreTrainedModel,
    tokenizer: Any,
    examples: list[Example],
    *,
    max_new_tokens: int,
    batch_size: int = 32,
    keep: int = 3,
    teacher_answers: list[str] | None = None,
    samples: int = 0,
    answers: list[str] | None = None,
) -> TaskMetrics:
    """Exact match of the final answer (`####`, else the last number) against each example's
    reference response, plus rationale checks over the model's own answers that need no
    ground truth: the fraction of calculator annotations that are arithmetically right (of all
    annotations written; an unreadable one counts as wrong) and the fraction readable, the
    fraction of answers that equal the last step's result; with `teacher_answers` (the
    teacher's greedy answers to the same questions) how often the final answer agrees with
    the teacher's and how many of the teacher's calculations it repeats; with `samples` > 0,
    that many sampled answers per question: how often they agree with their majority answer
    and the exact match of that majority (self-consistency). `keep` answers are returned for
    the report; `answers` are the model's greedy answers when already computed. Questions
    with a `group` also give the exact match per group (`groups`)."""
    if not examples:
        raise ValueError("task evaluation needs at least one example")
    if answers is None:
        answers = greedy_answers(model, tokenizer, examples, max_new_tokens, batch_size)
    correct = annotated = readable = right = follows = judged = 0
    by_group: dict[str, list[int]] = {}  # group -> [examples, correct]
    grouped = any(e.group is not None for e in examples)
    for example, answer in zip(examples, answers, strict=True):
        gold = final_answer(example.response or "")
        hit = gold is not None and final_answer(answer) == gold
        correct += hit
        if grouped:
            tally = by_group.setdefault(example.group or NO_GROUP, [0, 0])
            tally[0] += 1
            tally[1] += hit
        quality = rationale_quality(answer)
        annotated += quality.annotations
        readable += quality.readable_annotations
        right += quality.correct_annotations
        if quality.answer_follows is not None:
            judged += 1
            follows += quality.answer_follows
    teacher = None if teacher_answers is None else _teacher_agreement(answers, teacher_answers)
    consistency = None
    if samples > 0:
        drawn = sampled_responses(
            model, tokenizer, examples, max_new_tokens, samples=samples, batch_size=batch_size
        )
        votes = [majority_answer(texts) for texts in drawn]
        golds = [final_answer(e.response or "") for e in examples]
        consistency = SelfConsistency(
            sampled_answers_per_question=samples,
            sample_agreement=sum(share for _, share in votes) / len(votes),
            majority_exact_match=sum(
                g is not None and a == g for (a, _), g in zip(votes, golds, strict=True)
            )
            / len(votes),
        )
    return TaskMetrics(
        examples=len(examples),
        exact_match=correct / len(examples),
        annotations_per_answer=annotated / len(examples),
        # A share of all annotations written: one the checker cannot read counts as wrong, so
        # a student that writes malformed calculations is not flattered by them.
        annotation_accuracy=right / annotated if annotated else None,
        annotations_readable=readable / annotated if annotated else None,
        answer_follows_last_step=follows / judged if judged else None,
        samples=[
            {"prompt": e.messages[-1]["content"], "answer": a, "reference": e.response}
            for e, a in zip(examples[:keep], answers[:keep], strict=True)
        ],
        teacher=teacher,
        consistency=consistency,
        groups={
            g: {"examples": n, "exact_match": hits / n} for g, (n, hits) in sorted(by_group.items())
        },
    )


def _teacher_agreement(answers: list[str], teacher_answers: list[str]) -> TeacherAgreement:
    if len(answers) != len(teacher_answers):
        raise ValueError(f"{len(teacher_answers)} teacher answers for {len(answers)} questions")
    same = sum(
        final_answer(a) is not None and final_answer(a) == final_answer(t)
        for a, t in zip(answers, teacher_answers, strict=True)
    )
    steps = [step_agreement(a, t) for a, t in zip(answers, teacher_answers, strict=True)]
    judged = [s for s in steps if s is not None]
    # A student that writes no calculations at all (label-only, step-by-step at inference)
    # has no rationale to compare: None, not 0.
    writes = any(calculator_annotations(a) for a in answers)
    return TeacherAgreement(
        teacher_answer_agreement=same / len(answers),
        teacher_step_agreement=sum(judged) / len(judged) if judged and writes else None,
    )


def greedy_answers(
    model: PreTrainedModel,
    tokenizer: Any,
    examples: list[Example],
    max_new_tokens: int,
    batch_size: int,
) -> list[str]:
    answers: list[str] = []
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        answers += greedy_responses(model, tokenizer, batch, max_new_tokens)
    return answers
