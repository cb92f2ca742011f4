"""Turn `Example`s into token ids with a response-only loss mask, and batch them.

The prompt is rendered with the tokenizer's chat template (when it has one) exactly as
`generate` renders it, and the response is tokenised after it, so the student trains on the
same token boundary the teacher generated from.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from lmdistill.data.example import DataError, Example

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenizedExample:
    id: str
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt tokens: the loss sees the response only
    truncated: bool
    weights: list[float] | None = None  # per position, like labels; None: all 1
    ranks: list[int] | None = None  # per position: the step's rank from the end; -1 prompt
    group: str | None = None  # the example's group (data's `group` field)


@dataclass
class TruncationReport:
    """How many examples lost response tokens to `max_length`, how many were dropped because
    their prompt alone filled it, and how many because their response was empty (they would
    train on the end-of-turn token alone). Reported in metrics, never silent."""

    total: int = 0
    truncated: int = 0
    dropped: int = 0
    dropped_ids: list[str] = field(default_factory=list)
    empty: int = 0
    empty_ids: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, int]:
        return {
            "total": self.total,
            "truncated": self.truncated,
            "dropped": self.dropped,
            "empty": self.empty,
        }


def prompt_text(example: Example, tokenizer: Any) -> str:
    messages = list(example.messages)
    if getattr(tokenizer, "chat_template", None):
        return str(
            tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        )
    return "\n\n".join(m["content"] for m in messages) + "\n"


def response_text(response: str, tokenizer: Any) -> str:
    """The response as the template closes it (e.g. `...<|im_end|>`), so the student learns
    to stop."""
    if getattr(tokenizer, "chat_template", None):
        probe = [{"role": "user", "content": "x"}]
        prefix = str(
            tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
        )
        full = str(
            tokenizer.apply_chat_template(
                [*probe, {"role": "assistant", "content": response}], tokenize=False
            )
        )
        if full.startswith(prefix):
            return full[len(prefix) :]
    return response + (tokenizer.eos_token or "")


def encode_prompt(example: Example, tokenizer: Any) -> list[int]:
    return list(tokenizer(prompt_text(example, tokenizer), add_special_tokens=False)["input_ids"])


def tokenize_examples(
    examples: list[Example],
    tokenizer: Any,
    max_length: int,
    on_truncation: str = "warn",
    *,
    on_empty: str = "drop",
) -> tuple[list[TokenizedExample], TruncationReport]:
    """Tokenise training examples; count (or refuse, with `on_truncation="error"`) truncation,
    and drop (or refuse, with `on_empty="error"`) examples whose response is empty."""
    report = TruncationReport(total=len(examples))
    out = []
    empty_named: list[str] = []  # "'id' (source)" of each empty response dropped
    for example in examples:
        if example.response is None:
            raise DataError(f"{example.source}: no response to train on (a prompt-only row)")
        if _is_empty(on_empty, example):
            report.empty += 1
            report.empty_ids.append(example.id)
            named = f"{example.id!r} ({example.source})" if example.source else repr(example.id)
            empty_named.append(named)
            continue
        prompt_ids = encode_prompt(example, tokenizer)
        response_ids = _response_ids(example, example.response, tokenizer)
        weights = _span_values(example, example.weight_spans, tokenizer, len(response_ids))
        ranks = _span_values(example, example.step_spans, tokenizer, len(response_ids))
        room = max_length - len(prompt_ids)
        if room < 1:
            _on_truncation(on_truncation, example, f"prompt alone is {len(prompt_ids)} tokens")
            report.dropped += 1
            report.dropped_ids.append(example.id)
            continue
        truncated = len(response_ids) > room
        if truncated:
            _on_truncation(on_truncation, example, f"{len(prompt_ids) + len(response_ids)} tokens")
            report.truncated += 1
            response_ids = response_ids[:room]
        input_ids = prompt_ids + response_ids
        labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids
        if weights is not None:
            weights = [0.0] * len(prompt_ids) + weights[: len(response_ids)]
        step_ranks = None
        if ranks is not None:
            step_ranks = [-1] * len(prompt_ids) + [int(r) for r in ranks[: len(response_ids)]]
        out.append(
            TokenizedExample(
                example.id, input_ids, labels, truncated, weights, step_ranks, example.group
            )
        )
    if report.empty:
        # An empty response would train on the end-of-turn token alone: never silently.
        more = f" and {report.empty - 3} more" if report.empty > 3 else ""
        warnings.warn(
            f"dropped {report.empty} of {report.total} examples with an empty response: "
            f"{', '.join(empty_named[:3])}{more} (data.on_empty=error refuses them)",
            stacklevel=2,
        )
    if not out:
        raise DataError(
            f"no example left to train on: {report.dropped} longer than data.max_length="
            f"{max_length}, {report.empty} with an empty response"
        )
    if report.truncated or report.dropped:
        warnings.warn(
            f"data.max_length={max_length}: truncated {report.truncated} and dropped "
            f"{report.dropped} of {report.total} examples",
            stacklevel=2,
        )
    return out, report


def _response_ids(example: Example, response: str, tokenizer: Any) -> list[int]:
    if example.response_ids is not None:
        # The teacher's own tokens, then the template's closing tokens when it stopped.
        closing = response_text("", tokenizer) if example.response_complete else ""
        return list(example.response_ids) + list(
            tokenizer(closing, add_special_tokens=False)["input_ids"] if closing else []
        )
    text = response_text(response, tokenizer) if example.response_complete else response
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _span_values(
    example: Example, breakpoints: Any, tokenizer: Any, count: int
) -> list[float] | None:
    """Per-token values of the response from (start_char, value) breakpoints (weight_spans,
    step_spans), through the tokenizer's offsets, so the tokens are exactly the ones training
    sees. The template's closing tokens (end of turn) take the last span's value."""
    if breakpoints is None:
        return None
    if example.response_ids is not None or example.response is None:
        raise DataError(f"{example.source}: token spans need a text response (no token ids)")
    spans = sorted(breakpoints)
    encoded = tokenizer(example.response, add_special_tokens=False, return_offsets_mapping=True)
    values = []
    for start, _end in encoded["offset_mapping"]:
        value = spans[0][1]
        for begin, span_value in spans:
            if begin <= start:
                value = span_value
        values.append(float(value))
    return values + [float(spans[-1][1])] * (count - len(values))


def _is_empty(mode: str, example: Example) -> bool:
    """Whether the response is empty or whitespace (an error with `data.on_empty=error`)."""
    empty = example.response is not None and not example.response.strip()
    if empty and mode == "error":
        raise DataError(
            f"{example.source}: example {example.id!r} has an empty response; "
            "fix the data or set data.on_empty=drop"
        )
    return empty


def _on_truncation(mode: str, example: Example, detail: str) -> None:
    if mode == "error":
        raise DataError(
            f"{example.source}: example {example.id!r} does not fit data.max_length ({detail}); "
            "raise data.max_length or set data.on_truncation=warn"
        )


def collate(
    batch: list[TokenizedExample], pad_token_id: int, *, ranks: bool = False
) -> dict[str, torch.Tensor]:
    """Right-pad a batch: `input_ids`, `attention_mask`, `labels` of shape (B, T), `weights`
    when any example has them, and with `ranks` the step ranks (for the curriculum)."""
    width = max(len(item.input_ids) for item in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    weighted = any(item.weights is not None for item in batch)
    weights = torch.ones((len(batch), width)) if weighted else None
    ranked = ranks and any(item.ranks is not None for item in batch)
    step_ranks = torch.full((len(batch), width), -1, dtype=torch.long) if ranked else None
    for row, item in enumerate(batch):
        n = len(item.input_ids)
        input_ids[row, :n] = torch.tensor(item.input_ids)
        labels[row, :n] = torch.tensor(item.labels)
        attention_mask[row, :n] = 1
        if weights is not None and item.weights is not None:
            weights[row, :n] = torch.tensor(item.weights)
        if step_ranks is not None and item.ranks is not None:
            step_ranks[row, :n] = torch.tensor(item.ranks)
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if weights is not None:
        out["weights"] = weights  # (B, T) loss weight of each label position
    if step_ranks is not None:
        out["ranks"] = step_ranks  # (B, T) rationale step counted from the end; -1: no step
    return out


def to_device(batch: dict[str, torch.Tensor], device: Any) -> dict[str, torch.Tensor]:
    """A collated batch on `device` (where the model that reads it is)."""
    return {k: v.to(device) for k, v in batch.items()}


def prompt_ids(item: TokenizedExample) -> list[int]:
    """The tokens before the first response token (the chat template's prompt)."""
    first = next((i for i, y in enumerate(item.labels) if y != IGNORE_INDEX), len(item.labels))
    return item.input_ids[:first]


def collate_prompts(prompts: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Left-pad prompts for batched generation: new tokens line up at the right edge."""
    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention_mask[row, width - len(ids) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}
