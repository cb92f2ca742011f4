"""A teacher behind an OpenAI-compatible server (vLLM, llama.cpp, a hosted API).

The server writes responses through `/chat/completions` and returns, per generated token, the
`top_logprobs` alternatives as token *strings*. `TokenMapper` maps those strings back to ids
of the local tokenizer; a generated token that does not map to exactly one id stops the run
(or, with `teacher.on_unmappable: text_only`, leaves that row to text-only sequence KD).
An alternative that does not map is dropped from the row, so its mass falls into the tail
bucket, which stays exact; the count is reported.

Requests run `max_concurrency` at a time through `served_client.ServedClient` (retries,
backoff, timeouts; the API key only ever in the Authorization header, to the base URL's origin).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from lmdistill.config import GenerateConfig, TeacherConfig
from lmdistill.data import IGNORE_INDEX, Example, TokenizedExample, encode_prompt
from lmdistill.teachers.generate import (
    GenerationReport,
    answered_examples,
    check_manifest,
    finished_rows,
    generation_settings,
)
from lmdistill.teachers.served_client import ServedClient, ServedStats, ServedTeacherError

MAX_MISALIGNED = 0.25  # of greedy probe tokens that may differ from their row's top-1
PROBE_PROMPTS = (
    "What is 12 times 7? Answer briefly.",
    "Name the three primary colours.",
    "Write one sentence about the sea.",
)


# ---------------------------------------------------------------------------------------------
# Token strings -> token ids


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: printable stand-ins for the 256 bytes."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars, strict=True)}


class TokenMapper:
    """Map the strings a server returns for single tokens back to ids of `tokenizer`.

    A token's key is its bytes decoded as UTF-8 with errors ignored, which is how llama.cpp
    and most servers render a single token. Generated tokens are matched position by position
    against the local tokenization of the response text (exact: the ids the student trains
    on). Alternatives map only when their key belongs to exactly one id; the others (e.g. " ",
    shared by the space token and every partial multi-byte token that starts with a space)
    are dropped into the tail.
    """

    def __init__(self, tokenizer: Any) -> None:
        decoder = _byte_decoder()
        special = set(getattr(tokenizer, "all_special_ids", []))
        self.bytes: dict[int, bytes] = {}
        owners: dict[str, list[int]] = {}
        whole: dict[str, list[int]] = {}  # tokens that are complete UTF-8 on their own
        for token, index in tokenizer.get_vocab().items():
            if index in special:
                continue
            raw = _token_bytes(token, decoder)
            self.bytes[index] = raw
            key = raw.decode("utf-8", "ignore")
            owners.setdefault(key, []).append(index)
            with contextlib.suppress(UnicodeDecodeError):
                whole.setdefault(raw.decode("utf-8"), []).append(index)
        self.unique = {key: ids[0] for key, ids in owners.items() if len(ids) == 1}
        self.whole = {key: ids[0] for key, ids in whole.items() if len(ids) == 1}

    def lookup(self, text: str) -> int | None:
        """The one id whose rendering is `text`, or None (unknown or ambiguous)."""
        return self.unique.get(text)

    def chosen_ids(self, response: str, strings: list[str]) -> list[int]:
        """Ids of the generated tokens, checked exactly: their bytes must spell `response`.

        An ambiguous string (" " is also how a partial multi-byte token starting with a space
        renders) resolves to the token that is whole UTF-8 on its own; the byte check then
        proves the guess, or the row is unmappable."""
        ids = []
        for position, text in enumerate(strings):
            index = self.unique.get(text, self.whole.get(text))
            if index is None:
                raise UnmappableTokenError(
                    f"generated token {position} ({text!r}) does not map to one id of the "
                    "local tokenizer"
                )
            ids.append(index)
        spelled = b"".join(self.bytes[i] for i in ids)
        if spelled != response.encode():
            raise UnmappableTokenError(
                f"the ids mapped from the server's tokens spell {spelled[:80]!r}, not the "
                f"response {response[:80]!r}"
            )
        return ids


def _token_bytes(token: str, decoder: dict[str, int]) -> bytes:
    if all(c in decoder for c in token):  # byte-level BPE (GPT-2, Llama 3, SmolLM, Qwen)
        return bytes(decoder[c] for c in token)
    if token.startswith("<0x") and token.endswith(">") and len(token) == 6:  # SentencePiece byte
        return bytes([int(token[3:5], 16)])
    return token.replace("\u2581", " ").encode()  # SentencePiece word piece


class UnmappableTokenError(ServedTeacherError):
    """The server's generated tokens do not line up with the local tokenizer's ids."""


def row_signal(
    choice: dict[str, Any], mapper: TokenMapper, stats: ServedStats
) -> dict[str, list[Any]]:
    """The server's logprobs of one answer as local ids: the generated ids (checked to spell
    the text) and, per token, the top-k ids and log-probs sorted descending. Raises
    UnmappableTokenError when the tokens do not map exactly."""
    content = (choice.get("logprobs") or {}).get("content")
    if content is None:
        raise ServedTeacherError(
            "the server returned no logprobs.content; it must support `logprobs` and "
            "`top_logprobs` on /chat/completions"
        )
    text = (choice.get("message") or {}).get("content") or ""
    chosen = mapper.chosen_ids(text, [entry["token"] for entry in content])
    top_ids, top_lps, dropped = [], [], 0
    for index, entry in zip(chosen, content, strict=True):
        alternatives: dict[int, float] = {}
        for alt in entry.get("top_logprobs") or []:
            alt_id = mapper.lookup(alt["token"])
            if alt_id is None or alt_id == index or not math.isfinite(alt["logprob"]):
                dropped += alt_id is None
                continue
            alternatives[alt_id] = float(alt["logprob"])
        if math.isfinite(entry["logprob"]):
            alternatives[index] = float(entry["logprob"])
        ordered = sorted(alternatives.items(), key=lambda kv: -kv[1])
        top_ids.append([i for i, _ in ordered])
        top_lps.append([lp for _, lp in ordered])
    stats.add(dropped_alternatives=dropped)
    return {"chosen": chosen, "top_ids": top_ids, "top_logprobs": top_lps}


# ---------------------------------------------------------------------------------------------
# Generation


def served_generate(
    client: ServedClient,
    tokenizer: Any,
    prompts: list[Example],
    out_path: Path,
    config: GenerateConfig,
    spec: TeacherConfig,
    *,
    teacher_id: str,
    desc: str = "generate (served)",
) -> tuple[list[Example], GenerationReport]:
    """Like `generate_responses`, but the server writes, `max_concurrency` requests at a time;
    each finished row (with its top-k signal) is appended and fsync'd as it arrives."""
    check_manifest(
        out_path.with_name("manifest.json"),
        {
            "teacher": teacher_id,
            "generate": generation_settings(
                config, top_logprobs=spec.top_logprobs if scored(spec) else 0
            ),
        },
    )
    done = finished_rows(out_path, prompts)
    todo = [p for p in prompts if p.id not in done]
    mapper = TokenMapper(tokenizer)
    started = time.perf_counter()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if todo:
        client.check_model()

    def answer(prompt: Example) -> dict[str, Any]:
        return _answer_row(client, mapper, tokenizer, prompt, config, spec)

    with (
        out_path.open("a", encoding="utf-8") as sink,
        tqdm(total=len(prompts), initial=len(prompts) - len(todo), desc=desc, unit="prompt") as bar,
        ThreadPoolExecutor(max_workers=spec.max_concurrency) as pool,
    ):
        new = _write_as_completed([pool.submit(answer, p) for p in todo], sink, bar, started)
    done.update(new)
    report = GenerationReport(
        len(prompts),
        len(todo),
        sum(row["finish_reason"] == "length" for row in new.values()),
        sum(row["new_tokens"] for row in new.values()),
        time.perf_counter() - started,
    )
    return answered_examples(prompts, done, out_path), report


