"""From `teacher.kind` to the examples and the teacher signal a run trains and evaluates on.

- `local`: the model in this process scores every batch (and writes responses when
  `generate.enabled`).
- `served`: the conformance probe (when `teacher.probe`), then the server writes the responses
  with their top-k log-probs, which are stored as a cache: training reads the cache. With
  `on_policy.fraction` > 0 the server also scores the student's samples through its prompt
  log-probs (lmdistill/teachers/served_scoring.py), after a probe that finds how its echoed
  log-probs line up.
- `cache`: the examples and the signal `lmdistill cache` stored; no teacher in memory.
- `text`: a server that gives text only (a closed API): it writes the responses, the student
  (`student.init: path`, whose tokenizer is used) learns them by CE; nothing is scored.

Caches live in `cache.dir` (default OUTPUT_DIR/teacher_cache), one per split: train/, eval/.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from accelerate import PartialState
from transformers import PreTrainedModel

from lmdistill.config import ConfigError, ModelConfig, RunConfig
from lmdistill.config.checks import check
from lmdistill.data import (
    Example,
    load_examples,
)
from lmdistill.data.memory import open_memory
from lmdistill.models import describe, load_model, resolve_device
from lmdistill.teachers.backends import TEACHERS, TeacherSetup, register_teacher
from lmdistill.teachers.base import (
    CachedTeacher,
    LocalTeacher,
    ResponseWriter,
    ServedTeacher,
    TextTeacher,
)
from lmdistill.teachers.consistency import (
    as_asked,
    expand_samples,
    filtering,
    select_rationales,
    with_rationale_prompt,
)
from lmdistill.teachers.served import conformance_probe
from lmdistill.teachers.served_scoring import ServedScorer, probe_scoring
from lmdistill.teachers.signal_caches import (
    SPLITS,
    cache_complete,
    from_cache,
    generation_path,
    open_split,
    write_local_caches,
    write_served_caches,
)


def open_teacher(config: RunConfig, *, write_local_cache: bool = False) -> TeacherSetup:
    """Load what `config.teacher` describes; generate and cache what its backend needs."""
    return TEACHERS.lookup(config.teacher.kind).open(config, write_local_cache)


def generating_teacher(config: RunConfig) -> tuple[ResponseWriter, dict[str, Any]]:
    """The teacher `lmdistill generate` writes with (a cache returns what it stored)."""
    return TEACHERS.lookup(config.teacher.kind).generating(config)


def _no_features(config: RunConfig) -> None:
    """Feature losses need the teacher's hidden states and attention: in this process only."""
    loss = config.loss
    check(
        loss.hidden_weight == 0 and loss.attention_weight == 0,
        "loss.hidden_weight/attention_weight",
        [loss.hidden_weight, loss.attention_weight],
        f"0 with teacher.kind={config.teacher.kind} (feature losses need the teacher in memory)",
    )


def _server_named(config: RunConfig) -> None:
    """A teacher behind a server needs its address and model name."""
    for name in ("base_url", "model"):
        value = getattr(config.teacher, name)
        check(
            bool(value),
            f"teacher.{name}",
            value,
            f"a value when teacher.kind={config.teacher.kind}",
        )


def _check_served(config: RunConfig) -> None:
    teacher = config.teacher
    _no_features(config)
    if config.cache.k != teacher.top_logprobs:
        warnings.warn(
            f"cache.k={config.cache.k} is not used with teacher.kind=served: its cache holds the "
            f"teacher.top_logprobs={teacher.top_logprobs} log-probs the server returns per token "
            f"(set cache.k={teacher.top_logprobs} to say so)",
            stacklevel=2,  # one place (validate), so it is shown once per process
        )
    _server_named(config)
    check(
        config.generate.enabled,
        "generate.enabled",
        config.generate.enabled,
        "true with teacher.kind=served (a server returns log-probs only for text it writes)",
    )
    check(
        config.loss.temperature == 1.0,
        "loss.temperature",
        config.loss.temperature,
        "1.0 with teacher.kind=served (servers report log-probs at temperature 1, and the "
        "tail mass outside their top-k cannot be re-tempered)",
    )


def _check_text(config: RunConfig) -> None:
    """A text-only teacher gives no scores and no weights: whatever needs them is refused."""
    why = "with teacher.kind=text (a text-only teacher gives no log-probs"
    _no_features(config)
    _server_named(config)
    check(config.generate.enabled, "generate.enabled", config.generate.enabled,
          f"true {why}: the student learns the text it writes)")  # fmt: skip
    check(config.student.init == "path", "student.init", config.student.init,
          "path with teacher.kind=text (no teacher weights to build a student from; "
          "student.path names the student, and its tokenizer is used)")  # fmt: skip
    check(config.loss.alpha == 1.0, "loss.alpha", config.loss.alpha,
          f"1.0 {why}: sequence-level KD is CE on its text)")  # fmt: skip
    check(not config.eval.fidelity, "eval.fidelity", config.eval.fidelity,
          f"false {why} to measure a student's fidelity against)")  # fmt: skip
    check(not config.eval.task_teacher, "eval.task_teacher", config.eval.task_teacher,
          "false with teacher.kind=text (its task answers are not asked for)")  # fmt: skip
    check(not config.baseline, "baseline", config.baseline,
          "false with teacher.kind=text (the student already trains on CE alone: a CE-only "
          "baseline on the same text is the same run)")  # fmt: skip


