"""The evaluation a run gives each model: fidelity to the teacher on held-out responses and
accuracy on each task set; the teacher answers the task questions once (stored, so the runs
of a sweep share its answers)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import PartialState
from transformers import PreTrainedModel

from lmdistill.config import RunConfig
from lmdistill.data import Example, TokenizedExample, load_examples, prompt_ids
from lmdistill.data.example import NO_GROUP
from lmdistill.eval.answers import answer_quality
from lmdistill.eval.choice import load_choice_questions, multiple_choice
from lmdistill.eval.fidelity import fidelity, fidelity_by_group
from lmdistill.eval.harness import lm_eval_scores
from lmdistill.eval.task import greedy_answers, task_accuracy
from lmdistill.io import atomic_write_json
from lmdistill.kd.rationale import eval_prompts
from lmdistill.metrics import ChoiceMetrics, EvalMetrics, FidelityMetrics, TaskMetrics
from lmdistill.models import describe, weights_fingerprint
from lmdistill.teachers.backends import TeacherSetup
from lmdistill.teachers.base import LocalTeacher, Teacher
from lmdistill.teachers.consistency import with_rationale_prompt


@dataclass
class Evaluator:
    """Fidelity to the teacher on held-out responses, and accuracy on each task set; built
    once per run (the teacher answers the task questions then), called on each student."""

    config: RunConfig
    signal: Teacher | None
    eval_set: list[TokenizedExample]
    vocab_size: int
    tokenizer: Any
    task_sets: dict[str, list[Example]]
    choice_sets: dict[str, Any]
    teacher_answers: dict[str, list[str]]
    teacher: EvalMetrics | None  # the teacher's accuracy on the task sets
    # Who scores the models' own answers (teacher NLL, reverse KL): the training signal when
    # it is a model in this process; with a cache, the teacher's weights the run loaded.
    answer_teacher: Teacher | None = None

    @classmethod
    def build(
        cls,
        config: RunConfig,
        setup: TeacherSetup,
        eval_set: list[TokenizedExample],
        vocab_size: int,
    ) -> Evaluator:
        """The task sets as the student is asked them; the teacher's answers (and its
        accuracy) as it is asked them."""
        questions = {
            source: load_examples(source, split=config.data.split, format=config.data.format)
            for source in config.eval.tasks
            if not source.startswith("mc:")
        }
        teacher_answers: dict[str, list[str]] = {}
        teacher = None
        if questions and config.eval.enabled and config.eval.task_teacher:
            teacher_answers, teacher = _teacher_tasks(config, setup, questions)
        choice_sets = {
            source: load_choice_questions(source.removeprefix("mc:"))
            for source in config.eval.tasks
            if source.startswith("mc:")
        }
        task_sets = {s: eval_prompts(q, config.objective) for s, q in questions.items()}
        signal = setup.signal.get("eval")  # None: a text-only teacher (fidelity is refused)
        answer_teacher = signal
        scores_answers = config.eval.enabled and config.eval.answers > 0
        cached = config.teacher.kind == "cache" and not config.teachers
        if scores_answers and cached and setup.model is not None:
            # Kept for the end of the run: the teacher's weights stay in memory (training
            # still reads the cache).
            answer_teacher = LocalTeacher(setup.model, setup.tokenizer, "teacher")
        if config.eval.enabled and config.eval.answers and setup.model is not None:
            own = answer_quality(  # the teacher's own answers: the reference row
                setup.model,
                setup.tokenizer,
                [prompt_ids(item) for item in eval_set[: config.eval.answers]],
                answer_teacher,
                max_new_tokens=config.eval.answer_max_new_tokens,
                vocab_size=vocab_size,
                batch_size=config.eval.batch_size,
            )
            teacher = dataclasses.replace(teacher or EvalMetrics(), answers=own)
        if config.eval.enabled and config.eval.lm_eval_tasks and setup.model is not None:
            scores = lm_eval_scores(setup.model, setup.tokenizer, config.eval)
            teacher = dataclasses.replace(teacher or EvalMetrics(), lm_eval=scores)
        return cls(
            config,
            signal,
            eval_set,
            vocab_size,
            setup.tokenizer,
            task_sets,
            choice_sets,
            teacher_answers,
            teacher,
            answer_teacher,
        )

    def __call__(self, model: PreTrainedModel) -> EvalMetrics:
        settings, tokenizer = self.config.eval, self.tokenizer
        fidelity_metrics = None
        groups: dict[str, FidelityMetrics] = {}
        if settings.fidelity and self.signal is not None:
            kwargs = {
                "vocab_size": self.vocab_size,
                "pad_token_id": tokenizer.pad_token_id,
                "batch_size": settings.batch_size,
            }
            members = eval_groups(self.eval_set)
            if members:  # every row in one group's pass; the overall from their sums
                fidelity_metrics, groups = fidelity_by_group(
                    model, self.signal, self.eval_set, members, **kwargs
                )
            else:
                fidelity_metrics = fidelity(model, self.signal, self.eval_set, **kwargs)
        tasks: dict[str, TaskMetrics | ChoiceMetrics] = {
            s: multiple_choice(model, tokenizer, q) for s, q in self.choice_sets.items()
        }
        for source, examples in self.task_sets.items():
            tasks[source] = task_accuracy(
                model,
                tokenizer,
                examples,
                max_new_tokens=settings.task_max_new_tokens,
                batch_size=settings.task_batch_size,
                teacher_answers=self.teacher_answers.get(source),
                samples=settings.task_samples,
            )
        answers = None
        if settings.answers:
            answers = answer_quality(
                model,
                tokenizer,
                [prompt_ids(item) for item in self.eval_set[: settings.answers]],
                self.answer_teacher,
                max_new_tokens=settings.answer_max_new_tokens,
                vocab_size=self.vocab_size,
                batch_size=settings.batch_size,
            )
        harness = lm_eval_scores(model, tokenizer, settings) if settings.lm_eval_tasks else {}
        return EvalMetrics(fidelity_metrics, tasks, answers, groups, harness)


def eval_groups(eval_set: list[TokenizedExample]) -> dict[str, list[int]]:
    """The positions of each group's rows, by group name; rows without a group form
    `(no group)` when others have one. Empty when no row has a group."""
    if all(item.group is None for item in eval_set):
        return {}
    members: dict[str, list[int]] = {}
    for index, item in enumerate(eval_set):
        members.setdefault(item.group or NO_GROUP, []).append(index)
    return dict(sorted(members.items()))


def _teacher_tasks(
    config: RunConfig, setup: TeacherSetup, questions: dict[str, list[Example]]
) -> tuple[dict[str, list[str]], EvalMetrics]:
    """The teacher's answers to each task set and its accuracy on them."""
    teacher_model = setup.model
    assert teacher_model is not None
    longest, batch = config.eval.task_max_new_tokens, config.eval.task_batch_size
    answers_dir = Path(
        config.eval.teacher_answers_dir or Path(config.output_dir) / "teacher_answers"
    )
    answers_by_source: dict[str, list[str]] = {}
    tasks: dict[str, TaskMetrics | ChoiceMetrics] = {}
    for source, examples in questions.items():
        # Asked as it was when it wrote the training rationales.
        asked = with_rationale_prompt(examples, config.generate.rationale_prompt)
        answers = _teacher_answers(
            teacher_model,
            setup.tokenizer,
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
        answers_by_source[source] = answers
        tasks[source] = task_accuracy(
            teacher_model,
            setup.tokenizer,
            examples,
            max_new_tokens=longest,
            batch_size=batch,
            answers=answers,
        )
    return answers_by_source, EvalMetrics(tasks=tasks)


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
