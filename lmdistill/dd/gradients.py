"""LESS-style gradient features: per-example LoRA gradients, randomly projected, streamed to disk.

LESS (Xia et al. 2024) scores a training example by the cosine between its (projected) LoRA
gradient and the gradients of a small target set. Here:

- LoRA adapters (rank r, A random, B = 0 as LoRA initialises them) go on the named linear
  layers of a copy of the model. With B = 0 the gradient of an example's loss wrt B is
  `scale * sum_t delta_t (A x_t)^T`: the full weight gradient seen through the random map A.
  The gradients wrt A are 0 at B = 0 and are not used.
- Per-example gradients come from one batched backward pass: each layer keeps its input
  projection `h = A x` and the gradient `delta` reaching its LoRA output, and the per-example
  outer products are summed over that example's tokens (each example's loss is its own mean
  NLL, so the batch's summed loss carries every example's gradient separately).
- The flattened gradient (P values) is projected to `dim` values by a Gaussian matrix
  N(0, 1/dim) that is never stored whole: it is drawn in blocks of rows from seeded
  generators, so the same seed gives the same projection on any machine.
- Rows are written into `features.partial.npy` through a file handle as each batch finishes,
  and `progress.json` records how many are done: memory does not grow with the dataset, and an
  interrupted run resumes at the first unfinished batch.
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from lmdistill.data import IGNORE_INDEX, TokenizedExample, collate, to_device
from lmdistill.io import atomic_write_json

BLOCK_ROWS = 4096  # projection rows drawn per generator


class LoRALinear(nn.Module):
    """`base(x) + scale * (x A^T) B^T`, keeping what the per-example gradient of B needs."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        # Drawn on the CPU (the same A on every device), then placed beside the layer.
        a = torch.randn(rank, base.in_features, generator=generator) / math.sqrt(base.in_features)
        device = base.weight.device
        self.lora_a = nn.Parameter(a.to(device), requires_grad=False)
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=device))
        self.h: torch.Tensor | None = None
        self.delta: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x @ self.lora_a.T  # (B, T, r)
        z = h @ self.lora_b.T  # (B, T, out)
        if z.requires_grad:
            self.h = h.detach()
            z.register_hook(self._keep_delta)
        return self.base(x) + self.scale * z

    def _keep_delta(self, grad: torch.Tensor) -> None:
        self.delta = grad.detach()

    def per_example_grad(self) -> torch.Tensor:
        """(B, out * r): d loss_i / d B for each example i of the last backward pass."""
        assert self.h is not None and self.delta is not None
        # `delta` is d loss / d z, so the scale on z is already in it.
        return torch.einsum("bto,btr->bor", self.delta, self.h).flatten(1)


def add_lora(
    model: PreTrainedModel, modules: list[str], rank: int, alpha: float, seed: int
) -> tuple[PreTrainedModel, list[LoRALinear]]:
    """A frozen copy of `model` with LoRA on every linear layer whose name ends in one of
    `modules` (e.g. q_proj, v_proj)."""
    wrapped = copy.deepcopy(model).float().eval()
    for p in wrapped.parameters():
        p.requires_grad_(False)
    # A stream of its own: the projection's blocks are drawn from seed * 1_000_003 + block.
    generator = torch.Generator().manual_seed(2**40 + seed)
    adapters: list[LoRALinear] = []
    targets = [
        (name, module)
        for name, module in wrapped.named_modules()
        if isinstance(module, nn.Linear) and name.split(".")[-1] in modules
    ]
    if not targets:
        names = {n.split(".")[-1] for n, m in wrapped.named_modules() if isinstance(m, nn.Linear)}
        raise ValueError(
            f"select.lora_modules: {modules} match no linear layer of the model; its linear "
            f"layers end in {sorted(names)}"
        )
    for name, module in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = wrapped.get_submodule(parent_name) if parent_name else wrapped
        adapter = LoRALinear(module, rank, alpha, generator)
        setattr(parent, attr, adapter)
        adapters.append(adapter)
    return wrapped, adapters


