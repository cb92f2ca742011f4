"""Opening several teachers (`teachers:`) as one `EnsembleTeacher`.

The first teacher is the run's teacher: it is opened as a single teacher is (its backend,
its responses when `generate.enabled`, its cache) and its examples are the run's. Every other
teacher scores those same response tokens:

- `local`: the model in this process (its top `ensemble.k` per token);
- `cache`: its own cache under `cache.dir/<name>`, written first by its local copy when
  missing (on the run's examples), and checked to hold exactly the run's responses;
- `served`: the server scores the run's text through its prompt log-probs (the probe of
  on-policy scoring decides how), nothing cached.

Every teacher must share the first one's tokenizer (the student's). Held-out fidelity is
measured against the first teacher. With `ensemble.answers`, each teacher also writes its own
greedy answer to every training prompt once (`ensemble.answers_dir/<name>/`), whose final
answers `vote`, `route` and the conflict report use.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from accelerate import PartialState

from lmdistill.config import GenerateConfig, RunConfig
from lmdistill.data import Example, data_hash
from lmdistill.data.gsm8k import final_answer
from lmdistill.models import describe, load_model, resolve_device
from lmdistill.models.students import check_tokenizers
from lmdistill.teachers.backends import TeacherSetup
from lmdistill.teachers.base import LocalTeacher, ResponseWriter, ServedTeacher, Teacher
from lmdistill.teachers.cache import REBUILD, CacheError
from lmdistill.teachers.consistency import with_rationale_prompt
from lmdistill.teachers.ensemble import Answers, EnsembleTeacher
from lmdistill.teachers.served_client import ServedClient
from lmdistill.teachers.served_scoring import ServedScorer, probe_scoring
from lmdistill.teachers.setup import TEACHERS, load_splits, open_teacher
from lmdistill.teachers.signal_caches import (
    SPLITS,
    _tokenized,
    cache_complete,
    cache_dir,
    from_cache,
    write_local_caches,
)

NEEDS_ANSWERS = ("vote", "route")


def open_teachers(config: RunConfig, *, write_local_cache: bool = False) -> TeacherSetup:
    """The run's teacher side: one teacher as `open_teacher` opens it, or an ensemble."""
    if not config.teachers:
        return open_teacher(config, write_local_cache=write_local_cache)
    return open_ensemble(config, write_local_cache)


def member_config(config: RunConfig, index: int) -> RunConfig:
    """The run as teacher `index` alone: its teacher settings and its own cache directory."""
    teacher = config.teachers[index]
    assert teacher.name is not None
    cache = dataclasses.replace(config.cache, dir=str(cache_dir(config) / teacher.name))
    return dataclasses.replace(config, teacher=teacher, teachers=[], cache=cache)


def cache_directories(config: RunConfig) -> list[Path]:
    """Each teacher's cache directory (what a run, or `lmdistill cache`, holds): a cached
    teacher's is read or written, a local one's is written by `lmdistill cache`."""
    return [cache_dir(member_config(config, i)) for i in range(len(config.teachers))]


def needs_answers(config: RunConfig) -> bool:
    spec = config.ensemble
    return spec.answers if spec.answers is not None else spec.strategy in NEEDS_ANSWERS


