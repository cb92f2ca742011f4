"""lm-evaluation-harness: a local task over the items of an `mc:` file scores what lmdistill's
own multiple choice scores (the same log-likelihoods and accuracies, with the chat template
on); `eval.lm_eval_tasks` puts lm-eval's metrics for every model in metrics.json and the
report; a saved student of the GGUF teacher loads in lm-eval's `hf` model as is (slow)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from lmdistill.config import ConfigError, EvalConfig
from lmdistill.eval.choice import choice_logprobs, load_choice_questions, multiple_choice
from lmdistill.eval.harness import lm_eval_scores
from lmdistill.validate import load_config

pytest.importorskip("lm_eval")

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
ITEMS = [
    {"question": "What is 2+2?", "choices": ["4", "five", "22 apples", "The answer is 9."],
     "answer": 0},
    {"question": "Pick the colour of the sky.", "choices": ["blue", "green", "a red one"],
     "answer": 0},
    {"question": "How many legs has a cat?", "choices": ["3", "4", "five legs", "eight"],
     "answer": 1},
    {"question": "Which is a fruit?", "choices": ["a stone", "an apple", "rain"], "answer": 1},
]  # fmt: skip


def write_task(directory: Path, items: list[dict[str, Any]], name: str = "mc_items") -> Path:
    """The `mc:` rows as a JSONL file and an lm-eval task that asks them: the question as
    the text, the choices, the answer's index."""
    rows = directory / "items.jsonl"
    rows.write_text("".join(json.dumps(item) + "\n" for item in items))
    task = directory / f"{name}.yaml"
    task.write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {rows}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n"
        "  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
        "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}\n"
    )
    return task


def test_lm_eval_scores_what_multiple_choice_scores(
    tiny_teacher: Any, tiny_tokenizer: Any, tmp_path: Path
) -> None:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    task = write_task(tmp_path, ITEMS)
    questions = load_choice_questions(tmp_path / "items.jsonl")
    found = lm_eval.simple_evaluate(
        model=HFLM(pretrained=tiny_teacher, tokenizer=tiny_tokenizer, batch_size=4),
        tasks=[str(task)],
        apply_chat_template=True,
        task_manager=TaskManager(include_defaults=False),
        bootstrap_iters=0,
        log_samples=True,
    )
    assert found is not None
    samples = sorted(found["samples"]["mc_items"], key=lambda s: s["doc_id"])
    for question, sample in zip(questions, samples, strict=True):
        ours = [total for total, _ in choice_logprobs(tiny_teacher, tiny_tokenizer, question)]
        theirs = [float(resp[0]) for resp in sample["filtered_resps"]]
        # lm-eval moves the prompt's trailing whitespace (the newline after the generation
        # prompt) into every continuation: each choice carries the same extra term, the
        # log-prob of that newline, so the sums differ by one constant per question.
        offsets = [t - o for t, o in zip(theirs, ours, strict=True)]
        assert offsets == pytest.approx([offsets[0]] * len(offsets), abs=1e-4)
        assert offsets[0] < 0
    ours_metrics = multiple_choice(tiny_teacher, tiny_tokenizer, questions)
    settings = EvalConfig(lm_eval_tasks=[str(task)], lm_eval_chat_template=True, batch_size=4)
    scores = lm_eval_scores(tiny_teacher, tiny_tokenizer, settings)
    assert scores["mc_items"]["acc"] == ours_metrics.accuracy  # a constant moves no argmax
    assert 0 <= scores["mc_items"]["acc_norm"] <= 1
    assert scores["mc_items"]["documents"] == len(ITEMS)
    assert not tiny_teacher.training  # the fixture's mode is restored


