"""A served teacher that scores text it did not write (on-policy distillation).

Two ways, chosen by what the server supports (`probe_scoring` tries them in this order):

- `prompt_logprobs` (vLLM): the sequence goes as token ids to `/completions` with
  `prompt_logprobs: k`; per position the server gives the top-k ids of the distribution that
  predicts it, and always that position's own token. Nothing to line up: the ids are ours.
- `echo` (the OpenAI convention, llama.cpp): the whole sequence goes as text to
  `/completions` (`echo: true`, `logprobs: k`, one greedy token generated), and the server
  returns, per token of the echoed prompt, its top-k alternatives as strings. Those are
  mapped back to the local tokenizer's ids (`TokenMapper`) and lined up with the local
  tokens by the text they spell.

Either way, a position the server tokenised differently (a student can write a word in
pieces the server would not) or whose sampled token it gives no log-prob for is *unscored*:
on-policy training leaves it out of the loss (its label is masked) and counts it.

Servers disagree on which entry holds which distribution. OpenAI's convention: entry m holds
the distribution that predicts token m. llama-cpp-python's server drops a leading BOS token
from the echo and otherwise pairs each token with the distribution *after* it, so a prompt
that does not start with BOS comes back shifted by one. `probe_scoring` finds the shift:
the server writes a greedy continuation, the text is echoed, and under the right shift every
greedy token is the top-1 of the distribution that predicts it; with a local copy of the
teacher the log-probs are also compared with the local model's. A server that gives no
prompt log-probs, or whose log-probs line up under no shift, is refused with the reason.
"""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel

from lmdistill.config import LossConfig
from lmdistill.data import IGNORE_INDEX, TokenizedExample
from lmdistill.losses import SparseSignal
from lmdistill.teachers.base import Teacher, TeacherSignal
from lmdistill.teachers.served import PROBE_PROMPTS, TokenMapper, _pad
from lmdistill.teachers.served_client import ServedClient, ServedTeacherError

SHIFTS = (0, 1)
MIN_GREEDY_TOP1 = 0.75  # of the probe's greedy tokens that must be top-1 under the shift


@dataclass
class ScoringStats:
    """What scoring the student's text cost and how much of it the server could score."""

    sequences: int = 0
    positions: int = 0  # response tokens sent
    unscored: int = 0  # of those, left out of the loss (tokenised differently / no log-prob)
    seconds: float = 0.0  # waiting for the server's answers
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, rows: list[dict[int, float] | None]) -> None:
        with self.lock:
            self.sequences += 1
            self.positions += len(rows)
            self.unscored += sum(r is None for r in rows)

    def as_dict(self) -> dict[str, float]:
        return {k: v for k, v in self.__dict__.items() if k != "lock"}


class Aligner:
    """Lines up the local tokens of a text with the server's tokens of the same text."""

    def __init__(self, tokenizer: Any, mapper: TokenMapper) -> None:
        self.tokenizer = tokenizer
        self.mapper = mapper
        self.special_text = {
            str(tokenizer.convert_ids_to_tokens(i)) for i in tokenizer.all_special_ids
        }

    def render(self, index: int) -> str:
        """How a server writes one token: special tokens as '' (llama.cpp) or their literal
        text (normalised to '' on the server's side), the rest as their UTF-8 text."""
        raw = self.mapper.bytes.get(index)
        return "" if raw is None else raw.decode("utf-8", "ignore")

    def theirs(self, strings: list[str]) -> list[str]:
        return ["" if s in self.special_text else s for s in strings]

    def match(self, ids: list[int], strings: list[str]) -> dict[int, int]:
        """{local position: server position} for the tokens both sides cut alike (and the
        token before each), walking
        the two token streams along the text they spell."""
        ours, theirs = [self.render(i) for i in ids], self.theirs(strings)
        matched: dict[int, int] = {}
        i = m = at_ours = at_theirs = 0
        while i < len(ours) and m < len(theirs):
            if at_ours == at_theirs:
                if ours[i] == theirs[m]:
                    matched[i] = m
                    at_ours += len(ours[i])
                    at_theirs += len(theirs[m])
                    i, m = i + 1, m + 1
                elif ours[i] == "":  # a token the server dropped (a leading BOS)
                    i += 1
                elif theirs[m] == "":
                    m += 1
                else:  # cut differently here: step past both
                    at_ours += len(ours[i])
                    at_theirs += len(theirs[m])
                    i, m = i + 1, m + 1
            elif at_ours < at_theirs:
                at_ours += len(ours[i])
                i += 1
            else:
                at_theirs += len(theirs[m])
                m += 1
        # The token before must be cut alike too: after "\n\n" written as one token or as
        # two, the same next token has different probabilities.
        return {i: m for i, m in matched.items() if matched.get(i - 1) == m - 1}


