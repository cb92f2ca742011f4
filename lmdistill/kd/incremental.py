"""Incremental distillation: continue a finished student on new data without the old data.

Three things keep what the student knew (each optional, `incremental` in the config):

- the previous student as a **retention teacher** (learning without forgetting, Li & Hoiem
  2016): on the new prompts, `retention_weight * T^2 * D(previous || student)` beside the
  big teacher's term; the previous student is the model `student.path` holds, frozen;
- a **replay memory**: at most 1% of the old training examples, chosen by dataset
  distillation once, when the old run finished (`memory.fraction` on the old run; written
  to its `memory/` with a manifest), mixed into the new data;
- **parameter anchoring**: `anchor_weight / 2 * sum_i F_i (theta_i - theta_prev_i)^2`, with
  F = 1 (`l2`) or the diagonal empirical Fisher the old run saved (`ewc`, Kirkpatrick et al.
  2017: the mean squared gradient of the log-likelihood of its training responses).

This module holds the anchor and the Fisher estimate; the manifests that tie a memory or a
Fisher file to the student it was made for are in `lineage.py`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from lmdistill.data import TokenizedExample, collate, to_device
from lmdistill.models.forward import response_hidden

FISHER_FILE = "fisher.safetensors"


class Anchor:
    """The previous weights (and their Fisher weights, for EWC) of every trainable tensor;
    `add_gradient` adds the penalty's gradient to the model's, `penalty` its value."""

    def __init__(
        self, model: nn.Module, weight: float, fisher: dict[str, torch.Tensor] | None = None
    ) -> None:
        self.weight = weight
        self.last_penalty = 0.0  # at the step just taken, before its update (logged)
        self.previous = {
            name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad
        }
        self.fisher = fisher
        if fisher is not None:
            missing = sorted(set(self.previous) - set(fisher))
            if missing:
                raise ValueError(
                    f"the Fisher estimate has no entry for {len(missing)} trainable tensors "
                    f"(e.g. {missing[0]}): it was made for another model"
                )

    def to(self, device: torch.device) -> Anchor:
        """The previous weights and the Fisher weights where the model trains (once)."""
        self.previous = {name: t.to(device) for name, t in self.previous.items()}
        if self.fisher is not None:
            self.fisher = {name: t.to(device) for name, t in self.fisher.items()}
        return self

    def _importance(self, name: str, p: torch.Tensor) -> torch.Tensor | float:
        return 1.0 if self.fisher is None else self.fisher[name].to(p.device, p.dtype)

    @torch.no_grad()
    def add_gradient(self, model: nn.Module) -> None:
        """p.grad += weight * F * (p - p_prev): the same on every process (after the
        all-reduce), so processes stay in step."""
        for name, p in model.named_parameters():
            if name not in self.previous:
                continue
            step = self.weight * self._importance(name, p) * (p - self.previous[name].to(p))
            p.grad = step if p.grad is None else p.grad + step

    @torch.no_grad()
    def penalty(self, model: nn.Module) -> float:
        total = 0.0
        for name, p in model.named_parameters():
            if name in self.previous:
                moved = p - self.previous[name].to(p)
                total += float((self._importance(name, p) * moved * moved).sum())
        return 0.5 * self.weight * total


def fisher_diagonal(
    model: PreTrainedModel, examples: list[TokenizedExample], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """The diagonal empirical Fisher of `model` on `examples`: per trainable tensor, the mean
    over examples of the squared gradient of the example's log-likelihood of its response
    (summed over its tokens). One backward pass per example."""
    if not examples:
        raise ValueError("a Fisher estimate needs at least one example")
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for item in examples:
            batch = to_device(collate([item], pad_token_id), device)
            states, targets = response_hidden(model, **batch)
            logits = states @ model.get_output_embeddings().weight.T
            nll = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
            grads = torch.autograd.grad(nll, list(params.values()), allow_unused=True)
            for (name, _), grad in zip(params.items(), grads, strict=True):
                if grad is not None:
                    fisher[name] += grad.float() ** 2
    finally:
        model.train(was_training)
    return {name: value / len(examples) for name, value in fisher.items()}


def save_fisher(fisher: dict[str, torch.Tensor], directory: Path) -> Path:
    """Written as safetensors (tied tensors are stored once per name: the Fisher of a tied
    weight is one tensor under each name it has)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / FISHER_FILE
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous().cpu() for k, v in fisher.items()}, str(tmp))
    tmp.replace(path)
    return path


def load_fisher(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / FISHER_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: anchor=ewc needs the Fisher estimate the earlier run saves "
            "with memory.fisher=true"
        )
    return dict(load_file(str(path)))