def test_lm_eval_tasks_put_every_models_scores_in_metrics_and_report(tmp_path: Path) -> None:
    from lmdistill.cli import main

    task = write_task(tmp_path, ITEMS)
    out = tmp_path / "run"
    fast = ["train.max_steps=2", "train.checkpoint_every=0", "data.max_train_examples=8",
            "generate.max_new_tokens=8", "eval.num_samples=0"]  # fmt: skip
    overrides = [f"output_dir={out}", f"eval.lm_eval_tasks=[{task}]", "eval.lm_eval_limit=3"]
    assert main(["run", TINY, *fast, *overrides]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for section in (metrics["teacher"], metrics["before"], metrics["kd"]["after"],
                    metrics["baseline"]["after"]):  # fmt: skip
        row = section["lm_eval"]["mc_items"]
        assert row["documents"] == 3 and 0 <= row["acc"] <= 1 and 0 <= row["acc_norm"] <= 1
    report = (out / "report.md").read_text()
    assert "## lm-evaluation-harness" in report and "| `mc_items` | acc |" in report


def test_lm_eval_settings_are_checked_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="a task YAML file that exists"):
        load_config(TINY, [f"eval.lm_eval_tasks=[{tmp_path / 'nowhere.yaml'}]"])
    task = write_task(tmp_path, ITEMS)
    with pytest.raises(ConfigError, match=r"eval\.lm_eval_limit"):
        load_config(TINY, [f"eval.lm_eval_tasks=[{task}]", "eval.lm_eval_limit=0"])
    assert load_config(TINY, []).eval.lm_eval_tasks == []
    with pytest.raises(ConfigError, match="a task lm-eval knows"):
        load_config(TINY, ["eval.lm_eval_tasks=[no_such_task_anywhere]"])
    with pytest.raises(ConfigError, match=r"eval\.lm_eval_num_fewshot"):
        load_config(TINY, [f"eval.lm_eval_tasks=[{task}]", "eval.lm_eval_num_fewshot=-1"])
    # A task file that would import Python (lm-eval's `!function` tag, or an include) is
    # refused: nothing loaded from disk runs code.
    coded = tmp_path / "coded.yaml"
    coded.write_text(task.read_text() + "process_docs: !function utils.process_docs\n")
    included = tmp_path / "included.yaml"
    included.write_text(f"include: {task.name}\ntask: other\n")
    for bad in (coded, included):
        with pytest.raises(ConfigError, match="runs no code"):
            load_config(TINY, [f"eval.lm_eval_tasks=[{bad}]"])


def gsm8k_choices(count: int) -> list[dict[str, Any]]:
    """Four choices per GSM8K problem (the answer and three numbers near it)."""
    from lmdistill.data import load_examples

    rows = []
    for example in load_examples("builtin:gsm8k-demo")[:count]:
        answer = int(float((example.response or "").rsplit("####", 1)[-1].strip().replace(",", "")))
        order = sorted({answer, answer + 1, answer + 10, 2 * answer + 3})
        rows.append(
            {
                "question": example.messages[-1]["content"],
                "choices": [f"The answer is {n}." for n in order],
                "answer": order.index(answer),
            }
        )
    return rows


@pytest.mark.slow
def test_a_saved_student_of_the_gguf_teacher_loads_in_lm_eval_as_is(tmp_path: Path) -> None:
    """`lm_eval --model hf --model_args pretrained=student/` on a student made from the GGUF
    teacher: it loads as a plain model and scores what `mc:` scores on the same items."""
    import lm_eval
    from conftest import skip_if_registry_unreachable
    from lm_eval.tasks import TaskManager

    from lmdistill.config import ModelConfig, StudentConfig
    from lmdistill.models import RegistryError, build_student, load_model
    from lmdistill.pipeline import save_student

    try:
        teacher, tokenizer = load_model(ModelConfig(path="smollm2-135m-instruct"))
    except RegistryError as error:
        skip_if_registry_unreachable(error)
        raise
    student, _ = build_student(StudentConfig(num_layers=6), teacher, tokenizer)
    save_student(student, tokenizer, tmp_path / "student")
    task = write_task(tmp_path, gsm8k_choices(8), name="gsm8k_choices")
    found = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={tmp_path / 'student'},device=cpu,dtype=float32",
        tasks=[str(task)],
        apply_chat_template=True,
        task_manager=TaskManager(include_defaults=False),
        bootstrap_iters=0,
    )
    assert found is not None
    questions = load_choice_questions(tmp_path / "items.jsonl")
    ours = multiple_choice(student.eval(), tokenizer, questions)
    assert found["results"]["gsm8k_choices"]["acc,none"] == ours.accuracy
    with torch.no_grad():  # the teacher itself, handed over loaded, for a non-trivial accuracy
        settings = EvalConfig(lm_eval_tasks=[str(task)], lm_eval_chat_template=True)
        theirs = lm_eval_scores(teacher, tokenizer, settings)["gsm8k_choices"]["acc"]
        assert theirs == multiple_choice(teacher, tokenizer, questions).accuracy
