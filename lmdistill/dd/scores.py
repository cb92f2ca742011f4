"""Per-example scores and features for data selection, each saved with a manifest.

Scores (one number per example, higher = selected first by `top`):
- `length`: response tokens.
- `perplexity`: exp(mean NLL of the response given its prompt) under a model.
- `ifd`: instruction-following difficulty (Superfiltering, Li et al. 2024): perplexity of the
  response with its instruction over its perplexity without it (an empty instruction, same
  template), under a small proxy model. Near 1 or above: the instruction hardly helps.
- `divergence`: mean KL(teacher || student) over the response tokens: data where the student
  is furthest from the teacher.
- `gradient`: LESS (Xia et al. 2024): cosine of an example's projected LoRA gradient with the
  target set's (see `lmdistill/dd/gradients.py`).

Features (one vector per example, for k-center, herding, DEITA and clusters):
- `embedding`: a sentence-embedding model (all-MiniLM-L6-v2 by default: mean-pooled,
  L2-normalised, as sentence-transformers computes it).
- `hidden`: a causal LM's final hidden state averaged over the example's tokens.
- `gradient`: the projected LoRA gradients themselves.

An artifact is a directory: `manifest.json` (what was scored, by which model and weights, on
which data) and `values.npy` (N,) or `features.npy` (N, D). A directory that holds another
model's or dataset's scores is refused, never silently reused.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from lmdistill.data import (
    IGNORE_INDEX,
    Example,
    TokenizedExample,
    collate,
    to_device,
    tokenize_examples,
)
from lmdistill.io import atomic_write_json, write_with

FORMAT = 1


class ManifestError(ValueError):
    """A saved score artifact belongs to another scorer, model or dataset."""


@dataclass(frozen=True)
class Identity:
    """What a score artifact was computed from; stored in its manifest and checked on reuse."""

    name: str  # e.g. "score:ifd" or "features:embedding"
    model: str  # the model's description and weights fingerprint ("" when none is used)
    data_hash: str
    examples: int
    params: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "name": self.name,
            "model": self.model,
            "data_hash": self.data_hash,
            "examples": self.examples,
            "params": self.params,
        }


def check_manifest(directory: Path, identity: Identity) -> bool:
    """True when `directory` holds a finished artifact for `identity`; False when it holds
    none; `ManifestError` naming each difference when it holds someone else's."""
    path = directory / "manifest.json"
    if not path.is_file():
        return False
    saved = json.loads(path.read_text())
    expected = json.loads(json.dumps(identity.as_dict()))  # tuples -> lists, as saved
    labels = {"model": "model", "data_hash": "dataset", "name": "scorer", "params": "settings"}
    differ = [
        f"{labels.get(key, key)}: saved {saved.get(key)!r}, this run {value!r}"
        for key, value in expected.items()
        if saved.get(key) != value
    ]
    if differ:
        raise ManifestError(
            f"{directory} holds scores for another run ({'; '.join(differ)}); point "
            "select.scores_dir (or select.out) at a new directory, or delete it"
        )
    return True


def saved_array(directory: Path, identity: Identity, compute: Callable[[], np.ndarray]) -> Any:
    """The artifact's array: read back when `directory` holds it for `identity`, else
    computed and written (array first, manifest last, both atomically)."""
    name = "features.npy" if identity.name.startswith("features:") else "values.npy"
    if check_manifest(directory, identity):
        return np.load(directory / name)
    started = time.perf_counter()
    array = np.asarray(compute())
    seconds = time.perf_counter() - started
    if len(array) != identity.examples:
        raise RuntimeError(f"{identity.name}: {len(array)} rows for {identity.examples} examples")
    directory.mkdir(parents=True, exist_ok=True)
    save_npy(directory / name, array)
    # The cost is recorded beside the identity (not part of it).
    atomic_write_json(directory / "manifest.json", {**identity.as_dict(), "seconds": seconds})
    return array


def save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("wb") as handle:  # a handle: np.save would append .npy to a name
            np.save(handle, array, allow_pickle=False)

    write_with(path, write)


# ---------------------------------------------------------------------------------------------
# Scores under causal LMs


def batches(items: list[TokenizedExample], batch_size: int, desc: str) -> Any:
    bar = tqdm(total=len(items), desc=desc, unit="ex", dynamic_ncols=True)
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        yield start, chunk
        bar.update(len(chunk))
    bar.close()