def _text_generating(config: RunConfig) -> tuple[ResponseWriter, dict[str, Any]]:
    return TextTeacher(config.teacher, _student_tokenizer(config)), {}


def _student_tokenizer(config: RunConfig) -> Any:
    path = config.student.path
    if path is None:
        raise ConfigError("student.path: a model is needed with teacher.kind=text (its tokenizer)")
    _, tokenizer = load_model(ModelConfig(path=path, gguf_file=config.student.gguf_file))
    return tokenizer


def _local_generating(config: RunConfig) -> tuple[ResponseWriter, dict[str, Any]]:
    model, tokenizer = load_model(config.teacher)
    model.to(resolve_device(config.train.device))  # type: ignore[arg-type]
    return LocalTeacher(model, tokenizer, describe(config.teacher)), {}


def _served_generating(config: RunConfig) -> tuple[ResponseWriter, dict[str, Any]]:
    model, tokenizer = load_model(config.teacher)
    report: dict[str, Any] = {}
    return _probed(config, tokenizer, model, report), report


def _cache_generating(config: RunConfig) -> tuple[ResponseWriter, dict[str, Any]]:
    _, tokenizer = load_model(config.teacher)
    caches = [open_split(config, tokenizer, split) for split in SPLITS]
    return CachedTeacher(caches[0], others=caches[1:]), {}


@register_teacher(
    "local",
    generating=_local_generating,
    check=lambda config: None,
    in_process=True,
    caches_signal=False,
    writes_text=True,
    scores_text=True,
)
def _open_local(config: RunConfig, write_local_cache: bool) -> TeacherSetup:
    """The model in this process scores every batch (and writes responses when
    `generate.enabled`)."""
    model, tokenizer = load_model(config.teacher)
    train, held_out = load_splits(config)
    examples = {"train": train, "eval": held_out}
    report: dict[str, Any] = {}
    model.to(resolve_device(config.train.device))  # type: ignore[arg-type]
    local = LocalTeacher(model, tokenizer, describe(config.teacher))
    if config.generate.enabled:
        examples, report["generate"] = _generate(config, local, examples)
    setup = TeacherSetup(tokenizer, model, examples, {s: local for s in SPLITS}, report)
    if write_local_cache:
        prompts = {"train": train, "eval": held_out}
        report["cache"] = write_local_caches(config, setup, prompts)
    return setup


@register_teacher(
    "served",
    generating=_served_generating,
    check=_check_served,
    in_process=False,
    caches_signal=True,
    writes_text=True,
    scores_text=True,
)
def _open_served(config: RunConfig, write_local_cache: bool) -> TeacherSetup:
    """The conformance probe (when `teacher.probe`), then the server writes the responses with
    their top-k log-probs, which are stored as a cache: training reads the cache."""
    model, tokenizer = load_model(config.teacher)
    train, held_out = load_splits(config)
    examples = {"train": train, "eval": held_out}
    report: dict[str, Any] = {}
    served = _probed(config, tokenizer, model, report)
    examples, report["generate"] = _generate(config, served, examples)
    report["served"] = served.client.stats.as_dict()
    prompts = {"train": train, "eval": held_out}
    report["cache"] = write_served_caches(config, tokenizer, served, examples, prompts)
    caches = {s: CachedTeacher(open_split(config, tokenizer, s)) for s in SPLITS}
    setup = TeacherSetup(tokenizer, model, examples, dict(caches), report)
    if config.on_policy.fraction > 0:  # the student's samples are scored by the server
        report["scoring_probe"] = probe_scoring(
            served.client,
            tokenizer,
            model if config.teacher.probe else None,
            top_logprobs=config.teacher.top_logprobs,
            tolerance=config.teacher.probe_tolerance,
        )
        setup.scorer = ServedScorer(
            served.client,
            tokenizer,
            config.teacher.top_logprobs,
            shift=report["scoring_probe"]["shift"],
            method=report["scoring_probe"]["method"],
            max_concurrency=config.teacher.max_concurrency,
            identity=served.identity,
        )
    return setup


