"""Multiple choice by log-likelihood: scores equal a direct per-choice forward pass, and a
choice the model itself prefers wins."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from lmdistill.data import DataError, Example, encode_prompt
from lmdistill.eval.choice import (
    ChoiceQuestion,
    choice_logprobs,
    load_choice_questions,
    multiple_choice,
)

QUESTION = ChoiceQuestion("q", "What is 2+2?", ("4", "five", "22 apples"), 0)


def _whole_texts(model: Any, tokenizer: Any, question: ChoiceQuestion) -> list[tuple[float, int]]:
    """The reference: one forward pass of the prompt and each choice, the choice's tokens'
    log-probs summed (and counted)."""
    prompt = encode_prompt(
        Example("q", ({"role": "user", "content": question.question},), None), tokenizer
    )
    found = []
    for choice in question.choices:
        ids = tokenizer(choice, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + ids])).logits[0].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        found.append(
            (sum(float(logprobs[len(prompt) - 1 + i, t]) for i, t in enumerate(ids)), len(ids))
        )
    return found


def test_choice_scores_equal_a_direct_forward_pass(tiny_teacher: Any, tiny_tokenizer: Any) -> None:
    scores = choice_logprobs(tiny_teacher, tiny_tokenizer, QUESTION)
    for (total, count), (direct, tokens) in zip(
        scores, _whole_texts(tiny_teacher, tiny_tokenizer, QUESTION), strict=True
    ):
        assert count == tokens
        assert total == pytest.approx(direct, abs=1e-4)


def test_the_choice_the_model_prefers_wins(tiny_teacher: Any, tiny_tokenizer: Any) -> None:
    scores = choice_logprobs(tiny_teacher, tiny_tokenizer, QUESTION)
    best = max(range(3), key=lambda i: scores[i][0])
    best_norm = max(range(3), key=lambda i: scores[i][0] / scores[i][1])
    questions = [
        ChoiceQuestion("a", QUESTION.question, QUESTION.choices, best),
        ChoiceQuestion("b", QUESTION.question, QUESTION.choices, (best + 1) % 3),
    ]
    result = multiple_choice(tiny_teacher, tiny_tokenizer, questions)
    assert result.accuracy == 0.5
    assert result.accuracy_per_token == (0.5 if best_norm in (best, (best + 1) % 3) else 0.0)


def test_the_shared_context_gives_what_one_forward_per_choice_gives(
    tiny_teacher: Any, tiny_tokenizer: Any
) -> None:
    """Choices that share leading tokens ("22 apples", "22 pears"), a one-character choice
    and two equal choices: every score as a forward pass of the whole text."""
    question = ChoiceQuestion("q", "How many?", ("22 apples", "22 pears", "7", "7"), 0)
    scores = choice_logprobs(tiny_teacher, tiny_tokenizer, question)
    for (total, count), (direct, tokens) in zip(
        scores, _whole_texts(tiny_teacher, tiny_tokenizer, question), strict=True
    ):
        assert count == tokens and total == pytest.approx(direct, abs=1e-4)
    assert scores[2] == pytest.approx(scores[3])


def test_the_three_measures_normalise_as_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """acc: the highest sum; acc_norm (lm-eval's): per character; per token: per token."""
    from lmdistill.eval import choice

    # (sum, tokens): "aaaaaaaaaa" (10 chars, 2 tokens) vs "b" (1 char, 1 token).
    fixed = [(-4.0, 2), (-1.0, 1)]
    monkeypatch.setattr(choice, "choice_logprobs", lambda *a, **k: fixed)
    asked = [ChoiceQuestion("q", "?", ("aaaaaaaaaa", "b"), 0)]
    result = choice.multiple_choice(torch.nn.Linear(1, 1), None, asked)  # type: ignore[arg-type]
    assert result.accuracy == 0.0  # -4 < -1
    assert result.accuracy_norm == 1.0  # -0.4 per character > -1
    assert result.accuracy_per_token == 0.0  # -2 per token < -1


def test_older_results_read_their_per_token_measure_under_its_name() -> None:
    from lmdistill.metrics import ChoiceMetrics

    old = ChoiceMetrics.from_dict({"questions": 2, "accuracy": 0.5, "accuracy_norm": 1.0})
    assert (old.accuracy_norm, old.accuracy_per_token) == (None, 1.0)
    new = ChoiceMetrics(2, 0.5, 0.0, 1.0)
    assert ChoiceMetrics.from_dict(new.as_dict()) == new


def test_multiple_choice_files_are_checked(tmp_path: Path) -> None:
    good = tmp_path / "mc.jsonl"
    good.write_text(
        json.dumps({"question": "q?", "choices": ["x", "y"], "answer": "B"}) + "\n"
        + json.dumps({"id": "z", "question": "r?", "choices": ["x", "y", "w"], "answer": 2}) + "\n"
    )  # fmt: skip
    loaded = load_choice_questions(good)
    assert [q.answer for q in loaded] == [1, 2] and loaded[1].id == "z"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q?", "choices": ["x", "y"], "answer": 5}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: `answer` must index"):
        load_choice_questions(bad)
    bad.write_text('{"question": "q?", "choices": ["x"]}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1: needs a `question`"):
        load_choice_questions(bad)


def test_a_run_reports_multiple_choice_accuracy(tmp_path: Path) -> None:
    from conftest import tiny_run_config

    from lmdistill.pipeline import run

    mc = tmp_path / "mc.jsonl"
    rows = [
        {"question": f"{i} + {i}?", "choices": [str(2 * i), "7", "x"], "answer": 0}
        for i in range(4)
    ]
    mc.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tiny_run_config(tmp_path, f"eval.tasks=['mc:{mc}']", "baseline=false")
    metrics = run(config)
    task = metrics.kd.after.tasks[f"mc:{mc}"]
    assert task.questions == 4 and task.accuracy in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert f"| `mc:{mc}` | KD student |" in (tmp_path / "run" / "report.md").read_text()