def _answer_row(
    client: ServedClient,
    mapper: TokenMapper,
    tokenizer: Any,
    prompt: Example,
    config: GenerateConfig,
    spec: TeacherConfig,
) -> dict[str, Any]:
    """One request: the row `generate` writes, with the top-k signal (or None: text only)."""
    seed = config.seed * 1_000_003 + _stable_hash(prompt.id)  # a resumed run samples alike
    k = spec.top_logprobs if scored(spec) else None
    choice = client.chat(list(prompt.messages), config, top_logprobs=k, seed=seed)
    text = (choice.get("message") or {}).get("content") or ""
    if k is None:  # a text-only teacher: sequence-level KD on its text
        return {
            "id": prompt.id,
            "messages": list(prompt.messages),
            "response": text,
            "finish_reason": "length" if choice.get("finish_reason") == "length" else "stop",
            "new_tokens": len(tokenizer.encode(text, add_special_tokens=False)),
            "signal": None,
        }
    try:
        signal: dict[str, Any] | None = row_signal(choice, mapper, client.stats)
    except UnmappableTokenError as error:
        if spec.on_unmappable == "error":
            raise UnmappableTokenError(
                f"prompt {prompt.id!r}: {error}; set teacher.on_unmappable=text_only to "
                "train such rows on the text alone"
            ) from None
        client.stats.add(text_only_rows=1)
        signal = None
    return {
        "id": prompt.id,
        "messages": list(prompt.messages),
        "response": text,
        "finish_reason": "length" if choice.get("finish_reason") == "length" else "stop",
        "new_tokens": len(signal["chosen"]) if signal else len(tokenizer.encode(text)),
        "signal": signal,
    }


