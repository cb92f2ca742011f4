"""Group objectives (`train.group_objective`): the training rows' groups (the data's `group`
field) weigh their tokens' losses.

With N the step's response tokens (over every micro-batch and process, as the loss is
normalised), N_g those of group g, and l_t a token's loss, a step minimises

    none:      sum_t l_t / N
    reweight:  sum_t w_g(t) l_t / N,  w_g = T / (G T_g)  (T_g: group g's response tokens in
               the whole training set, T all of them, G the groups that have any): every
               group carries the same total weight over the training set, whatever its size;
    dro:       sum_g q_g (sum_{t in g} l_t / N_g)  over the groups present in the step, q
               renormalised over them: group DRO (Sagawa et al. 2020). After each step
               q_g <- q_g exp(eta L_g) with L_g that step's mean loss of group g, normalised;
               the step uses the weights the earlier steps made (one pass per step, and the
               same q on every process).

Each is a per-token weight (`scales`: one factor per group), so gradient accumulation and
several processes give the gradient of one big batch: the counts are global. With one group,
every factor is exactly 1 and each objective is plain KD.
"""

from __future__ import annotations

import math

import torch

from lmdistill.config import TrainConfig
from lmdistill.data import IGNORE_INDEX, TokenizedExample
from lmdistill.data.example import NO_GROUP


class GroupBalance:
    """The groups of a training set and the factor each step gives each group's tokens."""

    def __init__(self, train_set: list[TokenizedExample], train: TrainConfig) -> None:
        self.objective = train.group_objective
        self.step_size = train.dro_step_size
        if all(item.group is None for item in train_set):
            raise ValueError(
                f"train.group_objective={self.objective} needs groups: give the training rows a "
                "`group` field (a string), or set train.group_objective=none"
            )
        self.names = sorted({item.group or NO_GROUP for item in train_set})
        position = {name: i for i, name in enumerate(self.names)}
        self.of_example = [position[item.group or NO_GROUP] for item in train_set]
        tokens = [0] * len(self.names)
        for item, g in zip(train_set, self.of_example, strict=True):
            tokens[g] += sum(1 for y in item.labels[1:] if y != IGNORE_INDEX)
        total, present = sum(tokens), sum(1 for t in tokens if t)
        self.reweight = torch.tensor(
            [total / (present * t) if t else 0.0 for t in tokens], dtype=torch.float64
        )

    def initial_weights(self) -> dict[str, float]:
        return {name: 1.0 / len(self.names) for name in self.names}

    def rows(self, chunk: list[int]) -> torch.Tensor:
        """(B,) the group of each row of a micro-batch made of dataset indices `chunk`."""
        return torch.tensor([self.of_example[i] for i in chunk], dtype=torch.long)

    def tokens(
        self, micro: list[dict[str, torch.Tensor]], chunks: list[list[int]], *, trained: bool
    ) -> torch.Tensor:
        """(G,) this process's response tokens per group in one step (float64, to all-reduce),
        counted as the step's normaliser counts them (`trained`: those of weight > 0 only, as
        under the progressive curriculum), so that they sum to it."""
        counts = torch.zeros(len(self.names), dtype=torch.float64)
        for batch, chunk in zip(micro, chunks, strict=True):
            counted = batch["labels"][:, 1:] != IGNORE_INDEX
            if trained and "weights" in batch:
                counted &= batch["weights"][:, 1:] > 0
            counts.index_add_(0, self.rows(chunk), counted.sum(dim=1).to(torch.float64).cpu())
        return counts

    def scales(self, group_tokens: torch.Tensor, q: dict[str, float]) -> torch.Tensor:
        """(G,) the factor of each group's tokens in a step with `group_tokens` (global)."""
        if self.objective == "reweight":
            return self.reweight.clone()
        present = group_tokens > 0
        weights = torch.tensor([q[name] for name in self.names], dtype=torch.float64)
        weights = torch.where(present, weights, torch.zeros_like(weights))
        weights = weights / weights.sum()
        total = group_tokens.sum()
        return torch.where(present, total * weights / group_tokens.clamp(min=1), weights)

    def update(
        self, q: dict[str, float], loss_sums: torch.Tensor, group_tokens: torch.Tensor
    ) -> dict[str, float]:
        """DRO's step: q_g <- q_g exp(eta L_g), normalised (groups absent from the step keep
        their q before normalising). Other objectives keep no weights."""
        if self.objective != "dro":
            return q
        raised = {
            name: q[name] * math.exp(self.step_size * float(loss_sums[g] / group_tokens[g]))
            if group_tokens[g] > 0
            else q[name]
            for g, name in enumerate(self.names)
        }
        total = sum(raised.values())
        return {name: value / total for name, value in raised.items()}

    def record(
        self, q: dict[str, float], loss_sums: torch.Tensor, group_tokens: torch.Tensor
    ) -> dict[str, float]:
        """The step's mean loss per group present, and DRO's weights, for the history."""
        out = {
            f"loss[{name}]": float(loss_sums[g] / group_tokens[g])
            for g, name in enumerate(self.names)
            if group_tokens[g] > 0
        }
        if self.objective == "dro":
            out.update({f"q[{name}]": value for name, value in q.items()})
        return out
