"""Read training and prompt data into one shape: a list of chat `Example`s.

Accepted rows: `prompt`/`response`, chat `messages` (list of `{role, content}`), or GSM8K's
`question`/`answer`. A row without a response (only `prompt` or `question`, or messages that
do not end with the assistant) is a prompt: fine for `generate`, an error for training.
Sources: a `.jsonl` or `.json` file, `hf:NAME[:CONFIG]` (needs `datasets`), or
`builtin:gsm8k-demo` (400 GSM8K train questions shipped with the package, MIT licence).
Any source but `hf:` (whose `@SPLIT` takes `datasets`' own slicing) may end in a row range,
Python-style: `data.jsonl[:352]`, `builtin:gsm8k-demo[352:]` (rows keep the ids they have in
the whole source). Any row may carry a `group` (a non-empty string: e.g. a demographic or a
phrasing), which evaluation reports per group and `train.group_objective` balances.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

from lmdistill.data.example import DataError, Example
from lmdistill.data.lab import LabSpec, lab_problems
from lmdistill.io import atomic_write_text, read_utf8

FORMATS = ("auto", "prompt_response", "messages", "gsm8k")
BUILTIN = {"gsm8k-demo": "gsm8k_demo.jsonl"}
ROLES = ("system", "user", "assistant")


def load_examples(source: str, *, split: str = "train", format: str = "auto") -> list[Example]:
    """Load `source` as `Example`s; raise `DataError` on malformed or empty input."""
    if format not in FORMATS:
        raise DataError(f"data.format: {format!r} is not allowed; choose one of {list(FORMATS)}")
    ranged = re.fullmatch(r"(.+)\[(-?\d*):(-?\d*)\]", source)
    literal = source.startswith("hf:") or Path(source).expanduser().is_file()
    if not ranged and not literal and re.search(r"\[[^\[\]]*\]$", source):
        raise DataError(f"{source}: a row range is [start:stop] (integers, either may be empty)")
    if ranged and not literal:
        whole, start, stop = ranged.group(1), ranged.group(2), ranged.group(3)
        rows = list(enumerate(_read_rows(whole, split)))
        rows = rows[slice(int(start) if start else None, int(stop) if stop else None)]
    else:
        rows = list(enumerate(_read_rows(source, split)))
    examples = [_to_example(row, where, index, format) for index, (where, row) in rows]
    if not examples:
        raise DataError(f"{source}: the dataset is empty")
    return examples


def write_examples(path: Path, examples: list[Example]) -> None:
    """Write examples as `messages` JSONL (ids kept) that `load_examples` reads back;
    atomically, so a finished file is never half-written."""
    lines = []
    for e in examples:
        turns = list(e.messages)
        if e.response is not None:
            turns.append({"role": "assistant", "content": e.response})
        row: dict[str, Any] = {"id": e.id, "messages": turns}
        if e.group is not None:
            row["group"] = e.group
        lines.append(json.dumps(row, ensure_ascii=False))
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def data_hash(examples: list[Example]) -> str:
    digest = hashlib.sha256()
    for example in examples:
        blob: list[Any] = [example.id, list(example.messages), example.response]
        if example.response_ids is not None:
            blob.append(list(example.response_ids))
        if example.group is not None:  # rows without a group hash as they always have
            blob.append({"group": example.group})
        digest.update(json.dumps(blob, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def _read_rows(source: str, split: str) -> list[tuple[str, Any]]:
    if source.startswith("lab:"):
        return _read_lab(source)
    if source.startswith("builtin:"):
        name = source.removeprefix("builtin:")
        if name not in BUILTIN:
            raise DataError(f"unknown builtin dataset {name!r}; choose one of {sorted(BUILTIN)}")
        asset = resources.files("lmdistill.data") / "assets" / BUILTIN[name]
        return _read_jsonl(source, asset.read_text(encoding="utf-8"))
    if source.startswith("hf:"):
        return _read_hf(source.removeprefix("hf:"), split)
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    text = read_utf8(path)
    if path.suffix == ".json":
        return _read_json(str(path), text)
    return _read_jsonl(str(path), text)


def _read_jsonl(name: str, text: str) -> list[tuple[str, Any]]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((f"{name}:{number}", json.loads(line)))
        except json.JSONDecodeError as error:
            raise DataError(
                f"{name}:{number}: invalid JSON ({error.msg} at column {error.colno})"
            ) from None
    return rows


def _read_json(name: str, text: str) -> list[tuple[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{name}:{error.lineno}: invalid JSON ({error.msg})") from None
    if not isinstance(data, list):
        raise DataError(f"{name}: a .json dataset must be a list of objects")
    return [(f"{name}[{i}]", row) for i, row in enumerate(data)]


def _read_lab(source: str) -> list[tuple[str, Any]]:
    """`lab:SPLIT:N[:SEED][:key=value]...`: N generated lab problems (see `data/lab.py`), e.g.
    `lab:train:4000`, `lab:ood:200:0:steps=3:min_steps=1:operations=add+multiply`."""
    parts = source.split(":")
    if len(parts) < 3 or not parts[2].isdigit():
        raise DataError(f"{source}: expected lab:SPLIT:N[:SEED][:key=value]...")
    split, n, rest = parts[1], int(parts[2]), parts[3:]
    seed = int(rest.pop(0)) if rest and rest[0].isdigit() else 0
    knobs: dict[str, Any] = {}
    for item in rest:
        key, eq, value = item.partition("=")
        if not eq or key not in LabSpec.__dataclass_fields__:
            raise DataError(
                f"{source}: {item!r} is not a lab knob; choose from "
                f"{', '.join(LabSpec.__dataclass_fields__)}"
            )
        try:
            knobs[key] = tuple(value.split("+")) if key == "operations" else int(value)
        except ValueError:
            raise DataError(f"{source}: lab knob {key} needs an integer, got {value!r}") from None
    try:
        problems = lab_problems(split, n, seed=seed, spec=LabSpec(**knobs))
    except ValueError as error:
        raise DataError(f"{source}: {error}") from None
    return [
        (f"{source}[{i}]", {"id": f"lab-{split}-{seed}-{i}", "question": p.question,
                            "answer": p.solution, **({"group": p.group} if p.group else {})})
        for i, p in enumerate(problems)
    ]  # fmt: skip


def _read_hf(spec: str, split: str) -> list[tuple[str, Any]]:
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError:
        raise DataError(
            "hf: datasets need the `datasets` package: pip install 'lmdistill[hf]'"
        ) from None
    spec, _, own_split = spec.partition("@")  # hf:NAME[:CONFIG][@SPLIT]
    split = own_split or split
    name, _, config = spec.partition(":")
    dataset = datasets.load_dataset(name, config or None, split=split)
    return [(f"hf:{spec}[{split}][{i}]", dict(row)) for i, row in enumerate(dataset)]


def _to_example(row: Any, where: str, index: int, format: str) -> Example:
    if not isinstance(row, dict):
        raise DataError(f"{where}: each row must be a JSON object, got {type(row).__name__}")
    kind = format if format != "auto" else _detect(row, where)
    row_id = str(row.get("id", index))
    group = _group(row, where)
    if kind == "messages":
        return dataclasses.replace(_from_messages(row, where, row_id), group=group)
    prompt_key, response_key = (
        ("prompt", "response")
        if kind == "prompt_response"
        else (
            "question",
            "answer",
        )
    )
    prompt = _text(row, prompt_key, where, required=True)
    response = _text(row, response_key, where, required=False)
    assert prompt is not None
    turns: list[dict[str, str]] = [{"role": "user", "content": prompt}]
    if isinstance(row.get("system"), str):
        turns.insert(0, {"role": "system", "content": row["system"]})
    return Example(row_id, tuple(turns), response, where, group=group)


def _group(row: dict[str, Any], where: str) -> str | None:
    """The row's `group`: absent, or a non-empty string."""
    value = row.get("group")
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: `group` must be a non-empty string, got {value!r}")
    return value