def per_example_grads(
    model: PreTrainedModel, adapters: list[LoRALinear], batch: dict[str, torch.Tensor]
) -> torch.Tensor:
    """(B, P) LoRA-B gradients of each example's mean response NLL."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    nll = F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), targets.clamp(min=0), reduction="none"
    )
    per_example = (nll * mask).sum(1) / mask.sum(1).clamp(min=1)
    per_example.sum().backward()
    return torch.cat([a.per_example_grad() for a in adapters], dim=1)


class Projection:
    """x (B, P) -> x R (B, dim) with R ~ N(0, 1/dim), drawn block by block from `seed`."""

    def __init__(self, rows: int, dim: int, seed: int, cache_bytes: int = 256 << 20) -> None:
        self.rows, self.dim, self.seed = rows, dim, seed
        self.keep = rows * dim * 4 <= cache_bytes  # small enough: draw once, keep
        self._blocks: dict[int, torch.Tensor] = {}

    def block(self, index: int, device: torch.device | str = "cpu") -> torch.Tensor:
        if index in self._blocks:
            return self._blocks[index]
        start = index * BLOCK_ROWS
        size = min(BLOCK_ROWS, self.rows - start)
        # Drawn on the CPU, so that features do not depend on the device that computes them.
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        matrix = (torch.randn(size, self.dim, generator=generator) / math.sqrt(self.dim)).to(device)
        if self.keep:
            self._blocks[index] = matrix
        return matrix

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], self.dim, device=x.device)
        for index in range(math.ceil(self.rows / BLOCK_ROWS)):
            start = index * BLOCK_ROWS
            out += x[:, start : start + BLOCK_ROWS] @ self.block(index, x.device)
        return out


def lora_rows(model: PreTrainedModel, modules: list[str], rank: int) -> int:
    return sum(
        m.out_features * rank
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.split(".")[-1] in modules
    )


def gradient_features(
    model: PreTrainedModel,
    items: list[TokenizedExample],
    pad_token_id: int,
    *,
    directory: Path,
    identity: dict[str, Any],
    modules: list[str],
    rank: int = 8,
    dim: int = 2048,
    seed: int = 0,
    batch_size: int = 8,
    stop_after: int | None = None,
) -> np.ndarray | None:
    """Projected per-example LoRA gradients (N, dim), streamed into `directory` and finished
    as `directory/features.npy` (returned memory-mapped).

    Resumable: rows finished by an interrupted call (same `identity`) are kept. `stop_after`
    ends the call after that many batches, as a kill would (returns None)."""
    directory.mkdir(parents=True, exist_ok=True)
    partial, progress_path = directory / "features.partial.npy", directory / "progress.json"
    done = 0
    if partial.is_file() and progress_path.is_file():
        progress = json.loads(progress_path.read_text())
        if progress.get("identity") == json.loads(json.dumps(identity)):
            done = int(progress["rows"])
    if done == 0:
        np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=(len(items), dim))
    header = _header_size(partial)
    wrapped, adapters = add_lora(model, modules, rank, alpha=2.0 * rank, seed=seed)
    projection = Projection(sum(a.lora_b.numel() for a in adapters), dim, seed)
    batches_run = 0
    bar = tqdm(total=len(items), initial=done, desc="gradient features", unit="ex")
    with partial.open("r+b") as handle:
        for start in range(done, len(items), batch_size):
            if stop_after is not None and batches_run >= stop_after:
                bar.close()
                return None
            chunk = items[start : start + batch_size]
            batch = to_device(collate(chunk, pad_token_id), wrapped.device)
            grads = per_example_grads(wrapped, adapters, batch)
            for adapter in adapters:
                adapter.lora_b.grad = None
            rows = projection(grads).cpu().numpy().astype(np.float32)
            handle.seek(header + start * dim * 4)
            handle.write(rows.tobytes())
            handle.flush()
            os.fsync(handle.fileno())
            atomic_write_json(progress_path, {"identity": identity, "rows": start + len(chunk)})
            batches_run += 1
            bar.update(len(chunk))
    bar.close()
    final = directory / "features.npy"
    os.replace(partial, final)
    progress_path.unlink()
    return np.load(final, mmap_mode="r")  # read from disk as it is used


def _header_size(path: Path) -> int:
    """Bytes before the array's data in a .npy file."""
    mapped = np.load(path, mmap_mode="r")
    offset = int(mapped.offset)
    del mapped
    return offset


def less_scores(features: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Mean cosine of each example's gradient with the target set's gradients."""
    if len(target) == 0:
        raise ValueError("select.target: the target set is empty; LESS needs target examples")
    target_unit = target / np.maximum(np.linalg.norm(target, axis=1, keepdims=True), 1e-12)
    direction = target_unit.mean(0)
    out = np.zeros(len(features))
    for start in range(0, len(features), 4096):  # chunks: features may be memory-mapped
        rows = np.asarray(features[start : start + 4096], dtype=np.float64)
        norms = np.maximum(np.linalg.norm(rows, axis=1), 1e-12)
        out[start : start + len(rows)] = rows @ direction / norms
    return out
