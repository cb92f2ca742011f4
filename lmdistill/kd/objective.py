"""The KD objective as a module, so that a DDP wrapper sees the whole loss in its forward.

loss_sum = sum over response tokens of
    alpha * CE(student, next token) + (1 - alpha) * tau^2 * D(teacher || student)

Logits are never materialised for the whole batch: we take the final hidden states at the
positions that predict a response token, and the fused loss projects them chunk by chunk.
Prompt positions never touch the output head at all (the head is ~60% of a 6-layer
SmolLM2 student's parameters, so this alone saves most of its cost on prompt tokens).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from lmdistill.config import LossConfig
from lmdistill.data import IGNORE_INDEX
from lmdistill.losses import fused_kd_loss


def check_supported(model: PreTrainedModel) -> None:
    """Logits must be `hidden @ W.T` for the fused path; refuse models that post-process them."""
    config = model.config
    for attr in ("final_logit_softcapping", "logit_scale"):
        if getattr(config, attr, None) not in (None, 1.0):
            raise NotImplementedError(
                f"{type(model).__name__} sets config.{attr}; the fused KD loss assumes plain "
                "linear logits"
            )
    head = model.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        raise NotImplementedError(f"{type(model).__name__}: output head must be bias-free Linear")


def response_hidden(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states at the positions that predict a response token, and those tokens.

    Position t predicts token t + 1, so (B, T) labels shift left by one.
    """
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask)
    states = hidden.last_hidden_state[:, :-1]  # (B, T-1, H)
    targets = labels[:, 1:]  # (B, T-1)
    mask = targets != IGNORE_INDEX
    return states[mask], targets[mask]  # (N, H), (N,)


@torch.no_grad()
def teacher_hidden(teacher: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    states, _ = response_hidden(
        teacher, batch["input_ids"], batch["attention_mask"], batch["labels"]
    )
    return states


class KDObjective(nn.Module):
    """Wraps the student; `forward(batch, teacher_states)` returns the summed loss and its parts."""

    def __init__(self, student: PreTrainedModel, loss: LossConfig, vocab_size: int) -> None:
        super().__init__()
        check_supported(student)
        self.student = student
        self.loss = loss
        self.vocab_size = vocab_size

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        teacher_states: torch.Tensor | None = None,
        teacher_weight: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        states, targets = response_hidden(self.student, input_ids, attention_mask, labels)
        params = {"beta": self.loss.beta} if self.loss.divergence == "generalized_jsd" else {}
        return fused_kd_loss(
            states,
            self.student.get_output_embeddings().weight,
            targets,
            teacher_hidden=teacher_states,
            teacher_weight=teacher_weight,
            vocab_size=self.vocab_size,
            divergence=self.loss.divergence,
            alpha=self.loss.alpha,
            temperature=self.loss.temperature,
            chunk_size=self.loss.chunk_size,
            divergence_params=params,
        )