def position_logprobs(
    echoed: dict[str, Any], m: int, shift: int, chosen: int, mapper: TokenMapper
) -> dict[int, float] | None:
    """The distribution that predicts server token m, as {local id: log-prob} (the
    alternatives that map to one id, and always the chosen token), or None when the server
    gives none or not the chosen token's log-prob."""
    entry = m - shift
    tops = echoed["top_logprobs"]
    if entry < 0 or entry >= len(tops) or not tops[entry]:
        return None
    alternatives: dict[int, float] = {}
    for text, logprob in tops[entry].items():
        index = mapper.lookup(text)
        if index is not None and math.isfinite(logprob):
            alternatives[index] = float(logprob)
    # The chosen token's own log-prob: under shift 0 the server reports it for token m;
    # under another shift that number belongs to another distribution, so only the top-k.
    own = echoed["token_logprobs"][m] if shift == 0 else alternatives.get(chosen)
    if own is None or not math.isfinite(own):
        return None
    alternatives[chosen] = float(own)
    return alternatives


def own_row(entry: dict[int, float] | None, chosen: int, vocab: int) -> dict[int, float] | None:
    """A prompt_logprobs entry as the scorer's row: None without the chosen token's own
    log-prob; ids outside the tokenizer's vocabulary (none on a matching server) dropped."""
    if entry is None or chosen not in entry or not math.isfinite(entry[chosen]):
        return None
    return {i: lp for i, lp in entry.items() if 0 <= i < vocab and math.isfinite(lp)}


@dataclass
class ScoredRow:
    """One sequence's response positions: the distribution of each scored one (None: not)."""

    rows: list[dict[int, float] | None]


