"""Atomic file writes: a finished artifact is never half-written (temp file + rename)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# Below this many free bytes a failed write is taken for a full disk.
NEARLY_FULL = 16 * 2**20


class DiskFullError(OSError):
    """A write failed because the disk is (nearly) full; nothing was left half-written."""


def free_bytes(path: Path) -> int:
    """Free space on the file system that holds `path` (or its nearest existing parent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def explain_write_failure(path: Path, error: BaseException) -> None:
    """Raise a DiskFullError that names `path` and the free space when `error` (an OSError,
    safetensors' error, or torch's "file write failed" / "unexpected pos" RuntimeError) came
    from a full disk; any other error is left to propagate as it is."""
    if isinstance(error, DiskFullError):
        return
    no_space = (isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)) or (
        # safetensors' SafetensorError (an Exception) carries the OS error in its text
        "No space left on device" in str(error) or "os error 28" in str(error)
    )
    torch_short_write = isinstance(error, RuntimeError) and (
        "file write failed" in str(error) or "unexpected pos" in str(error)
    )
    free = free_bytes(path)
    if no_space or (torch_short_write and free < NEARLY_FULL):
        raise DiskFullError(
            errno.ENOSPC,
            f"writing {path} failed: the disk is full ({free / 2**20:.0f} MiB free there; "
            f"{type(error).__name__}: {error}). Nothing was half-written: free some space "
            "(old runs' checkpoints, a protocol's finished arms) and run again, with --resume "
            "where the command has it",
        ) from error


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except Exception as error:
        explain_write_failure(path, error)
        raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary directory; it replaces `path` only when the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except Exception as error:
        explain_write_failure(path, error)
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_with(path: Path, writer: Callable[[Path], None]) -> None:
    """Call `writer(tmp_path)` and move the result onto `path` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)