def _shifted(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T-1) targets and their bool mask: position t predicts token t + 1."""
    targets = batch["labels"][:, 1:]
    return targets, targets != IGNORE_INDEX


@torch.no_grad()
def response_nll(
    model: PreTrainedModel, items: list[TokenizedExample], pad_token_id: int, batch_size: int = 8
) -> np.ndarray:
    """Mean negative log-likelihood (nats per token) of each example's response tokens."""
    out = np.zeros(len(items))
    for start, chunk in batches(items, batch_size, "perplexity"):
        batch = to_device(collate(chunk, pad_token_id), model.device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[
            :, :-1
        ]
        targets, mask = _shifted(batch)
        nll = F.cross_entropy(
            logits.float().transpose(1, 2), targets.clamp(min=0), reduction="none"
        )  # (B, T-1)
        per_example = (nll * mask).sum(1) / mask.sum(1).clamp(min=1)
        out[start : start + len(chunk)] = per_example.double().cpu().numpy()
    return out


def without_instruction(examples: list[Example]) -> list[Example]:
    """The same responses after an empty instruction (same chat template): IFD's denominator."""
    from dataclasses import replace

    return [replace(e, messages=({"role": "user", "content": ""},)) for e in examples]


def ifd_scores(
    model: PreTrainedModel,
    examples: list[Example],
    tokenizer: Any,
    max_length: int,
    batch_size: int = 8,
) -> np.ndarray:
    """IFD = ppl(response | instruction) / ppl(response), on the same response tokens."""
    conditioned, _ = tokenize_examples(examples, tokenizer, max_length, "warn")
    bare, _ = tokenize_examples(without_instruction(examples), tokenizer, max_length, "warn")
    if len(conditioned) != len(examples) or len(bare) != len(examples):
        raise ValueError("IFD: an example's prompt alone fills data.max_length; raise it")
    # The conditioned response may have been cut shorter; score the same tokens in both.
    trimmed = []
    for full, free in zip(conditioned, bare, strict=True):
        kept = sum(1 for y in full.labels if y != IGNORE_INDEX)
        prompt = sum(1 for y in free.labels if y == IGNORE_INDEX)
        trimmed.append(
            TokenizedExample(
                free.id, free.input_ids[: prompt + kept], free.labels[: prompt + kept], False
            )
        )
    pad = tokenizer.pad_token_id
    with_nll = response_nll(model, conditioned, pad, batch_size)
    without_nll = response_nll(model, trimmed, pad, batch_size)
    return np.exp(with_nll - without_nll)


@torch.no_grad()
def divergence_scores(
    teacher: PreTrainedModel,
    student: PreTrainedModel,
    items: list[TokenizedExample],
    pad_token_id: int,
    vocab_size: int,
    batch_size: int = 8,
) -> np.ndarray:
    """Mean KL(teacher || student) per response token, over the shared vocabulary."""
    out = np.zeros(len(items))
    for start, chunk in batches(items, batch_size, "divergence"):
        batch = to_device(collate(chunk, pad_token_id), teacher.device)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        t = teacher(**inputs).logits[:, :-1, :vocab_size].float().log_softmax(-1)
        s = student(**to_device(inputs, student.device)).logits[:, :-1, :vocab_size].float()
        s = s.log_softmax(-1).to(t.device)
        kl = (t.exp() * (t - s)).sum(-1)  # (B, T-1)
        _, mask = _shifted(batch)
        per_example = (kl * mask).sum(1) / mask.sum(1).clamp(min=1)
        out[start : start + len(chunk)] = per_example.cpu().numpy()
    return out


@torch.no_grad()
def hidden_features(
    model: PreTrainedModel, items: list[TokenizedExample], pad_token_id: int, batch_size: int = 8
) -> np.ndarray:
    """The final hidden state averaged over each example's tokens (prompt and response)."""
    rows = []
    for _, chunk in batches(items, batch_size, "hidden states"):
        batch = to_device(collate(chunk, pad_token_id), model.device)
        states = model.get_decoder()(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).float()
        rows.append(((states * mask).sum(1) / mask.sum(1)).cpu().numpy())
    return np.concatenate(rows).astype(np.float32)


def example_text(example: Example) -> str:
    turns = [m["content"] for m in example.messages]
    return "\n".join([*turns, example.response or ""])


@torch.no_grad()
def sentence_embeddings(
    model_dir: str | Path,
    examples: list[Example],
    batch_size: int = 32,
    max_length: int = 256,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Mean-pooled, L2-normalised sentence embeddings (sentence-transformers' recipe for
    all-MiniLM-L6-v2), computed with transformers alone."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModel.from_pretrained(str(model_dir)).to(device).eval()
    rows = []
    bar = tqdm(total=len(examples), desc="embeddings", unit="ex", dynamic_ncols=True)
    for start in range(0, len(examples), batch_size):
        chunk = [example_text(e) for e in examples[start : start + batch_size]]
        encoded = tokenizer(
            chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        ).to(model.device)
        states = model(**encoded).last_hidden_state
        mask = encoded["attention_mask"].unsqueeze(-1).float()
        pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        rows.append(F.normalize(pooled, dim=-1).cpu().numpy())
        bar.update(len(chunk))
    bar.close()
    return np.concatenate(rows).astype(np.float32)


def response_tokens(items: list[TokenizedExample]) -> np.ndarray:
    return np.array([sum(1 for y in item.labels if y != IGNORE_INDEX) for item in items])


def total_tokens(items: list[TokenizedExample]) -> np.ndarray:
    """Tokens a training step processes for each example (prompt and response)."""
    return np.array([len(item.input_ids) for item in items])
