"""`lmdistill synthesise`: the teacher writes new training examples from a few seeds.

Self-instruct style (Wang et al. 2023): each request shows the teacher `shots` seed examples,
drawn at random, and asks for one new problem with its worked solution:

    Problem: <a new question>
    Solution: <step-by-step solution ending in '#### <answer>'>

Every attempt is kept on disk as the teacher wrote it (`attempts.jsonl`, resumable: an
interrupted run keeps its finished attempts), then filtered, each drop counted by reason:
- `format`: no `Problem:` / `Solution:` parts, or an empty one;
- `no_answer`: the solution has no `#### <answer>` line;
- `unverifiable` / `wrong_answer`: with `verify: lab`, the problem is outside the lab's
  grammar, or the teacher's answer differs from the exact one
  (lmdistill.data.lab.solve_question); with `verify: calculations` (any GSM8K-style data), the
  solution has no calculator annotation, or its answer is not its last calculation's result;
- `wrong_calculation`: a calculator annotation `<<a op b=c>>` that is false;
- `copies_seed` / `near_duplicate`: word-trigram Jaccard similarity with a seed, or with an
  example already kept, above `dedup_threshold` (1.0: exact copies only).
The kept examples are written as messages JSONL (`synthetic.jsonl`) that `data.train` reads.
"""

from __future__ import annotations

import random
import re
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

from lmdistill.config import GenerateConfig, RunConfig
from lmdistill.data import Example, data_hash, load_examples, write_examples
from lmdistill.data.gsm8k import (
    calculator_annotations,
    format_number,
    parse_number,
    split_rationale,
)
from lmdistill.data.lab import solve_question
from lmdistill.io import atomic_write_json, atomic_write_text
from lmdistill.report.synthesis import render_synthesis

INSTRUCTION = (
    "Here are example problems with their worked solutions. Write one NEW problem in the "
    "same style (different names and numbers), then solve it step by step the same way. "
    "Reply exactly as:\nProblem: <the new problem>\nSolution: <the solution, ending with "
    "'#### <answer>'>"
)
_NEXT_EXAMPLE = re.compile(r"\n\s*Example \d+:")
_STATED = re.compile(r"<<[^<>=]+=([^<>]+)>>\$?([\d.,]*\d)?")
_PARTS = re.compile(r"Problem:\s*(?P<problem>.+?)\s*Solution:\s*(?P<solution>.+)", re.S)


def synth_dir(config: RunConfig) -> Path:
    return Path(config.synthesise.out or Path(config.output_dir) / "synthesise")


def request(seeds: list[Example], shots: int, index: int, base_seed: int) -> Example:
    """Attempt `index`'s prompt: `shots` seeds drawn by (base_seed, index)."""
    rng = random.Random(f"synthesise:{base_seed}:{index}")
    shown = rng.sample(seeds, min(shots, len(seeds)))
    blocks = [
        f"Example {n}:\nProblem: {e.messages[-1]['content']}\nSolution: {e.response}"
        for n, e in enumerate(shown, 1)
    ]
    text = INSTRUCTION + "\n\n" + "\n\n".join(blocks) + f"\n\nExample {len(shown) + 1}:"
    return Example(f"synth-attempt-{index}", ({"role": "user", "content": text},), None)


def trigrams(text: str) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i : i + 3]) for i in range(max(1, len(words) - 2))}


