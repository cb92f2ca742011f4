"""Teacher generation: batched, resumable, never redoing or losing a finished row."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import tiny_run_config

from lmdistill.config import GenerateConfig
from lmdistill.data import load_examples
from lmdistill.teachers import generate_responses, read_finished
from lmdistill.teachers.generate import check_manifest


def test_interrupted_generation_resumes_without_redoing_rows(
    tmp_path: Path, tiny_teacher: Any, tiny_tokenizer: Any
) -> None:
    prompts = load_examples("builtin:gsm8k-demo")[:20]
    path = tmp_path / "out.jsonl"
    config = GenerateConfig(max_new_tokens=6, batch_size=8)
    answered, report = generate_responses(
        tiny_teacher, tiny_tokenizer, prompts, path, config, teacher_id="t"
    )
    assert report.generated == 20 and [a.id for a in answered] == [p.id for p in prompts]
    assert (
        report.hit_length_limit
        + sum(json.loads(line)["finish_reason"] == "stop" for line in path.read_text().splitlines())
        == 20
    )

    # A kill mid-write: 7 whole rows survive, the 8th is torn.
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:7]) + lines[7][:15])
    kept = {json.loads(line)["id"]: json.loads(line) for line in lines[:7]}
    answered, report = generate_responses(
        tiny_teacher, tiny_tokenizer, prompts, path, config, teacher_id="t"
    )
    assert report.generated == 13
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == sorted(p.id for p in prompts)  # each exactly once
    assert all(read_finished(path)[i] == row for i, row in kept.items())  # finished rows kept
    assert [a.response for a in answered if a.id in kept] == [
        kept[p.id]["response"] for p in prompts if p.id in kept
    ]

    # Everything done: a third call generates nothing.
    _, report = generate_responses(
        tiny_teacher, tiny_tokenizer, prompts, path, config, teacher_id="t"
    )
    assert report.generated == 0


def test_a_damaged_line_is_skipped_and_the_rows_after_it_are_kept(
    tmp_path: Path, tiny_teacher: Any, tiny_tokenizer: Any
) -> None:
    prompts = load_examples("builtin:gsm8k-demo")[:20]
    path = tmp_path / "out.jsonl"
    config = GenerateConfig(max_new_tokens=6, batch_size=8)
    generate_responses(tiny_teacher, tiny_tokenizer, prompts, path, config, teacher_id="t")
    lines = path.read_text().splitlines(keepends=True)
    redo = {json.loads(lines[4])["id"], json.loads(lines[-1])["id"]}
    # Line 5 damaged in place (a whole line, newline and all), and the last one torn by a kill.
    lines[4] = lines[4][:15] + "\n"
    path.write_text("".join(lines[:-1]) + lines[-1][:15])
    intact = {json.loads(line)["id"]: json.loads(line) for line in lines[:4] + lines[5:-1]}

    with pytest.warns(UserWarning, match=r"out.jsonl: 1 damaged line \(line 5\) skipped"):
        answered, report = generate_responses(
            tiny_teacher, tiny_tokenizer, prompts, path, config, teacher_id="t"
        )
    assert report.generated == 2  # only the damaged and the torn rows, not all 16 after line 5
    assert [a.id for a in answered] == [p.id for p in prompts]
    on_disk = path.read_text().splitlines(keepends=True)
    assert on_disk[:-2] == lines[:-1]  # appended only: every intact row, and line 5, in place
    appended = [json.loads(line)["id"] for line in on_disk[-2:]]
    assert sorted(appended) == sorted(redo)  # one new row per missing prompt, no duplicates
    with pytest.warns(UserWarning, match=r"\(line 5\)"):
        rows = read_finished(path)
    assert sorted(rows) == sorted(p.id for p in prompts)
    assert all(rows[i] == row for i, row in intact.items())

    # Everything done: a further call generates nothing (and still names the damaged line).
    with pytest.warns(UserWarning, match="1 damaged line"):
        _, report = generate_responses(
            tiny_teacher, tiny_tokenizer, prompts, path, config, teacher_id="t"
        )
    assert report.generated == 0


def test_responses_cut_at_max_new_tokens_are_marked_incomplete(
    tmp_path: Path, tiny_teacher: Any, tiny_tokenizer: Any
) -> None:
    prompts = load_examples("builtin:gsm8k-demo")[:4]
    answered, report = generate_responses(
        tiny_teacher,
        tiny_tokenizer,
        prompts,
        tmp_path / "o.jsonl",
        GenerateConfig(max_new_tokens=3),
        teacher_id="t",
    )
    cut = [a for a in answered if not a.response_complete]
    assert len(cut) == report.hit_length_limit > 0


def test_generation_with_another_config_is_refused(tmp_path: Path) -> None:
    manifest = {"teacher": "a", "generate": {"max_new_tokens": 8}}
    path = tmp_path / "manifest.json"
    check_manifest(path, manifest)
    check_manifest(path, manifest)  # the same again is fine
    with pytest.raises(ValueError, match="generated with a different generate, teacher"):
        check_manifest(path, {**manifest, "teacher": "b", "generate": {"max_new_tokens": 9}})


def test_run_rejects_a_changed_generation_config(tmp_path: Path) -> None:
    from lmdistill.pipeline import run

    run(tiny_run_config(tmp_path, "baseline=false", "train.max_steps=1"))
    changed = tiny_run_config(
        tmp_path, "baseline=false", "generate.max_new_tokens=7", "train.max_steps=1"
    )
    with pytest.raises(ValueError, match="generated with a different generate"):
        run(changed, resume=True)


def test_a_row_written_for_another_prompt_is_refused(
    tmp_path: Path, tiny_teacher: Any, tiny_tokenizer: Any
) -> None:
    prompts = load_examples("builtin:gsm8k-demo")[:2]
    path = tmp_path / "o.jsonl"
    config = GenerateConfig(max_new_tokens=2)
    generate_responses(tiny_teacher, tiny_tokenizer, prompts, path, config, teacher_id="t")
    edited = [dataclasses.replace(prompts[0], messages=({"role": "user", "content": "new"},))]
    with pytest.raises(ValueError, match="was generated for a different prompt"):
        generate_responses(tiny_teacher, tiny_tokenizer, edited, path, config, teacher_id="t")
    with pytest.raises(ValueError, match="generated with a different teacher"):
        generate_responses(tiny_teacher, tiny_tokenizer, prompts, path, config, teacher_id="u")


def test_filters_may_change_but_new_weights_at_the_same_path_may_not(
    tmp_path: Path, tiny_teacher: Any, tiny_tokenizer: Any
) -> None:
    prompts = load_examples("builtin:gsm8k-demo")[:3]
    path = tmp_path / "out.jsonl"
    config = GenerateConfig(max_new_tokens=4, batch_size=3)
    generate_responses(tiny_teacher, tiny_tokenizer, prompts, path, config, teacher_id="t")
    # Filters only pick among finished rows: nothing is regenerated.
    filtered = dataclasses.replace(config, keep="gold", min_chars=2, require_answer=True)
    _, report = generate_responses(
        tiny_teacher, tiny_tokenizer, prompts, path, filtered, teacher_id="t"
    )
    assert report.generated == 0
    # The same path retrained: the old rows are not silently reused.
    import torch

    with torch.no_grad():
        next(tiny_teacher.parameters()).add_(0.01)
    with pytest.raises(ValueError, match="different weights"):
        generate_responses(tiny_teacher, tiny_tokenizer, prompts, path, config, teacher_id="t")
