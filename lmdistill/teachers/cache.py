"""An on-disk teacher-signal cache: run the teacher once, train from its top-k log-probs.

Layout (`cache_dir/`):
    manifest.json           identity (teacher, tokenizer, chat template, k, temperature, data,
                            max_length) and one entry per finished shard: examples, tokens, sha256
    examples.jsonl          the examples the signal belongs to (prompt and response text), so a
                            run with `teacher.kind: cache` needs nothing else from the teacher
    shard-00000/ ...        one directory per `shard_size` examples, written atomically:
        ids.npy     (T, k)    token ids, uint16 when the vocabulary fits, else int32
        top.npy     (T,)      the top-1 log-prob, float16
        gaps.npy    (T, k-1)  the other log-probs as uint8 codes of sqrt(top - logprob)
        tail.npy    (T,)      the mass outside the top k, float16
        present.npy (T,)      uint8, 0 where the teacher gave no signal (e.g. a served
                              teacher's end-of-turn token): that token trains on CE alone
        offsets.npy (E + 1,)  where each example's response tokens start and end

The manifest checksums itself (`checksums`: one digest per field and per shard entry), so an
edited `k`, `teacher` or shard `tokens` is refused by name instead of training on false values;
a directory that is not a cache lmdistill can finish is never written over.

Log-probs are stored relative to the top-1 on a square-root scale: the likely tokens, which
carry the KL, get the finest steps (0.01 nats near the top, 0.08 at 16 nats below it). The
tail mass is stored too and the decoded top-k is rescaled to leave exactly that: without it
the rounding errors of all k entries pile up in the tail, which then dominates the
reconstruction KL (measured 6.4e-4 without, 3.3e-5 with, vs 1.1e-4 for int32 ids + bf16
log-probs at k = 32; benchmarks/teacher_cache.py). At k = 32 a token costs
2k + (k - 1) + 2 + 2 + 1 = 100 bytes with uint16 ids (DistillKit's recommended setting: ~300).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from lmdistill.data import IGNORE_INDEX, Example, TokenizedExample, collate, to_device
from lmdistill.io import atomic_dir, atomic_write_json, atomic_write_text, read_utf8
from lmdistill.losses import SparseSignal
from lmdistill.models.forward import response_hidden

FORMAT = 2  # 2: the manifest carries checksums of its own fields and the writer's identity
GAP_RANGE = 25.0  # nats below the top-1 that a code can express (e^-25 ~ 1e-11 of its mass)
FILES = ("ids.npy", "top.npy", "gaps.npy", "tail.npy", "present.npy", "offsets.npy")

# One batch of rows: (N, k) ids, (N, k) log-probs sorted descending, (N,) bool present.
Rows = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class CacheError(ValueError):
    """The cache does not belong to this run, or a shard is corrupted or missing."""


def quantize(logprobs: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(T, k) log-probs sorted descending -> top-1 (T,) float16, gap codes (T, k-1) uint8 and
    the tail mass (T,) float16."""
    top = logprobs[:, 0]
    gaps = torch.nan_to_num(top[:, None] - logprobs[:, 1:], posinf=GAP_RANGE).clamp(0, GAP_RANGE)
    codes = torch.round(gaps.sqrt() * (255 / GAP_RANGE**0.5))
    tail = (1 - logprobs.double().exp().sum(-1)).clamp(0, 1)
    return top.half().numpy(), codes.to(torch.uint8).numpy(), tail.half().numpy()


def dequantize(top: np.ndarray, codes: np.ndarray, tail: np.ndarray) -> torch.Tensor:
    """Inverse of `quantize`: (T, k) float32 log-probs whose mass is exactly 1 - tail."""
    top_t = torch.from_numpy(np.asarray(top, dtype=np.float64))
    gaps = (torch.from_numpy(np.asarray(codes, dtype=np.float64)) * (GAP_RANGE**0.5 / 255)) ** 2
    logprobs = torch.cat([top_t[:, None], top_t[:, None] - gaps], dim=1)  # (T, k)
    kept = (1 - torch.from_numpy(np.asarray(tail, dtype=np.float64))).clamp(min=1e-12)
    logprobs += (kept.log() - torch.logsumexp(logprobs, dim=-1))[:, None]
    return logprobs.float()