def scored(spec: TeacherConfig) -> bool:
    """Whether the server is asked for log-probs (`teacher.kind: text` is text only)."""
    return spec.kind != "text"


def _write_as_completed(
    futures: list[Future[dict[str, Any]]], sink: Any, bar: Any, started: float
) -> dict[str, dict[str, Any]]:
    """Append each row the moment its request finishes (fsync'd); the first failure stops
    the run, after the rows that did arrive are safely on disk. Returns the rows written."""
    written: dict[str, dict[str, Any]] = {}
    pending = set(futures)
    failure: BaseException | None = None
    try:
        while pending and failure is None:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                if future.exception() is not None:
                    failure = failure or future.exception()
                    continue
                row = future.result()
                sink.write(json.dumps(row) + "\n")
                written[row["id"]] = row
                bar.update(1)
            sink.flush()
            os.fsync(sink.fileno())
            tokens = sum(row["new_tokens"] for row in written.values())
            bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - started):.0f}")
    finally:
        for future in pending:
            future.cancel()
    if failure is not None:
        raise failure
    return written


def _stable_hash(text: str) -> int:
    return int.from_bytes(text.encode()[:8].ljust(8, b"\0"), "little") % 1_000_003


# ---------------------------------------------------------------------------------------------
# Conformance probe


