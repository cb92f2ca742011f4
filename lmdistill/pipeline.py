"""`lmdistill run`: load -> (generate) -> evaluate -> distil -> (CE baseline) -> evaluate -> report.

Every stage writes its artifact under `output_dir`; a killed run started again with `--resume`
continues from the last checkpoint and keeps every generated row.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import resource
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from transformers import PreTrainedModel

from lmdistill import __version__
from lmdistill.config import (
    ConfigError,
    LossConfig,
    ModelConfig,
    RunConfig,
    StudentConfig,
    config_hash,
    save_config,
    to_dict,
)
from lmdistill.data import (
    Example,
    TokenizedExample,
    TruncationReport,
    collate,
    data_hash,
    load_examples,
    tokenize_examples,
)
from lmdistill.data.memory import open_memory
from lmdistill.eval.choice import load_choice_questions
from lmdistill.eval.evaluator import Evaluator
from lmdistill.incremental import build_memory, continuation, lineage
from lmdistill.io import (
    atomic_dir,
    atomic_write_json,
    atomic_write_text,
    directory_lock,
    remove_left_behind,
)
from lmdistill.kd.checkpoint import list_checkpoints
from lmdistill.kd.incremental import Anchor
from lmdistill.kd.on_policy import OnPolicy
from lmdistill.kd.rationale import apply_objective, eval_prompts
from lmdistill.kd.tracking import open_tracking
from lmdistill.kd.train import (
    TrainResult,
    check_launch_plugins,
    check_precision,
    train_student,
)
from lmdistill.metrics import ArmMetrics, EvalMetrics, RunMetrics
from lmdistill.models import (
    build_student,
    check_model_path,
    describe,
    resolve_device,
    shared_vocab_size,
)
from lmdistill.models.generate import greedy_responses, stop_token_ids
from lmdistill.models.lora import add_adapters, save_adapted
from lmdistill.report import write_report
from lmdistill.teachers.backends import TeacherSetup
from lmdistill.teachers.base import Teacher
from lmdistill.teachers.ensemble import EnsembleTeacher, conflict_report, example_rows
from lmdistill.teachers.ensemble_setup import (
    answers_dir,
    cache_directories,
    needs_answers,
    open_teachers,
)
from lmdistill.teachers.setup import TEACHERS, load_splits
from lmdistill.teachers.signal_caches import cache_dir, generation_path


class OutputExistsError(RuntimeError):
    """The output directory holds a previous run's checkpoints and --resume was not given."""


def run(config: RunConfig, *, resume: bool = False) -> RunMetrics:
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
    check_precision(config.train.precision, device)
    check_launch_plugins(config.train.sharding)
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
    if config.teachers:
        directories += cache_directories(config)
        if needs_answers(config):
            directories.append(answers_dir(config))
    elif TEACHERS[config.teacher.kind].caches_signal:
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
    if TEACHERS[config.teacher.kind].scores_text or TEACHERS[config.teacher.kind].caches_signal:
        check_model_path(config.teacher, "teacher.path")  # a text-only teacher has none
    if config.student.init == "path" and config.student.path:
        check_model_path(ModelConfig(path=config.student.path), "student.path")
    if config.incremental.memory is not None:  # it belongs to student.path, or is refused
        open_memory(config.incremental.memory, str(config.student.path))
    load_splits(config)
    for source in config.eval.tasks:
        if source.startswith("mc:"):
            load_choice_questions(source.removeprefix("mc:"))
        else:
            load_examples(source, split=config.data.split, format=config.data.format)