def _detect(row: dict[str, Any], where: str) -> str:
    if "messages" in row:
        return "messages"
    if "prompt" in row:
        return "prompt_response"
    if "question" in row:
        return "gsm8k"
    raise DataError(
        f"{where}: cannot tell the format from the columns {sorted(row)}; expected "
        "`prompt` (+ `response`), `messages`, or `question` (+ `answer`)"
    )


def _text(row: dict[str, Any], key: str, where: str, *, required: bool) -> str | None:
    value = row.get(key)
    if value is None:
        if required:
            raise DataError(f"{where}: missing column {key!r} (columns: {sorted(row)})")
        return None
    if not isinstance(value, str):
        raise DataError(f"{where}: column {key!r} must be a string, got {type(value).__name__}")
    return value


def _from_messages(row: dict[str, Any], where: str, row_id: str) -> Example:
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: `messages` must be a non-empty list of {{role, content}}")
    turns = []
    for position, message in enumerate(messages):
        ok = isinstance(message, dict) and message.get("role") in ROLES
        if not ok or not isinstance(message.get("content"), str):
            raise DataError(
                f"{where}: messages[{position}] must be {{role: one of {list(ROLES)}, "
                f"content: string}}, got {message!r}"
            )
        turns.append({"role": message["role"], "content": message["content"]})
    if turns[-1]["role"] == "assistant":
        if len(turns) == 1:
            raise DataError(f"{where}: `messages` has an assistant turn but no prompt before it")
        return Example(row_id, tuple(turns[:-1]), turns[-1]["content"], where)
    return Example(row_id, tuple(turns), None, where)
