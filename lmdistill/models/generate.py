"""Generation with an in-process model (a teacher writing its responses, a student answering
held-out questions): batched, greedy or sampled, stopping at any end-of-turn token."""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel

from lmdistill.config import GenerateConfig
from lmdistill.data import Example, collate_prompts, encode_prompt, to_device


def stop_token_ids(model: PreTrainedModel, tokenizer: Any) -> list[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


def greedy_responses(
    model: PreTrainedModel, tokenizer: Any, prompts: list[Example], max_new_tokens: int
) -> list[str]:
    """Greedy answers to a few prompts (side-by-side samples in reports); nothing written."""
    config = GenerateConfig(max_new_tokens=max_new_tokens, batch_size=len(prompts) or 1)
    stops = stop_token_ids(model, tokenizer)
    rows = generate_batch(model, tokenizer, prompts, config, stops, seed=0) if prompts else []
    return [row["response"] for row in rows]


def sampled_responses(
    model: PreTrainedModel,
    tokenizer: Any,
    prompts: list[Example],
    max_new_tokens: int,
    *,
    samples: int,
    batch_size: int,
    seed: int = 0,
) -> list[list[str]]:
    """`samples` answers to each prompt, sampled at temperature 1 (seeded per batch); for
    agreement across sampled rationales. Nothing written."""
    config = GenerateConfig(
        max_new_tokens=max_new_tokens, do_sample=True, batch_size=batch_size, seed=seed
    )
    stops = stop_token_ids(model, tokenizer)
    flat = [p for p in prompts for _ in range(samples)]
    texts: list[str] = []
    for start in range(0, len(flat), batch_size):
        batch = flat[start : start + batch_size]
        texts += [
            r["response"] for r in generate_batch(model, tokenizer, batch, config, stops, start)
        ]
    return [texts[i * samples : (i + 1) * samples] for i in range(len(prompts))]


@torch.no_grad()
def generate_batch(
    model: PreTrainedModel,
    tokenizer: Any,
    batch: list[Example],
    config: GenerateConfig,
    stops: list[int],
    seed: int,
) -> list[dict[str, Any]]:
    encoded = collate_prompts([encode_prompt(p, tokenizer) for p in batch], tokenizer.pad_token_id)
    encoded = to_device(encoded, model.device)
    sampling: dict[str, Any] = {"do_sample": config.do_sample}
    if config.do_sample:
        # Seeded per batch so that a resumed run samples the same way for the same batch.
        torch.manual_seed(config.seed * 1_000_003 + seed)
        sampling.update(temperature=config.temperature, top_p=config.top_p, top_k=0)
    output = model.generate(  # type: ignore[operator]
        **encoded,
        max_new_tokens=config.max_new_tokens,
        eos_token_id=stops,
        pad_token_id=tokenizer.pad_token_id,
        **sampling,
    )
    new = output[:, encoded["input_ids"].shape[1] :]  # (B, new)
    rows = []
    for example, ids in zip(batch, new.tolist(), strict=True):
        end = next((i for i, t in enumerate(ids) if t in stops), None)
        kept = ids if end is None else ids[:end]
        rows.append(
            {
                "id": example.id,
                "messages": list(example.messages),
                "response": tokenizer.decode(kept, skip_special_tokens=True),
                "finish_reason": "length" if end is None else "stop",
                "new_tokens": len(kept) + (end is not None),
            }
        )
    return rows
