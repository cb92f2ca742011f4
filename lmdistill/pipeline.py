"""`lmdistill run`: load -> (generate) -> evaluate -> distil -> (CE baseline) -> evaluate -> report.

Every stage writes its artifact under `output_dir`; a killed run started again with `--resume`
continues from the last checkpoint and keeps every generated row.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import resource
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from transformers import PreTrainedModel

from lmdistill import __version__
from lmdistill.config import ConfigError, ModelConfig, RunConfig, config_hash, save_config, to_dict
from lmdistill.data import Example, data_hash, load_examples, tokenize_examples
from lmdistill.eval import fidelity
from lmdistill.eval.choice import load_choice_questions, multiple_choice
from lmdistill.eval.task import greedy_answers, task_accuracy
from lmdistill.io import atomic_dir, atomic_write_json, directory_lock, remove_left_behind
from lmdistill.kd.checkpoint import list_checkpoints
from lmdistill.kd.rationale import apply_objective, eval_prompts
from lmdistill.kd.train import TrainResult, train_student
from lmdistill.models import (
    build_student,
    check_model_path,
    describe,
    resolve_device,
    shared_vocab_size,
    weights_fingerprint,
)
from lmdistill.models.generate import greedy_responses
from lmdistill.report import write_report
from lmdistill.teachers.consistency import with_rationale_prompt
from lmdistill.teachers.setup import (
    TEACHERS,
    cache_dir,
    generation_path,
    load_splits,
    open_teacher,
)


class OutputExistsError(RuntimeError):
    """The output directory holds a previous run's checkpoints and --resume was not given."""


def run(config: RunConfig, *, resume: bool = False) -> dict[str, Any]:
    """Run the configured pipeline; return (and write) the metrics.

    Inputs are checked before anything is written; then the run holds its output directory
    (and a teacher cache it may write) for itself: a second run into it stops at once."""
    started = time.perf_counter()
    # Initialised once, as the trainer's Accelerator will be (gloo on CPU).
    device = resolve_device(config.train.device)
    state = PartialState(
        cpu=device.type == "cpu",
        timeout=timedelta(minutes=config.train.process_group_timeout_minutes),
    )
    out = Path(config.output_dir)
    check_inputs(config)
    with contextlib.ExitStack() as held:
        # Under torchrun the main process holds the locks for the run; if it cannot, it
        # stops, and torchrun stops the others. What is in the directory is read only once
        # it is held, so a second run is told the directory is in use, not what it holds.
        if state.is_main_process:
            for directory in written_directories(config):
                held.enter_context(directory_lock(directory, "runs"))
        if not resume and list_checkpoints(out / "checkpoints"):
            raise OutputExistsError(
                f"{out} already holds checkpoints from an earlier run; pass --resume to "
                "continue it, or choose another output_dir"
            )
        if state.is_main_process:
            for directory in written_directories(config):
                for left in remove_left_behind(directory):
                    print(f"removed {left} (left by a killed write)", file=sys.stderr)
            save_config(config, out / "config.yaml")
        state.wait_for_everyone()
        return _run(config, resume=resume, started=started, device=device)


def written_directories(config: RunConfig) -> list[Path]:
    """The directories a run writes into and holds for itself: its output directory, the
    teacher's responses when it generates, the teacher cache when its signal is cached
    (`cache`, `served`). Each has its own lock, so that `lmdistill generate` or `lmdistill
    cache` into the same place is refused too."""
    return [Path(config.output_dir), *teacher_directories(config)]


def teacher_directories(config: RunConfig) -> list[Path]:
    """What opening the teacher may write: its responses (`generate.enabled`) and, when its
    signal is cached, the cache. `cache` and `eval` hold them too."""
    directories = []
    if config.generate.enabled:
        directories.append(generation_path(config).parent)
    if TEACHERS[config.teacher.kind].caches_signal:
        directories.append(cache_dir(config))
    return directories


def check_inputs(config: RunConfig) -> None:
    """What can be checked before anything is written or the teacher spends minutes: the
    output directory can be one, the data files parse, the models' local paths exist."""
    out = Path(config.output_dir)
    for parent in (out, *out.parents):
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"output_dir: {out} cannot be a directory ({parent} is a file)")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ConfigError(f"output_dir: {out} is not writable ({parent} is not)")
            break
    check_model_path(config.teacher, "teacher.path")
    if config.student.init == "path" and config.student.path:
        check_model_path(ModelConfig(path=config.student.path), "student.path")
    load_splits(config)
    for source in config.eval.tasks:
        if source.startswith("mc:"):
            load_choice_questions(source.removeprefix("mc:"))
        else:
            load_examples(source, split=config.data.split, format=config.data.format)


