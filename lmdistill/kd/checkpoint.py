"""Resumable checkpoints: student weights (safetensors), optimizer, scheduler, RNG, position.

Each checkpoint is written into a temporary directory and renamed into place, so a directory
named `step-NNNNNN` is always complete; a run killed mid-write leaves only a temp dir behind.
"""

from __future__ import annotations

import errno
import json
import random
import shutil
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from torch import nn

from lmdistill.io import DiskFullError, atomic_dir, free_bytes

PREFIX = "step-"


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs to continue exactly."""

    step: int = 0  # optimizer steps done; also the data position (batches are a function of it)
    tokens: int = 0  # response tokens trained on, all processes
    config_hash: str = ""
    history: list[dict[str, float]] = field(default_factory=list)


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.random.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.random.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """About what one checkpoint takes on disk: the weights (tied ones once) plus every
    tensor in the optimizer's state (for AdamW, two moments per trainable weight)."""
    seen: set[int] = set()
    total = 0
    for tensor in model.state_dict().values():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    stored = sum(
        v.numel() * v.element_size()
        for state in optimizer.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor)
    )
    if stored:
        return total + stored
    # Before the first step the state is empty: AdamW keeps two moments per trainable weight,
    # in the weight's dtype.
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    return total + sum(2 * p.numel() * p.element_size() for p in params)


def check_room(directory: Path, need: int, keep: int, warn: bool = True) -> None:
    """Refuse a run whose next checkpoint cannot fit on the disk (before hours of training),
    and warn when the `keep` checkpoints plus the one being written may not (those already
    written, on a resumed run, hold their space already)."""
    free = free_bytes(directory)
    written = len(list_checkpoints(directory))
    mib = 2**20
    if free < need:
        raise DiskFullError(
            errno.ENOSPC,
            f"a checkpoint of this run takes about {need / mib:.0f} MiB, and {directory} has "
            f"{free / mib:.0f} MiB free: free some space, or set train.checkpoint_every=0 "
            "(no checkpoints: a killed run cannot resume)",
        )
    if warn and free < max(1, keep + 1 - written) * need:
        warnings.warn(
            f"{directory} has {free / mib:.0f} MiB free; train.keep_checkpoints={keep} "
            f"checkpoints of about {need / mib:.0f} MiB, plus the one being written, may not fit",
            stacklevel=2,
        )


def save_checkpoint(
    directory: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: TrainState,
    keep: int,
) -> Path:
    target = directory / f"{PREFIX}{state.step:06d}"
    with atomic_dir(target) as tmp:
        # save_model de-duplicates tied weights (embedding == output head) correctly.
        save_model(model, str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(asdict(state), indent=1))
    for old in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def list_checkpoints(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> TrainState:
    load_model(model, str(path / "model.safetensors"))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return TrainState(**json.loads((path / "state.json").read_text()))
