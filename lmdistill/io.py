"""Atomic file writes (a finished artifact is never half-written: temp file + rename), and one
writer per directory (an advisory lock that the kernel releases when the process dies)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
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


def _umask() -> int:
    """The process's umask (read without changing it where /proc tells it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore at once
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    # mkstemp makes the file 0600; the finished file gets the mode any other file gets (0644
    # under the usual umask), so an artifact written atomically is as readable as the rest.
    os.fchmod(fd, 0o666 & ~_umask())
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
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700: the umask's mode, as for mkdir
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


# What `atomic_path` / `atomic_dir` leave when the process is killed mid-write: `.NAME.XXXX.tmp`
# (mkstemp / mkdtemp's random part is 8 characters) and `.NAME.old` (a replaced directory).
_LEFT_BEHIND = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$|^\..+\.old$")


def remove_left_behind(directory: Path) -> list[Path]:
    """Remove the temp files and directories that killed atomic writes left under `directory`
    (each up to a whole checkpoint); return what was removed. Call it only while holding the
    directory's lock: another live writer's temp files look the same. A subdirectory that
    another process holds (a cache or sweep being written there) is left alone."""
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    with contextlib.ExitStack() as probes:
        for root, dirs, files in os.walk(directory):
            if Path(root) != directory and LOCK_NAME in files and not _take(Path(root), probes):
                dirs.clear()  # held by a live process: its temp files are in use
                continue
            removed += _remove_matching(Path(root), dirs, files)
    return removed


def _take(directory: Path, probes: contextlib.ExitStack) -> bool:
    """Whether `directory`'s lock is free (then held until `probes` closes) or ours already."""
    if directory.resolve() in _held:
        return True
    try:
        fd = os.open(directory / LOCK_NAME, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:  # not a lock lmdistill wrote (a symlink): leave the directory alone
        return False
    probes.callback(os.close, fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _remove_matching(root: Path, dirs: list[str], files: list[str]) -> list[Path]:
    removed: list[Path] = []
    for name in [*dirs, *files]:
        if _LEFT_BEHIND.match(name):
            path = root / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
                dirs.remove(name)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


LOCK_NAME = ".lmdistill.lock"


class DirectoryLockedError(RuntimeError):
    """Another process holds the directory's lock."""


# Directories this process holds, by resolved path: a stage called inside another (a sweep's
# runs, a run's generation) that asks for a lock it already holds gets it at once.
_held: dict[Path, int] = {}


@contextmanager
def directory_lock(directory: Path, what: str = "writes") -> Iterator[None]:
    """Hold an exclusive advisory lock (`flock`) on `directory` while the block runs: a second
    lmdistill process that asks for it fails at once, naming the directory and the PID that
    holds it. The kernel releases the lock when the holder exits or is killed (kill -9 too),
    so a stale lock file never blocks anyone. Re-entrant within a process."""
    directory.mkdir(parents=True, exist_ok=True)
    key = directory.resolve()
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    path = directory / LOCK_NAME
    try:  # never through a symlink: on a shared disk it could point at someone's file
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as error:
        raise DirectoryLockedError(f"{path}: cannot be used as a lock file ({error})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid, _, theirs = os.pread(fd, 256, 0).decode("utf-8", "replace").partition(" ")
            raise DirectoryLockedError(
                f"{directory} is in use: another lmdistill process (PID {pid.strip() or '?'}) "
                f"{theirs.strip() or 'writes'} there; wait for it to finish, or choose another "
                "directory"
            ) from None
        record = f"{os.getpid()} {what}\n".encode()
        os.pwrite(fd, record, 0)  # written, then cut to length: a reader never sees it empty
        os.ftruncate(fd, len(record))
        _held[key] = 1
        try:
            yield
        finally:
            del _held[key]
    finally:
        os.close(fd)  # releases the lock


class NotUtf8Error(ValueError):
    """A text file that is not valid UTF-8; the message names the file, line and column."""


def read_utf8(path: Path) -> str:
    """The text of `path`; invalid UTF-8 is a NotUtf8Error naming the line and column."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        column = error.start - (raw.rfind(b"\n", 0, error.start) + 1) + 1
        raise NotUtf8Error(
            f"{path}:{line}: not valid UTF-8 (byte 0x{raw[error.start]:02x} at column "
            f"{column}); save the file as UTF-8"
        ) from None
