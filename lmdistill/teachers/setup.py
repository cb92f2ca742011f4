"""From `teacher.kind` to the examples and the teacher signal a run trains and evaluates on.

- `local`: the model in this process scores every batch (and writes responses when
  `generate.enabled`).
- `served`: the conformance probe (when `teacher.probe`), then the server writes the responses
  with their top-k log-probs, which are stored as a cache: training reads the cache.
- `cache`: the examples and the signal `lmdistill cache` stored; no teacher in memory.

Caches live in `cache.dir` (default OUTPUT_DIR/teacher_cache), one per split: train/, eval/.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

from accelerate import PartialState
from transformers import PreTrainedModel

from lmdistill.config import RunConfig
from lmdistill.config.checks import check
from lmdistill.data import (
    Example,
    TokenizedExample,
    data_hash,
    load_examples,
    tokenize_examples,
)
from lmdistill.models import describe, load_model, resolve_device, weights_fingerprint
from lmdistill.teachers.backends import TEACHERS, TeacherSetup, register_teacher
from lmdistill.teachers.base import (
    CachedTeacher,
    LocalTeacher,
    ResponseWriter,
    ServedTeacher,
    Teacher,
)
from lmdistill.teachers.cache import (
    REBUILD,
    CacheError,
    CacheSpec,
    TeacherCache,
    bytes_per_token,
    read_manifest,
    tokenizer_identity,
    write_cache,
    write_rows,
)
from lmdistill.teachers.consistency import (
    as_asked,
    expand_samples,
    filtering,
    select_rationales,
    with_rationale_prompt,
)
from lmdistill.teachers.generate import read_finished
from lmdistill.teachers.served import conformance_probe, rows_scorer

SPLITS = ("train", "eval")


def cache_dir(config: RunConfig) -> Path:
    return Path(config.cache.dir or Path(config.output_dir) / "teacher_cache")


def generation_path(config: RunConfig) -> Path:
    return Path(config.output_dir) / "generate" / "teacher_responses.jsonl"


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
    for name in ("base_url", "model"):
        value = getattr(teacher, name)
        check(bool(value), f"teacher.{name}", value, "a value when teacher.kind=served")
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
    caches = [_open(config, tokenizer, split) for split in SPLITS]
    return CachedTeacher(caches[0], others=caches[1:]), {}


@register_teacher(
    "local",
    generating=_local_generating,
    check=lambda config: None,
    in_process=True,
    caches_signal=False,
    writes_text=True,
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
        report["cache"] = _write_local_caches(config, setup, prompts)
    return setup


@register_teacher(
    "served",
    generating=_served_generating,
    check=_check_served,
    in_process=False,
    caches_signal=True,
    writes_text=True,
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
    report["cache"] = _write_served_caches(config, tokenizer, served, examples, prompts)
    caches = {s: CachedTeacher(_open(config, tokenizer, s)) for s in SPLITS}
    return TeacherSetup(tokenizer, model, examples, dict(caches), report)


@register_teacher(
    "cache",
    generating=_cache_generating,
    check=_no_features,
    in_process=False,
    caches_signal=True,
    writes_text=False,
)
def _open_cache(config: RunConfig, write_local_cache: bool) -> TeacherSetup:
    """The examples and the signal `lmdistill cache` stored; no teacher in memory. A cache
    not yet complete is written first with the local copy of the teacher (paid for once)."""
    model, tokenizer = load_model(config.teacher)
    train, held_out = load_splits(config)
    examples = {"train": train, "eval": held_out}
    written: dict[str, Any] = {}
    if not _cache_complete(config):
        device = resolve_device(config.train.device)
        model.to(device)  # type: ignore[arg-type]  # transformers' wrapped `to`
        writer = LocalTeacher(model, tokenizer, describe(config.teacher))
        if config.generate.enabled:
            examples, written["generate"] = _generate(config, writer, examples)
        staged = TeacherSetup(tokenizer, model, examples, {})
        prompts = {"train": train, "eval": held_out}
        written["cache"] = _write_local_caches(config, staged, prompts)
        model.to("cpu")  # type: ignore[arg-type]  # training reads the cache, not the model
    setup = _from_cache(config, model, tokenizer, {"train": train, "eval": held_out})
    if "cache" in written:  # what this call wrote, with its size
        for split, summary in written["cache"].items():
            setup.report["cache"][split].update(summary)
    if "generate" in written:
        setup.report["generate"] = written["generate"]
    return setup


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
    """Train and held-out examples; without `data.eval`, hold out `eval_size` at random."""
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


def _spec(config: RunConfig, tokenizer: Any, **fields: Any) -> CacheSpec:
    values: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "max_length": config.data.max_length,
        "shard_size": config.cache.shard_size,
        **tokenizer_identity(tokenizer),
        **fields,
    }
    return CacheSpec(**values)


def prompts_hash(prompts: list[Example]) -> str:
    """Which prompts a cache answers (ids and prompt turns, not responses): a cache read with
    `teacher.kind: cache` must have been written for the prompts the config loads now."""
    return data_hash([dataclasses.replace(p, response=None, response_ids=None) for p in prompts])


def split_temperature(config: RunConfig, split: str) -> float:
    """The temperature a split's cache holds log-probs at: the loss temperature for training;
    1 for the held-out split, since fidelity is measured against the teacher as it is."""
    return config.loss.temperature if split == "train" else 1.0


def generation_identity(config: RunConfig) -> dict[str, Any]:
    """The settings that decide what the teacher wrote (`{}`: the data's own responses)."""
    if not config.generate.enabled:
        return {}
    settings = dataclasses.asdict(config.generate)
    return {k: v for k, v in settings.items() if k not in ("enabled", "batch_size")}


def _cache_complete(config: RunConfig) -> bool:
    """Both splits are cached in full. Anything else (absent, unfinished, damaged) goes to the
    writer, which finishes this run's own cache and refuses, by name, anything else."""
    for split in SPLITS:
        directory = cache_dir(config) / split
        if not (directory / "manifest.json").is_file():
            return False
        try:
            shards = read_manifest(directory)["shards"]
            lines = (directory / "examples.jsonl").read_text().splitlines()
        except (CacheError, OSError, ValueError):
            return False
        if sum(shard["examples"] for shard in shards) != len([line for line in lines if line]):
            return False
    return True


def _write_local_caches(
    config: RunConfig, setup: TeacherSetup, prompts: dict[str, list[Example]]
) -> dict[str, Any]:
    assert setup.model is not None
    out: dict[str, Any] = {}
    weights = weights_fingerprint(setup.model)
    for split in SPLITS:
        tokenized, examples = _tokenized(config, setup.tokenizer, setup.examples[split])
        spec = _spec(
            config,
            setup.tokenizer,
            teacher=describe(config.teacher),
            data_hash=data_hash(examples),
            prompts_hash=prompts_hash(prompts[split]),
            k=config.cache.k,
            temperature=split_temperature(config, split),
            writer="local",
            teacher_weights=weights,
            generate=generation_identity(config),
        )
        state = PartialState()
        if state.is_main_process:  # one writer; the other processes read the finished cache
            manifest = write_cache(
                setup.model,
                tokenized,
                cache_dir(config) / split,
                spec,
                pad_token_id=setup.tokenizer.pad_token_id,
                texts=examples,
            )
            out[split] = _summary(manifest, spec)
        state.wait_for_everyone()
    return out


def _write_served_caches(
    config: RunConfig,
    tokenizer: Any,
    served: ServedTeacher,
    examples: dict[str, list[Example]],
    prompts: dict[str, list[Example]],
) -> dict[str, Any]:
    rows = read_finished(generation_path(config))
    out: dict[str, Any] = {}
    k = config.teacher.top_logprobs
    for split in SPLITS:
        tokenized, kept = _tokenized(config, tokenizer, examples[split])
        spec = _spec(
            config,
            tokenizer,
            teacher=served.identity,
            data_hash=data_hash(kept),
            prompts_hash=prompts_hash(prompts[split]),
            k=k,
            temperature=1.0,  # servers report log-probs at temperature 1
            writer="served",
            generate=generation_identity(config),
        )
        state = PartialState()
        if state.is_main_process:
            manifest = write_rows(
                rows_scorer(rows, k),
                tokenized,
                cache_dir(config) / split,
                spec,
                texts=kept,
            )
            out[split] = _summary(manifest, spec)
        state.wait_for_everyone()
    return out


def _tokenized(
    config: RunConfig, tokenizer: Any, examples: list[Example]
) -> tuple[list[TokenizedExample], list[Example]]:
    """Tokenised examples and the examples they came from (those too long are dropped), so
    that cache row i, training example i and stored text i are the same example."""
    tokenized, _ = tokenize_examples(
        examples,
        tokenizer,
        config.data.max_length,
        config.data.on_truncation,
        on_empty=config.data.on_empty,
    )
    kept = {item.id for item in tokenized}
    return tokenized, [e for e in examples if e.id in kept]


def _summary(manifest: dict[str, Any], spec: CacheSpec) -> dict[str, Any]:
    assert spec.k is not None
    tokens = sum(shard["tokens"] for shard in manifest["shards"])
    per_token = bytes_per_token(spec.k, spec.vocab_size)
    return {
        "examples": sum(shard["examples"] for shard in manifest["shards"]),
        "tokens": tokens,
        "k": spec.k,
        "bytes_per_token": per_token,
        "bytes": tokens * per_token,
    }


def _open(
    config: RunConfig, tokenizer: Any, split: str, prompts: list[Example] | None = None
) -> TeacherCache:
    """Open a split's cache as `teacher.kind: cache` reads it: any teacher and k, but these
    prompts (when given), this tokenizer, chat template, max_length and (loss) temperature."""
    spec = _spec(
        config,
        tokenizer,
        teacher=None,
        data_hash=None,
        prompts_hash=None if prompts is None else prompts_hash(prompts),
        k=None,
        temperature=split_temperature(config, split),
        shard_size=None,
    )
    return TeacherCache(cache_dir(config) / split, spec)


def _from_cache(
    config: RunConfig,
    model: PreTrainedModel,
    tokenizer: Any,
    prompts: dict[str, list[Example]],
) -> TeacherSetup:
    caches = {split: _open(config, tokenizer, split, prompts[split]) for split in SPLITS}
    weights = weights_fingerprint(model)
    examples = {}
    for split, cache in caches.items():
        check_writer(cache, config, weights)
        examples[split] = cache.examples()
        if data_hash(examples[split]) != cache.manifest["data_hash"]:
            raise CacheError(
                f"{cache.dir}/examples.jsonl does not match the cached signal; "
                + REBUILD.format(dir=cache_dir(config))
            )
        if len(examples[split]) != cache.num_examples:
            raise CacheError(
                f"{cache.dir}: {cache.num_examples} of {len(examples[split])} examples are "
                "cached (an interrupted write): run the same command again to finish it"
            )
    report = {"cache": {s: {"teacher": c.teacher, **_counts(c)} for s, c in caches.items()}}
    signal: dict[str, Teacher] = {s: CachedTeacher(c) for s, c in caches.items()}
    return TeacherSetup(tokenizer, model, examples, signal, report)


def check_writer(cache: TeacherCache, config: RunConfig, weights: str) -> None:
    """`teacher.kind: cache` trains on what the cache holds: it must be what this config's
    teacher wrote (the same model and weights, or the same served model; the same k; the same
    generation settings). Each difference is named."""
    manifest = cache.manifest
    served = manifest.get("writer") == "served"
    expected: dict[str, Any] = {"generate": generation_identity(config)}
    if served:
        expected["k"] = config.teacher.top_logprobs  # a server's cache holds what it returned
        if config.teacher.model:
            name = str(manifest["teacher"]).removeprefix("served:").rsplit("@", 1)[0]
            if name != config.teacher.model:
                expected["teacher"] = f"served:{config.teacher.model}@..."
    else:
        expected.update(
            {"teacher": describe(config.teacher), "teacher_weights": weights, "k": config.cache.k}
        )
    # The setting a user changes to match: a served cache holds teacher.top_logprobs.
    setting = {"k": "teacher.top_logprobs" if served else "cache.k", "teacher": "teacher"}
    differ = [k for k, v in expected.items() if manifest.get(k) != v]
    if differ:
        detail = "; ".join(
            f"{setting.get(k, k)}: cache {manifest.get(k)!r}, config {expected[k]!r}"
            for k in differ
        )
        raise CacheError(
            f"{cache.dir} was written by another teacher or settings ({detail}); set the config "
            "to match, or " + REBUILD.format(dir=cache_dir(config))
        )


def _counts(cache: TeacherCache) -> dict[str, Any]:
    return {
        "examples": cache.num_examples,
        "tokens": sum(s["tokens"] for s in cache.manifest["shards"]),
        "k": cache.manifest["k"],
    }
