"""What a run measures, as types: fidelity to the teacher, accuracy on each task set, each
trained student, the whole run.

Each type is written to `metrics.json` with `as_dict()` under the keys the file has always
had (a reader of the file sees no change) and read back with `from_dict()`, which accepts a
file written by any earlier version (a measure it did not have yet reads as None, a count
as 0). Code reads
fields (`run.kd.after.tasks[source].exact_match`), not nested string keys.

This module sits at the bottom of the package: it imports nothing from lmdistill.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class FidelityMetrics:
    """Per response token, teacher temperature 1. With a sparse teacher (cache, server) KL
    is the top-k + tail-bucket KL over the `signal_tokens` that have a signal, and
    `teacher_ppl` is None; `teacher_ece` is None when the signal is not at temperature 1."""

    kl: float
    top1_agreement: float
    student_ppl: float
    teacher_ppl: float | None
    student_ece: float | None  # None only in files written before it was measured
    teacher_ece: float | None
    tokens: int
    signal_tokens: int

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FidelityMetrics:
        return cls(
            kl=d["kl"],
            top1_agreement=d["top1_agreement"],
            student_ppl=d["student_ppl"],
            teacher_ppl=d.get("teacher_ppl"),
            student_ece=d.get("student_ece"),
            teacher_ece=d.get("teacher_ece"),
            tokens=d["tokens"],
            signal_tokens=d.get("signal_tokens", d["tokens"]),
        )


@dataclass(frozen=True)
class TeacherAgreement:
    """How a model's answers compare with the teacher's answers to the same questions."""

    teacher_answer_agreement: float
    teacher_step_agreement: float | None  # None: the model writes no calculations


@dataclass(frozen=True)
class SelfConsistency:
    """Several sampled answers per question: how often they agree with their majority, and
    the exact match of that majority."""

    sampled_answers_per_question: int
    sample_agreement: float
    majority_exact_match: float


@dataclass(frozen=True)
class TaskMetrics:
    """A GSM8K-format task set: exact match of the final answer, the rationale checks that
    need no ground truth, and (when asked for) agreement with the teacher and
    self-consistency. A share of annotations is None when none was written."""

    examples: int
    exact_match: float
    annotations_per_answer: float
    annotation_accuracy: float | None
    annotations_readable: float | None
    answer_follows_last_step: float | None
    samples: list[dict[str, Any]] = field(default_factory=list)
    teacher: TeacherAgreement | None = None
    consistency: SelfConsistency | None = None
    # Per group of the questions (the data's `group` field): {"examples", "exact_match"}.
    groups: dict[str, dict[str, float]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = {
            k: v for k, v in self.__dict__.items() if k not in ("teacher", "consistency", "groups")
        }
        for part in (self.teacher, self.consistency):
            if part is not None:
                d.update(part.__dict__)
        if self.groups:
            d["groups"] = self.groups
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TaskMetrics:
        teacher = consistency = None
        if "teacher_answer_agreement" in d:
            teacher = TeacherAgreement(
                d["teacher_answer_agreement"], d.get("teacher_step_agreement")
            )
        if "sampled_answers_per_question" in d:
            consistency = SelfConsistency(
                d["sampled_answers_per_question"], d["sample_agreement"], d["majority_exact_match"]
            )
        return cls(
            examples=d["examples"],
            exact_match=d["exact_match"],
            annotations_per_answer=d.get("annotations_per_answer", 0.0),
            annotation_accuracy=d.get("annotation_accuracy"),
            annotations_readable=d.get("annotations_readable"),
            answer_follows_last_step=d.get("answer_follows_last_step"),
            samples=list(d.get("samples") or []),
            teacher=teacher,
            consistency=consistency,
            groups=dict(d.get("groups") or {}),
        )


@dataclass(frozen=True)
class ChoiceMetrics:
    """A multiple-choice task set, with lm-evaluation-harness's names: the option with the
    highest total log-prob (`accuracy`, lm-eval's `acc`), per character of the option
    (`accuracy_norm`, lm-eval's `acc_norm`), and per token (`accuracy_per_token`). Older
    results (no `accuracy_per_token` key) hold the per-token one under `accuracy_norm`: read
    back, it is `accuracy_per_token` and `accuracy_norm` is None."""

    questions: int
    accuracy: float
    accuracy_norm: float | None
    accuracy_per_token: float

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ChoiceMetrics:
        if "accuracy_per_token" not in d:  # the older meaning of accuracy_norm
            return cls(d["questions"], d["accuracy"], None, d["accuracy_norm"])
        return cls(d["questions"], d["accuracy"], d["accuracy_norm"], d["accuracy_per_token"])


def task_from_dict(d: dict[str, Any]) -> TaskMetrics | ChoiceMetrics:
    return TaskMetrics.from_dict(d) if "exact_match" in d else ChoiceMetrics.from_dict(d)


@dataclass(frozen=True)
class AnswerMetrics:
    """A model's own greedy answers to held-out prompts (lmdistill/eval/answers.py): the share
    of repeated 4-grams, the share that end by themselves, and per token the teacher's NLL and
    KL(model || teacher) on that text (None without a teacher's full distribution)."""

    answers: int
    tokens: int
    mean_tokens: float
    repetition: float
    ended: float
    teacher_nll: float | None
    reverse_kl: float | None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AnswerMetrics:
        return cls(
            answers=d["answers"],
            tokens=d["tokens"],
            mean_tokens=d["mean_tokens"],
            repetition=d["repetition"],
            ended=d["ended"],
            teacher_nll=d.get("teacher_nll"),
            reverse_kl=d.get("reverse_kl"),
        )


@dataclass(frozen=True)
class EvalMetrics:
    """One model evaluated: fidelity to the teacher (None when `eval.fidelity` is off) and
    each task set by its source. Written flat: the fidelity keys, then `tasks`."""

    fidelity: FidelityMetrics | None = None
    tasks: dict[str, TaskMetrics | ChoiceMetrics] = field(default_factory=dict)
    answers: AnswerMetrics | None = None  # its own greedy answers (eval.answers > 0)
    # Fidelity per group of the held-out rows (the data's `group` field); empty: no groups.
    groups: dict[str, FidelityMetrics] = field(default_factory=dict)
    # lm-evaluation-harness per task: {task: {metric: value}} by lm-eval's names.
    lm_eval: dict[str, dict[str, float]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = self.fidelity.as_dict() if self.fidelity is not None else {}
        if self.tasks:
            d["tasks"] = {source: task.as_dict() for source, task in self.tasks.items()}
        if self.answers is not None:
            d["answers"] = self.answers.as_dict()
        if self.groups:
            d["groups"] = {name: f.as_dict() for name, f in self.groups.items()}
        if gaps := self.group_gaps():
            d["group_gaps"] = gaps
        if self.lm_eval:
            d["lm_eval"] = self.lm_eval
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> EvalMetrics:
        d = d or {}
        return cls(
            fidelity=FidelityMetrics.from_dict(d) if "kl" in d else None,
            tasks={s: task_from_dict(t) for s, t in (d.get("tasks") or {}).items()},
            answers=AnswerMetrics.from_dict(d["answers"]) if d.get("answers") else None,
            groups={g: FidelityMetrics.from_dict(f) for g, f in (d.get("groups") or {}).items()},
            lm_eval={t: dict(m) for t, m in (d.get("lm_eval") or {}).items()},
        )

    def group_gaps(self) -> dict[str, dict[str, Any]]:
        """Per measure measured on two groups or more: the worst and the best group, their
        values and the gap between them (always >= 0). Fidelity's measures from `groups`
        (KL and ECE lower is better, agreement higher), each GSM8K task's exact match under
        `exact_match <source>`."""
        found: dict[str, dict[str, Any]] = {}
        for measure, lower_is_better in GROUP_MEASURES.items():
            values = {
                g: getattr(f, measure)
                for g, f in self.groups.items()
                if getattr(f, measure) is not None
            }
            if len(values) > 1:
                found[measure] = worst_and_best(values, lower_is_better=lower_is_better)
        for source, task in self.tasks.items():
            if isinstance(task, TaskMetrics) and len(task.groups) > 1:
                values = {g: part["exact_match"] for g, part in task.groups.items()}
                found[f"exact_match {source}"] = worst_and_best(values, lower_is_better=False)
        return found

    def exact_match(self, source: str) -> float:
        """The exact match on a GSM8K-format task set; a clear error for any other."""
        task = self.tasks.get(source)
        if not isinstance(task, TaskMetrics):
            raise KeyError(f"no GSM8K-format task {source!r} was evaluated")
        return task.exact_match


# The fidelity measures reported per group: True where lower is better.
GROUP_MEASURES = {"kl": True, "top1_agreement": False, "student_ece": True}


def worst_and_best(values: dict[str, float], *, lower_is_better: bool) -> dict[str, Any]:
    """The worst and the best group of `values` and the gap between them (ties: the worst is
    the first name in sorted order, the best the last, so two groups are always named)."""
    names = sorted(values)
    sign = 1.0 if lower_is_better else -1.0
    worst = max(names, key=lambda g: sign * values[g])
    best = min(reversed(names), key=lambda g: sign * values[g])
    return {
        "worst_group": worst,
        "worst": values[worst],
        "best_group": best,
        "best": values[best],
        "gap": abs(values[worst] - values[best]),
        "groups": len(values),
    }


@dataclass(frozen=True)
class ArmMetrics:
    """A trained student: its evaluation after training (None when `eval.enabled` is off),
    the steps and tokens it trained on, its speed, and the per-step history."""

    after: EvalMetrics | None
    steps: int
    tokens: int
    train_seconds: float
    tokens_per_s: float
    resumed_from: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    # On-policy runs: the student's sampling (steps, tokens, seconds, tokens/s), apart from
    # training's; absent from the file otherwise.
    on_policy: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["after"] = self.after.as_dict() if self.after is not None else None
        if self.on_policy is None:
            del d["on_policy"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ArmMetrics:
        after = d.get("after")
        return cls(
            after=EvalMetrics.from_dict(after) if after is not None else None,
            steps=d.get("steps", 0),
            tokens=d.get("tokens", 0),
            train_seconds=d.get("train_seconds", 0.0),
            tokens_per_s=d.get("tokens_per_s", 0.0),
            resumed_from=d.get("resumed_from"),
            history=list(d.get("history") or []),
            on_policy=d.get("on_policy"),
        )


@dataclass
class RunMetrics:
    """Everything `lmdistill run` measured, as `metrics.json` holds it."""

    lmdistill_version: str
    config_hash: str
    data: dict[str, Any]
    models: dict[str, Any]
    kd: ArmMetrics
    # What the teacher's set-up reports, each stage's summary under its own top-level key
    # (`generate`, `served`, `probe`, `cache`): written by the backend, shown by the report.
    setup: dict[str, Any] = field(default_factory=dict)
    teacher: EvalMetrics | None = None  # the teacher's task accuracy (tasks only)
    before: EvalMetrics | None = None
    baseline: ArmMetrics | None = None
    samples: list[dict[str, str]] = field(default_factory=list)
    wall_seconds: float = 0.0
    peak_rss_mb: float = 0.0
    peak_gpu_mb: float | None = None

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "lmdistill_version": self.lmdistill_version,
            "config_hash": self.config_hash,
            **self.setup,
            "data": self.data,
            "models": self.models,
        }
        if self.teacher is not None:
            d["teacher"] = self.teacher.as_dict()
        if self.before is not None:
            d["before"] = self.before.as_dict()
        d["kd"] = self.kd.as_dict()
        if self.baseline is not None:
            d["baseline"] = self.baseline.as_dict()
        d.update(samples=self.samples, wall_seconds=self.wall_seconds, peak_rss_mb=self.peak_rss_mb)
        if self.peak_gpu_mb is not None:
            d["peak_gpu_mb"] = self.peak_gpu_mb
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunMetrics:
        def evaluated(key: str) -> EvalMetrics | None:
            return EvalMetrics.from_dict(d[key]) if d.get(key) is not None else None

        return cls(
            lmdistill_version=d.get("lmdistill_version", "unknown"),
            config_hash=d.get("config_hash", ""),
            data=dict(d.get("data") or {}),
            models=dict(d.get("models") or {}),
            kd=ArmMetrics.from_dict(d.get("kd") or {}),
            setup={k: v for k, v in d.items() if k not in _RUN_KEYS},
            teacher=evaluated("teacher"),
            before=evaluated("before"),
            baseline=ArmMetrics.from_dict(d["baseline"]) if d.get("baseline") else None,
            samples=list(d.get("samples") or []),
            wall_seconds=d.get("wall_seconds", 0.0),
            peak_rss_mb=d.get("peak_rss_mb", 0.0),
            peak_gpu_mb=d.get("peak_gpu_mb"),
        )

    def arms(self) -> list[tuple[str, EvalMetrics | None]]:
        """The evaluated models in the order reports show them: before training (when it
        was evaluated), the KD student, the CE-only student (when there is one)."""
        rows: list[tuple[str, EvalMetrics | None]] = []
        if self.before is not None:
            rows.append(("before", self.before))
        rows.append(("KD", self.kd.after))
        if self.baseline is not None:
            rows.append(("CE-only", self.baseline.after))
        return rows


_RUN_KEYS = {f for f in RunMetrics.__dataclass_fields__ if f != "setup"}
