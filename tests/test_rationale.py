"""Rationale objectives: which tokens each one trains on, with what weight, and how the
student is prompted at evaluation (character-level tokenizer, so positions are exact)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lmdistill.config import ObjectiveConfig
from lmdistill.data import IGNORE_INDEX, Example, collate, load_examples, tokenize_examples
from lmdistill.kd.rationale import OBJECTIVES, apply_objective, eval_prompts
from lmdistill.validate import load_config

SOLUTION = "Ana has 7+5=<<7+5=12>>12 shells.\nAna has 12*3=<<12*3=36>>36 shells.\n#### 36"
EXAMPLE = Example("q1", ({"role": "user", "content": "How many shells?"},), SOLUTION, "t")


def trained_text(item: Any, tokenizer: Any) -> str:
    """The response tokens that carry a loss, decoded (the template's end-of-turn token is
    special, the newline after it is not)."""
    ids = [y for y in item.labels if y != IGNORE_INDEX]
    return tokenizer.decode(ids, skip_special_tokens=True)


def test_cot_trains_on_the_rationale_and_the_answer(tiny_tokenizer: Any) -> None:
    (item,), _ = tokenize_examples(
        apply_objective([EXAMPLE], ObjectiveConfig(kind="cot")), tiny_tokenizer, 256
    )
    assert trained_text(item, tiny_tokenizer) == SOLUTION + "\n" and item.weights is None


def test_label_only_trains_on_the_answer_line_alone(tiny_tokenizer: Any) -> None:
    (example,) = apply_objective([EXAMPLE], ObjectiveConfig(kind="label_only"))
    assert example.response == "#### 36" and example.messages == EXAMPLE.messages
    (item,), _ = tokenize_examples([example], tiny_tokenizer, 256)
    assert trained_text(item, tiny_tokenizer) == "#### 36\n"


def test_step_by_step_makes_two_prefixed_tasks_weighted_lambda(tiny_tokenizer: Any) -> None:
    config = ObjectiveConfig(kind="step_by_step", rationale_weight=0.5)
    label, rationale = apply_objective([EXAMPLE], config)
    assert label.messages[0]["content"] == "[label] How many shells?"
    assert rationale.messages[0]["content"] == "[rationale] How many shells?"
    assert label.response == "#### 36" and rationale.response == SOLUTION.rsplit("\n", 1)[0]
    items, _ = tokenize_examples([label, rationale], tiny_tokenizer, 256)
    assert items[0].weights is None
    response = [w for w, y in zip(items[1].weights or [], items[1].labels, strict=True) if y >= 0]
    assert response and set(response) == {0.5}  # every rationale token, the closing ones too
    batch = collate(items, tiny_tokenizer.pad_token_id)
    assert torch.equal(batch["weights"][0], torch.ones_like(batch["weights"][0]))
    # At evaluation the student is asked for the label, without a rationale.
    (asked,) = eval_prompts([EXAMPLE], config)
    assert asked.messages[0]["content"] == "[label] How many shells?"
    assert eval_prompts([EXAMPLE], ObjectiveConfig(kind="cot")) == [EXAMPLE]


def test_kpod_weights_the_calculations(tiny_tokenizer: Any) -> None:
    (example,) = apply_objective([EXAMPLE], ObjectiveConfig(kind="kpod", keypoint_weight=3.0))
    (item,), _ = tokenize_examples([example], tiny_tokenizer, 256)
    pairs = [(y, w) for y, w in zip(item.labels, item.weights or [], strict=True) if y >= 0]
    heavy = tiny_tokenizer.decode([y for y, w in pairs if w == 3.0])
    light = tiny_tokenizer.decode([y for y, w in pairs if w == 1.0], skip_special_tokens=True)
    assert heavy == "75<<7+5=12>>12123<<12*3=36>>3636"  # numbers and annotations
    assert light.startswith("Ana has ") and "shells." in light and "<<" not in light
    assert {w for _, w in pairs} == {1.0, 3.0}


def test_step_by_step_kpod_weights_the_rationale_tasks_calculations(tiny_tokenizer: Any) -> None:
    config = ObjectiveConfig(kind="step_by_step_kpod", rationale_weight=0.5, keypoint_weight=4.0)
    label, rationale = apply_objective([EXAMPLE], config)
    assert label.response == "#### 36" and label.weight_spans is None
    (asked,) = eval_prompts([EXAMPLE], config)
    assert asked.messages[0]["content"] == "[label] How many shells?"
    (item,), _ = tokenize_examples([rationale], tiny_tokenizer, 256)
    pairs = [(y, w) for y, w in zip(item.labels, item.weights or [], strict=True) if y >= 0]
    assert tiny_tokenizer.decode([y for y, w in pairs if w == 2.0]) == (
        "75<<7+5=12>>12123<<12*3=36>>36"
    )
    assert {w for _, w in pairs} == {0.5, 2.0}


def test_objectives_need_gsm8k_format_and_are_registered() -> None:
    assert {"cot", "label_only", "step_by_step", "kpod"} <= set(OBJECTIVES)
    bare = Example("q2", EXAMPLE.messages, "just text", "file.jsonl:3")
    with pytest.raises(ValueError, match=r"file\.jsonl:3: example 'q2' has no '#### answer'"):
        apply_objective([bare], ObjectiveConfig(kind="label_only"))
    with pytest.raises(ValueError, match=r"objective\.kind: 'magic'"):
        load_config(None, ["objective.kind=magic"])


def test_lab_examples_go_through_every_objective(tiny_tokenizer: Any) -> None:
    examples = load_examples("lab:train:8:0:steps=3")
    for kind in ("cot", "label_only", "step_by_step", "kpod"):
        made = apply_objective(examples, ObjectiveConfig(kind=kind))
        items, report = tokenize_examples(made, tiny_tokenizer, 400)
        assert report.truncated == 0 and len(items) == len(made)
        answers = [trained_text(i, tiny_tokenizer) for i in items]
        assert all(a.strip() for a in answers)


def test_weights_reach_the_loss_aligned_with_their_tokens(
    tiny_tokenizer: Any, tiny_teacher: Any
) -> None:
    from lmdistill.models.forward import run_decoder

    (example,) = apply_objective([EXAMPLE], ObjectiveConfig(kind="kpod", keypoint_weight=3.0))
    items, _ = tokenize_examples([EXAMPLE, example], tiny_tokenizer, 256)
    batch = collate(items, tiny_tokenizer.pad_token_id)
    out = run_decoder(tiny_teacher, **batch)
    assert out.weights is not None and out.weights.shape == out.targets.shape
    n = len(out.targets) // 2
    assert (out.weights[:n] == 1).all()  # the unweighted example
    expected = [w for y, w in zip(items[1].labels, items[1].weights or [], strict=True) if y >= 0]
    assert out.weights[n:].tolist() == expected


def test_the_curriculum_starts_easy_and_ends_with_everything() -> None:
    from lmdistill.config import TrainConfig
    from lmdistill.kd.train import curriculum_indices

    order = list(range(100))  # easiest first
    train = TrainConfig(max_steps=40, curriculum="easy_to_hard", curriculum_start=0.2)
    first = curriculum_indices(0, order, 16, train)
    assert len(first) == 16 and len(set(first)) == 16 and max(first) < 20
    assert max(curriculum_indices(10, order, 16, train)) < 60  # share 0.6 at half the ramp
    late = set().union(*(curriculum_indices(s, order, 16, train) for s in range(20, 40)))
    assert max(late) >= 90  # the hardest examples come in once the ramp ends
    assert curriculum_indices(7, order, 16, train) == curriculum_indices(7, order, 16, train)
    tiny_pool = curriculum_indices(0, order[:5], 12, train)  # pool smaller than the batch
    assert len(tiny_pool) == 12 and set(tiny_pool) == {0}


def test_progressive_steps_train_the_last_line_first_then_earlier_ones(
    tiny_tokenizer: Any, tmp_path: Any
) -> None:
    from conftest import tiny_run_config

    from lmdistill.config import ConfigError, TrainConfig
    from lmdistill.kd.train import gate_steps, visible_steps
    from lmdistill.validate import validate

    (example,) = apply_objective([EXAMPLE], ObjectiveConfig(kind="kpod", keypoint_weight=3.0))
    (item,), _ = tokenize_examples([example], tiny_tokenizer, 256)
    by_rank: dict[int, list[int]] = {}
    for y, r in zip(item.labels, item.ranks or [], strict=True):
        if y >= 0:
            by_rank.setdefault(r, []).append(y)
    lines = SOLUTION.split("\n")
    # Each line (with its newline) has its rank from the end; the answer line and the
    # template's closing tokens rank 0.
    assert tiny_tokenizer.decode(by_rank[2]) == lines[0] + "\n"
    assert tiny_tokenizer.decode(by_rank[1]) == lines[1] + "\n"
    assert tiny_tokenizer.decode(by_rank[0], skip_special_tokens=True) == lines[2] + "\n"

    train = TrainConfig(max_steps=40, curriculum="progressive_steps", curriculum_steps=20)
    assert [visible_steps(s, 2, train) for s in (0, 9, 10, 19, 20, 39)] == [0, 0, 1, 1, 2, 2]
    batch = collate([item], tiny_tokenizer.pad_token_id, ranks=True)
    assert "ranks" not in collate([item], tiny_tokenizer.pad_token_id)  # only when asked
    gated = gate_steps(batch, 0)
    assert "ranks" not in gated  # the model never sees them
    response = batch["labels"][0] >= 0
    kept = gated["weights"][0][response]
    expected = [
        w if r == 0 else 0.0
        for w, r, y in zip(item.weights or [], item.ranks or [], item.labels, strict=True)
        if y >= 0
    ]
    assert kept.tolist() == expected and 0 < sum(w > 0 for w in expected) < len(expected)
    assert torch.equal(gate_steps(batch, 2)["weights"], batch["weights"])  # all lines

    with pytest.raises(ConfigError, match=r"train\.curriculum"):
        validate(tiny_run_config(tmp_path, "train.curriculum=progressive_steps"))


def test_a_progressive_kpod_run_trains_end_to_end(tmp_path: Any) -> None:
    from conftest import tiny_run_config

    from lmdistill.pipeline import run

    config = tiny_run_config(
        tmp_path,
        "data.train=lab:train:24",
        "data.eval=lab:test:4",
        "objective.kind=step_by_step_kpod",
        "train.curriculum=progressive_steps",
        "train.curriculum_steps=2",
        "train.max_steps=4",
        "baseline=false",
        "generate.enabled=false",
        "eval.fidelity=false",
    )
    metrics = run(config)
    assert metrics.kd.steps == 4
    losses = [h["loss"] for h in metrics.kd.history]
    assert all(loss == loss and loss > 0 for loss in losses)  # finite, not NaN


def test_step_ranks_skip_blank_lines_and_answers_come_from_the_first_mark() -> None:
    from lmdistill.kd.rationale import split_answer, step_spans

    # "A", blank, "B", trailing newline: the blank joins B (rank 0), A is one step earlier.
    assert step_spans("A\n\nB\n") == ((0, 1), (2, 0), (3, 0), (5, 0))
    assert step_spans("x\ny\n#### 3") == ((0, 2), (2, 1), (4, 0))
    twice = Example("q", EXAMPLE.messages, "step\n#### 5\nmore\n#### 6")
    assert split_answer(twice) == ("step", "#### 5")  # as final_answer reads it
    (label,) = apply_objective([twice], ObjectiveConfig(kind="label_only"))
    assert label.response == "#### 5"