def open_ensemble(config: RunConfig, write_local_cache: bool) -> TeacherSetup:
    first = open_teacher(member_config(config, 0), write_local_cache=write_local_cache)
    train, held_out = load_splits(config)
    prompts = {"train": train, "eval": held_out}
    members: list[Teacher] = [first.signal["train"]]
    writers = [_writer(member_config(config, 0), first.model, first.tokenizer)]
    head = config.teachers[0]
    report: dict[str, Any] = {
        "teachers": {head.name: {"kind": head.kind, "path": describe(head), "first": True}}
    }
    device = resolve_device(config.train.device)
    for index in range(1, len(config.teachers)):
        spec = member_config(config, index)
        teacher = spec.teacher
        model, tokenizer = load_model(teacher)
        check_tokenizers(first.tokenizer, tokenizer)
        summary: dict[str, Any] = {"kind": teacher.kind, "path": describe(teacher)}
        member: Teacher
        if teacher.kind == "local":
            model.to(device)  # type: ignore[arg-type]  # transformers' wrapped `to`
            member = LocalTeacher(model, tokenizer, describe(teacher))
            if write_local_cache:
                staged = TeacherSetup(tokenizer, model, first.examples, {})
                summary["cache"] = write_local_caches(spec, staged, prompts)
        elif teacher.kind == "cache":
            if not cache_complete(spec):
                model.to(device)  # type: ignore[arg-type]
                staged = TeacherSetup(tokenizer, model, first.examples, {})
                summary["cache"] = write_local_caches(spec, staged, prompts)
                model.to("cpu")  # type: ignore[arg-type]
            cached = from_cache(spec, model, tokenizer, prompts)
            _same_responses(spec, cached, first)
            member = cached.signal["train"]
        elif teacher.kind == "served":
            client = ServedClient(teacher)
            summary["scoring_probe"] = probe_scoring(
                client,
                tokenizer,
                model if teacher.probe else None,
                top_logprobs=teacher.top_logprobs,
                tolerance=teacher.probe_tolerance,
            )
            member = ServedScorer(
                client,
                tokenizer,
                teacher.top_logprobs,
                shift=summary["scoring_probe"]["shift"],
                method=summary["scoring_probe"]["method"],
                max_concurrency=teacher.max_concurrency,
                identity=f"served:{teacher.model}@{teacher.base_url}",
            )
        else:  # refused when the config loads
            raise ValueError(f"teachers[{index}].kind={teacher.kind} cannot be combined")
        members.append(member)
        writers.append(_writer(spec, model, tokenizer))
        report["teachers"][teacher.name] = summary
    answers = None
    if needs_answers(config):
        answers, report["answers"] = teacher_answers(config, writers, first.examples["train"])
    names = [str(t.name) for t in config.teachers]
    settings = config.ensemble
    ensemble = EnsembleTeacher(
        members,
        names,
        [t.weight for t in config.teachers],
        strategy=settings.strategy,
        k=settings.k or config.cache.k,
        vocab=len(first.tokenizer),
        confidence_temperature=settings.confidence_temperature,
        answers=answers,
    )
    signal: dict[str, Teacher] = {"train": ensemble, "eval": first.signal["eval"]}
    setup = TeacherSetup(first.tokenizer, first.model, first.examples, signal, first.report)
    setup.report["ensemble"] = report
    if config.on_policy.fraction > 0:
        setup.scorer = ensemble  # every teacher scores the student's samples
    return setup


def _same_responses(spec: RunConfig, cached: TeacherSetup, first: TeacherSetup) -> None:
    """A teacher's cache must hold the responses the run trains on, example for example."""
    for split in SPLITS:
        _, expected = _tokenized(spec, cached.tokenizer, first.examples[split])
        if data_hash(cached.examples[split]) != data_hash(expected):
            raise CacheError(
                f"{cache_dir(spec) / split}: teacher {spec.teacher.name}'s cache holds other "
                "responses than the run's teacher wrote; " + REBUILD.format(dir=cache_dir(spec))
            )


def _writer(spec: RunConfig, model: Any, tokenizer: Any) -> ResponseWriter | None:
    """Who writes a teacher's own answers: its server, or its local weights."""
    teacher = spec.teacher
    if teacher.kind == "served":
        return ServedTeacher(teacher, tokenizer)
    return None if model is None else LocalTeacher(model, tokenizer, describe(teacher))


def answers_dir(config: RunConfig) -> Path:
    """Where each teacher's answers live: runs of the same teachers on the same prompts may
    share the directory (each teacher's manifest checks its weights and settings)."""
    return Path(config.ensemble.answers_dir or Path(config.output_dir) / "ensemble" / "answers")


