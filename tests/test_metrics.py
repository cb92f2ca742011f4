"""The result types: written to metrics.json under the keys the file has always had, read
back from any version of the file."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from lmdistill.metrics import ChoiceMetrics, EvalMetrics, RunMetrics, TaskMetrics

FIDELITY = {
    "kl": 2.5,
    "top1_agreement": 0.3,
    "student_ppl": 9.0,
    "teacher_ppl": None,
    "student_ece": 0.05,
    "teacher_ece": 0.02,
    "tokens": 100,
    "signal_tokens": 96,
}
TASK = {
    "examples": 4,
    "exact_match": 0.5,
    "annotations_per_answer": 2.0,
    "annotation_accuracy": 0.75,
    "annotations_readable": 1.0,
    "answer_follows_last_step": None,
    "samples": [{"prompt": "q", "answer": "a", "reference": "r"}],
    "teacher_answer_agreement": 0.5,
    "teacher_step_agreement": None,
    "sampled_answers_per_question": 3,
    "sample_agreement": 0.8,
    "majority_exact_match": 0.5,
}
ARM = {
    "after": {
        **FIDELITY,
        "tasks": {
            "lab:test:4": TASK,
            "mc:q.jsonl": {
                "questions": 2,
                "accuracy": 0.5,
                "accuracy_norm": 0.5,
                "accuracy_per_token": 1.0,
            },
        },
    },
    "steps": 8,
    "tokens": 512,
    "train_seconds": 1.5,
    "tokens_per_s": 341.3,
    "resumed_from": 0,
    "history": [{"step": 8, "loss": 1.0}],
}
RUN: dict[str, Any] = {
    "lmdistill_version": "0.9.0",
    "config_hash": "abc",
    "generate": {"prompts": 20, "new_tokens": 480},
    "cache": {"train": {"examples": 16}},
    "data": {"source": "lab:train:16", "train_examples": 16},
    "models": {"teacher": "tiny", "vocab_size": 64},
    "teacher": {"tasks": {"lab:test:4": {k: TASK[k] for k in list(TASK)[:7]}}},
    "before": FIDELITY,
    "kd": ARM,
    "baseline": {**ARM, "after": None},
    "samples": [{"prompt": "q", "teacher": "t", "KD student": "s"}],
    "wall_seconds": 12.0,
    "peak_rss_mb": 900.0,
    "peak_gpu_mb": 10.0,
}


def test_a_run_reads_back_and_writes_the_same_file() -> None:
    metrics = RunMetrics.from_dict(copy.deepcopy(RUN))
    assert metrics.as_dict() == RUN
    assert json.dumps(metrics.as_dict()) == json.dumps(RUN)  # key order too
    assert metrics.setup == {"generate": RUN["generate"], "cache": RUN["cache"]}
    after = metrics.kd.after
    assert after is not None and after.fidelity is not None
    assert after.fidelity.signal_tokens == 96 and after.exact_match("lab:test:4") == 0.5
    task = after.tasks["lab:test:4"]
    assert isinstance(task, TaskMetrics) and task.teacher is not None
    assert task.consistency is not None and task.consistency.sample_agreement == 0.8
    assert isinstance(after.tasks["mc:q.jsonl"], ChoiceMetrics)
    assert [name for name, _ in metrics.arms()] == ["before", "KD", "CE-only"]


def test_optional_groups_are_absent_not_null() -> None:
    """A model evaluated without the teacher's answers or samples has no such keys (as the
    file always had it), and a run without a baseline, a GPU or fidelity has none either."""
    bare = {k: TASK[k] for k in list(TASK)[:7]}
    assert TaskMetrics.from_dict(bare).as_dict() == bare
    only_tasks = {"tasks": {"lab:test:4": bare}}
    assert EvalMetrics.from_dict(only_tasks).as_dict() == only_tasks
    run = {k: v for k, v in RUN.items() if k not in ("baseline", "peak_gpu_mb", "before")}
    assert RunMetrics.from_dict(copy.deepcopy(run)).as_dict() == run


def test_a_file_from_an_earlier_version_reads() -> None:
    """Before calibration and signal counts were measured, fidelity had neither."""
    old = {k: FIDELITY[k] for k in ("kl", "top1_agreement", "student_ppl", "tokens")}
    read = EvalMetrics.from_dict(old).fidelity
    assert read is not None and read.signal_tokens == 100 and read.teacher_ece is None


def test_a_task_that_was_not_evaluated_is_a_clear_error() -> None:
    with pytest.raises(KeyError, match="no GSM8K-format task 'gsm8k'"):
        EvalMetrics().exact_match("gsm8k")