def bytes_per_token(k: int, vocab_size: int) -> int:
    return k * (2 if vocab_size <= 65536 else 4) + (k - 1) + 2 + 2 + 1


def tokenizer_identity(tokenizer: Any) -> dict[str, str]:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items())).encode()
    template = str(getattr(tokenizer, "chat_template", "") or "").encode()
    return {
        "tokenizer_hash": hashlib.sha256(vocab).hexdigest()[:16],
        "chat_template_hash": hashlib.sha256(template).hexdigest()[:16],
    }


@dataclass(frozen=True)
class CacheSpec:
    """What a cache must match to be used: written into, and checked against, the manifest."""

    teacher: str | None  # None: any (reading with `teacher.kind: cache`)
    tokenizer_hash: str
    chat_template_hash: str
    data_hash: str | None
    k: int | None
    temperature: float
    vocab_size: int
    max_length: int = 256
    shard_size: int | None = 256
    prompts_hash: str | None = None  # the prompts (not responses) the cache answers
    # Who wrote it, recorded for `teacher.kind: cache` to check (None when reading): `local`
    # or `served`; the local teacher's weight digest; the generation settings of teacher-
    # written responses (`{}` for responses that came with the data).
    writer: str | None = None
    teacher_weights: str | None = None
    generate: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **self.__dict__}


def write_cache(
    teacher: PreTrainedModel,
    examples: list[TokenizedExample],
    cache_dir: Path,
    spec: CacheSpec,
    *,
    pad_token_id: int,
    batch_size: int = 8,
    texts: list[Example] | None = None,
) -> dict[str, Any]:
    """Score `examples` with an in-process teacher and write (or finish) the cache."""
    weight = teacher.get_output_embeddings().weight[: spec.vocab_size]

    @torch.no_grad()
    def score(batch: list[TokenizedExample], _: int) -> Rows:
        inputs = to_device(collate(batch, pad_token_id), teacher.device)
        states, _targets = response_hidden(teacher, **inputs)  # (N, H)
        logprobs = torch.log_softmax((states @ weight.T).float() / spec.temperature, dim=-1)
        assert spec.k is not None
        values, ids = logprobs.topk(spec.k, dim=-1)  # (N, k), sorted descending
        return ids.cpu(), values.cpu(), torch.ones(len(ids), dtype=torch.bool)

    return write_rows(score, examples, cache_dir, spec, batch_size=batch_size, texts=texts)