def _run(config: RunConfig, *, resume: bool, started: float, device: torch.device) -> RunMetrics:
    """The stages of a run, in order: teacher signal, student, data, evaluation set-up,
    evaluation before training, the KD student, the CE-only baseline, the report."""
    out = Path(config.output_dir)
    chash = config_hash(config)
    setup = open_teachers(config)
    teacher_model = setup.model  # None: a text-only teacher
    data = prepare_data(config, setup)
    calibration = None
    if config.student.init == "layers_by_importance":  # the first training examples
        chosen = data.train_set[: config.student.calibration_examples]
        calibration = collate(chosen, setup.tokenizer.pad_token_id)
    torch.manual_seed(config.train.seed)  # fresh student weights are reproducible
    student, _ = build_student(config.student, teacher_model, setup.tokenizer, calibration)
    vocab_size = shared_vocab_size(teacher_model, student, setup.tokenizer)
    retention, anchor = continuation(config, student, setup.tokenizer)
    continued = lineage(config, setup.examples["train"])  # before the student changes
    ensemble = setup.signal.get("train")
    if isinstance(ensemble, EnsembleTeacher):
        ensemble.bind(data.train_set)
    models = describe_models(config, setup, student, vocab_size)  # while the teacher is loaded
    # LoRA: the training code sees the student with its adapters injected; the PeftModel
    # around it saves the merged student and the adapter (lmdistill/models/lora.py).
    adapted = add_adapters(student, config.student) if config.student.lora.r > 0 else None
    if adapted is not None:
        trained = (p.numel() for p in student.parameters() if p.requires_grad)
        models["student_trainable_parameters"] = sum(trained)
    evaluate = Evaluator.build(config, setup, data.eval_set, vocab_size)

    samples = eval_prompts(data.eval_examples[: config.eval.num_samples], config.objective)
    # On the CPU until it trains; with LoRA, its own adapters (the same start).
    initial_adapted = copy.deepcopy(adapted) if config.baseline and adapted is not None else None
    if initial_adapted is not None:
        initial = initial_adapted.get_base_model()
    else:
        initial = copy.deepcopy(student) if config.baseline else None
    student.to(device)  # type: ignore[arg-type]
    before = evaluate(student) if config.eval.enabled and config.eval.before else None
    if TEACHERS[config.teacher.kind].in_process and teacher_model is not None:
        texts = {"teacher": sample(teacher_model, setup.tokenizer, samples, config)}
    else:  # the teacher's own (served or cached) responses
        texts = {"teacher": [ex.response or "" for ex in samples]}
    texts["student before"] = sample(student, setup.tokenizer, samples, config)
    setup.release_model()  # served / cache: training holds no teacher weights
    del teacher_model

    arms = Arms(
        config, setup.tokenizer, data.train_set, vocab_size, chash, resume, evaluate, setup.scorer
    )
    metrics = RunMetrics(
        lmdistill_version=__version__,
        config_hash=chash,
        setup=setup.report,
        data=data.summary(config),
        models=models,
        teacher=evaluate.teacher,
        before=before,
        kd=arms.train_and_evaluate(
            student,
            setup.signal.get("train"),  # None: a text-only teacher (CE on its text)
            config.loss,
            out,
            "distil",
            "KD student",
            samples,
            texts,
            retention=retention,
            anchor=anchor,
            adapted=adapted,
        ),
    )
    del retention
    if continued is not None:
        metrics.setup["lineage"] = continued
    state = PartialState()
    if state.is_main_process:  # what runs that continue this student will need
        memory = build_memory(
            config, out / "student", student, setup.tokenizer, setup.examples["train"]
        )
        if memory is not None:
            metrics.setup["memory"] = memory
    state.wait_for_everyone()
    if isinstance(ensemble, EnsembleTeacher):
        conflicts = record_conflicts(config, ensemble)
        # A resumed run scored only the examples after its checkpoint: say so.
        conflicts["scored_since_step"] = metrics.kd.resumed_from
        metrics.setup["ensemble"]["conflicts"] = conflicts
    if initial is not None:
        ce_only = dataclasses.replace(
            config.loss, alpha=1.0, hidden_weight=0.0, attention_weight=0.0
        )
        metrics.baseline = arms.train_and_evaluate(
            initial,
            None,
            ce_only,
            out / "baseline",
            "CE baseline",
            "CE-only student",
            samples,
            texts,
            tracked_as="baseline",
            adapted=initial_adapted,
        )
    finish(config, metrics, samples, texts, started=started, device=device)
    return metrics


