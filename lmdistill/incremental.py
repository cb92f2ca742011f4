"""Incremental distillation at the level of runs: what a finished run leaves for the runs that
continue its student (`OUTPUT/memory/`: a replay memory chosen by dataset distillation, the
Fisher estimate), what a continuing run takes from its predecessor (the previous student as
a retention teacher, the anchor), and the lineage it records."""

from __future__ import annotations

import copy
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedModel

from lmdistill.config import RunConfig
from lmdistill.data import Example, data_hash, tokenize_examples, write_examples
from lmdistill.data.memory import (
    EXAMPLES,
    KIND,
    MANIFEST,
    REPLAY_PREFIX,
    open_memory,
    weights_sha256,
)
from lmdistill.dd.scores import hidden_features
from lmdistill.dd.select import select
from lmdistill.io import atomic_dir, atomic_write_json
from lmdistill.kd.incremental import Anchor, fisher_diagonal, load_fisher, save_fisher
from lmdistill.teachers.base import LocalTeacher


def continuation(
    config: RunConfig, student: PreTrainedModel, tokenizer: Any
) -> tuple[LocalTeacher | None, Anchor | None]:
    """The previous student (the model `student.path` holds, as loaded, before any training)
    as a frozen retention teacher, and the anchor to its weights, as the config asks."""
    inc = config.incremental  # its memory was checked with the inputs (pipeline.check_inputs)
    retention = None
    if inc.retention_weight > 0:
        previous = copy.deepcopy(student).eval().requires_grad_(False)
        retention = LocalTeacher(previous, tokenizer, f"previous student {config.student.path}")
    anchor = None
    if inc.anchor != "none":
        fisher = None
        if inc.anchor == "ewc":
            assert inc.memory is not None  # the config's checks require it
            fisher = load_fisher(Path(inc.memory))
        anchor = Anchor(student, inc.anchor_weight, fisher)
    return retention, anchor


def lineage(config: RunConfig, train_examples: list[Example]) -> dict[str, Any] | None:
    """Which student this run continued, on which data, with what memory; None for a run
    that is not incremental. Read before training (the continued student's weights)."""
    inc = config.incremental
    if not inc.used() or not config.student.path:
        return None
    replayed = sum(1 for e in train_examples if e.id.startswith(REPLAY_PREFIX))
    found: dict[str, Any] = {
        "continued": config.student.path,
        "continued_sha256": weights_sha256(Path(config.student.path)),
        "new_data": config.data.train,
        "new_examples": len(train_examples) - replayed,
        "retention_weight": inc.retention_weight,
        "anchor": inc.anchor,
        "anchor_weight": inc.anchor_weight,
        "memory": None,
    }
    if inc.memory is not None:
        memory = open_memory(inc.memory, config.student.path)
        manifest = memory.manifest
        found["memory"] = {
            "directory": inc.memory,
            "replayed_examples": replayed,
            "old_examples": manifest.get("old_examples"),
            "share_of_old": replayed / manifest["old_examples"]
            if manifest.get("old_examples")
            else 0.0,
            "selector": manifest.get("selector"),
            "fisher": manifest.get("fisher"),
            "old_source": manifest.get("source"),
        }
    return found


def build_memory(
    config: RunConfig,
    student_dir: Path,
    student: PreTrainedModel,
    tokenizer: Any,
    examples: list[Example],
) -> dict[str, Any] | None:
    """After a run: `memory.fraction` of its training examples chosen by `memory.selector` over
    the finished student's `memory.features`, and (with `memory.fisher`) the student's
    Fisher estimate, written with a manifest to OUTPUT/memory (atomically). None when the
    config asks for neither."""
    spec = config.memory
    if spec.fraction <= 0 and not spec.fisher:
        return None
    # The training examples as the data gave them (before the rationale objective shapes
    # them: a continuing run shapes its replay as it shapes its own data).
    by_id = {e.id: e for e in examples}
    kept, _ = tokenize_examples(examples, tokenizer, config.data.max_length, on_empty="drop")
    pad_token_id = tokenizer.pad_token_id
    out = Path(config.output_dir) / "memory"
    manifest: dict[str, Any] = {
        "kind": KIND,
        "student": str(student_dir),
        "student_sha256": weights_sha256(student_dir),
        "source": config.data.train,
        "data_hash": data_hash([by_id[item.id] for item in kept]),
        "old_examples": len(kept),
        "examples": 0,
        "fraction": 0.0,
        "selector": None,
        "features": None,
        "fisher": None,
    }
    # At most `fraction` of the examples, whole examples only (so never above 1%).
    budget = int(spec.fraction * len(kept) + 1e-9)
    if spec.fraction > 0 and budget == 0:
        warnings.warn(
            f"memory.fraction={spec.fraction} of {len(kept)} training examples is less than one "
            "example: the memory holds no replay examples",
            stacklevel=2,
        )
    with atomic_dir(out) as tmp:
        if budget > 0:
            costs = np.array([len(item.input_ids) for item in kept], dtype=np.int64)
            features = None
            if spec.features == "hidden":  # else a selector that needs none (random)
                batch = config.eval.batch_size
                features = hidden_features(student, kept, pad_token_id, batch)
            selection = select(
                spec.selector,
                costs=costs,
                budget=budget,
                unit="examples",
                seed=spec.seed,
                features=features,
            )
            chosen = [by_id[kept[i].id] for i in selection.indices]
            write_examples(tmp / EXAMPLES, chosen)
            manifest.update(
                examples=len(chosen),
                fraction=len(chosen) / len(kept),
                selector=spec.selector,
                features=spec.features if features is not None else None,
                ids=[e.id for e in chosen],
            )
        if spec.fisher:
            order = list(range(len(kept)))
            random.Random(spec.seed).shuffle(order)
            sample = [kept[i] for i in sorted(order[: spec.fisher_examples])]
            save_fisher(fisher_diagonal(student, sample, pad_token_id), tmp)
            manifest["fisher"] = {"examples": len(sample)}
        atomic_write_json(tmp / MANIFEST, manifest)
    return {k: v for k, v in manifest.items() if k != "ids"}
