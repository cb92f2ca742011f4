"""`lmdistill select`: score -> select -> materialise.

Writes under `select.out` (default OUTPUT_DIR/select):
    scores/score-<scorer>[-<model>]/     values.npy + manifest.json (see lmdistill/dd/scores.py)
    scores/features-<kind>[-<model>]/    features.npy + manifest.json
    subset.jsonl                         the selected examples (messages JSONL, original ids)
    selection.json                       what was selected, how, from what (ids, budget, tokens)
    select.md                            a readable summary

Scores are computed once per (scorer, model, data) and reused by every later selection, so a
protocol over budgets and selectors pays for each scorer once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel

from lmdistill.config import ModelConfig, RunConfig
from lmdistill.data import Example, data_hash, load_examples, tokenize_examples, write_examples
from lmdistill.dd import gradients, scores
from lmdistill.dd.select import SELECTORS, Selection, select
from lmdistill.io import atomic_write_json, atomic_write_text
from lmdistill.models import (
    build_student,
    check_tokenizers,
    describe,
    load_model,
    resolve_device,
    shared_vocab_size,
    weights_fingerprint,
)
from lmdistill.registry import Registry
from lmdistill.report.selection import render_selection

EMBEDDING_ALIASES = ("all-minilm-l6-v2",)


@dataclass
class Pool:
    """The data a selection draws from, tokenised once."""

    examples: list[Example]
    items: list[Any]  # TokenizedExample, aligned with examples
    costs: np.ndarray  # tokens per example
    hash: str
    dropped: int


def select_dir(config: RunConfig) -> Path:
    return Path(config.select.out or Path(config.output_dir) / "select")


def scores_dir(config: RunConfig) -> Path:
    return Path(config.select.scores_dir or select_dir(config) / "scores")


class Models:
    """The models a selection needs, loaded on first use."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.device = resolve_device(config.train.device)  # scoring runs where training would
        self._teacher: tuple[PreTrainedModel, Any] | None = None
        self._scorer: PreTrainedModel | None = None

    @property
    def teacher(self) -> tuple[PreTrainedModel, Any]:
        if self._teacher is None:
            # On the CPU until its weights compute (often only its tokenizer is needed).
            self._teacher = load_model(self.config.teacher)
        return self._teacher

    @property
    def tokenizer(self) -> Any:
        return self.teacher[1]

    def scorer(self) -> PreTrainedModel:
        """`select.model` on the device, to compute with."""
        model = self._scorer_weights()
        model.to(self.device)  # type: ignore[arg-type]  # transformers' wrapped `to`
        return model

    def _scorer_weights(self) -> PreTrainedModel:
        """`select.model`: the student as the config builds it, the teacher, or a path."""
        if self._scorer is None:
            choice = self.config.select.model
            teacher, tokenizer = self.teacher
            if choice == "teacher":
                self._scorer = teacher
            elif choice == "student":
                torch.manual_seed(self.config.train.seed)
                self._scorer, _ = build_student(self.config.student, teacher, tokenizer)
            else:
                model, other = load_model(ModelConfig(path=choice))
                check_tokenizers(tokenizer, other)
                self._scorer = model
            self._scorer.eval()
        return self._scorer

    def identity(self) -> str:
        choice = self.config.select.model
        name = describe(self.config.teacher) if choice == "teacher" else choice
        if choice == "student":
            name = f"student({self.config.student.init}, {self.config.student.num_layers} layers)"
        return f"{name} weights={weights_fingerprint(self._scorer_weights())}"


def load_pool(config: RunConfig, tokenizer: Any) -> Pool:
    data = config.data
    examples = load_examples(data.train, split=data.split, format=data.format)
    if data.max_train_examples is not None:
        examples = examples[: data.max_train_examples]
    missing = [e for e in examples if e.response is None]
    if missing:
        raise ValueError(
            f"{missing[0].source}: {len(missing)} examples have no response; selection scores "
            "prompt-response pairs (run `lmdistill generate` first for prompts only)"
        )
    ids = [e.id for e in examples]
    if len(set(ids)) != len(ids):
        repeated = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(
            f"{data.train}: example id {repeated!r} appears more than once; a selection is a set "
            "of ids, so ids must be unique"
        )
    items, report = tokenize_examples(
        examples, tokenizer, data.max_length, data.on_truncation, on_empty=data.on_empty
    )
    kept = {item.id for item in items}
    if report.dropped or report.empty:  # prompt fills max_length, or empty: not selectable
        examples = [e for e in examples if e.id in kept]
    assert [e.id for e in examples] == [item.id for item in items]
    costs = scores.total_tokens(items)
    return Pool(examples, items, costs, data_hash(examples), report.dropped)


