"""`lmdistill conflicts CONFIG`: audit several teachers before paying for a run. Every teacher
scores the run's training responses, as training would, and where they contradict each other
is written out (conflicts.json, conflicts.jsonl, conflicts.md with a histogram); no student
is trained."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lmdistill.config import ConfigError, RunConfig
from lmdistill.data import collate
from lmdistill.io import atomic_write_json, atomic_write_text, directory_lock
from lmdistill.models import check_model_path, resolve_device
from lmdistill.pipeline import prepare_data, teacher_directories
from lmdistill.report.ensemble import conflict_histogram, conflict_lines
from lmdistill.teachers.ensemble import EnsembleTeacher, conflict_report, example_rows
from lmdistill.teachers.ensemble_setup import open_teachers
from lmdistill.teachers.setup import load_splits


@torch.no_grad()
def audit_teachers(config: RunConfig, out: Path, command: str) -> dict[str, Any]:
    """Score every training example with every teacher; write the conflict analysis to
    `out`; return its summary."""
    if not config.teachers:
        raise ConfigError(
            "teachers: `lmdistill conflicts` compares two or more teachers; list them under "
            "`teachers:` (see configs/tiny-ensemble.yaml)"
        )
    for i, teacher in enumerate(config.teachers):
        check_model_path(teacher, f"teachers[{i}].path")
    load_splits(config)
    started = time.perf_counter()
    with contextlib.ExitStack() as held:
        for directory in dict.fromkeys([out, *teacher_directories(config)]):
            held.enter_context(directory_lock(directory, "audits teachers"))
        setup = open_teachers(config)
        ensemble = setup.signal["train"]
        assert isinstance(ensemble, EnsembleTeacher)
        data = prepare_data(config, setup)
        ensemble.bind(data.train_set)
        ensemble.prepare(resolve_device(config.train.device), config.loss)
        pad = setup.tokenizer.pad_token_id
        size = config.eval.batch_size
        items = data.train_set
        for start in tqdm(range(0, len(items), size), desc="conflicts", unit="batch"):
            indices = list(range(start, min(start + size, len(items))))
            ensemble.score(collate([items[i] for i in indices], pad), indices, config.loss)
        summary = conflict_report(ensemble, config.ensemble.shown)
        rows = "".join(json.dumps(row) + "\n" for row in example_rows(ensemble))
        atomic_write_text(out / "conflicts.jsonl", rows)
        result = {
            "command": command,
            "seconds": time.perf_counter() - started,
            "setup": setup.report.get("ensemble", {}),
            "conflicts": summary,
        }
        atomic_write_json(out / "conflicts.json", result)
        conflict_histogram(summary, out / "conflict.png")
        lines = ["# Where the teachers contradict each other", "", *conflict_lines(summary,
                 "conflict.png")]  # fmt: skip
        atomic_write_text(out / "conflicts.md", "\n".join(lines) + "\n")
    print(f"wrote {out}/conflicts.md, conflicts.json, conflicts.jsonl", file=sys.stderr)
    return result
