"""Synthesis: the filters, each drop counted, exact lab verification, resumable attempts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lmdistill.data import Example, load_examples
from lmdistill.data.lab import LabSpec, lab_problems, solve_question
from lmdistill.dd import synth
from lmdistill.teachers.base import LocalTeacher
from lmdistill.teachers.generate import GenerationReport
from lmdistill.validate import load_config

GOOD = (
    "Problem: Eve has 4 coins. Eve finds 3 more coins. How many coins does Eve have now?\n"
    "Solution: Eve has 4+3=<<4+3=7>>7 coins.\n#### 7"
)


def test_lab_solver_agrees_with_the_generator_and_refuses_other_text() -> None:
    spec = LabSpec(steps=4, distractors=2, operations=("add", "subtract", "multiply", "divide"))
    for problem in lab_problems("train", 300, seed=3, spec=spec):
        assert solve_question(problem.question) == problem.answer
    assert (
        solve_question("Ana has 3 pens. Ana eats 2 pens. How many pens does Ana have now?") is None
    )
    assert (
        solve_question("Ana has 3 pens. Ana gives away 5 pens. How many pens does Ana have now?")
        is None
    )
    assert solve_question("What is 2 + 2?") is None


@pytest.mark.parametrize(
    ("text", "verify", "reason"),
    [
        (GOOD, "lab", None),
        (GOOD, "calculations", None),
        (GOOD.replace("#### 7", "#### 8"), "lab", "wrong_answer"),
        (GOOD.replace("#### 7", "#### 8"), "calculations", "wrong_answer"),
        (GOOD.replace("=7>>", "=6>>"), "none", "wrong_calculation"),
        (GOOD.replace("=7>>7", "=7>>8"), "none", "wrong_calculation"),  # states another value
        (GOOD.replace("finds 3 more", "borrows 3"), "lab", "unverifiable"),
        (GOOD.replace("\n#### 7", ""), "none", "no_answer"),
        ("The answer is 7.", "none", "format"),
        ("Problem: \nSolution: ", "none", "format"),
        (GOOD + "\n\nExample 5:\nProblem: Ben has", "lab", None),  # a second example is cut
    ],
)
def test_each_filter(text: str, verify: str, reason: str | None) -> None:
    assert synth.check(text, verify)[0] == reason


def test_dedup_measures_word_trigrams() -> None:
    a = synth.trigrams("Ana has 3 pens. Ana finds 2 more pens.")
    assert synth.jaccard(a, a) == 1.0
    b = synth.trigrams("Ana has 3 pens. Ana finds 2 more cards.")
    assert 0.5 < synth.jaccard(a, b) < 1.0
    assert synth.jaccard(a, synth.trigrams("Completely different words here today")) == 0.0


def test_synthesise_end_to_end_counts_every_drop(tmp_path: Path, monkeypatch: Any) -> None:
    seed_question = "Ana has 2 pens. Ana finds 1 more pens. How many pens does Ana have now?"
    near_copy = seed_question.replace("2 pens", "5 pens")
    responses = [
        GOOD,
        GOOD,  # an exact duplicate of the first
        GOOD.replace("#### 7", "#### 9"),  # wrong answer
        f"Problem: {near_copy}\nSolution: Ana has 5+1=<<5+1=6>>6 pens.\n#### 6",  # near a seed
        "no idea",
        "Problem: Gus has 2 eggs. Gus then has 3 times as many eggs. How many eggs does Gus "
        "have now?\nSolution: Gus has 2*3=<<2*3=6>>6 eggs.\n#### 6",
    ]
    calls: list[int] = []

    def fake_generate(self: Any, prompts: list[Example], out: Path, config: Any) -> Any:
        calls.append(len(prompts))
        assert all("Example 4:" in p.messages[-1]["content"] for p in prompts)  # 3 shots
        answered = [
            Example(p.id, p.messages, responses[i % len(responses)]) for i, p in enumerate(prompts)
        ]
        return answered, GenerationReport(len(prompts), len(prompts), 0, 0, 0.0)

    monkeypatch.setattr(LocalTeacher, "generate", fake_generate)
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(
        "\n".join(
            f'{{"prompt": "{q}", "response": "#### 3"}}'
            for q in [
                seed_question,
                "Ben has 1 cards. How many cards does Ben have now?",
                "Cal has 4 eggs. Cal gives away 1 eggs. How many eggs does Cal have now?",
            ]
        )
    )
    config = load_config(
        None,
        [
            f"output_dir={tmp_path}",
            "teacher.path=tiny-llama",
            f"synthesise.seeds={seeds}",
            "synthesise.attempts=6",
            "synthesise.verify=lab",
            "synthesise.dedup_threshold=0.5",
        ],
    )
    summary = synth.synthesise(config)
    assert summary["kept"] == 2 and summary["attempts"] == 6
    assert summary["dropped"] == {
        "near_duplicate": 1,
        "wrong_answer": 1,
        "copies_seed": 1,
        "format": 1,
    }
    kept = load_examples(str(tmp_path / "synthesise" / "synthetic.jsonl"))
    assert [e.response.splitlines()[-1] for e in kept] == ["#### 7", "#### 6"]
    assert (tmp_path / "synthesise" / "synthesise.md").read_text().count("| ") >= 4


def test_synthesise_with_nothing_kept_is_an_error_naming_the_drops(tmp_path: Path) -> None:
    config = load_config(
        None,
        [
            f"output_dir={tmp_path}",
            "teacher.path=tiny-llama",
            "synthesise.attempts=3",
            "synthesise.max_new_tokens=8",
            "synthesise.seeds=lab:train:4:0",
        ],
    )
    with pytest.raises(RuntimeError, match="none of 3 attempts passed"):
        synth.synthesise(config)


def test_attempts_are_kept_and_not_generated_again(tmp_path: Path, monkeypatch: Any) -> None:
    config = load_config(
        None,
        [
            f"output_dir={tmp_path}",
            "teacher.path=tiny-llama",
            "synthesise.attempts=4",
            "synthesise.max_new_tokens=8",
            "synthesise.seeds=lab:train:4:0",
        ],
    )
    # Accept whatever the random tiny teacher writes, as distinct examples.
    monkeypatch.setattr(synth, "check", lambda text, verify: (None, (f"q {text}", "#### 1")))
    first = synth.synthesise(config)
    assert first["generation"]["generated"] == 4
    again = synth.synthesise(config)
    assert again["generation"]["generated"] == 0  # read back from attempts.jsonl
    assert again["data_hash"] == first["data_hash"]


def test_text_after_the_answer_line_is_not_kept() -> None:
    reason, parts = synth.check(GOOD + "\nProblem: and another one", "lab")
    assert reason is None and parts is not None and parts[1].endswith("#### 7")
