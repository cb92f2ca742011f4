"""The models' own greedy answers (lmdistill/eval/answers.py): repeated 4-grams, answers that
end by themselves, the teacher's NLL and KL(model || teacher) on them, against naive
one-prompt-at-a-time references; and a run that reports them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from lmdistill.eval.answers import answer_quality, repeated_ngrams
from lmdistill.models.generate import stop_token_ids
from lmdistill.models.tiny import build_tiny_llama
from lmdistill.teachers.base import LocalTeacher


def test_repeated_ngrams_counts_each_4gram_seen_earlier_in_the_answer() -> None:
    assert repeated_ngrams([1, 2, 3, 4, 1, 2, 3, 4]) == (1, 5)
    assert repeated_ngrams([7, 7, 7, 7, 7, 7]) == (2, 3)
    assert repeated_ngrams([1, 2, 3]) == (0, 0)
    assert repeated_ngrams([1, 2, 3, 4, 5, 6]) == (0, 3)


def naive(
    model: Any, teacher: Any, prompt: list[int], stops: list[int], max_new: int
) -> tuple[list[int], bool, float, float]:
    """One prompt, no padding, no cache: greedy ids, ended, teacher NLL sum, reverse KL sum."""
    ids: list[int] = []
    with torch.no_grad():
        for _ in range(max_new):
            logits = model(input_ids=torch.tensor([prompt + ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
            if ids[-1] in stops:
                break
        ended = ids[-1] in stops
        full = torch.tensor([prompt + ids])
        log_q = torch.log_softmax(model(input_ids=full).logits[0, len(prompt) - 1 : -1], -1)
        log_p = torch.log_softmax(teacher(input_ids=full).logits[0, len(prompt) - 1 : -1], -1)
        nll = -float(log_p.gather(1, torch.tensor(ids)[:, None]).sum())
        kl = float((log_q.exp() * (log_q - log_p)).sum())
    return ids, ended, nll, kl


def test_answer_quality_equals_a_naive_reference(tiny_tokenizer: Any) -> None:
    teacher = build_tiny_llama(len(tiny_tokenizer), layers=2, hidden=64, seed=0).eval()
    student = build_tiny_llama(len(tiny_tokenizer), layers=1, hidden=64, seed=1).eval()
    # Make the end-of-turn token likely for the student, so some answers end and some do not.
    stops = stop_token_ids(student, tiny_tokenizer)
    with torch.no_grad():
        student.get_output_embeddings().weight[stops[0]] *= 6.0
    chats = ["Hi", "What is 2 + 2?", "Tell me a long story about a cat", "ok"]
    chat = [[{"role": "user", "content": c}] for c in chats]
    encoded = [tiny_tokenizer.apply_chat_template(m, add_generation_prompt=True) for m in chat]
    prompts = [list(getattr(p, "input_ids", p)) for p in encoded]
    judge = LocalTeacher(teacher, tiny_tokenizer, "t")
    got = answer_quality(student, tiny_tokenizer, prompts, judge, max_new_tokens=12,
                         vocab_size=len(tiny_tokenizer), batch_size=3)  # fmt: skip
    reference = [naive(student, teacher, p, stops, 12) for p in prompts]
    tokens = sum(len(ids) for ids, *_ in reference)
    repeated = total = 0
    for ids, ended, *_ in reference:
        r, t = repeated_ngrams(ids[:-1] if ended else ids)
        repeated, total = repeated + r, total + t
    assert got.answers == 4 and got.tokens == tokens
    assert 0 < got.ended < 1 and got.repetition > 0  # both kinds of answer, and loops
    assert got.ended == sum(e for _, e, *_ in reference) / 4
    assert got.repetition == (repeated / total if total else 0.0)
    assert got.teacher_nll == pytest.approx(sum(r[2] for r in reference) / tokens, rel=1e-4)
    assert got.reverse_kl == pytest.approx(sum(r[3] for r in reference) / tokens, rel=1e-4)
    # Without a teacher's full distribution the teacher measures are None.
    alone = answer_quality(student, tiny_tokenizer, prompts, None, max_new_tokens=12,
                           vocab_size=len(tiny_tokenizer))  # fmt: skip
    assert alone.teacher_nll is None and alone.reverse_kl is None
    assert alone.repetition == got.repetition and alone.ended == got.ended


def test_a_run_reports_each_models_own_answers(tmp_path: Path) -> None:
    from conftest import tiny_run_config

    from lmdistill.pipeline import run

    config = tiny_run_config(tmp_path, "eval.answers=4", "eval.answer_max_new_tokens=16")
    metrics = run(config)
    assert metrics.teacher is not None and metrics.teacher.answers is not None
    assert metrics.teacher.answers.reverse_kl == pytest.approx(0.0, abs=1e-5)
    for evaluated in (metrics.before, metrics.kd.after):
        assert evaluated is not None and evaluated.answers is not None
        assert evaluated.answers.answers == 4 and evaluated.answers.teacher_nll is not None
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["kd"]["after"]["answers"]["answers"] == 4
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## The models' own greedy answers" in report and "| teacher (reference) |" in report


def test_a_cached_teacher_still_scores_the_answers_with_its_weights(tmp_path: Path) -> None:
    """Training reads the cache; the teacher's weights the run loaded score the models' own
    answers (the demo's set-up): the same figures as a local teacher gives."""
    from conftest import tiny_run_config

    from lmdistill.pipeline import run

    answers = ["eval.answers=3", "eval.answer_max_new_tokens=12", "baseline=false"]
    cached = run(tiny_run_config(tmp_path / "cache", *answers, "teacher.kind=cache"))
    local = run(tiny_run_config(tmp_path / "local", *answers, "teacher.kind=local"))
    for found, reference in ((cached.teacher, local.teacher), (cached.before, local.before)):
        assert found is not None and found.answers is not None
        assert reference is not None and reference.answers is not None
        assert found.answers.teacher_nll is not None
        assert found.answers.teacher_nll == pytest.approx(reference.answers.teacher_nll, rel=1e-5)