def write_rows(
    score: Callable[[list[TokenizedExample], int], Rows],
    examples: list[TokenizedExample],
    cache_dir: Path,
    spec: CacheSpec,
    *,
    batch_size: int = 8,
    texts: list[Example] | None = None,
) -> dict[str, Any]:
    """Write (or finish writing) a cache; return the manifest. Finished shards are kept.

    `score(batch, first_index)` returns the rows of the batch's response tokens, in order;
    `texts` are the examples' prompt and response, stored beside the signal.
    """
    manifest = _open_manifest(cache_dir, spec)
    assert spec.shard_size is not None
    shard_size = spec.shard_size
    if not (cache_dir / "manifest.json").is_file():
        # The manifest comes first: a write killed before its first shard leaves a cache
        # this run can finish, not files without a manifest (which are never written over).
        atomic_write_json(cache_dir / "manifest.json", seal(manifest))
    if texts is not None and not (cache_dir / "examples.jsonl").is_file():
        lines = [json.dumps(_example_row(example)) for example in texts]
        atomic_write_text(cache_dir / "examples.jsonl", "\n".join(lines) + "\n")
    done = {shard["name"] for shard in manifest["shards"]}
    starts = range(0, len(examples), shard_size)
    todo = [s for s in starts if _shard_name(s // shard_size) not in done]
    finished = sum(shard["examples"] for shard in manifest["shards"])
    with tqdm(total=len(examples), initial=finished, desc="cache", unit="example") as bar:
        for start in todo:
            shard = examples[start : start + shard_size]
            arrays = _shard_arrays(score, shard, start, spec, batch_size, bar)
            name = _shard_name(start // shard_size)
            with atomic_dir(cache_dir / name) as tmp:
                for file, array in zip(FILES, arrays, strict=True):
                    np.save(tmp / file, array)
                digest = _shard_digest(tmp)
            manifest["shards"].append(
                {
                    "name": name,
                    "examples": len(shard),
                    "tokens": int(arrays[-1][-1]),
                    "sha256": digest,
                }
            )
            manifest["shards"].sort(key=lambda s: s["name"])
            atomic_write_json(cache_dir / "manifest.json", seal(manifest))
    return manifest


def _shard_arrays(
    score: Callable[[list[TokenizedExample], int], Rows],
    shard: list[TokenizedExample],
    first: int,
    spec: CacheSpec,
    batch_size: int,
    bar: Any,
) -> tuple[np.ndarray, ...]:
    parts: list[list[np.ndarray]] = [[] for _ in FILES[:-1]]
    counts: list[int] = []
    for lo in range(0, len(shard), batch_size):
        batch = shard[lo : lo + batch_size]
        ids, values, present = score(batch, first + lo)
        batch_counts = [sum(1 for y in item.labels[1:] if y != IGNORE_INDEX) for item in batch]
        if len(ids) != sum(batch_counts):
            raise CacheError(
                f"examples {first + lo}..{first + lo + len(batch) - 1}: the teacher scored "
                f"{len(ids)} response tokens, the data has {sum(batch_counts)}"
            )
        top, gaps, tail = quantize(values)
        dtype = np.uint16 if spec.vocab_size <= 65536 else np.int32
        for part, array in zip(
            parts,
            (ids.numpy().astype(dtype), top, gaps, tail, present.numpy().astype(np.uint8)),
            strict=True,
        ):
            part.append(array)
        counts += batch_counts
        bar.update(len(batch))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return (*(np.concatenate(part) for part in parts), offsets)


class TeacherCache:
    """Read a cache written by `write_cache`, memory-mapped; checked against `spec`
    (`spec.teacher=None` accepts whichever teacher wrote it: `teacher.kind: cache`)."""

    def __init__(self, cache_dir: Path, spec: CacheSpec, *, verify: bool = True) -> None:
        manifest_path = cache_dir / "manifest.json"
        if not manifest_path.is_file():
            raise CacheError(f"{cache_dir}: no manifest.json; run `lmdistill cache` first")
        manifest = read_manifest(cache_dir)
        _check_identity(manifest, spec, cache_dir)
        self.dir = cache_dir
        self.spec = spec
        self.teacher = str(manifest.get("teacher"))
        self.manifest = manifest
        self.shard_size = int(manifest["shard_size"])
        self.shards: list[dict[str, np.ndarray]] = []
        total = 0
        for i, entry in enumerate(manifest["shards"]):
            path = cache_dir / entry["name"]
            # Example i lives in shard i // shard_size: every shard but the last is full.
            last = i == len(manifest["shards"]) - 1
            if entry["name"] != _shard_name(i) or not (
                0 < entry["examples"] <= self.shard_size
                and (last or entry["examples"] == self.shard_size)
            ):
                raise CacheError(
                    f"{manifest_path}: shards[{i}] ({entry['name']}, {entry['examples']} "
                    f"examples) does not fit shard_size {self.shard_size}; the cache is not "
                    f"used: {REBUILD.format(dir=cache_dir)}"
                )
            if verify and (not path.is_dir() or _shard_digest(path) != entry["sha256"]):
                raise CacheError(
                    f"{path}: shard is missing, truncated or corrupted (checksum mismatch); "
                    f"the cache cannot be used: {REBUILD.format(dir=cache_dir)}"
                )
            try:
                arrays = {f: np.load(path / f, mmap_mode="r") for f in FILES}
            except (OSError, ValueError) as error:
                raise CacheError(f"{path}: unreadable ({error})") from None
            _check_shard(arrays, entry, int(manifest["k"]), path)
            self.shards.append(arrays)
            total += entry["examples"]
        self.num_examples = total

    def signal(self, index: int) -> SparseSignal:
        """The teacher's top-k signal on example `index`'s response tokens, in order."""
        if not 0 <= index < self.num_examples:
            raise IndexError(f"example {index} is not in the cache ({self.num_examples} examples)")
        shard = self.shards[index // self.shard_size]
        row = index % self.shard_size
        lo, hi = int(shard["offsets.npy"][row]), int(shard["offsets.npy"][row + 1])
        logprobs = dequantize(
            shard["top.npy"][lo:hi], shard["gaps.npy"][lo:hi], shard["tail.npy"][lo:hi]
        )
        ids = torch.from_numpy(np.asarray(shard["ids.npy"][lo:hi], dtype=np.int64))
        present = torch.from_numpy(np.asarray(shard["present.npy"][lo:hi]) != 0)
        return SparseSignal(
            ids,
            logprobs,
            tail="bucket",
            temperature=self.spec.temperature,
            present=None if bool(present.all()) else present,
        )

    def batch_signal(self, indices: list[int]) -> SparseSignal:
        """Signals of several examples, concatenated in order (a training micro-batch)."""
        parts = [self.signal(i) for i in indices]
        present = [
            p.present if p.present is not None else torch.ones(p.num_rows, dtype=torch.bool)
            for p in parts
        ]
        all_present = torch.cat(present) if present else torch.ones(0, dtype=torch.bool)
        return SparseSignal(
            torch.cat([p.token_ids for p in parts]),
            torch.cat([p.logprobs for p in parts]),
            tail="bucket",
            temperature=self.spec.temperature,
            present=None if bool(all_present.all()) else all_present,
        )

    def examples(self) -> list[Example]:
        """The examples the signal was computed on (prompt and response text)."""
        path = self.dir / "examples.jsonl"
        if not path.is_file():
            raise CacheError(f"{path} is missing; {REBUILD.format(dir=self.dir)}")
        rows = []
        try:
            lines = read_utf8(path).splitlines()
        except ValueError as error:
            raise CacheError(f"{error}; {REBUILD.format(dir=self.dir)}") from None
        for number, line in enumerate(lines, 1):
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except ValueError as error:
                raise CacheError(
                    f"{path}:{number}: damaged ({error}); {REBUILD.format(dir=self.dir)}"
                ) from None
        return [
            Example(
                r["id"],
                tuple(r["messages"]),
                r["response"],
                f"{path}:{r['id']}",
                response_complete=r["response_complete"],
                response_ids=None if r["response_ids"] is None else tuple(r["response_ids"]),
                group=r.get("group"),
            )
            for r in rows
        ]


def _example_row(example: Example) -> dict[str, Any]:
    row = {
        "id": example.id,
        "messages": list(example.messages),
        "response": example.response,
        "response_complete": example.response_complete,
        "response_ids": None if example.response_ids is None else list(example.response_ids),
    }
    if example.group is not None:
        row["group"] = example.group
    return row


REBUILD = (
    "to write it again, delete {dir} (or set cache.dir to a new directory) and run the same "
    "command; lmdistill never writes over a cache it cannot check"
)


def _open_manifest(cache_dir: Path, spec: CacheSpec) -> dict[str, Any]:
    """The manifest to continue writing: this run's own unfinished cache (checked field by
    field), or a new one in an empty directory. Anything else is refused, never overwritten."""
    if None in (spec.teacher, spec.data_hash, spec.k):
        raise ValueError("writing a cache needs a complete CacheSpec (teacher, data_hash, k)")
    path = cache_dir / "manifest.json"
    if path.is_file():
        manifest = read_manifest(cache_dir)
        _check_identity(manifest, spec, cache_dir)
        return {k: v for k, v in manifest.items() if k != "checksums"}
    if cache_dir.is_dir():
        present = sorted(p.name for p in cache_dir.iterdir() if not _ignorable(p.name))
        if present:
            raise CacheError(
                f"{cache_dir} holds {', '.join(present[:4])}{' ...' if len(present) > 4 else ''}"
                f" but no manifest.json: it is not a cache this run can finish; "
                + REBUILD.format(dir=cache_dir)
            )
    cache_dir.mkdir(parents=True, exist_ok=True)
    return {**spec.as_dict(), "shards": []}


def _ignorable(name: str) -> bool:
    """The lock file and what killed atomic writes leave (removed at the next start)."""
    return name == ".lmdistill.lock" or (name.startswith(".") and name.endswith((".tmp", ".old")))


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def seal(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest with `checksums`: a digest of every field and of every shard entry."""
    fields = {k: v for k, v in manifest.items() if k != "checksums"}
    sums: dict[str, Any] = {k: _digest(v) for k, v in fields.items() if k != "shards"}
    sums["shards"] = [{f: _digest(v) for f, v in entry.items()} for entry in fields["shards"]]
    return {**fields, "checksums": sums}


def read_manifest(cache_dir: Path) -> dict[str, Any]:
    """The manifest, checked against its own checksums and for a consistent shape: an edit of
    any field is a CacheError that names it."""
    path = cache_dir / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CacheError(f"{path} is damaged ({error}); {REBUILD.format(dir=cache_dir)}") from None
    if not isinstance(manifest, dict):
        raise CacheError(f"{path} is not a manifest; {REBUILD.format(dir=cache_dir)}")
    if manifest.get("format") != FORMAT:
        raise CacheError(
            f"{path}: format {manifest.get('format')!r}, this lmdistill reads format {FORMAT} "
            f"(caches before format 2 carry no checksums of their own fields); "
            + REBUILD.format(dir=cache_dir)
        )
    sums = manifest.get("checksums")
    if not isinstance(sums, dict) or not isinstance(manifest.get("shards"), list):
        raise CacheError(f"{path}: no checksums or shards; {REBUILD.format(dir=cache_dir)}")
    edited = [
        k
        for k in sorted(set(manifest) | set(sums))
        if k not in ("checksums", "shards")
        and (k not in manifest or sums.get(k) != _digest(manifest[k]))
    ]
    stored: list[Any] = sums["shards"] if isinstance(sums.get("shards"), list) else []
    for i, entry in enumerate(manifest["shards"]):
        sum_i = stored[i] if i < len(stored) else None
        if not isinstance(entry, dict) or not isinstance(sum_i, dict):
            edited.append(f"shards[{i}]")
            continue
        edited += [
            f"shards[{i}].{f}"
            for f in sorted(set(entry) | set(sum_i))
            if f not in entry or sum_i.get(f) != _digest(entry[f])
        ]
    if len(stored) > len(manifest["shards"]):
        edited.append(f"shards (shard entries removed: {len(stored) - len(manifest['shards'])})")
    if edited:
        raise CacheError(
            f"{path}: field {', '.join(edited)} does not match the manifest's checksums (edited "
            f"or damaged); the cache is not used: {REBUILD.format(dir=cache_dir)}"
        )
    return dict(manifest)


def _check_shard(arrays: dict[str, np.ndarray], entry: dict[str, Any], k: int, path: Path) -> None:
    """A shard's arrays agree with its manifest entry (a consistent but wrong entry would
    index the wrong tokens)."""
    offsets = arrays["offsets.npy"]
    rows = int(offsets[-1]) if len(offsets) else -1
    problems = []
    if len(offsets) != entry["examples"] + 1:
        problems.append(f"examples {entry['examples']} != {len(offsets) - 1} stored")
    if rows != entry["tokens"]:
        problems.append(f"tokens {entry['tokens']} != {rows} stored")
    if arrays["ids.npy"].shape[1:] != (k,):
        problems.append(f"k {k} != {arrays['ids.npy'].shape[1:]} stored")
    if any(len(arrays[f]) != rows for f in FILES[:-1]):
        problems.append("arrays of different lengths")
    if problems:
        raise CacheError(f"{path}: {'; '.join(problems)}; {REBUILD.format(dir=path.parent)}")


def _check_identity(manifest: dict[str, Any], spec: CacheSpec, cache_dir: Path) -> None:
    # None fields accept what the cache holds (`teacher.kind: cache` takes the cache's teacher,
    # k and data as they are, and checks the tokenizer, template, temperature, max_length).
    expected = {k: v for k, v in spec.as_dict().items() if v is not None}
    changed = sorted(k for k, v in expected.items() if manifest.get(k) != v)
    if changed:
        detail = ", ".join(
            f"{k}: cache {manifest.get(k)!r} != run {expected[k]!r}" for k in changed
        )
        raise CacheError(
            f"{cache_dir} was written for another run ({detail}); set those settings to the "
            f"cache's, or {REBUILD.format(dir=cache_dir)}"
        )


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def _shard_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for file in FILES:
        digest.update((path / file).read_bytes())
    return digest.hexdigest()
