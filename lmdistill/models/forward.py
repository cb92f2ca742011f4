"""One forward pass of a decoder, reduced to what the losses and the evaluation need: the final
hidden states at the positions that predict a response token (and, on request, every layer's
hidden states and attention maps). Teachers, students and evaluation share it."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel

from lmdistill.config import LossConfig
from lmdistill.data import IGNORE_INDEX


def uses_attention(loss: LossConfig) -> bool:
    return loss.attention_weight > 0


def kv_cache(model: PreTrainedModel, out: Any) -> dict[str, Any]:
    """The key/value cache of forward output `out`, as the keyword the next forward of
    `model` takes it by: transformers >= 5.2x names it `cache`, earlier 5.x
    `past_key_values`."""
    if "cache" in inspect.signature(model.forward).parameters:
        return {"cache": out.cache}
    return {"past_key_values": out.past_key_values}


@dataclass
class DecoderOutputs:
    """What the losses need from one forward pass of a decoder."""

    states: torch.Tensor  # (N, H) final hidden states at positions predicting a response token
    targets: torch.Tensor  # (N,) those response tokens
    mask: torch.Tensor  # (B, T) bool: the same positions, for the feature losses
    hidden_states: tuple[torch.Tensor, ...] | None
    attentions: tuple[torch.Tensor, ...] | None
    weights: torch.Tensor | None = None  # (N,) loss weights of those tokens, when given


def run_decoder(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    hidden_states: bool = False,
    attentions: bool = False,
) -> DecoderOutputs:
    """One decoder pass. Position t predicts token t + 1, so (B, T) labels shift left by one."""
    out = model.get_decoder()(
        input_ids=input_ids,
        attention_mask=attention_mask,
        output_hidden_states=hidden_states,
        output_attentions=attentions,
    )
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX  # (B, T)
    return DecoderOutputs(
        states=out.last_hidden_state[mask],  # (B, T, H) -> (N, H)
        targets=labels[:, 1:][mask[:, :-1]],  # (N,)
        mask=mask,
        hidden_states=out.hidden_states if hidden_states else None,
        attentions=out.attentions if attentions else None,
        weights=None if weights is None else weights[:, 1:][mask[:, :-1]],  # (N,)
    )


def response_hidden(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states at the positions that predict a response token, and those tokens."""
    out = run_decoder(model, input_ids, attention_mask, labels)
    return out.states, out.targets


@torch.no_grad()
def teacher_outputs(
    teacher: PreTrainedModel, batch: dict[str, torch.Tensor], loss: LossConfig
) -> DecoderOutputs:
    return run_decoder(
        teacher,
        **batch,
        hidden_states=loss.hidden_weight > 0,
        attentions=uses_attention(loss),
    )