def record_conflicts(config: RunConfig, ensemble: EnsembleTeacher) -> dict[str, Any]:
    """What the teachers contradicted each other on, over every process's examples: the
    summary for metrics.json, and one row per example in OUTPUT/ensemble/conflicts.jsonl."""
    state = PartialState()
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        ensemble.audit = dict(gather_object(list(ensemble.audit.items())))
    if state.is_main_process:
        rows = "".join(json.dumps(row) + "\n" for row in example_rows(ensemble))
        atomic_write_text(Path(config.output_dir) / "ensemble" / "conflicts.jsonl", rows)
    return conflict_report(ensemble, config.ensemble.shown)


@dataclass
class PreparedData:
    """The run's examples as the objective makes them, tokenised."""

    train_examples: list[Example]
    eval_examples: list[Example]
    train_set: list[TokenizedExample]
    eval_set: list[TokenizedExample]
    train_truncation: TruncationReport
    eval_truncation: TruncationReport

    def summary(self, config: RunConfig) -> dict[str, Any]:
        return {
            "source": config.data.train,
            "train_examples": len(self.train_set),
            "eval_examples": len(self.eval_set),
            "train_hash": data_hash(self.train_examples),
            "train_truncation": self.train_truncation.as_dict(),
            "eval_truncation": self.eval_truncation.as_dict(),
        }


def prepare_data(config: RunConfig, setup: TeacherSetup) -> PreparedData:
    """The rationale objective decides what the student trains on; both splits tokenised."""
    train_examples = apply_objective(setup.examples["train"], config.objective)
    eval_examples = setup.examples["eval"]
    data = config.data
    train_set, train_truncation = tokenize_examples(
        train_examples, setup.tokenizer, data.max_length, data.on_truncation, on_empty=data.on_empty
    )
    eval_set, eval_truncation = tokenize_examples(
        eval_examples, setup.tokenizer, data.max_length, data.on_truncation, on_empty=data.on_empty
    )
    return PreparedData(
        train_examples, eval_examples, train_set, eval_set, train_truncation, eval_truncation
    )


def describe_models(
    config: RunConfig, setup: TeacherSetup, student: PreTrainedModel, vocab_size: int
) -> dict[str, Any]:
    teacher = setup.model  # None: a text-only teacher (no weights here)
    signal = setup.signal.get("train")
    return {
        "teacher": describe(config.teacher) if teacher is not None else config.teacher.model,
        "teacher_kind": config.teacher.kind,
        "teacher_signal": signal.identity if signal is not None else "text only",
        "teacher_parameters": count_parameters(teacher) if teacher is not None else None,
        "student_parameters": count_parameters(student),
        "student_trainable_parameters": sum(
            p.numel() for p in student.parameters() if p.requires_grad
        ),
        "student_layers": student.config.num_hidden_layers,
        # Which teacher layers the student kept, and (layers_by_importance) every layer's score.
        "student_layer_map": getattr(student.config, "lmdistill_layer_map", None),
        "layer_scores": getattr(student.config, "lmdistill_layer_scores", None),
        "teacher_layers": teacher.config.num_hidden_layers if teacher is not None else None,
        "vocab_size": vocab_size,
    }


