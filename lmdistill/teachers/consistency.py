"""Rationale data from a teacher: several sampled rationales per question, filtered.

With `generate.samples: n` the teacher answers every training question n times (sampling);
`generate.keep` then decides which rationales the student trains on:

- `all`: every sample that passes the format filters;
- `majority` (self-consistency, Wang et al. 2023): the samples whose final answer agrees with
  the most common answer among the question's well-formed samples;
- `gold`: the samples whose final answer equals the question's reference answer (questions
  without one fall back to `majority`).

Format filters apply first: `min_chars` / `max_chars` on the response, `require_answer` (a
GSM8K-style `#### answer` line), and a response cut at `max_new_tokens` is never kept when
anything is filtered (`drop_truncated` asks for that alone). At most `keep_per_prompt`
samples are kept per question (the first ones in sample order; default all); a question
with none left is dropped. Every drop is
counted by reason in the report, so a filter that throws away most of the data is visible.

Held-out questions are answered once (sample 0) and never filtered, so evaluation sees the
same questions whatever the filters keep. `generate.rationale_prompt` is shown to the teacher
only (as a system message); the kept examples carry the question as the student sees it.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

from lmdistill.config import GenerateConfig
from lmdistill.data import Example
from lmdistill.data.gsm8k import ANSWER_MARK, final_answer, majority_answer, split_rationale

SAMPLE_MARK = "#s"


def filtering(config: GenerateConfig) -> bool:
    """Whether generated responses are filtered at all (else they are used as written)."""
    return (
        config.samples > 1
        or config.keep != "all"
        or config.min_chars > 0
        or config.max_chars is not None
        or config.require_answer
        or config.drop_truncated
    )


def with_rationale_prompt(prompts: list[Example], prompt: str | None) -> list[Example]:
    """The prompts as the teacher sees them: `prompt` as (or added to) the system message."""
    if not prompt:
        return list(prompts)
    out = []
    for p in prompts:
        turns = list(p.messages)
        if turns and turns[0]["role"] == "system":
            turns[0] = {**turns[0], "content": f"{turns[0]['content']}\n\n{prompt}"}
        else:
            turns.insert(0, {"role": "system", "content": prompt})
        out.append(dataclasses.replace(p, messages=tuple(turns)))
    return out


def as_asked(answered: list[Example], prompts: list[Example]) -> list[Example]:
    """The teacher's answers on the prompts the student sees (without the rationale prompt)."""
    return [
        dataclasses.replace(a, messages=p.messages) for a, p in zip(answered, prompts, strict=True)
    ]


def expand_samples(prompts: list[Example], samples: int) -> list[Example]:
    """Each prompt `samples` times, ids `ID#s0` .. `ID#s{n-1}` (unchanged for one sample)."""
    if samples == 1:
        return list(prompts)
    return [
        dataclasses.replace(p, id=f"{p.id}{SAMPLE_MARK}{j}")
        for p in prompts
        for j in range(samples)
    ]


def select_rationales(
    prompts: list[Example], answered: list[Example], config: GenerateConfig
) -> tuple[list[Example], dict[str, Any]]:
    """Keep the rationales `config` asks for; `answered` is `expand_samples(prompts)` with
    the teacher's responses, in that order. Returns the kept examples (in prompt order,
    sample ids kept) and a report of what was dropped and why."""
    n = config.samples
    if len(answered) != len(prompts) * n:
        raise ValueError(f"expected {len(prompts)} x {n} answered samples, got {len(answered)}")
    dropped: Counter[str] = Counter()
    kept: list[Example] = []
    agree = 0.0
    voted = gold_known = majority_right = prompts_kept = 0
    for i, prompt in enumerate(prompts):
        group = answered[i * n : (i + 1) * n]
        answers = [final_answer(a.response or "") for a in group]
        passing = []
        for sample, answer in zip(group, answers, strict=True):
            reason = _format_problem(sample, config)
            if reason:
                dropped[reason] += 1
            else:
                passing.append((sample, answer))
        # Only well-formed samples vote: a truncated loop repeating one number must not
        # outvote them.
        majority, share = majority_answer([s.response or "" for s, _ in passing])
        if majority is not None and n > 1:
            voted += 1
            agree += share
        gold = final_answer(prompt.response or "") if _has_answer(prompt) else None
        if gold is not None and majority is not None:
            gold_known += 1
            majority_right += majority == gold
        target = gold if config.keep == "gold" and gold is not None else majority
        chosen: list[Example] = []
        for sample, answer in passing:
            if config.keep != "all" and answer != target:
                dropped["disagrees"] += 1
            elif config.keep_per_prompt is None or len(chosen) < config.keep_per_prompt:
                chosen.append(sample)
            else:
                dropped["over_keep_per_prompt"] += 1
        prompts_kept += bool(chosen)
        kept += chosen
    if prompts and not kept:
        raise ValueError(
            f"generate: the filters kept none of {len(prompts)} training questions (dropped: "
            f"{dict(dropped)}); loosen generate.keep / min_chars / max_chars / require_answer "
            "/ drop_truncated (or raise max_new_tokens)"
        )
    report = {
        "prompts": len(prompts),
        "samples_per_prompt": n,
        "kept": len(kept),
        "prompts_kept": prompts_kept,
        "prompts_dropped": len(prompts) - prompts_kept,
        "dropped": dict(sorted(dropped.items())),
        # Self-consistency statistics: how often a sample agrees with its question's majority
        # answer, and how often that majority answer is the reference answer.
        "majority_agreement": agree / voted if voted else None,
        "majority_accuracy": majority_right / gold_known if gold_known else None,
    }
    return kept, report


def _format_problem(sample: Example, config: GenerateConfig) -> str | None:
    text = sample.response or ""
    if not sample.response_complete:
        return "truncated"
    if len(text) < config.min_chars:
        return "too_short"
    if config.max_chars is not None and len(text) > config.max_chars:
        return "too_long"
    if (config.require_answer or config.keep != "all") and split_rationale(text).answer is None:
        return "no_answer"
    return None


def _has_answer(example: Example) -> bool:
    return ANSWER_MARK in (example.response or "")