def jaccard(a: set[Any], b: set[Any]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def calculations_right(solution: str) -> bool:
    """Every `<<expr=value>>` annotation evaluates (safely, +-*/ only) to its value, and the
    text right after it (GSM8K writes `<<48/2=24>>24`) states that value when it is a number."""
    if not all(a.is_correct() is True for a in calculator_annotations(solution)):
        return False
    for value, after in _STATED.findall(solution):
        if after and parse_number(after) != parse_number(value):
            return False
    return True


def check(text: str, verify: str) -> tuple[str | None, tuple[str, str] | None]:
    """(drop reason or None, (problem, solution))."""
    parts = _PARTS.search(text)
    if parts is None:
        return "format", None
    problem = parts.group("problem").strip()
    solution = parts.group("solution").strip()
    # The teacher may go on to write another example: keep the first one only.
    solution = _NEXT_EXAMPLE.split(solution)[0].strip()
    # ... and nothing after its answer line.
    solution = re.sub(r"(\n?####[^\n]*)\n.*", r"\1", solution, flags=re.S).strip()
    if not problem or not solution:
        return "format", None
    answer = split_rationale(solution).answer
    if answer is None:
        return "no_answer", (problem, solution)
    if verify == "lab":
        exact = solve_question(problem)
        if exact is None:
            return "unverifiable", (problem, solution)
        if answer.strip() != str(exact):
            return "wrong_answer", (problem, solution)
    if not calculations_right(solution):
        return "wrong_calculation", (problem, solution)
    if verify == "calculations":
        steps = calculator_annotations(solution)
        if not steps:
            return "unverifiable", (problem, solution)
        last = steps[-1].value()
        if last is None or answer.strip() != format_number(last):
            return "wrong_answer", (problem, solution)
    return None, (problem, solution)


def synthesise(config: RunConfig) -> dict[str, Any]:
    from lmdistill.teachers.setup import generating_teacher

    spec = config.synthesise
    started = time.perf_counter()
    seeds = load_examples(spec.seeds, split=config.data.split, format=config.data.format)
    seeds = [e for e in seeds if e.response is not None][: spec.seed_count]
    if not seeds:
        raise ValueError(f"synthesise.seeds: {spec.seeds} holds no examples with a response")
    out = synth_dir(config)
    prompts = [request(seeds, spec.shots, i, spec.seed) for i in range(spec.attempts)]
    generation = GenerateConfig(
        max_new_tokens=spec.max_new_tokens,
        do_sample=True,
        temperature=spec.temperature,
        top_p=spec.top_p,
        batch_size=spec.batch_size,
        seed=spec.seed,
    )
    teacher, _ = generating_teacher(replace(config, generate=generation))
    answered, report = teacher.generate(prompts, out / "attempts.jsonl", generation)
    seed_grams = [trigrams(e.messages[-1]["content"]) for e in seeds]
    kept: list[Example] = []
    kept_grams: list[set[tuple[str, ...]]] = []
    drops: Counter[str] = Counter()
    for attempt in answered:
        if len(kept) >= spec.count:
            drops["over_count"] += 1
            continue
        reason, parts = check(attempt.response or "", spec.verify)
        cut_short = not attempt.response_complete
        if reason is None and cut_short and not _NEXT_EXAMPLE.search(attempt.response or ""):
            reason = "truncated"  # cut off inside its first example
        if reason is None:
            assert parts is not None
            grams = trigrams(parts[0])
            if any(jaccard(grams, g) >= spec.dedup_threshold for g in seed_grams):
                reason = "copies_seed"
            elif any(jaccard(grams, g) >= spec.dedup_threshold for g in kept_grams):
                reason = "near_duplicate"
        if reason is not None:
            drops[reason] += 1
            continue
        assert parts is not None
        kept_grams.append(trigrams(parts[0]))
        kept.append(
            Example(
                f"synth-{len(kept)}",
                ({"role": "user", "content": parts[0]},),
                parts[1],
                f"synthesised from {attempt.id}",
            )
        )
    if not kept:
        raise RuntimeError(
            f"synthesise: none of {len(answered)} attempts passed the filters "
            f"({dict(drops)}); raise synthesise.attempts, loosen verify, or use a stronger teacher"
        )
    write_examples(out / "synthetic.jsonl", kept)
    summary = {
        "teacher": getattr(teacher, "identity", str(config.teacher.path)),
        "seeds": spec.seeds,
        "seed_examples": len(seeds),
        "attempts": len(answered),
        "kept": len(kept),
        "acceptance": len(kept) / len(answered),
        "dropped": dict(drops),
        "verify": spec.verify,
        "generation": report.as_dict(),
        "seconds": time.perf_counter() - started,
        "output": str(out / "synthetic.jsonl"),
        "data_hash": data_hash(kept),
        "examples": [
            {"problem": e.messages[-1]["content"], "solution": e.response} for e in kept[:3]
        ],
    }
    atomic_write_json(out / "synthesis.json", summary)
    atomic_write_text(out / "synthesise.md", render_synthesis(summary))
    return summary