def _run(
    config: RunConfig, *, resume: bool, started: float, device: torch.device
) -> dict[str, Any]:
    state = PartialState()
    out = Path(config.output_dir)
    chash = config_hash(config)

    setup = open_teacher(config)
    tokenizer, teacher_model = setup.tokenizer, setup.model
    assert teacher_model is not None
    torch.manual_seed(config.train.seed)  # fresh student weights are reproducible
    student, _ = build_student(config.student, teacher_model, tokenizer)
    vocab_size = shared_vocab_size(teacher_model, student, tokenizer)
    metrics: dict[str, Any] = {"lmdistill_version": __version__, "config_hash": chash}
    metrics.update(setup.report)
    train_examples, eval_examples = setup.examples["train"], setup.examples["eval"]
    # The rationale objective decides what the student trains on and how it is asked.
    train_examples = apply_objective(train_examples, config.objective)

    train_set, truncation = tokenize_examples(
        train_examples,
        tokenizer,
        config.data.max_length,
        config.data.on_truncation,
        on_empty=config.data.on_empty,
    )
    eval_set, eval_truncation = tokenize_examples(
        eval_examples,
        tokenizer,
        config.data.max_length,
        config.data.on_truncation,
        on_empty=config.data.on_empty,
    )
    metrics["data"] = {
        "source": config.data.train,
        "train_examples": len(train_set),
        "eval_examples": len(eval_set),
        "train_hash": data_hash(train_examples),
        "train_truncation": truncation.as_dict(),
        "eval_truncation": eval_truncation.as_dict(),
    }
    metrics["models"] = {
        "teacher": describe(config.teacher),
        "teacher_kind": config.teacher.kind,
        "teacher_signal": setup.signal["train"].identity,
        "teacher_parameters": count_parameters(teacher_model),
        "student_parameters": count_parameters(student),
        "student_layers": student.config.num_hidden_layers,
        "teacher_layers": teacher_model.config.num_hidden_layers,
        "vocab_size": vocab_size,
    }

    # The teacher is asked the task questions as they are; the student as its objective says.
    questions = {
        source: load_examples(source, split=config.data.split, format=config.data.format)
        for source in config.eval.tasks
        if not source.startswith("mc:")
    }
    task_sets = {s: eval_prompts(q, config.objective) for s, q in questions.items()}
    teacher_answers: dict[str, list[str]] = {}
    if questions and config.eval.enabled and config.eval.task_teacher:
        longest, batch = config.eval.task_max_new_tokens, config.eval.task_batch_size
        teacher_tasks = {}
        answers_dir = Path(config.eval.teacher_answers_dir or out / "teacher_answers")
        for source, examples in questions.items():
            # Asked as it was when it wrote the training rationales.
            asked = with_rationale_prompt(examples, config.generate.rationale_prompt)
            answers = _teacher_answers(
                teacher_model,
                tokenizer,
                asked,
                answers_dir,
                key={
                    "teacher": describe(config.teacher),
                    "source": source,
                    "max": longest,
                    "rationale_prompt": config.generate.rationale_prompt,
                },
                batch_size=batch,
            )
            teacher_answers[source] = answers
            teacher_tasks[source] = task_accuracy(
                teacher_model,
                tokenizer,
                examples,
                max_new_tokens=longest,
                batch_size=batch,
                answers=answers,
            )
        metrics["teacher"] = {"tasks": teacher_tasks}
    choice_sets = {
        source: load_choice_questions(source.removeprefix("mc:"))
        for source in config.eval.tasks
        if source.startswith("mc:")
    }

    def evaluate(model: PreTrainedModel) -> dict[str, Any]:
        """Fidelity to the teacher on held-out responses, and accuracy on each task set."""
        result: dict[str, Any] = {}
        if config.eval.fidelity:
            result = dict(
                fidelity(
                    model,
                    setup.signal["eval"],
                    eval_set,
                    vocab_size=vocab_size,
                    pad_token_id=tokenizer.pad_token_id,
                    batch_size=config.eval.batch_size,
                )
            )
        if choice_sets:
            result.setdefault("tasks", {}).update(
                {s: multiple_choice(model, tokenizer, q) for s, q in choice_sets.items()}
            )
        if task_sets:
            result.setdefault("tasks", {}).update(
                {
                    source: task_accuracy(
                        model,
                        tokenizer,
                        examples,
                        max_new_tokens=config.eval.task_max_new_tokens,
                        batch_size=config.eval.task_batch_size,
                        teacher_answers=teacher_answers.get(source),
                        samples=config.eval.task_samples,
                    )
                    for source, examples in task_sets.items()
                }
            )
        return result

    samples = eval_prompts(eval_examples[: config.eval.num_samples], config.objective)
    initial = copy.deepcopy(student) if config.baseline else None  # on the CPU until it trains
    student.to(device)  # type: ignore[arg-type]
    if config.eval.enabled and config.eval.before:
        metrics["before"] = evaluate(student)
    if TEACHERS[config.teacher.kind].in_process:
        texts = {"teacher": sample(teacher_model, tokenizer, samples, config)}
    else:  # the teacher's own (served or cached) responses
        texts = {"teacher": [ex.response or "" for ex in samples]}
    texts["student before"] = sample(student, tokenizer, samples, config)
    setup.release_model()  # served / cache: training holds no teacher weights
    del teacher_model

    common = dict(
        train=config.train,
        vocab_size=vocab_size,
        pad_token_id=tokenizer.pad_token_id,
        config_hash=chash,
        resume=resume,
    )
    kd = train_student(
        student,
        setup.signal["train"],
        train_set,
        loss=config.loss,
        checkpoint_dir=out / "checkpoints",
        desc="distil",
        **common,
    )
    metrics["kd"] = summarise(kd, evaluate(student) if config.eval.enabled else None)
    texts["KD student"] = sample(student, tokenizer, samples, config)
    save_student(student, tokenizer, out / "student")

    if initial is not None:
        ce_only = dataclasses.replace(
            config.loss, alpha=1.0, hidden_weight=0.0, attention_weight=0.0
        )
        base = train_student(
            initial,
            None,
            train_set,
            loss=ce_only,
            checkpoint_dir=out / "baseline" / "checkpoints",
            desc="CE baseline",
            **common,
        )
        metrics["baseline"] = summarise(base, evaluate(initial) if config.eval.enabled else None)
        texts["CE-only student"] = sample(initial, tokenizer, samples, config)
        save_student(initial, tokenizer, out / "baseline" / "student")

    metrics["samples"] = [
        {"prompt": ex.messages[-1]["content"], **{k: v[i] for k, v in texts.items()}}
        for i, ex in enumerate(samples)
    ]
    metrics["wall_seconds"] = time.perf_counter() - started
    metrics["peak_rss_mb"] = peak_rss_mb()
    if device.type == "cuda":
        metrics["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if state.is_main_process:
        atomic_write_json(out / "metrics.json", metrics)
        write_report(out, metrics, to_dict(config))
    state.wait_for_everyone()
    return metrics


def _teacher_answers(
    model: PreTrainedModel,
    tokenizer: Any,
    examples: list[Example],
    directory: Path,
    *,
    key: dict[str, Any],
    batch_size: int,
) -> list[str]:
    """The teacher's greedy answers to a task set, stored under `directory` so that the runs
    of a sweep (which share `eval.teacher_answers_dir`) ask the teacher once. The file is
    named by the teacher, its weights, the task set and the answer length: a retrained
    teacher is asked again."""
    import hashlib
    import json

    weights = weights_fingerprint(model)
    identity = json.dumps({**key, "weights": weights, "questions": [e.id for e in examples]})
    path = directory / f"{hashlib.sha256(identity.encode()).hexdigest()[:16]}.json"
    if path.is_file():
        stored = json.loads(path.read_text())
        if len(stored["answers"]) == len(examples):
            return list(stored["answers"])
    answers = greedy_answers(model, tokenizer, examples, key["max"], batch_size)
    if PartialState().is_main_process:
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {**key, "answers": answers})
    return answers


def summarise(result: TrainResult, after: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "after": after,
        "steps": result.state.step,
        "tokens": result.state.tokens,
        "train_seconds": result.seconds,
        "tokens_per_s": result.tokens_per_second,
        "resumed_from": result.resumed_from,
        "history": result.state.history,
    }


def sample(
    model: PreTrainedModel, tokenizer: Any, examples: list[Example], config: RunConfig
) -> list[str]:
    return greedy_responses(model, tokenizer, examples, config.eval.sample_max_new_tokens)


def save_student(model: PreTrainedModel, tokenizer: Any, path: Path) -> None:
    """Hugging Face format (loads with AutoModelForCausalLM.from_pretrained), atomically."""
    if not PartialState().is_main_process:
        return
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024