@dataclass
class Arms:
    """What the KD student and the CE-only baseline share: the data, the settings, how they
    are evaluated."""

    config: RunConfig
    tokenizer: Any
    train_set: list[TokenizedExample]
    vocab_size: int
    config_hash: str
    resume: bool
    evaluate: Evaluator
    scorer: Teacher | None = None  # who scores on-policy samples (None: the run's teacher)

    def train_and_evaluate(
        self,
        model: PreTrainedModel,
        teacher: Teacher | None,
        loss: LossConfig,
        directory: Path,
        desc: str,
        label: str,
        samples: list[Example],
        texts: dict[str, list[str]],
        *,
        retention: Teacher | None = None,
        anchor: Anchor | None = None,
        tracked_as: str = "kd",
        adapted: Any = None,
    ) -> ArmMetrics:
        """Train `model` (from `teacher`'s signal, or CE only without one), evaluate it, add
        its answers to `texts` under `label`, save it under `directory/student`. An
        incremental run's KD student also keeps to its previous self (`retention`,
        `anchor`). With `train.report_to`, its records and held-out measures go to the
        trackers as the run `tracked_as`."""
        train = self.config.train
        out = Path(self.config.output_dir)
        tracking = open_tracking(
            train.report_to,
            Path(train.tracking_dir or out / "tracking"),
            tracked_as,
            out.resolve().name,
            to_dict(self.config),
        )
        on_policy = None
        if teacher is not None and self.config.on_policy.fraction > 0:
            stops = tuple(stop_token_ids(model, self.tokenizer))
            on_policy = OnPolicy(self.config.on_policy, stops, self.vocab_size, self.scorer)
        try:
            result = train_student(
                model,
                teacher,
                self.train_set,
                train=self.config.train,
                loss=loss,
                vocab_size=self.vocab_size,
                pad_token_id=self.tokenizer.pad_token_id,
                checkpoint_dir=directory / "checkpoints",
                config_hash=self.config_hash,
                resume=self.resume,
                desc=desc,
                on_policy=on_policy,
                retention=retention,
                retention_weight=self.config.incremental.retention_weight,
                anchor=anchor,
                tracking=tracking,
            )
            after = self.evaluate(model) if self.config.eval.enabled else None
            if tracking is not None:
                tracking.log_evaluation(after, result.state.step)
        finally:  # the trackers' files closed even when training stops with an error
            if tracking is not None:
                tracking.finish()
        summary = summarise(result, after)
        scoring = getattr(self.scorer, "stats", None)
        if summary.on_policy is not None and scoring is not None:
            summary.on_policy.update(scored_by_server=scoring.as_dict())
        texts[label] = sample(model, self.tokenizer, samples, self.config)
        if adapted is not None:  # merged into student/, the adapter beside it
            base = adapter_base(self.config.student)
            if PartialState().is_main_process:
                save_adapted(adapted, self.tokenizer, directory, base)
        else:
            save_student(model, self.tokenizer, directory / "student")
        return summary


def adapter_base(student: StudentConfig) -> str | None:
    """Where a LoRA student's base is on disk, as `PeftModel.from_pretrained` needs it: the
    absolute path of `student.path` when it is a plain Hugging Face directory; None (the
    base is written beside the student) for a student made from the teacher, an alias, a
    GGUF file or `tiny-llama`."""
    if student.init != "path" or student.path is None or student.gguf_file is not None:
        return None
    path = Path(student.path).expanduser()
    return str(path.resolve()) if (path / "config.json").is_file() else None


def finish(
    config: RunConfig,
    metrics: RunMetrics,
    samples: list[Example],
    texts: dict[str, list[str]],
    *,
    started: float,
    device: torch.device,
) -> None:
    """Side-by-side answers, time and memory into the metrics; metrics.json and the report."""
    out = Path(config.output_dir)
    metrics.samples = [
        {"prompt": ex.messages[-1]["content"], **{k: v[i] for k, v in texts.items()}}
        for i, ex in enumerate(samples)
    ]
    metrics.wall_seconds = time.perf_counter() - started
    metrics.peak_rss_mb = peak_rss_mb()
    if device.type == "cuda":
        metrics.peak_gpu_mb = torch.cuda.max_memory_allocated() / 2**20
    state = PartialState()
    if state.is_main_process:
        atomic_write_json(out / "metrics.json", metrics.as_dict())
        write_report(out, metrics, to_dict(config))
    state.wait_for_everyone()


def summarise(result: TrainResult, after: EvalMetrics | None) -> ArmMetrics:
    sampling = result.sampling
    return ArmMetrics(
        after=after,
        steps=result.state.step,
        tokens=result.state.tokens,
        train_seconds=result.seconds,
        tokens_per_s=result.tokens_per_second,
        resumed_from=result.resumed_from,
        history=result.state.history,
        on_policy=sampling.as_dict() if sampling is not None else None,
    )


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