@dataclass
class ServedScorer(Teacher):
    """Scores any token sequence through the server's prompt log-probs (sparse top-k)."""

    client: ServedClient
    tokenizer: Any
    top_logprobs: int
    shift: int
    method: str = "echo"  # or "prompt_logprobs"
    max_concurrency: int = 4
    stats: ScoringStats = field(default_factory=ScoringStats)
    identity: str = "served"
    _memo: dict[tuple[int, ...], ScoredRow] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.mapper = TokenMapper(self.tokenizer)
        self.aligner = Aligner(self.tokenizer, self.mapper)

    def score_sequences(self, items: list[TokenizedExample]) -> list[ScoredRow]:
        """Each sequence's response positions scored (requests `max_concurrency` at a time);
        remembered until `score` uses them."""
        todo = [item for item in items if _key(item) not in self._memo]
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            for item, scored in zip(todo, pool.map(self._score_one, todo), strict=True):
                self._memo[_key(item)] = scored
        self.stats.seconds += time.perf_counter() - started
        return [self._memo[_key(item)] for item in items]

    def mask_unscored(self, items: list[TokenizedExample]) -> list[TokenizedExample]:
        """The sequences with every response position the server could not score masked
        out of the labels (such a position then carries no loss at all)."""
        masked = []
        for item, scored in zip(items, self.score_sequences(items), strict=True):
            labels = list(item.labels)
            responses = [p for p in range(1, len(labels)) if labels[p] != IGNORE_INDEX]
            for position, row in zip(responses, scored.rows, strict=True):
                if row is None:
                    labels[position] = IGNORE_INDEX
            kept = TokenizedExample(item.id, item.input_ids, labels, item.truncated)
            self._memo.pop(_key(item), None)  # `score` looks the masked sequence up
            self._memo[_key(kept)] = ScoredRow([r for r in scored.rows if r is not None])
            masked.append(kept)
        return masked

    def _score_one(self, item: TokenizedExample) -> ScoredRow:
        ids = list(item.input_ids)
        responses = [p for p in range(1, len(item.labels)) if item.labels[p] != IGNORE_INDEX]
        rows: list[dict[int, float] | None]
        if self.method == "prompt_logprobs":
            entries = self.client.prompt_logprobs(ids, top_logprobs=self.top_logprobs)
            if entries is None:
                raise ServedTeacherError(
                    f"{self.client.base_url} stopped answering prompt_logprobs, which its "
                    "probe found it supports"
                )
            rows = [own_row(entries[p], ids[p], len(self.tokenizer)) for p in responses]
            self.stats.add(rows)
            return ScoredRow(rows)
        # The tokens' own text: no clean-up of spaces before punctuation, which would shift
        # every later offset against the server's tokens.
        text = self.tokenizer.decode(
            ids, skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        echoed = self.client.echo(text, top_logprobs=self.top_logprobs)
        matched = self.aligner.match(ids, list(echoed["tokens"]))
        rows = []
        for position in responses:
            m = matched.get(position)
            rows.append(
                None
                if m is None
                else position_logprobs(echoed, m, self.shift, ids[position], self.mapper)
            )
        self.stats.add(rows)
        return ScoredRow(rows)

    def score(
        self, batch: dict[str, torch.Tensor], indices: list[int], loss: LossConfig
    ) -> TeacherSignal:
        items = _batch_items(batch)
        k = self.top_logprobs + 1  # the alternatives and the chosen token
        ids_rows, lp_rows, present = [], [], []
        for scored in self.score_sequences(items):
            for row in scored.rows:
                if row is None:
                    ids, lps = list(range(k)), [-math.log(k)] * k
                else:
                    ordered = sorted(row.items(), key=lambda kv: -kv[1])
                    ids, lps = _pad([i for i, _ in ordered], [lp for _, lp in ordered], k)
                ids_rows.append(ids)
                lp_rows.append(lps)
                present.append(row is not None)
        for item in items:
            self._memo.pop(_key(item), None)
        signal = SparseSignal(
            torch.tensor(ids_rows, dtype=torch.long).reshape(-1, k),
            torch.tensor(lp_rows, dtype=torch.float32).reshape(-1, k),
            tail="bucket",
            temperature=1.0,
            present=torch.tensor(present, dtype=torch.bool),
        )
        return TeacherSignal(sparse=signal)


def _key(item: TokenizedExample) -> tuple[int, ...]:
    # The tokens and which of them are labelled: the same sequence masked differently is
    # another key.
    return (*item.input_ids, -1, *(int(y != IGNORE_INDEX) for y in item.labels))


def _batch_items(batch: dict[str, torch.Tensor]) -> list[TokenizedExample]:
    """The sequences of a collated batch (padding dropped by the attention mask)."""
    items = []
    for row, (ids, mask, labels) in enumerate(
        zip(batch["input_ids"], batch["attention_mask"], batch["labels"], strict=True)
    ):
        keep = mask.bool()
        items.append(
            TokenizedExample(
                f"row{row}", ids[keep].tolist(), labels[keep].tolist(), truncated=False
            )
        )
    return items


# ---------------------------------------------------------------------------------------------
# Probe


Compared = list[tuple[list[int], list[tuple[int, dict[int, float] | None]]]]


@torch.no_grad()
def probe_scoring(
    client: ServedClient,
    tokenizer: Any,
    local: PreTrainedModel | None,
    *,
    top_logprobs: int,
    tolerance: float,
    prompts: list[str] | None = None,
    max_new_tokens: int = 16,
) -> dict[str, Any]:
    """Find how the server scores text it did not write (`method`, and for `echo` which
    entry holds which distribution, the `shift`), or refuse the server.

    For each probe prompt (chat-templated, as the student's text will be, unless `prompts`
    gives raw texts) the server writes a greedy continuation; the whole text is scored and we
    count the continuation tokens that are the top-1 of the distribution predicting them:
    nearly all must be. `prompt_logprobs` is tried first (token ids, nothing to line up);
    a server that refuses it or answers without it is scored by `echo`, under the shift
    that wins. With a local copy of the teacher, the server's log-probs of the continuation
    must then agree with the local model's within `tolerance` nats on average."""
    client.check_model()
    texts = prompts or [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in PROBE_PROMPTS
    ]
    samples = []
    for prompt in texts:
        continuation = client.complete(prompt, max_tokens=max_new_tokens)
        ids = tokenizer(prompt + continuation, add_special_tokens=False)["input_ids"]
        start = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        samples.append((prompt + continuation, ids, start))
    first = client.prompt_logprobs(samples[0][1], top_logprobs=top_logprobs, probing=True)
    if first is not None:
        result, compared = _probe_prompt_logprobs(client, tokenizer, samples, first, top_logprobs)
    else:
        result, compared = _probe_echo(client, tokenizer, samples, top_logprobs)
    result["tolerance"] = tolerance
    if local is not None:
        diffs = []
        for ids, rows in compared:
            logits = local(input_ids=torch.tensor([ids], device=local.device)).logits[0]
            log_p = torch.log_softmax(logits.float(), dim=-1)
            for i, row in rows:
                if row is not None:
                    diffs += [abs(float(log_p[i - 1, t]) - lp) for t, lp in row.items()]
        result["compared_logprobs"] = len(diffs)
        result["mean_abs_diff"] = sum(diffs) / len(diffs) if diffs else None
        if diffs and result["mean_abs_diff"] > tolerance:
            raise ServedTeacherError(
                f"scoring probe: the server's log-probs of text it did not write differ from "
                f"the local teacher's by {result['mean_abs_diff']:.3f} nats on average "
                f"(tolerance {tolerance}) ({result})"
            )
    return result


def _probe_prompt_logprobs(
    client: ServedClient,
    tokenizer: Any,
    samples: list[tuple[str, list[int], int]],
    first: list[dict[int, float] | None],
    top_logprobs: int,
) -> tuple[dict[str, Any], Compared]:
    top1 = positions = 0
    compared: Compared = []
    for n, (_, ids, start) in enumerate(samples):
        entries = first if n == 0 else client.prompt_logprobs(ids, top_logprobs=top_logprobs)
        if entries is None:
            raise ServedTeacherError(
                "scoring probe: the server answered prompt_logprobs once, then not"
            )
        rows = [(i, own_row(entries[i], ids[i], len(tokenizer))) for i in range(start, len(ids))]
        positions += len(rows)
        top1 += sum(row is not None and max(row, key=row.__getitem__) == ids[i] for i, row in rows)
        compared.append((ids, rows))
    result: dict[str, Any] = {
        "method": "prompt_logprobs",
        "shift": 0,
        "positions": positions,
        "greedy_top1": {"0": top1},
    }
    if positions == 0 or top1 < MIN_GREEDY_TOP1 * positions:
        raise ServedTeacherError(
            "scoring probe: the server's prompt_logprobs do not rank its own greedy tokens "
            f"first ({top1} of {positions}); it cannot score the student's text"
        )
    return result, compared


def _probe_echo(
    client: ServedClient,
    tokenizer: Any,
    samples: list[tuple[str, list[int], int]],
    top_logprobs: int,
) -> tuple[dict[str, Any], Compared]:
    mapper = TokenMapper(tokenizer)
    aligner = Aligner(tokenizer, mapper)
    top1 = dict.fromkeys(SHIFTS, 0)
    positions = 0
    probes = []
    for text, ids, start in samples:
        echoed = client.echo(text, top_logprobs=top_logprobs)
        strings = aligner.theirs(list(echoed["tokens"]))
        matched = aligner.match(ids, list(echoed["tokens"]))
        written = [(i, m) for i, m in matched.items() if i >= start]
        positions += len(written)
        for shift in SHIFTS:
            for _, m in written:
                entry = m - shift
                tops = echoed["top_logprobs"]
                if 0 <= entry < len(tops) and tops[entry]:
                    best = max(tops[entry].items(), key=lambda kv: kv[1])[0]
                    top1[shift] += aligner.theirs([best])[0] == strings[m]
        probes.append((ids, written, echoed))
    result: dict[str, Any] = {
        "method": "echo",
        "positions": positions,
        "greedy_top1": {str(s): top1[s] for s in SHIFTS},
    }
    if positions == 0:
        raise ServedTeacherError(
            f"scoring probe: no echoed token lines up with the local tokenizer's: {result}"
        )
    shift = max(SHIFTS, key=lambda s: top1[s])
    result["shift"] = shift
    if top1[shift] < MIN_GREEDY_TOP1 * positions:
        raise ServedTeacherError(
            "scoring probe: the server's echoed log-probs line up with its own greedy tokens "
            f"under no shift (top-1 under each: {result['greedy_top1']} of {positions}); it "
            "cannot score the student's text"
        )
    compared: Compared = [
        (ids, [(i, position_logprobs(echoed, m, shift, ids[i], mapper)) for i, m in written])
        for ids, written, echoed in probes
    ]
    return result, compared
