"""The KD objective as a module, so that a DDP wrapper sees the whole loss in its forward.

loss_sum = sum over response tokens of
    alpha * CE(student, next token) + (1 - alpha) * tau^2 * D(teacher || student)
    + hidden_weight * hidden-state distance + attention_weight * attention-map KL

Logits are never materialised for the whole batch: we take the final hidden states at the
positions that predict a response token, and the fused loss projects them chunk by chunk.
Prompt positions never touch the output head at all (the head is ~60% of a 6-layer
SmolLM2 student's parameters, so this alone saves most of its cost on prompt tokens).
The feature losses are averaged over layer pairs, so every term is per response token and
one global division by the token count normalises them all.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from lmdistill.config import LossConfig
from lmdistill.losses import SparseSignal, fused_kd_loss
from lmdistill.losses.features import HiddenStateMatcher, attention_kl, layer_map
from lmdistill.models.forward import run_decoder, uses_attention

# The order training logs reduce in; "retention" is the previous student's divergence
# (incremental distillation), unweighted like "kd".
PARTS = ("loss", "ce", "kd", "hidden", "attention", "retention")


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


def divergence_params(loss: LossConfig) -> dict[str, float]:
    """The config fields a divergence takes, under the names its function uses."""
    if loss.divergence == "generalized_jsd":
        return {"beta": loss.beta}
    if loss.divergence.startswith("skew_"):
        return {"alpha": loss.skew_alpha}
    return {}


class KDObjective(nn.Module):
    """Wraps the student (and the feature-loss projections); `forward` returns the summed
    loss and its detached parts, all sums over response tokens."""

    def __init__(
        self,
        student: PreTrainedModel,
        loss: LossConfig,
        vocab_size: int,
        teacher_config: Any | None = None,
        retention_weight: float = 0.0,
    ) -> None:
        super().__init__()
        check_supported(student)
        self.student = student
        self.loss = loss
        self.vocab_size = vocab_size
        self.retention_weight = retention_weight
        self.pairs: list[tuple[int, int]] = []
        self.hidden: HiddenStateMatcher | None = None
        if loss.hidden_weight > 0 or uses_attention(loss):
            if teacher_config is None:
                raise ValueError("feature losses need the teacher's config (layers, width)")
            s_layers, t_layers = student.config.num_hidden_layers, teacher_config.num_hidden_layers
            self.pairs = layer_map(s_layers, t_layers, loss.layer_map)
        if loss.hidden_weight > 0:
            assert teacher_config is not None
            self.hidden = HiddenStateMatcher(
                student.config.hidden_size,
                teacher_config.hidden_size,
                self.pairs,
                kind=loss.hidden_kind,
            ).to(dtype=student.dtype)
        if uses_attention(loss):
            # Attention weights exist only in the eager implementation (sdpa returns none).
            student.set_attn_implementation("eager")

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        teacher_states: torch.Tensor | None = None,
        teacher_weight: torch.Tensor | None = None,
        teacher_hidden_states: tuple[torch.Tensor, ...] | None = None,
        teacher_attentions: tuple[torch.Tensor, ...] | None = None,
        teacher_signal: SparseSignal | None = None,
        weights: torch.Tensor | None = None,
        loss: LossConfig | None = None,
        groups: torch.Tensor | None = None,
        group_scales: torch.Tensor | None = None,
        retention_states: torch.Tensor | None = None,
        retention_head: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`loss` replaces the run's loss for this batch (an on-policy step's divergence
        alone, with no feature losses). With `groups` (B,) (each row's group) and
        `group_scales` (G,), each token's loss is also weighted by its group's factor, and
        `parts["groups"]` (G,) holds each group's sum of token losses (weighted as without
        groups: the groups' own losses). With `retention_states` and `retention_head` (the
        previous student's, incremental distillation), `retention_weight * T^2 *
        D(previous || student)` joins the loss, its sum in `parts["retention"]`."""
        spec = self.loss if loss is None else loss
        hidden = self.hidden is not None and spec.hidden_weight > 0
        out = run_decoder(
            self.student,
            input_ids,
            attention_mask,
            labels,
            weights,
            hidden_states=hidden,
            attentions=uses_attention(spec),
        )
        token_weights, token_groups, row_losses = out.weights, None, None
        if groups is not None and group_scales is not None:
            token_groups = groups[out.mask.nonzero(as_tuple=True)[0]]  # (N,) row-major
            scale = group_scales.to(out.states.device, torch.float32)[token_groups]
            token_weights = scale if out.weights is None else out.weights * scale
            row_losses = torch.empty(len(token_groups), device=out.states.device)

        def head_loss(**teacher: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            """The fused loss of the student's states against one teacher's signal."""
            return fused_kd_loss(
                out.states,
                self.student.get_output_embeddings().weight,
                out.targets,
                vocab_size=self.vocab_size,
                divergence=spec.divergence,
                temperature=spec.temperature,
                chunk_size=spec.chunk_size,
                divergence_params=divergence_params(spec),
                token_weights=token_weights,
                **teacher,
            )

        loss_sum, parts = head_loss(
            teacher_hidden=teacher_states,
            teacher_weight=teacher_weight,
            teacher_signal=teacher_signal,
            alpha=spec.alpha,
            row_losses=row_losses,
        )
        parts = dict(parts)
        if retention_states is not None and retention_head is not None:
            kept, kept_parts = head_loss(
                teacher_hidden=retention_states, teacher_weight=retention_head, alpha=0.0
            )
            loss_sum = loss_sum + self.retention_weight * kept
            parts["retention"] = kept_parts["kd"]
        if token_groups is not None and row_losses is not None and group_scales is not None:
            own = row_losses if out.weights is None else row_losses * out.weights
            parts["groups"] = torch.zeros(
                len(group_scales), device=own.device, dtype=torch.float64
            ).index_add_(0, token_groups, own.double())
        if hidden:
            assert self.hidden is not None
            if out.hidden_states is None or teacher_hidden_states is None:
                raise ValueError("loss.hidden_weight > 0 needs the teacher's hidden states")
            hidden_sum, _ = self.hidden(out.hidden_states, teacher_hidden_states, out.mask)
            parts["hidden"] = hidden_sum.detach() / len(self.pairs)
            loss_sum = loss_sum + self.loss.hidden_weight * hidden_sum / len(self.pairs)
        if uses_attention(spec):
            if out.attentions is None or teacher_attentions is None:
                raise ValueError("loss.attention_weight > 0 needs the teacher's attentions")
            attn_sum, _ = attention_kl(out.attentions, teacher_attentions, self.pairs, out.mask)
            parts["attention"] = attn_sum.detach() / len(self.pairs)
            loss_sum = loss_sum + self.loss.attention_weight * attn_sum / len(self.pairs)
        return loss_sum, parts
