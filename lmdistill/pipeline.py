"""`lmdistill run`: load -> (generate) -> evaluate -> distil -> (CE baseline) -> evaluate -> report.

Every stage writes its artifact under `output_dir`; a killed run started again with `--resume`
continues from the last checkpoint and keeps every generated row.
"""

from __future__ import annotations

import copy
import dataclasses
import random
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from transformers import PreTrainedModel

from lmdistill import __version__
from lmdistill.config import RunConfig, config_hash, save_config, to_dict
from lmdistill.data import Example, data_hash, load_examples, tokenize_examples
from lmdistill.eval import fidelity
from lmdistill.io import atomic_dir, atomic_write_json
from lmdistill.kd.checkpoint import list_checkpoints
from lmdistill.kd.train import TrainResult, train_student, use_cpu
from lmdistill.models import build_student, describe, load_model, shared_vocab_size
from lmdistill.report import write_report
from lmdistill.teachers import generate_responses, greedy_responses


class OutputExistsError(RuntimeError):
    """The output directory holds a previous run's checkpoints and --resume was not given."""


def run(config: RunConfig, *, resume: bool = False) -> dict[str, Any]:
    """Run the configured pipeline; return (and write) the metrics."""
    started = time.perf_counter()
    # Initialised once, as the trainer's Accelerator will be (gloo on CPU).
    state = PartialState(cpu=use_cpu(config.train.device))
    out = Path(config.output_dir)
    if not resume and list_checkpoints(out / "checkpoints"):
        raise OutputExistsError(
            f"{out} already holds checkpoints from an earlier run; pass --resume to continue "
            "it, or choose another output_dir"
        )
    if state.is_main_process:
        save_config(config, out / "config.yaml")
    chash = config_hash(config)

    teacher, tokenizer = load_model(config.teacher)
    torch.manual_seed(config.train.seed)  # fresh student weights are reproducible
    student, _ = build_student(config.student, teacher, tokenizer)
    vocab_size = shared_vocab_size(teacher, student, tokenizer)
    metrics: dict[str, Any] = {"lmdistill_version": __version__, "config_hash": chash}
    train_examples, eval_examples, generation = prepare_examples(config, teacher, tokenizer)
    if generation is not None:
        metrics["generate"] = generation

    train_set, truncation = tokenize_examples(
        train_examples, tokenizer, config.data.max_length, config.data.on_truncation
    )
    eval_set, eval_truncation = tokenize_examples(
        eval_examples, tokenizer, config.data.max_length, config.data.on_truncation
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
        "teacher_parameters": count_parameters(teacher),
        "student_parameters": count_parameters(student),
        "student_layers": student.config.num_hidden_layers,
        "teacher_layers": teacher.config.num_hidden_layers,
        "vocab_size": vocab_size,
    }

    def evaluate(model: PreTrainedModel) -> dict[str, float]:
        return fidelity(
            model,
            teacher,
            eval_set,
            vocab_size=vocab_size,
            pad_token_id=tokenizer.pad_token_id,
            batch_size=config.eval.batch_size,
        )

    samples = eval_examples[: config.eval.num_samples]
    initial = copy.deepcopy(student) if config.baseline else None
    if config.eval.enabled:
        metrics["before"] = evaluate(student)
    texts = {"teacher": sample(teacher, tokenizer, samples, config)}
    texts["student before"] = sample(student, tokenizer, samples, config)

    common = dict(
        train=config.train,
        vocab_size=vocab_size,
        pad_token_id=tokenizer.pad_token_id,
        config_hash=chash,
        resume=resume,
    )
    kd = train_student(
        student,
        teacher,
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
    if state.is_main_process:
        atomic_write_json(out / "metrics.json", metrics)
        write_report(out, metrics, to_dict(config))
    state.wait_for_everyone()
    return metrics


def prepare_examples(
    config: RunConfig, teacher: PreTrainedModel, tokenizer: Any
) -> tuple[list[Example], list[Example], dict[str, Any] | None]:
    """Train and held-out examples, with teacher-written responses when `generate.enabled`
    (generated once into output_dir, then read back by later stages such as `eval`)."""
    train_examples, eval_examples = load_splits(config)
    if not config.generate.enabled:
        return train_examples, eval_examples, None
    return teacher_writes(
        config, teacher, tokenizer, train_examples, eval_examples, Path(config.output_dir)
    )


def load_splits(config: RunConfig) -> tuple[list[Example], list[Example]]:
    """Train and held-out examples; without `data.eval`, hold out `eval_size` at random."""
    data = config.data
    examples = load_examples(data.train, split=data.split, format=data.format)
    if data.eval is not None:
        held_out = load_examples(data.eval, split=data.split, format=data.format)
    else:
        if len(examples) <= data.eval_size:
            raise ValueError(
                f"data.eval_size={data.eval_size} leaves no training data out of "
                f"{len(examples)} examples"
            )
        order = list(range(len(examples)))
        random.Random(config.train.seed).shuffle(order)
        held_out = [examples[i] for i in order[: data.eval_size]]
        examples = [examples[i] for i in sorted(order[data.eval_size :])]
    if data.max_train_examples is not None:
        examples = examples[: data.max_train_examples]
    return examples, held_out


def teacher_writes(
    config: RunConfig,
    teacher: PreTrainedModel,
    tokenizer: Any,
    train_examples: list[Example],
    eval_examples: list[Example],
    out: Path,
) -> tuple[list[Example], list[Example], dict[str, Any]]:
    """Replace every response with the teacher's own (sequence-level KD)."""
    state = PartialState()
    path = out / "generate" / "teacher_responses.jsonl"
    prompts = train_examples + eval_examples
    teacher_id = describe(config.teacher)
    report: dict[str, Any] = {}
    if state.is_main_process:
        _, gen = generate_responses(
            teacher, tokenizer, prompts, path, config.generate, teacher_id=teacher_id
        )
        report = gen.as_dict()
    state.wait_for_everyone()
    # Every process reads the finished file, so all of them train on the same responses.
    answered, _ = generate_responses(
        teacher, tokenizer, prompts, path, config.generate, teacher_id=teacher_id, desc="read"
    )
    n = len(train_examples)
    return answered[:n], answered[n:], report


def summarise(result: TrainResult, after: dict[str, float] | None) -> dict[str, Any]:
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
