"""The reasoning lab's generator: deterministic, exactly right, and as hard as its knobs say."""

from __future__ import annotations

import dataclasses

import pytest

from lmdistill.data.gsm8k import calculator_annotations, final_answer, split_rationale
from lmdistill.data.lab import LabSpec, lab_examples, lab_problems


def test_splits_are_deterministic_and_seeded() -> None:
    spec = LabSpec(distractors=1)
    first = lab_problems("train", 50, seed=3, spec=spec)
    assert first == lab_problems("train", 50, seed=3, spec=spec)
    assert first != lab_problems("train", 50, seed=4, spec=spec)
    assert first[:20] == lab_problems("train", 20, seed=3, spec=spec)  # a prefix is stable


@pytest.mark.parametrize(
    "spec",
    [
        LabSpec(),
        LabSpec(steps=4, operations=("add", "subtract", "multiply", "divide"), distractors=2),
        LabSpec(steps=1, operations=("multiply",), factor_max=5, value_max=999),
    ],
)
def test_every_rationale_step_and_answer_is_exactly_right(spec: LabSpec) -> None:
    for split in ("train", "test", "ood"):
        for problem in lab_problems(split, 200, seed=0, spec=spec):
            found = calculator_annotations(problem.solution)
            assert len(found) == len(problem.steps)
            assert all(a.is_correct() for a in found), problem.solution
            # Each step starts from the previous step's result, and the last one is the answer.
            results = [int(a.claimed) for a in found]
            for step, previous in zip(found[1:], results, strict=False):
                assert step.expression.startswith(f"{previous}")
            assert results[-1] == problem.answer
            assert final_answer(problem.solution) == str(problem.answer)
            assert split_rationale(problem.solution).answer == str(problem.answer)
            assert 0 <= problem.answer <= spec.value_max


def test_test_questions_never_repeat_training_ones_and_ood_is_longer() -> None:
    spec = LabSpec()
    train = {p.question for p in lab_problems("train", 2000, seed=0, spec=spec)}
    test = lab_problems("test", 100, seed=0, spec=spec)
    assert not train & {p.question for p in test}
    ood = lab_problems("ood", 100, seed=0, spec=spec)
    assert {len(p.steps) for p in test} == {spec.steps}
    assert {len(p.steps) for p in ood} == {spec.steps + spec.ood_extra_steps}


def test_distractors_add_numbers_that_play_no_part() -> None:
    plain = lab_problems("train", 50, seed=1, spec=LabSpec(distractors=0))
    noisy = lab_problems("train", 50, seed=1, spec=LabSpec(distractors=2))
    assert all(p.question.count(".") == 1 + 2 for p in plain)  # opening + 2 steps
    assert all(p.question.count(".") == 1 + 2 + 2 for p in noisy)
    assert [p.steps for p in plain] != [p.steps for p in noisy] or plain != noisy


def test_examples_carry_the_question_and_the_gsm8k_format_solution() -> None:
    examples = lab_examples("test", 5, seed=2)
    assert [e.id for e in examples] == [f"lab-test-2-{i}" for i in range(5)]
    assert examples[0].messages[0]["content"].endswith("have now?")
    assert examples[0].response is not None and "\n#### " in examples[0].response


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"operations": ("power",)}, "choose from"),
        ({"steps": 0}, "steps >= 1"),
        ({"factor_max": 1}, "factor_max >= 2"),
    ],
)
def test_bad_specs_are_refused(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(LabSpec(), **change)
    with pytest.raises(ValueError, match="lab split 'dev'"):
        lab_problems("dev", 1, seed=0, spec=LabSpec())


def test_a_tiny_space_is_reported_not_looped_forever() -> None:
    tiny = LabSpec(steps=1, start_max=1, operand_max=1, operations=("add",), value_max=2)
    with pytest.raises(ValueError, match="could not draw 100 distinct"):
        lab_problems("train", 100, seed=0, spec=tiny)  # only 8 names x 8 items exist


def test_lab_problems_load_as_a_data_source() -> None:
    from lmdistill.data import DataError, load_examples

    examples = load_examples("lab:ood:3:5:steps=1:distractors=1")
    assert [e.id for e in examples] == ["lab-ood-5-0", "lab-ood-5-1", "lab-ood-5-2"]
    problems = lab_problems("ood", 3, seed=5, spec=LabSpec(steps=1, distractors=1))
    assert [e.response for e in examples] == [p.solution for p in problems]
    with pytest.raises(DataError, match="'color=3' is not a lab knob; choose from steps"):
        load_examples("lab:train:3:color=3")
    with pytest.raises(DataError, match="expected lab:SPLIT:N"):
        load_examples("lab:train")
    with pytest.raises(DataError, match="lab split 'dev'"):
        load_examples("lab:dev:3")


def test_mixed_lengths_in_training_and_longer_ones_out_of_distribution() -> None:
    spec = LabSpec(steps=3, min_steps=1, ood_extra_steps=2)
    train = {len(p.steps) for p in lab_problems("train", 300, seed=0, spec=spec)}
    ood = {len(p.steps) for p in lab_problems("ood", 300, seed=0, spec=spec)}
    assert train == {1, 2, 3} and ood == {4, 5}
