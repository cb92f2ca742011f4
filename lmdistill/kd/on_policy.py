"""On-policy distillation (GKD, Agarwal et al. 2024): on a share `on_policy.fraction` of the
optimizer steps the student writes the responses itself, the teacher scores what it wrote,
and the student is trained toward the teacher's distribution on its own text, mistakes
included. It removes the exposure bias of off-policy KD (a student that only ever saw the
teacher's text never learns to recover from its own).

Which steps are on-policy is a function of (seed, step); each example's sample is a function
of (seed, step, the example's index in the dataset) and the student's weights: its own
random stream, drawn with a KV cache, batched, in `torch.no_grad()` and eval mode. So a
resumed run draws the same samples, and how the examples are split over micro-batches and
processes does not change what is drawn (exactly on a CPU in fp32; on a GPU, batches of
another composition may round a logit differently, and a sample can then differ).
`SamplingStats` count the sampling of one call: a resumed run reports its own part.
"""

from __future__ import annotations

import dataclasses
import inspect
import random
import time
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from lmdistill.config import LossConfig, OnPolicyConfig
from lmdistill.data import (
    IGNORE_INDEX,
    TokenizedExample,
    collate,
    collate_prompts,
    prompt_ids,
)
from lmdistill.models.forward import kv_cache
from lmdistill.teachers.base import Teacher


@dataclass(frozen=True)
class OnPolicy:
    """What a training run needs to sample: the settings, the tokens that end a response
    (the tokenizer's end-of-turn ids), the vocabulary the student may write, and who scores
    the samples (None: the run's teacher, in this process; a served teacher's
    `ServedScorer` otherwise)."""

    spec: OnPolicyConfig
    stop_ids: tuple[int, ...]
    vocab_size: int
    scorer: Teacher | None = None

    def loss(self, loss: LossConfig) -> LossConfig:
        """The loss of an on-policy step: the divergence alone (CE on the student's own
        samples would only reinforce them), at the run's temperature."""
        return dataclasses.replace(
            loss,
            divergence=self.spec.divergence,
            beta=self.spec.beta,
            alpha=0.0,
            hidden_weight=0.0,
            attention_weight=0.0,
        )


@dataclass
class SamplingStats:
    """Student sampling, counted apart from training."""

    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "on_policy_steps": self.steps,
            "sampled_tokens": self.tokens,
            "sample_seconds": self.seconds,
            "sample_tokens_per_s": self.tokens / self.seconds if self.seconds else 0.0,
        }


def is_on_policy(seed: int, step: int, fraction: float) -> bool:
    """Whether optimizer step `step` samples its responses (GKD's lambda), drawn from its own
    stream: the same on every process and after a resume, and no draw at all (no random state
    touched) when `fraction` is 0 or 1."""
    if fraction <= 0.0:
        return False
    if fraction >= 1.0:
        return True
    return random.Random(f"on-policy step {seed} {step}").random() < fraction


def sample_key(seed: int, step: int, index: int) -> int:
    """The seed of one example's sample at one step."""
    return random.Random(f"on-policy sample {seed} {step} {index}").getrandbits(63)


def on_policy_batches(
    model: PreTrainedModel,
    train_set: list[TokenizedExample],
    chunks: list[list[int]],
    on_policy: OnPolicy,
    *,
    seed: int,
    step: int,
    pad_token_id: int,
    stats: SamplingStats,
) -> list[dict[str, torch.Tensor]]:
    """This process's micro-batches of an on-policy step: each example's prompt with the
    student's sampled response as the labelled tokens (its end-of-turn token included, when
    it wrote one: the student learns where to stop)."""
    was_training = model.training
    model.eval()
    micro = []
    try:
        for chunk in chunks:
            prompts = [prompt_ids(train_set[i]) for i in chunk]
            keys = [sample_key(seed, step, i) for i in chunk]
            started = time.perf_counter()
            written = sample(model, prompts, keys, on_policy, pad_token_id)
            stats.seconds += time.perf_counter() - started
            rows = [
                TokenizedExample(
                    id=f"{train_set[i].id}@{step}",
                    input_ids=prompt + response,
                    labels=[IGNORE_INDEX] * len(prompt) + response,
                    truncated=False,
                    group=train_set[i].group,
                )
                for i, prompt, response in zip(chunk, prompts, written, strict=True)
            ]
            stats.tokens += sum(len(r) for r in written)
            # A teacher that may not score every position (a server that cut the text
            # differently) masks those out: they carry no loss and no count.
            mask = getattr(on_policy.scorer, "mask_unscored", None)
            micro.append(collate(mask(rows) if mask else rows, pad_token_id))
    finally:
        model.train(was_training)
    stats.steps += 1
    return micro


@torch.no_grad()
def sample(
    model: PreTrainedModel,
    prompts: list[list[int]],
    keys: list[int],
    on_policy: OnPolicy,
    pad_token_id: int,
) -> list[list[int]]:
    """One response per prompt, token by token with the model's KV cache (prompts left-padded
    into one batch); row i draws from its own generator seeded `keys[i]`, at
    `spec.temperature` within the top-`spec.top_p` nucleus, until a stop token or
    `spec.max_new_tokens`."""
    spec = on_policy.spec
    device = model.device
    padded = collate_prompts(prompts, pad_token_id)
    ids, mask = padded["input_ids"], padded["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
    generators = [torch.Generator().manual_seed(key) for key in keys]
    accepted = inspect.signature(model.forward).parameters
    # Only the last position's logits: (B, 1, V), not (B, prompt length, V).
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in accepted else {}
    out = model(
        input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **last_only
    )
    written: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    stops = set(on_policy.stop_ids)
    following = positions[:, -1:] + 1
    for _ in range(spec.max_new_tokens):
        logits = out.logits[:, -1, : on_policy.vocab_size]
        tokens = draw(logits, spec.temperature, spec.top_p, generators)
        for row, token in enumerate(tokens):
            if not done[row]:
                written[row].append(token)
                done[row] = token in stops
        if all(done):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = model(
            input_ids=torch.tensor(tokens, device=device)[:, None],
            attention_mask=mask,
            position_ids=following,
            use_cache=True,
            **kv_cache(model, out),
        )
        following = following + 1
    return written


def draw(
    logits: torch.Tensor, temperature: float, top_p: float, generators: list[torch.Generator]
) -> list[int]:
    """One token per row: the smallest set of most likely tokens whose probability reaches
    `top_p` (all of them at 1), renormalised, sampled by inverse CDF with the row's own
    uniform draw. On the logits' device; only the B uniforms and the B tokens move."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)  # (B, V)
    order = None
    if top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True)
        # Keep a token while the mass before it is below top_p (the first is always kept).
        probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, 0.0)
    cumulative = probs.cumsum(dim=-1)  # (B, V)
    u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in generators])
    u = u.to(probs.device)[:, None] * cumulative[:, -1:]  # (B, 1)
    position = torch.searchsorted(cumulative, u, right=True)  # (B, 1)
    # Rounding can put u at the very top: take the last token with mass.
    last = (probs > 0).long().cumsum(dim=-1).argmax(dim=-1, keepdim=True)
    position = torch.minimum(position, last)
    tokens = position if order is None else order.gather(-1, position)
    return tokens.squeeze(-1).tolist()
