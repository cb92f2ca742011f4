"""Resumable checkpoints: student weights (safetensors), optimizer, scheduler, RNG, position.

Each checkpoint is written into a temporary directory and renamed into place, so a directory
named `step-NNNNNN` is always complete; a run killed mid-write leaves only a temp dir behind
(removed when the same run starts again).

Nothing in a checkpoint can run code when it is read: the weights are safetensors, the
position is JSON, and the optimizer, scheduler and RNG states hold only tensors, numbers,
strings and containers of them, read with `torch.load(weights_only=True)`, which refuses any
other pickled object. A checkpoint directory from a shared disk or a download is data.
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
from safetensors.torch import load_file, load_model, save_file, save_model
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
    # train.group_objective=dro: the groups' weights q (by group name), carried across steps.
    group_weights: dict[str, float] = field(default_factory=dict)


class CheckpointError(ValueError):
    """A checkpoint is damaged, or holds something other than plain tensors and numbers."""


def rng_state() -> dict[str, Any]:
    """Every generator's state as tensors, numbers and lists (no numpy arrays or other
    objects), so that `torch.load(weights_only=True)` reads it back."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    return {
        "python": [version, torch.tensor(words, dtype=torch.int64), gauss],
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos, has_gauss, cached],
        "torch": torch.random.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, words, gauss = state["python"]
    random.setstate((version, tuple(int(w) for w in words.tolist()), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.random.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def adapters_only(model: nn.Module) -> bool:
    """Whether a checkpoint of `model` holds its trained tensors only: a LoRA student (peft
    marks the model it injects adapters into), whose frozen base the run rebuilds."""
    return any(hasattr(module, "peft_config") for module in model.modules())


def trained_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def checkpoint_bytes(model: nn.Module, optimizer: Any) -> int:
    """About what one checkpoint takes on disk: the weights (tied ones once; a LoRA
    student's trained ones only) plus every tensor in the optimizer's state (for AdamW, two
    moments per trainable weight). `optimizer`: an Optimizer, or anything with its `state`
    and `param_groups` (a sharded one's, whose tensors count whole)."""
    seen: set[int] = set()
    total = 0
    kept = trained_tensors(model) if adapters_only(model) else model.state_dict()
    for tensor in kept.values():
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
        if adapters_only(model):  # the adapters (and modules trained in full) alone
            save_file(trained_tensors(model), str(tmp / "model.safetensors"))
        else:  # save_model de-duplicates tied weights (embedding == output head) correctly.
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
    # Everything is read (and refused, if it must be) before anything is changed.
    optimizer_state = _safe_load(path / "optimizer.pt")
    scheduler_state = _safe_load(path / "scheduler.pt")
    rng = _safe_load(path / "rng.pt")
    try:
        state = TrainState(**json.loads((path / "state.json").read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as error:
        raise CheckpointError(f"{path / 'state.json'} is damaged: {error}") from None
    try:
        if adapters_only(model):
            load_trained(model, path / "model.safetensors")
        else:
            load_model(model, str(path / "model.safetensors"))
        optimizer.load_state_dict(optimizer_state)
        scheduler.load_state_dict(scheduler_state)
        set_rng_state(rng)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
        raise CheckpointError(f"{path} does not fit this run or is damaged: {error}") from None
    return state


def load_trained(model: nn.Module, path: Path) -> None:
    """A LoRA checkpoint into `model`: exactly its trained tensors, or an error."""
    tensors = load_file(str(path))
    expected = set(trained_tensors(model))
    if set(tensors) != expected:
        raise ValueError(
            f"it holds {len(tensors)} tensors, and this run trains {len(expected)} others "
            "(another student.lora setting?)"
        )
    model.load_state_dict(tensors, strict=False)


def _safe_load(path: Path) -> Any:
    """`torch.load` that runs no code: anything but tensors, numbers, strings and containers
    of them (a pickled object whose `__reduce__` would run on load) is refused."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete") from None
    except Exception as error:  # pickle.UnpicklingError, RuntimeError: both mean "not ours"
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"{path} holds something other than tensors and numbers, or is damaged; it was "
            f"not loaded (loading it could run code). Resume only checkpoints lmdistill wrote "
            f"(older releases pickled RNG state: start that run again). ({first})"
        ) from None
