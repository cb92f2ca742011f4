"""A continuation memory: what a finished run leaves beside its student (`OUTPUT/memory/`) for
runs that continue that student without its training data: `manifest.json` (whose student
it belongs to, how it was made, how much of the old data it holds), the replay examples
(`examples.jsonl`, at most 1% of the old training examples) and, optionally, the student's
Fisher estimate (`fisher.safetensors`). A continuing run reads only this directory of the
old run's data, and refuses a memory made for another student."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmdistill.data.example import DataError, Example
from lmdistill.data.formats import load_examples
from lmdistill.io import read_utf8

KIND = "lmdistill continuation memory"
MANIFEST = "manifest.json"
EXAMPLES = "examples.jsonl"
WEIGHTS = "model.safetensors"
REPLAY_PREFIX = "memory/"  # replayed examples' ids: never the same as a new example's


def weights_sha256(student_dir: Path) -> str:
    """The student's identity: the sha256 of its safetensors weights, every shard and the
    shard index in name order (the first 16 hex digits)."""
    directory = Path(student_dir)
    files = sorted(directory.glob("*.safetensors")) + sorted(
        directory.glob("*.safetensors.index.json")
    )
    if not files:
        raise DataError(
            f"{directory / WEIGHTS} is missing: not a student directory lmdistill wrote"
        )
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Memory:
    directory: Path
    manifest: dict[str, Any]

    @property
    def examples_path(self) -> Path:
        return self.directory / EXAMPLES

    def replay(self) -> list[Example]:
        """The replay examples, ids prefixed so that they never collide with new ones."""
        if not self.manifest.get("examples"):
            raise DataError(
                f"{self.directory} holds no replay examples (made with memory.fraction=0, or "
                "a fraction of less than one example); set incremental.replay=false to "
                "continue without them"
            )
        return [
            dataclasses.replace(e, id=REPLAY_PREFIX + e.id)
            for e in load_examples(str(self.examples_path))
        ]


def open_memory(directory: str | Path, student_path: str | Path) -> Memory:
    """The memory in `directory`, checked to be one and to belong to the student at
    `student_path` (the same weights file)."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise DataError(
            f"incremental.memory: {path} is missing: not a memory an lmdistill run wrote"
        )
    try:
        manifest = json.loads(read_utf8(path))
    except ValueError as error:
        raise DataError(f"incremental.memory: {path} is damaged ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
        raise DataError(f"incremental.memory: {path} is not a memory an lmdistill run wrote")
    own = weights_sha256(Path(student_path))
    if manifest.get("student_sha256") != own:
        raise DataError(
            f"incremental.memory: {directory} was made for the student "
            f"{manifest.get('student')} (weights {manifest.get('student_sha256')}), and "
            f"student.path={student_path} holds other weights ({own}); a memory belongs to the "
            "student it was made with"
        )
    return Memory(directory, manifest)