ScoreFn = Callable[[RunConfig, Pool, Models], np.ndarray]


@dataclass(frozen=True)
class Scorer:
    """How one scorer computes a value per pool example (saved under `scores_dir`)."""

    compute: ScoreFn
    uses_model: bool = True  # False: its values depend on the tokenizer alone
    # Settings beside data.max_length that its values depend on (part of the saved identity).
    params: Callable[[RunConfig, Models], dict[str, Any]] | None = None
    # Values a selector that prefers high scores must rank last, and the count's info key.
    rank_last: tuple[Callable[[np.ndarray], np.ndarray], str] | None = None


SCORERS: Registry[Scorer] = Registry("scorer", "select.scorer")
# A feature kind computes (or loads) a (pool, d) matrix; `stop_after` batches, if it can stop.
FeatureFn = Callable[[RunConfig, Pool, Models, int | None], np.ndarray]
FEATURES: Registry[FeatureFn] = Registry("feature kind", "select.features")


def register_scorer(
    name: str,
    *,
    uses_model: bool = True,
    params: Callable[[RunConfig, Models], dict[str, Any]] | None = None,
    rank_last: tuple[Callable[[np.ndarray], np.ndarray], str] | None = None,
) -> Callable[
    [Callable[[RunConfig, Pool, Models], np.ndarray]],
    Callable[[RunConfig, Pool, Models], np.ndarray],
]:
    return SCORERS.register_as(name, lambda fn: Scorer(fn, uses_model, params, rank_last))


def compute_scores(config: RunConfig, pool: Pool, models: Models) -> np.ndarray | None:
    kind = config.select.scorer
    if kind is None:
        return None
    scorer = SCORERS.lookup(kind)
    model_tag = f"-{_tag(config.select.model)}" if scorer.uses_model else ""
    directory = scores_dir(config) / f"score-{kind}{model_tag}"
    params: dict[str, Any] = {"max_length": config.data.max_length}
    if scorer.params is not None:
        params.update(scorer.params(config, models))
    identity = scores.Identity(
        name=f"score:{kind}",
        model=models.identity() if scorer.uses_model else _tokenizer_identity(models.tokenizer),
        data_hash=pool.hash,
        examples=len(pool.examples),
        params=params,
    )
    values = scores.saved_array(directory, identity, lambda: scorer.compute(config, pool, models))
    return np.asarray(values, dtype=np.float64)


@register_scorer("length", uses_model=False)
def _length(config: RunConfig, pool: Pool, models: Models) -> np.ndarray:
    return scores.response_tokens(pool.items).astype(np.float64)


@register_scorer("perplexity")
def _perplexity(config: RunConfig, pool: Pool, models: Models) -> np.ndarray:
    pad, batch_size = models.tokenizer.pad_token_id, config.select.batch_size
    return np.exp(scores.response_nll(models.scorer(), pool.items, pad, batch_size))


# Superfiltering drops IFD >= 1: the instruction does not help predict the response.
@register_scorer("ifd", rank_last=(lambda v: v >= 1.0, "ifd_at_least_1_ranked_last"))
def _ifd(config: RunConfig, pool: Pool, models: Models) -> np.ndarray:
    return scores.ifd_scores(
        models.scorer(),
        pool.examples,
        models.tokenizer,
        config.data.max_length,
        config.select.batch_size,
    )


def _teacher_identity(config: RunConfig, models: Models) -> dict[str, Any]:
    return {
        "teacher": f"{describe(config.teacher)} weights={weights_fingerprint(models.teacher[0])}"
    }


@register_scorer("divergence", params=_teacher_identity)
def _divergence(config: RunConfig, pool: Pool, models: Models) -> np.ndarray:
    teacher = models.teacher[0]
    teacher.to(models.device)  # type: ignore[arg-type]  # transformers' wrapped `to`
    student = models.scorer()
    vocab = shared_vocab_size(teacher, student, models.tokenizer)
    pad = models.tokenizer.pad_token_id
    return scores.divergence_scores(
        teacher, student, pool.items, pad, vocab, config.select.batch_size
    )