@torch.no_grad()
def conformance_probe(
    client: ServedClient,
    tokenizer: Any,
    local: PreTrainedModel | None,
    *,
    top_logprobs: int,
    tolerance: float,
    max_new_tokens: int = 16,
) -> dict[str, Any]:
    """Generate greedily from fixed prompts and check the server's log-probs.

    Always: every generated token maps to an id and is the top-1 of its own alternatives
    (greedy), which catches log-probs shifted against their tokens. With a local copy of the
    teacher: the log-prob of every generated token and alternative agrees with the local
    model's within `tolerance` nats on average. Raises ServedTeacherError otherwise.
    """
    client.check_model()
    mapper = TokenMapper(tokenizer)
    config = GenerateConfig(max_new_tokens=max_new_tokens, do_sample=False)
    diffs: list[float] = []
    misaligned = positions = 0
    for n, text in enumerate(PROBE_PROMPTS):
        example = Example(f"probe-{n}", ({"role": "user", "content": text},), None, "probe")
        choice = client.chat(list(example.messages), config, top_logprobs=top_logprobs, seed=0)
        signal = row_signal(choice, mapper, ServedStats())
        for chosen, ids, lps in zip(
            signal["chosen"], signal["top_ids"], signal["top_logprobs"], strict=True
        ):
            positions += 1
            misaligned += bool(ids) and ids[0] != chosen and lps[0] > lps[ids.index(chosen)] + 1e-4
        if local is None or not signal["chosen"]:
            continue
        prompt = encode_prompt(example, tokenizer)
        ids_t = torch.tensor([prompt + signal["chosen"]], device=local.device)
        logits = local(input_ids=ids_t).logits[0, len(prompt) - 1 : -1].float()  # (n, V)
        local_lp = torch.log_softmax(logits, dim=-1)
        for row, (ids, lps) in enumerate(
            zip(signal["top_ids"], signal["top_logprobs"], strict=True)
        ):
            mine = local_lp[row, torch.tensor(ids, device=local_lp.device)]
            diffs += (mine - torch.tensor(lps, device=mine.device)).abs().tolist()
    result: dict[str, Any] = {
        "positions": positions,
        "misaligned": misaligned,
        "compared_logprobs": len(diffs),
        "mean_abs_diff": sum(diffs) / len(diffs) if diffs else None,
        "max_abs_diff": max(diffs) if diffs else None,
        "tolerance": tolerance,
    }
    if positions == 0:
        raise ServedTeacherError(f"conformance probe: the server generated nothing: {result}")
    # A few greedy tokens that are not their row's top-1 are normal (llama.cpp applies a
    # repeat penalty to sampling, not to the log-probs it reports); log-probs shifted against
    # their tokens make it the rule.
    if misaligned > MAX_MISALIGNED * positions:
        raise ServedTeacherError(
            f"conformance probe: in {misaligned} of {positions} greedy tokens the server's "
            "top log-prob belongs to another token: its log-probs do not line up with the "
            f"tokens they belong to ({result})"
        )
    if diffs and result["mean_abs_diff"] > tolerance:
        raise ServedTeacherError(
            f"conformance probe: the server's log-probs differ from the local teacher's by "
            f"{result['mean_abs_diff']:.3f} nats on average (tolerance {tolerance}); is it "
            f"serving the same model? ({result})"
        )
    return result


# ---------------------------------------------------------------------------------------------
# Rows -> cache


def rows_scorer(
    rows: dict[str, dict[str, Any]], k: int
) -> Callable[[list[TokenizedExample], int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """A `write_rows` scorer over served rows: each example's response tokens get the row's
    top-k (padded with placeholder ids at -inf log-prob, which carry no mass); tokens after
    the generated ones (the template's end-of-turn) and text-only rows get no signal."""

    def score(
        batch: list[TokenizedExample], first: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids_rows, lp_rows, present = [], [], []
        for item in batch:
            targets = [y for y in item.labels[1:] if y != IGNORE_INDEX]
            signal = rows[item.id].get("signal")
            chosen = signal["chosen"] if signal else []
            n = min(len(chosen), len(targets))
            if chosen[:n] != targets[:n]:
                raise ServedTeacherError(
                    f"example {item.id!r}: the served tokens differ from the training tokens; "
                    "the responses were changed after they were generated"
                )
            for position in range(len(targets)):
                if signal is not None and position < n:
                    ids, lps = _pad(
                        signal["top_ids"][position], signal["top_logprobs"][position], k
                    )
                    present.append(True)
                else:
                    ids, lps = list(range(k)), [-math.log(k)] * k
                    present.append(False)
                ids_rows.append(ids)
                lp_rows.append(lps)
        return (
            torch.tensor(ids_rows, dtype=torch.long).reshape(-1, k),
            torch.tensor(lp_rows, dtype=torch.float32).reshape(-1, k),
            torch.tensor(present, dtype=torch.bool),
        )

    return score


def _pad(ids: list[int], logprobs: list[float], k: int) -> tuple[list[int], list[float]]:
    ids, logprobs = ids[:k], logprobs[:k]
    taken = set(ids)
    filler = (i for i in range(k * 2 + len(taken)) if i not in taken)
    while len(ids) < k:
        ids.append(next(filler))
        logprobs.append(-math.inf)
    return ids, logprobs
