"""One training or evaluation example, as every format is read into."""

from __future__ import annotations

from dataclasses import dataclass

# The group of rows without one, in data where other rows have a group.
NO_GROUP = "(no group)"


class DataError(ValueError):
    """The input data is malformed; the message names the file, the line and the problem."""


@dataclass(frozen=True)
class Example:
    id: str
    messages: tuple[dict[str, str], ...]  # the prompt turns
    response: str | None  # the assistant's answer; None for a prompt-only row
    source: str = ""  # `file:line` for error messages
    # False when the response was cut off (a teacher that hit max_new_tokens): the student
    # must not learn to end the turn where the teacher had not.
    response_complete: bool = True
    # The response as token ids, when the teacher's own tokens must be kept (a served
    # teacher's log-probs belong to the tokens it generated, which re-tokenising the text
    # does not always reproduce: e.g. "\n\n" generated as one token, re-tokenised as two).
    response_ids: tuple[int, ...] | None = None
    # Loss weights over the response text: (start_char, weight) breakpoints, each weight
    # holding until the next; tokens are weighted by the span their first character is in,
    # and the template's closing tokens by the last span. None: every token weighs 1.
    weight_spans: tuple[tuple[int, float], ...] | None = None
    # Rationale steps counted from the end, as (start_char, rank) breakpoints like
    # weight_spans: the last line is rank 0. The `progressive_steps` curriculum trains the
    # last steps first (KPOD). None: no step structure.
    step_spans: tuple[tuple[int, int], ...] | None = None
    # The row's group (the data's optional `group` field): evaluation reports every measure
    # per group, and `train.group_objective` balances the groups' losses. None: no group.
    group: str | None = None