def _gradient_score_params(config: RunConfig, models: Models) -> dict[str, Any]:
    sel = config.select
    return {
        **_gradient_params(sel),
        "target": sel.target,
        "target_size": sel.target_size,
        "target_hash": data_hash(_target_examples(config)),
    }


@register_scorer("gradient", params=_gradient_score_params)
def _gradient(config: RunConfig, pool: Pool, models: Models) -> np.ndarray:
    features = compute_features(config, pool, models, "gradient")
    return gradients.less_scores(features, _target_features(config, models))


def _tag(model: str) -> str:
    """A directory name for a scoring model: a path's base name and a hash of the path."""
    if model in ("student", "teacher") or model in EMBEDDING_ALIASES:
        return model
    import hashlib

    digest = hashlib.sha256(model.encode()).hexdigest()[:8]
    return f"{Path(model).name or 'model'}-{digest}"


def _tokenizer_identity(tokenizer: Any) -> str:
    from lmdistill.teachers.cache import tokenizer_identity

    return "tokenizer " + json.dumps(tokenizer_identity(tokenizer), sort_keys=True)


def _gradient_params(sel: Any) -> dict[str, Any]:
    return {
        "lora_rank": sel.lora_rank,
        "lora_modules": list(sel.lora_modules),
        "grad_dim": sel.grad_dim,
        "seed": sel.seed,
    }


def compute_features(
    config: RunConfig,
    pool: Pool,
    models: Models,
    kind: str,
    *,
    stop_after: int | None = None,
) -> np.ndarray:
    return FEATURES.lookup(kind)(config, pool, models, stop_after)


@FEATURES.register("embedding")
def _embedding(config: RunConfig, pool: Pool, models: Models, stop_after: int | None) -> np.ndarray:
    model_name = config.select.embedding_model
    directory = scores_dir(config) / f"features-embedding-{_tag(model_name)}"
    identity = scores.Identity("features:embedding", model_name, pool.hash, len(pool.examples), {})
    return np.asarray(
        scores.saved_array(
            directory,
            identity,
            lambda: scores.sentence_embeddings(
                embedding_dir(model_name), pool.examples, device=models.device
            ),
        )
    )


def _model_features(
    config: RunConfig, pool: Pool, models: Models, kind: str, params: dict[str, Any]
) -> tuple[Path, scores.Identity]:
    """Where a model's features of `kind` are saved, and what they depend on."""
    directory = scores_dir(config) / f"features-{kind}-{_tag(config.select.model)}"
    identity = scores.Identity(
        f"features:{kind}",
        models.identity(),
        pool.hash,
        len(pool.examples),
        {"max_length": config.data.max_length, **params},
    )
    return directory, identity


@FEATURES.register("hidden")
def _hidden(config: RunConfig, pool: Pool, models: Models, stop_after: int | None) -> np.ndarray:
    directory, identity = _model_features(config, pool, models, "hidden", {})
    pad, batch_size = models.tokenizer.pad_token_id, config.select.batch_size
    return np.asarray(
        scores.saved_array(
            directory,
            identity,
            lambda: scores.hidden_features(models.scorer(), pool.items, pad, batch_size),
        )
    )


@FEATURES.register("gradient")
def _gradient_features(
    config: RunConfig, pool: Pool, models: Models, stop_after: int | None
) -> np.ndarray:
    sel = config.select
    directory, identity = _model_features(config, pool, models, "gradient", _gradient_params(sel))
    if scores.check_manifest(directory, identity):
        return np.load(directory / "features.npy", mmap_mode="r")
    started = time.perf_counter()
    features = gradients.gradient_features(
        models.scorer(),
        pool.items,
        models.tokenizer.pad_token_id,
        directory=directory,
        identity=identity.as_dict(),
        modules=list(sel.lora_modules),
        rank=sel.lora_rank,
        dim=sel.grad_dim,
        seed=sel.seed,
        batch_size=sel.batch_size,
        stop_after=stop_after,
    )
    if features is None:
        raise InterruptedError(f"stopped after {stop_after} batches (resumable)")
    atomic_write_json(
        directory / "manifest.json",
        {**identity.as_dict(), "seconds": time.perf_counter() - started},
    )
    return features


