"""Rationale data: several sampled rationales per question, filtered by self-consistency,
by the gold answer and by format; every drop counted."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from conftest import tiny_run_config

from lmdistill.cli import main
from lmdistill.config import ConfigError, GenerateConfig
from lmdistill.data import Example, load_examples, write_examples
from lmdistill.teachers.consistency import expand_samples, filtering, select_rationales
from lmdistill.teachers.generate import GenerationReport
from lmdistill.validate import validate


def _question(i: int, gold: str | None) -> Example:
    response = None if gold is None else f"step\n#### {gold}"
    return Example(f"q{i}", ({"role": "user", "content": f"question {i}"},), response)


def _answered(prompts: list[Example], responses: list[list[str]]) -> list[Example]:
    samples = expand_samples(prompts, len(responses[0]))
    flat = [r for group in responses for r in group]
    return [
        dataclasses.replace(s, response=r.rstrip("~"), response_complete=not r.endswith("~"))
        for s, r in zip(samples, flat, strict=True)
    ]


QUESTIONS = [_question(0, "5"), _question(1, "7"), _question(2, None)]
RESPONSES = [
    ["a\n#### 5", "b\n#### 6", "c\n#### 5"],  # majority 5 = gold
    ["a\n#### 8", "b\n#### 8", "c\n#### 7"],  # majority 8, gold 7
    ["a\n#### 3", "no answer here", "c\n#### 3~"],  # no gold; one unformatted, one truncated
]


def test_expanded_ids_name_question_and_sample() -> None:
    ids = [e.id for e in expand_samples(QUESTIONS[:2], 2)]
    assert ids == ["q0#s0", "q0#s1", "q1#s0", "q1#s1"]
    assert expand_samples(QUESTIONS, 1) == QUESTIONS


def test_majority_keeps_the_samples_that_agree_with_the_most_common_answer() -> None:
    config = GenerateConfig(do_sample=True, samples=3, keep="majority", keep_per_prompt=3)
    kept, report = select_rationales(QUESTIONS, _answered(QUESTIONS, RESPONSES), config)
    assert [e.id for e in kept] == ["q0#s0", "q0#s2", "q1#s0", "q1#s1", "q2#s0"]
    assert report["dropped"] == {"disagrees": 2, "no_answer": 1, "truncated": 1}
    assert report["prompts_kept"] == 3 and report["kept"] == 5
    # Only well-formed samples vote: 2 of 3 agree in q0 and q1, q2's one passing sample alone.
    assert report["majority_agreement"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    assert report["majority_accuracy"] == 0.5  # q0's majority is right, q1's is not


def test_gold_keeps_samples_with_the_reference_answer_and_falls_back_to_majority() -> None:
    config = GenerateConfig(do_sample=True, samples=3, keep="gold", keep_per_prompt=1)
    kept, report = select_rationales(QUESTIONS, _answered(QUESTIONS, RESPONSES), config)
    assert [(e.id, e.response) for e in kept] == [
        ("q0#s0", "a\n#### 5"),
        ("q1#s2", "c\n#### 7"),  # the minority sample that is right
        ("q2#s0", "a\n#### 3"),  # no gold: majority
    ]
    assert report["dropped"]["over_keep_per_prompt"] == 1
    assert report["dropped"]["disagrees"] == 3


def test_format_filters_count_each_reason_and_drop_questions_left_empty() -> None:
    config = GenerateConfig(samples=1, min_chars=8, max_chars=9, require_answer=True)
    assert filtering(config)
    prompts = [_question(i, None) for i in range(4)]
    answered = _answered(
        prompts, [["x\n#### 1"], ["long text\n#### 2"], ["no mark"], ["abcd ####"]]
    )
    kept, report = select_rationales(prompts, answered, config)
    assert [e.id for e in kept] == ["q0"]  # exactly 8 characters, with an answer
    assert report["dropped"] == {"no_answer": 1, "too_long": 1, "too_short": 1}
    assert report["prompts_dropped"] == 3
    assert not filtering(GenerateConfig())


def test_drop_truncated_keeps_only_answers_the_teacher_finished() -> None:
    """The student sees every answer end: a response cut at max_new_tokens ("~" here) is
    dropped and counted; the rest are kept as written, and without the option nothing is."""
    config = GenerateConfig(drop_truncated=True)
    assert filtering(config)
    prompts = [_question(i, None) for i in range(3)]
    answered = _answered(prompts, [["ends here"], ["cut in the mid~"], ["also ends"]])
    kept, report = select_rationales(prompts, answered, config)
    assert [(e.id, e.response) for e in kept] == [("q0", "ends here"), ("q2", "also ends")]
    assert report["dropped"] == {"truncated": 1} and report["prompts_dropped"] == 1
    assert all(e.response_complete for e in kept)


def test_config_rejects_samples_without_sampling_and_bad_filters(tmp_path: Path) -> None:
    bad = {
        "generate.samples=3": "generate.do_sample",
        "generate.samples=0": "generate.samples",
        "generate.keep=vote": "generate.keep",
        "generate.keep_per_prompt=2": "generate.keep_per_prompt",
        "generate.keep=majority": "generate.samples",
        "generate.max_chars=0": "generate.max_chars",
    }
    for override, field in bad.items():
        with pytest.raises(ConfigError, match=field):
            validate(tiny_run_config(tmp_path, override))


def test_written_examples_load_back_identically(tmp_path: Path) -> None:
    examples = [*QUESTIONS, dataclasses.replace(QUESTIONS[0], id="p", response=None)]
    path = tmp_path / "kept.jsonl"
    write_examples(path, examples)
    loaded = load_examples(str(path))
    assert [(e.id, e.messages, e.response) for e in loaded] == [
        (e.id, e.messages, e.response) for e in examples
    ]


class ScriptedTeacher:
    """Answers sample j of every question with `#### j % 2` (a teacher that is right about
    half the time), recording what it was asked."""

    identity = "scripted"

    def __init__(self) -> None:
        self.asked: list[str] = []

    def generate(
        self, prompts: list[Example], out: Path, config: GenerateConfig
    ) -> tuple[list[Example], GenerationReport]:
        self.asked += [p.id for p in prompts]
        self.messages = [p.messages for p in prompts]
        answered = [
            dataclasses.replace(p, response=f"work\n#### {int(p.id.rsplit('#s', 1)[-1]) % 2}")
            if "#s" in p.id
            else dataclasses.replace(p, response="held out")
            for p in prompts
        ]
        return answered, GenerationReport(len(prompts), len(prompts), 0, 0, 1.0)


def test_generate_cli_samples_each_question_and_writes_the_kept_rationales(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import lmdistill.teachers.setup as setup

    teacher = ScriptedTeacher()
    monkeypatch.setattr(setup, "generating_teacher", lambda config: (teacher, {}))
    config = tiny_run_config(tmp_path)
    overrides = [
        f"output_dir={config.output_dir}",
        "data.max_train_examples=6",
        "data.eval_size=2",
        "generate.do_sample=true",
        "generate.samples=3",
        "generate.keep=majority",
        "generate.keep_per_prompt=2",
        "generate.rationale_prompt=Think step by step.",
    ]
    assert main(["generate", "configs/tiny.yaml", *overrides]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(teacher.asked) == 6 * 3 + 2  # every question 3 times, held out once
    assert sum("#s" in i for i in teacher.asked) == 18
    stats = report["rationales"]
    # Samples 0 and 2 answer 0 (the majority), sample 1 answers 1: two kept per question.
    assert stats["kept"] == 12 and stats["dropped"] == {"disagrees": 6}
    assert stats["majority_agreement"] == pytest.approx(2 / 3)
    kept = load_examples(report["kept_output"])
    assert [e.id.split("#s")[1] for e in kept] == ["0", "2"] * 6
    assert all(e.response == "work\n#### 0" for e in kept)
    # The teacher was asked with the rationale prompt; the student's examples are without it.
    assert all(
        m[0] == {"role": "system", "content": "Think step by step."} for m in teacher.messages
    )
    assert all(e.messages[0]["role"] == "user" and len(e.messages) == 1 for e in kept)


def test_filters_that_keep_nothing_are_an_error() -> None:
    config = GenerateConfig(require_answer=True)
    prompts = [_question(0, None)]
    with pytest.raises(ValueError, match=r"kept none of 1 training questions.*no_answer"):
        select_rationales(prompts, _answered(prompts, [["no mark"]]), config)


def test_truncated_or_unformatted_samples_do_not_vote() -> None:
    prompts = [_question(0, None)]
    # Two cut-off loops repeating 9 (their last number would read as the answer) and one
    # well-formed rationale answering 4.
    answered = _answered(prompts, [["9 9 9 9~", "so 9, 9~", "a\n#### 4"]])
    config = GenerateConfig(do_sample=True, samples=3, keep="majority")
    kept, report = select_rationales(prompts, answered, config)
    assert [e.response for e in kept] == ["a\n#### 4"]
    assert report["dropped"] == {"truncated": 2} and report["majority_agreement"] == 1.0
