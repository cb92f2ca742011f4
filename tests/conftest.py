"""Shared fixtures: tiny random-weight models built from a config (no network)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch

import lmdistill  # noqa: F401  (sets OpenMP/tokenizer threading defaults before torch loads)
from lmdistill.config import RunConfig
from lmdistill.models.tiny import build_tiny_llama, build_tiny_tokenizer
from lmdistill.validate import load_config

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k"


@pytest.fixture(scope="session")
def tiny_tokenizer() -> Any:
    return build_tiny_tokenizer()


@pytest.fixture
def tiny_teacher(tiny_tokenizer: Any) -> torch.nn.Module:
    return build_tiny_llama(len(tiny_tokenizer), layers=4, hidden=64, seed=0).eval()


# What makes configs/tiny.yaml smaller still (tests that run the CLI pass them too).
TINY_OVERRIDES = [
    "data.max_train_examples=32",
    "data.eval_size=8",
    "generate.max_new_tokens=24",
    "train.max_steps=8",
    "train.batch_size=4",
    "train.checkpoint_every=4",
    "eval.num_samples=1",
    "eval.sample_max_new_tokens=8",
]


def tiny_run_config(tmp_path: Path, *overrides: str) -> RunConfig:
    """configs/tiny.yaml made smaller still, writing into `tmp_path`."""
    base = [f"output_dir={tmp_path / 'run'}", *TINY_OVERRIDES]
    return load_config(ROOT / "configs" / "tiny.yaml", [*base, *overrides])


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def replace(config: Any, **changes: Any) -> Any:
    return dataclasses.replace(config, **changes)


def skip_if_registry_unreachable(error: Exception) -> None:
    """Skip the calling test when `error` says the package registry cannot be reached, and
    return otherwise: the caller re-raises, so a checksum mismatch or a missing version fails."""
    from lmdistill.models.registry import RegistryUnreachableError

    if isinstance(error, RegistryUnreachableError):
        pytest.skip(f"the package registry is unreachable: {error}")
