"""What a teacher does, as two interfaces that each backend honours in full.

- `Teacher` scores a batch of token sequences: the signal at every position that predicts a
  response token (dense logits through hidden states and the output head, or a sparse top-k).
  The trainer and the evaluator see only this.
- `ResponseWriter` writes responses for prompts, resumably, into JSONL (sequence-level KD).

Backends: `LocalTeacher` (a model in this process) is both; `CachedTeacher` (a signal cache on
disk) is both (it scores the sequences it stored and returns the responses it stored);
`ServedTeacher` (an OpenAI-compatible server) is a writer: the log-probs it returns for the
text it writes become a cache, and the cache scores (and `ServedScorer` scores text it did not
write, through the echo's log-probs). `TextTeacher` (a server that gives text only) is a
writer alone. No backend has a method that only raises.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from lmdistill.config import GenerateConfig, LossConfig, TeacherConfig
from lmdistill.data import IGNORE_INDEX, Example, to_device
from lmdistill.io import atomic_write_text
from lmdistill.losses import SparseSignal
from lmdistill.models.forward import teacher_outputs, uses_attention
from lmdistill.teachers.cache import CacheError, TeacherCache
from lmdistill.teachers.generate import GenerationReport, generate_responses
from lmdistill.teachers.served import served_generate
from lmdistill.teachers.served_client import ServedClient


@dataclass
class TeacherSignal:
    """The teacher on one batch, at the positions that predict response tokens (N rows)."""

    states: torch.Tensor | None = None  # (N, H) final hidden states: dense, with `weight`
    weight: torch.Tensor | None = None  # (V, H) the teacher's output head
    sparse: SparseSignal | None = None  # or (N, k) top-k log-probs
    hidden_states: tuple[torch.Tensor, ...] | None = None  # feature losses (local only)
    attentions: tuple[torch.Tensor, ...] | None = None


class Teacher(ABC):
    """Scores token sequences: what training and evaluation learn from and measure against."""

    identity: str
    model_config: Any | None = None  # the model's config where feature losses can use it

    def prepare(self, device: Any, loss: LossConfig) -> None:
        """Get ready to score on `device` (a local model moves there); by default nothing."""
        return None

    @abstractmethod
    def score(
        self, batch: dict[str, torch.Tensor], indices: list[int], loss: LossConfig
    ) -> TeacherSignal:
        """The signal on `batch`, whose rows are examples `indices` of the scored dataset."""


class ResponseWriter(ABC):
    """Writes responses for prompts (sequence-level KD data)."""

    identity: str

    @abstractmethod
    def generate(
        self, prompts: list[Example], out_path: Path, config: GenerateConfig
    ) -> tuple[list[Example], GenerationReport]:
        """Responses for `prompts`, written (resumably) to `out_path` as JSONL."""


class LocalTeacher(Teacher, ResponseWriter):
    def __init__(self, model: PreTrainedModel, tokenizer: Any, identity: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.identity = identity
        self.model_config = model.config

    def prepare(self, device: Any, loss: LossConfig) -> None:
        self.model.to(device).eval().requires_grad_(False)
        if uses_attention(loss):
            # Attention weights exist only in the eager implementation (sdpa returns none).
            self.model.set_attn_implementation("eager")

    def score(
        self, batch: dict[str, torch.Tensor], indices: list[int], loss: LossConfig
    ) -> TeacherSignal:
        out = teacher_outputs(self.model, to_device(batch, self.model.device), loss)
        return TeacherSignal(
            states=out.states,
            weight=self.model.get_output_embeddings().weight,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
        )

    def generate(
        self, prompts: list[Example], out_path: Path, config: GenerateConfig
    ) -> tuple[list[Example], GenerationReport]:
        return generate_responses(
            self.model, self.tokenizer, prompts, out_path, config, teacher_id=self.identity
        )


class CachedTeacher(Teacher, ResponseWriter):
    """The signal `lmdistill cache` stored; example `i` of the cache is dataset index `i`."""

    def __init__(self, cache: TeacherCache, others: list[TeacherCache] | None = None) -> None:
        self.cache = cache
        self.others = others or []  # more caches `generate` may look prompts up in
        self.identity = f"cache:{cache.teacher}"

    def score(
        self, batch: dict[str, torch.Tensor], indices: list[int], loss: LossConfig
    ) -> TeacherSignal:
        signal = self.cache.batch_signal(indices)
        rows = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        if signal.num_rows != rows:
            raise CacheError(
                f"{self.cache.dir}: examples {indices} have {signal.num_rows} cached response "
                f"tokens, the batch has {rows}; the cache belongs to other data"
            )
        return TeacherSignal(sparse=signal)

    def generate(
        self, prompts: list[Example], out_path: Path, config: GenerateConfig
    ) -> tuple[list[Example], GenerationReport]:
        """The cached teacher-written responses for `prompts` (nothing is generated)."""
        stored = {e.id: e for c in [self.cache, *self.others] for e in c.examples()}
        answered = []
        for prompt in prompts:
            found = stored.get(prompt.id)
            if found is None or found.messages != prompt.messages:
                raise CacheError(
                    f"{self.cache.dir}: prompt {prompt.id!r} is not in the cache (or its text "
                    "differs); a cache teacher can only return responses it has stored"
                )
            answered.append(found)
        lines = [json_row(e, "stop" if e.response_complete else "length") for e in answered]
        atomic_write_text(out_path, "".join(lines))
        return answered, GenerationReport(len(prompts), 0, 0, 0, 0.0)


class ServedTeacher(ResponseWriter):
    """Generation through the server; its token-level signal is the top-k log-probs of the
    tokens it generated, stored with each row and turned into a cache for training (the
    cache is the `Teacher` a run scores with)."""

    def __init__(self, spec: TeacherConfig, tokenizer: Any) -> None:
        self.spec = spec
        self.tokenizer = tokenizer
        self.client = ServedClient(spec)
        self.identity = f"served:{spec.model}@{spec.base_url}"

    def generate(
        self, prompts: list[Example], out_path: Path, config: GenerateConfig
    ) -> tuple[list[Example], GenerationReport]:
        return served_generate(
            self.client,
            self.tokenizer,
            prompts,
            out_path,
            config,
            self.spec,
            teacher_id=self.identity,
        )


class TextTeacher(ServedTeacher):
    """A teacher that gives text only (a closed API: no log-probs, no local weights): it
    writes the responses the student learns by CE (sequence-level KD) and scores nothing."""

    def __init__(self, spec: TeacherConfig, tokenizer: Any) -> None:
        super().__init__(spec, tokenizer)
        self.identity = f"text:{spec.model}@{spec.base_url}"


def json_row(example: Example, finish_reason: str) -> str:
    row = {
        "id": example.id,
        "messages": list(example.messages),
        "response": example.response,
        "finish_reason": finish_reason,
    }
    return json.dumps(row) + "\n"
