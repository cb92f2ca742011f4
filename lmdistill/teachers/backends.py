"""Teacher backends (`teacher.kind`) as a registry: each says how a run opens it, how
`lmdistill generate` writes with it, what it refuses when the config loads, and what it can do.
Adding a backend is one `@register_teacher(...)` on a function that opens it.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedModel

from lmdistill.config import RunConfig
from lmdistill.data import Example
from lmdistill.registry import Registry
from lmdistill.teachers.base import LocalTeacher, ResponseWriter, Teacher


@dataclass
class TeacherSetup:
    """The teacher side of a run, as a backend opens it: the tokenizer, the local weights
    (while needed), the examples with the teacher's responses, and who scores each split."""

    tokenizer: Any
    model: PreTrainedModel | None  # the local weights (student init, samples); None once freed
    examples: dict[str, list[Example]]  # "train", "eval"
    signal: dict[str, Teacher]  # who scores each split
    report: dict[str, Any] = field(default_factory=dict)
    # Who scores text the student writes (on-policy), when not the train split's teacher.
    scorer: Teacher | None = None

    def release_model(self) -> None:
        """Drop the local weights when training does not need them (served, cache)."""
        if not isinstance(self.signal.get("train"), LocalTeacher):
            self.model = None
            gc.collect()


Open = Callable[[RunConfig, bool], TeacherSetup]


@dataclass(frozen=True)
class Backend:
    # What a run trains and evaluates on; the flag: also cache a local teacher's signal.
    open: Open
    # The teacher `lmdistill generate` (and synthesis) writes with, and what setting it up found.
    generating: Callable[[RunConfig], tuple[ResponseWriter, dict[str, Any]]]
    # Config-time refusals: what this backend cannot do with these settings, with the reason.
    check: Callable[[RunConfig], None]
    in_process: bool  # the teacher's weights score and write in this process
    caches_signal: bool  # training reads its signal from cache.dir
    writes_text: bool  # it can write new responses (a cache only returns what it stored)
    scores_text: bool  # it can score text it did not write (the student's, on-policy)


TEACHERS: Registry[Backend] = Registry("teacher backend", "teacher.kind")


def register_teacher(
    name: str,
    *,
    generating: Callable[[RunConfig], tuple[ResponseWriter, dict[str, Any]]],
    check: Callable[[RunConfig], None],
    in_process: bool,
    caches_signal: bool,
    writes_text: bool,
    scores_text: bool,
) -> Callable[[Open], Open]:
    return TEACHERS.register_as(
        name,
        lambda fn: Backend(
            fn, generating, check, in_process, caches_signal, writes_text, scores_text
        ),
    )