def teacher_answers(
    config: RunConfig, writers: list[ResponseWriter | None], train: list[Example]
) -> tuple[Answers, dict[str, Any]]:
    """Each teacher's greedy answer to every training prompt, written once per teacher (and
    resumed), and its final answer (`#### N`); the reference answer of each example when the
    responses are the data's own."""
    device = resolve_device(config.train.device)
    settings = GenerateConfig(
        enabled=True,
        max_new_tokens=config.ensemble.answer_max_new_tokens,
        batch_size=config.generate.batch_size,
    )
    asked = with_rationale_prompt(
        [dataclasses.replace(e, response=None, response_ids=None) for e in train],
        config.generate.rationale_prompt,
    )
    by_teacher: list[dict[str, str | None]] = []
    report: dict[str, Any] = {}
    state = PartialState()
    for teacher, writer in zip(config.teachers, writers, strict=True):
        if writer is None:
            raise ValueError(f"teacher {teacher.name} has no weights or server to answer with")
        if isinstance(writer, LocalTeacher):
            writer.model.to(device)  # type: ignore[arg-type]
        path = answers_dir(config) / str(teacher.name) / "answers.jsonl"
        if state.is_main_process:  # one writer; the others read what it wrote
            _, generation = writer.generate(asked, path, settings)
        state.wait_for_everyone()
        answered, read_back = writer.generate(asked, path, settings)
        generation = generation if state.is_main_process else read_back
        finals = {e.id: final_answer(e.response or "") for e in answered}
        by_teacher.append(finals)
        report[str(teacher.name)] = {
            **generation.as_dict(),
            "with_answer": sum(a is not None for a in finals.values()),
        }
    reference: dict[str, str | None] = {}
    if not config.generate.enabled:  # the data's own responses: their answers are the reference
        reference = {e.id: final_answer(e.response or "") for e in train}
    weights = [t.weight for t in config.teachers]
    return Answers(by_teacher, reference, weights), report


# ---------------------------------------------------------------------------------------------
# Sequence-level KD from several teachers: `lmdistill generate` keeps answers by agreement


def generate_by_agreement(
    config: RunConfig, out: Path, train: list[Example], held_out: list[Example]
) -> dict[str, Any]:
    """Every teacher writes a response to every training prompt (its own file under
    `out.parent/<name>/`, resumable, the config's filters applied per teacher); per prompt the
    weighted majority final answer wins (as self-consistency does across samples), and the
    response kept is that of the first teacher, in list order, that gives it. Prompts where no
    teacher has an answer, or the top answers tie, are dropped and counted. Writes the kept
    training examples to `out` (JSONL, for `data.train`); returns the report."""
    from lmdistill.data import write_examples
    from lmdistill.teachers.setup import generating_teacher, write_responses

    for index, teacher in enumerate(config.teachers):
        if not TEACHERS[teacher.kind].writes_text:
            raise ValueError(
                f"teachers[{index}].kind: {teacher.kind!r} returns the responses it stored; "
                "keeping answers by agreement needs teachers that write (local, served)"
            )
    written: list[dict[str, Example]] = []
    report: dict[str, Any] = {"teachers": {}}
    for index, teacher in enumerate(config.teachers):
        spec = member_config(config, index)
        writer, found = generating_teacher(spec)
        path = out.parent / str(teacher.name) / "teacher_responses.jsonl"
        answered, produced = write_responses(spec, writer, train, held_out, path)
        written.append({e.id: e for e in answered["train"]})
        report["teachers"][teacher.name] = {**found, **produced, "output": str(path)}
    answers = Answers(
        [{i: final_answer(e.response or "") for i, e in by_id.items()} for by_id in written],
        {},
        [t.weight for t in config.teachers],
    )
    kept: list[Example] = []
    dropped = {"no_answer": 0, "tie": 0}
    agreed = [0] * len(written)
    wrote = [0] * len(written)
    for prompt in train:
        majority = answers.majority(prompt.id)
        if majority is None:
            any_answer = any(a.get(prompt.id) is not None for a in answers.by_teacher)
            dropped["tie" if any_answer else "no_answer"] += 1
            continue
        chosen = next(j for j, a in enumerate(answers.by_teacher) if a.get(prompt.id) == majority)
        for j, by_id in enumerate(answers.by_teacher):
            agreed[j] += by_id.get(prompt.id) == majority
        kept.append(written[chosen][prompt.id])
        wrote[chosen] += 1
    write_examples(out, kept)
    names = [str(t.name) for t in config.teachers]
    report.update(
        output=str(out),
        prompts=len(train),
        kept=len(kept),
        dropped=dropped,
        agreed_with_majority=dict(zip(names, agreed, strict=True)),
        written_by=dict(zip(names, wrote, strict=True)),
    )
    return report