def _target_examples(config: RunConfig) -> list[Example]:
    sel = config.select
    assert sel.target is not None
    examples = load_examples(sel.target, split=config.data.split, format=config.data.format)
    examples = [e for e in examples if e.response is not None][: sel.target_size]
    if not examples:
        raise ValueError(f"select.target: {sel.target} holds no examples with a response")
    return examples


def _target_features(config: RunConfig, models: Models) -> np.ndarray:
    sel = config.select
    examples = _target_examples(config)
    items, report = tokenize_examples(examples, models.tokenizer, config.data.max_length, "warn")
    if report.dropped:
        raise ValueError(
            f"select.target: {report.dropped} target examples do not fit data.max_length="
            f"{config.data.max_length}"
        )
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        features = gradients.gradient_features(
            models.scorer(),
            items,
            models.tokenizer.pad_token_id,
            directory=Path(tmp),
            identity={"target": sel.target},
            modules=list(sel.lora_modules),
            rank=sel.lora_rank,
            dim=sel.grad_dim,
            seed=sel.seed,
            batch_size=sel.batch_size,
        )
        assert features is not None
        return np.array(features)


def embedding_dir(name: str) -> Path:
    """A sentence-embedding model directory: the packaged all-MiniLM-L6-v2, or a path."""
    if name in EMBEDDING_ALIASES:
        from lmdistill.models.registry import resolve_directory

        return resolve_directory(name)
    return Path(name)


def strata_labels(config: RunConfig, pool: Pool) -> np.ndarray | None:
    sel = config.select
    if sel.stratify == "none":
        return None
    if sel.stratify == "lines":
        return np.array([len((e.response or "").strip().splitlines()) for e in pool.examples])
    lengths = scores.response_tokens(pool.items)
    edges = np.quantile(lengths, np.linspace(0, 1, sel.strata + 1)[1:-1])
    return np.searchsorted(edges, lengths, side="right")


def run_select(config: RunConfig, *, stop_after: int | None = None) -> dict[str, Any]:
    """Score, select and write the subset; return the selection's summary."""
    started = time.perf_counter()
    sel = config.select
    models = Models(config)
    pool = load_pool(config, models.tokenizer)
    score_values = compute_scores(config, pool, models)
    excluded, rank_last = 0, SCORERS[sel.scorer].rank_last if sel.scorer else None
    if rank_last is not None and score_values is not None and SELECTORS[sel.selector].high_first:
        last, label = rank_last
        unhelpful = last(score_values)
        excluded = int(unhelpful.sum())
        score_values = np.where(unhelpful, -np.inf, score_values)
    features = None
    if sel.features is not None:
        features = compute_features(config, pool, models, sel.features, stop_after=stop_after)
    selection = select(
        sel.selector,
        costs=pool.costs,
        budget=sel.budget,
        unit=sel.budget_unit,
        seed=sel.seed,
        scores=score_values,
        features=features,
        strata=strata_labels(config, pool),
        threshold=sel.threshold,
        clusters=sel.clusters,
    )
    if excluded:
        selection.info[label] = excluded
    return materialise(config, pool, selection, time.perf_counter() - started)


def materialise(
    config: RunConfig, pool: Pool, selection: Selection, seconds: float
) -> dict[str, Any]:
    out = select_dir(config)
    sel = config.select
    chosen = [pool.examples[i] for i in selection.indices]
    write_examples(out / "subset.jsonl", chosen)
    summary = {
        "source": config.data.train,
        "data_hash": pool.hash,
        "pool_examples": len(pool.examples),
        "pool_tokens": int(pool.costs.sum()),
        "dropped_too_long": pool.dropped,
        "scorer": sel.scorer,
        "features": sel.features,
        "model": sel.model if (sel.scorer or sel.features) else None,
        "selector": sel.selector,
        "budget": sel.budget,
        "budget_unit": sel.budget_unit,
        "seed": sel.seed,
        "selected": len(selection.indices),
        "selected_tokens": selection.tokens,
        "fraction_examples": len(selection.indices) / len(pool.examples),
        "fraction_tokens": selection.tokens / float(pool.costs.sum()),
        "seconds": seconds,
        "info": selection.info,
        "subset": str(out / "subset.jsonl"),
        "subset_hash": data_hash(chosen),
        "ids": [e.id for e in chosen],
    }
    atomic_write_json(out / "selection.json", summary)
    atomic_write_text(out / "select.md", render_selection(summary))
    return summary
