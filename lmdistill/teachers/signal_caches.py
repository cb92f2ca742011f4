"""A run's teacher-signal caches, one per split (train/, eval/) under `cache.dir`: written
once (by the local teacher, or from a server's answers), checked against the run that opens
them (same teacher weights, tokenizer, prompts and signal settings), opened for training."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from accelerate import PartialState
from transformers import PreTrainedModel

from lmdistill.config import RunConfig
from lmdistill.data import (
    Example,
    TokenizedExample,
    data_hash,
    tokenize_examples,
)
from lmdistill.models import describe, weights_fingerprint
from lmdistill.teachers.backends import TeacherSetup
from lmdistill.teachers.base import (
    CachedTeacher,
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
from lmdistill.teachers.generate import read_finished
from lmdistill.teachers.served import rows_scorer

SPLITS = ("train", "eval")


def cache_dir(config: RunConfig) -> Path:
    return Path(config.cache.dir or Path(config.output_dir) / "teacher_cache")


def generation_path(config: RunConfig) -> Path:
    return Path(config.output_dir) / "generate" / "teacher_responses.jsonl"


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
    if not settings["drop_truncated"]:  # newer than some caches: recorded only when set
        del settings["drop_truncated"]
    return {k: v for k, v in settings.items() if k not in ("enabled", "batch_size")}


def cache_complete(config: RunConfig) -> bool:
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


def write_local_caches(
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


def write_served_caches(
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


def open_split(
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


def from_cache(
    config: RunConfig,
    model: PreTrainedModel,
    tokenizer: Any,
    prompts: dict[str, list[Example]],
) -> TeacherSetup:
    caches = {split: open_split(config, tokenizer, split, prompts[split]) for split in SPLITS}
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