@register_teacher(
    "cache",
    generating=_cache_generating,
    check=_no_features,
    in_process=False,
    caches_signal=True,
    writes_text=False,
    scores_text=False,
)
def _open_cache(config: RunConfig, write_local_cache: bool) -> TeacherSetup:
    """The examples and the signal `lmdistill cache` stored; no teacher in memory. A cache
    not yet complete is written first with the local copy of the teacher (paid for once)."""
    model, tokenizer = load_model(config.teacher)
    train, held_out = load_splits(config)
    examples = {"train": train, "eval": held_out}
    written: dict[str, Any] = {}
    if not cache_complete(config):
        device = resolve_device(config.train.device)
        model.to(device)  # type: ignore[arg-type]  # transformers' wrapped `to`
        writer = LocalTeacher(model, tokenizer, describe(config.teacher))
        if config.generate.enabled:
            examples, written["generate"] = _generate(config, writer, examples)
        staged = TeacherSetup(tokenizer, model, examples, {})
        prompts = {"train": train, "eval": held_out}
        written["cache"] = write_local_caches(config, staged, prompts)
        model.to("cpu")  # type: ignore[arg-type]  # training reads the cache, not the model
    setup = from_cache(config, model, tokenizer, {"train": train, "eval": held_out})
    if "cache" in written:  # what this call wrote, with its size
        for split, summary in written["cache"].items():
            setup.report["cache"][split].update(summary)
    if "generate" in written:
        setup.report["generate"] = written["generate"]
    return setup


@register_teacher(
    "text",
    generating=_text_generating,
    check=_check_text,
    in_process=False,
    caches_signal=False,
    writes_text=True,
    scores_text=False,
)
def _open_text(config: RunConfig, write_local_cache: bool) -> TeacherSetup:
    """The server writes every response (no log-probs asked for); the student learns them by
    CE. No teacher weights are loaded and nothing is scored."""
    tokenizer = _student_tokenizer(config)
    train, held_out = load_splits(config)
    writer = TextTeacher(config.teacher, tokenizer)
    report: dict[str, Any] = {}
    examples, report["generate"] = _generate(config, writer, {"train": train, "eval": held_out})
    report["served"] = writer.client.stats.as_dict()
    return TeacherSetup(tokenizer, None, examples, {}, report)


def _probed(
    config: RunConfig, tokenizer: Any, model: PreTrainedModel, report: dict[str, Any]
) -> ServedTeacher:
    """The served teacher, checked against the local copy first when `teacher.probe`."""
    served = ServedTeacher(config.teacher, tokenizer)
    if config.teacher.probe:
        report["probe"] = conformance_probe(
            served.client,
            tokenizer,
            model,
            top_logprobs=config.teacher.top_logprobs,
            tolerance=config.teacher.probe_tolerance,
        )
    return served


def load_splits(config: RunConfig) -> tuple[list[Example], list[Example]]:
    """Train and held-out examples; without `data.eval`, hold out `eval_size` at random. A
    continued student's replay memory (`incremental.memory`) joins the training examples."""
    import random

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
    inc = config.incremental
    if inc.memory is not None and inc.replay:  # a continued student's replay memory
        examples = examples + open_memory(inc.memory, str(config.student.path)).replay()
    return examples, held_out


def _generate(
    config: RunConfig, teacher: ResponseWriter, examples: dict[str, list[Example]]
) -> tuple[dict[str, list[Example]], dict[str, Any]]:
    """The teacher writes every response (sequence-level KD); the main process generates,
    every process then reads the finished file, so all train on the same responses."""
    state = PartialState()
    path = generation_path(config)
    report: dict[str, Any] = {}
    if state.is_main_process:
        _, report = write_responses(config, teacher, examples["train"], examples["eval"], path)
    state.wait_for_everyone()
    written, read_back = write_responses(config, teacher, examples["train"], examples["eval"], path)
    return written, report if state.is_main_process else read_back


def write_responses(
    config: RunConfig,
    teacher: ResponseWriter,
    train: list[Example],
    held_out: list[Example],
    path: Path,
) -> tuple[dict[str, list[Example]], dict[str, Any]]:
    """The teacher's response to every prompt, written (resumably) to `path`: each training
    prompt `generate.samples` times, every prompt asked as `generate.rationale_prompt` says;
    the training responses then filtered as `generate.keep` and the filters say. Returns
    {"train": kept, "eval": held-out answered} and the report (generation, rationales)."""
    sampled = expand_samples(train, config.generate.samples)
    prompts = sampled + held_out
    asked = with_rationale_prompt(prompts, config.generate.rationale_prompt)
    answered, generation = teacher.generate(asked, path, config.generate)
    answered = as_asked(answered, prompts)
    report: dict[str, Any] = generation.as_dict()
    kept = answered[: len(sampled)]
    if filtering(config.generate):
        kept, report["rationales"] = select_rationales(train, kept, config.generate)
    return {"train": kept, "eval": answered[len(sampled) :]}, report
