"""The teacher-signal cache: compact, faithful, resumable, and refusing what is not its own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lmdistill.data import load_examples, tokenize_examples
from lmdistill.losses import LOSSES, sparse_divergence
from lmdistill.models.forward import response_hidden
from lmdistill.teachers.cache import (
    CacheError,
    CacheSpec,
    TeacherCache,
    bytes_per_token,
    dequantize,
    quantize,
    tokenizer_identity,
    write_cache,
)


def test_quantisation_is_finest_near_the_top_and_keeps_the_tail() -> None:
    logprobs = torch.log(torch.tensor([[0.5, 0.2, 0.1, 1e-3, 1e-8, 1e-12]], dtype=torch.float64))
    top, codes, tail = quantize(logprobs.float())
    restored = dequantize(top, codes, tail).double()
    # The mass outside the top k survives (fp16), so the tail bucket is right...
    assert float(1 - restored.exp().sum()) == pytest.approx(
        1 - float(logprobs.exp().sum()), rel=1e-3
    )
    # ...and the gaps below the top-1 are within half a step on the sqrt scale.
    gaps, restored_gaps = logprobs[0, 0] - logprobs[0, 1:5], restored[0, 0] - restored[0, 1:5]
    assert ((gaps - restored_gaps).abs() <= gaps.sqrt() * 5 / 255 + 2e-3).all()
    assert bytes_per_token(32, 49152) == 100 and bytes_per_token(32, 151_000) == 164


@pytest.fixture
def tiny_setup(tiny_teacher: Any, tiny_tokenizer: Any) -> tuple[Any, Any, list, CacheSpec]:
    examples = load_examples("builtin:gsm8k-demo")[:10]
    train_set, _ = tokenize_examples(examples, tiny_tokenizer, max_length=700)
    spec = CacheSpec(
        teacher="tiny",
        data_hash="d",
        k=16,
        temperature=1.0,
        vocab_size=len(tiny_tokenizer),
        shard_size=4,
        **tokenizer_identity(tiny_tokenizer),
    )
    return tiny_teacher, tiny_tokenizer, train_set, spec


def test_cache_round_trip_matches_the_live_teacher(tmp_path: Path, tiny_setup: Any) -> None:
    teacher, tokenizer, train_set, spec = tiny_setup
    manifest = write_cache(teacher, train_set, tmp_path, spec, pad_token_id=tokenizer.pad_token_id)
    assert [s["examples"] for s in manifest["shards"]] == [4, 4, 2]
    cache = TeacherCache(tmp_path, spec)
    assert cache.num_examples == 10
    weight = teacher.get_output_embeddings().weight
    for index in (0, 5, 9):
        item = train_set[index]
        batch = {
            k: torch.tensor([v])
            for k, v in {
                "input_ids": item.input_ids,
                "labels": item.labels,
                "attention_mask": [1] * len(item.input_ids),
            }.items()
        }
        with torch.no_grad():
            states, _ = response_hidden(teacher, **batch)
            live = (states @ weight.T).float()  # (T, V) the full teacher distribution
        signal = cache.signal(index)
        assert signal.token_ids.shape == (len(live), 16)
        assert torch.equal(signal.token_ids, live.topk(16).indices)
        # The student-side loss from the cache is close to the one from exact top-k values.
        student = torch.randn_like(live)
        exact = torch.log_softmax(live, -1).topk(16)
        exact_signal = type(signal)(exact.indices, exact.values, tail="bucket")
        from_cache = sparse_divergence(student, signal, "forward_kl", temperature=1.0)
        from_exact = sparse_divergence(student, exact_signal, "forward_kl", temperature=1.0)
        torch.testing.assert_close(from_cache, from_exact, rtol=0.02, atol=0.02)
        dense = LOSSES["forward_kl"](student, live)
        assert (from_exact - dense).abs().mean() < dense.mean()  # a real approximation


def test_an_interrupted_cache_finishes_without_redoing_shards(
    tmp_path: Path, tiny_setup: Any
) -> None:
    teacher, tokenizer, train_set, spec = tiny_setup
    write_cache(teacher, train_set[:8], tmp_path, spec, pad_token_id=tokenizer.pad_token_id)
    first = (tmp_path / "shard-00000" / "ids.npy").stat().st_mtime_ns
    manifest = write_cache(teacher, train_set, tmp_path, spec, pad_token_id=tokenizer.pad_token_id)
    assert (tmp_path / "shard-00000" / "ids.npy").stat().st_mtime_ns == first
    assert [s["name"] for s in manifest["shards"]] == ["shard-00000", "shard-00001", "shard-00002"]
    assert TeacherCache(tmp_path, spec).num_examples == 10


def test_a_write_killed_before_its_first_shard_is_finished_on_the_next_start(
    tmp_path: Path, tiny_setup: Any
) -> None:
    """examples.jsonl used to come before any manifest: a kill while shard 0 was scored left a
    directory without a manifest, which is never written over, so the cache was stuck."""
    from lmdistill.teachers.cache import write_rows

    teacher, tokenizer, train_set, spec = tiny_setup
    texts = load_examples("builtin:gsm8k-demo")[:10]

    def killed(batch: list[Any], first: int) -> Any:
        raise KeyboardInterrupt  # the process dies while the first shard is scored

    with pytest.raises(KeyboardInterrupt):
        write_rows(killed, train_set, tmp_path, spec, texts=texts)
    assert (tmp_path / "examples.jsonl").is_file()
    write_cache(teacher, train_set, tmp_path, spec, pad_token_id=tokenizer.pad_token_id)
    assert TeacherCache(tmp_path, spec).num_examples == 10


def test_a_corrupted_or_truncated_shard_is_named(tmp_path: Path, tiny_setup: Any) -> None:
    teacher, tokenizer, train_set, spec = tiny_setup
    write_cache(teacher, train_set, tmp_path, spec, pad_token_id=tokenizer.pad_token_id)
    gaps = tmp_path / "shard-00001" / "gaps.npy"
    data = bytearray(gaps.read_bytes())
    data[-1] ^= 0xFF
    gaps.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="shard-00001: shard is missing, truncated or corrupted"):
        TeacherCache(tmp_path, spec)
    gaps.write_bytes(bytes(data[:-10]))
    with pytest.raises(CacheError, match="shard-00001"):
        TeacherCache(tmp_path, spec)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"k": 8}, "k: cache 16 != run 8"),
        ({"data_hash": "other"}, "data_hash"),
        ({"tokenizer_hash": "x"}, "tokenizer_hash"),
        ({"chat_template_hash": "x"}, "chat_template_hash"),
        ({"temperature": 2.0}, "temperature"),
    ],
)
def test_a_cache_for_another_run_is_refused(
    tmp_path: Path, tiny_setup: Any, change: dict, field: str
) -> None:
    teacher, tokenizer, train_set, spec = tiny_setup
    write_cache(teacher, train_set[:4], tmp_path, spec, pad_token_id=tokenizer.pad_token_id)
    other = CacheSpec(**{**spec.__dict__, **change})
    with pytest.raises(CacheError, match=f"written for another run.*{field}"):
        TeacherCache(tmp_path, other)
    with pytest.raises(CacheError, match="written for another run"):
        write_cache(teacher, train_set, tmp_path, other, pad_token_id=tokenizer.pad_token_id)


def test_ids_are_stored_compactly(tmp_path: Path, tiny_setup: Any) -> None:
    teacher, tokenizer, train_set, spec = tiny_setup
    write_cache(teacher, train_set[:4], tmp_path, spec, pad_token_id=tokenizer.pad_token_id)
    shard = tmp_path / "shard-00000"
    assert np.load(shard / "ids.npy").dtype == np.uint16
    assert np.load(shard / "gaps.npy").dtype == np.uint8
    assert np.load(shard / "top.npy").dtype == np.float16


def test_the_cache_command_writes_a_cache_the_run_can_open(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from conftest import ROOT

    from lmdistill.cli import main
    from lmdistill.teachers.setup import open_teacher
    from lmdistill.validate import load_config

    args = [
        str(ROOT / "configs" / "tiny.yaml"),
        f"output_dir={tmp_path}",
        "data.max_train_examples=6",
        "generate.max_new_tokens=8",
        "cache.shard_size=4",
    ]
    assert main(["cache", *args]) == 0
    out = capsys.readouterr().out
    printed = json.loads(out[out.index("{") :])
    assert printed["cache"]["train"]["examples"] == 6
    assert printed["cache"]["train"]["bytes_per_token"] == 3 * 32 + 4
    stamp = (tmp_path / "teacher_cache" / "train" / "shard-00000" / "ids.npy").stat().st_mtime_ns
    assert main(["cache", *args]) == 0  # everything is there: nothing is rewritten
    assert (
        tmp_path / "teacher_cache" / "train" / "shard-00000" / "ids.npy"
    ).stat().st_mtime_ns == stamp
    # A run with teacher.kind=cache takes the examples and the signal from the cache.
    config = load_config(args[0], [*args[1:], "teacher.kind=cache"])
    setup = open_teacher(config)
    assert [e.id for e in setup.examples["train"]] == [
        json.loads(line)["id"]
        for line in (tmp_path / "teacher_cache" / "train" / "examples.jsonl")
        .read_text()
        .splitlines()
    ]
    assert setup.signal["train"].identity == "cache:tiny-llama"


def test_a_run_from_the_cache_trains_without_the_teacher(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from conftest import tiny_run_config

    from lmdistill.pipeline import run
    from lmdistill.teachers import base
    from lmdistill.teachers.setup import open_teacher

    config = tiny_run_config(tmp_path, "cache.k=64")
    open_teacher(config, write_local_cache=True)

    def no_live_teacher(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the live teacher was asked for a signal")

    monkeypatch.setattr(base.LocalTeacher, "score", no_live_teacher)
    cached = tiny_run_config(tmp_path, "teacher.kind=cache", "baseline=false", "cache.k=64")
    metrics = run(cached)
    assert metrics.models["teacher_signal"] == "cache:tiny-llama"
    assert metrics.kd.after.fidelity.kl < 0.5 * metrics.before.fidelity.kl
    assert metrics.data["train_examples"] == 32


def test_a_cache_teacher_writes_a_missing_cache_once_and_refuses_a_foreign_one(
    tmp_path: Path,
) -> None:
    from conftest import tiny_run_config

    from lmdistill.teachers.setup import open_teacher

    cached = tiny_run_config(tmp_path, "teacher.kind=cache")
    setup = open_teacher(cached)  # no cache yet: the local teacher writes it first
    manifest = tmp_path / "run" / "teacher_cache" / "train" / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    again = open_teacher(cached)
    assert manifest.stat().st_mtime_ns == stamp  # read, not rewritten
    assert [e.response for e in again.examples["train"]] == [
        e.response for e in setup.examples["train"]
    ]
    with pytest.raises(CacheError, match="prompts_hash: cache"):
        open_teacher(tiny_run_config(tmp_path, "teacher.kind=cache", "data.max_train_examples=31"))
    with pytest.raises(CacheError, match="max_length: cache 384 != run 200"):
        open_teacher(tiny_run_config(tmp_path, "teacher.kind=cache", "data.max_length=200"))
    with pytest.raises(CacheError, match=r"temperature: cache 1\.0 != run 2\.0"):
        open_teacher(tiny_run_config(tmp_path, "teacher.kind=cache", "loss.temperature=2"))


def _files(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()
    }


def test_a_resealed_manifest_whose_shards_do_not_fit_shard_size_is_refused(
    tmp_path: Path, tiny_setup: Any
) -> None:
    """Checksums recomputed after an edit (a forged manifest) still cannot index the wrong
    shard: every shard but the last must hold shard_size examples (was an IndexError)."""
    import json

    from lmdistill.teachers.cache import seal

    teacher, tokenizer, train_set, spec = tiny_setup
    write_cache(teacher, train_set, tmp_path, spec, pad_token_id=tokenizer.pad_token_id)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest.pop("checksums")
    manifest["shard_size"] *= 2
    (tmp_path / "manifest.json").write_text(json.dumps(seal(manifest)))
    with pytest.raises(CacheError, match=r"shards\[0\] .* does not fit shard_size"):
        TeacherCache(
            tmp_path,
            CacheSpec(**{**spec.__dict__, "teacher": None, "k": None, "shard_size": None}),
        )


@pytest.mark.parametrize(
    ("field", "edit"),
    [
        ("k", lambda m: m.update(k=8)),
        ("teacher", lambda m: m.update(teacher="someone-else")),
        ("shard_size", lambda m: m.update(shard_size=3)),  # was an IndexError traceback
        ("data_hash", lambda m: m.update(data_hash="x")),
        ("temperature", lambda m: m.update(temperature=1.5)),
        ("shards[0].tokens", lambda m: m["shards"][0].update(tokens=m["shards"][0]["tokens"] + 1)),
        ("shards[2].examples", lambda m: m["shards"][2].update(examples=3)),
        ("shards", lambda m: m["shards"].pop()),
        ("extra", lambda m: m.update(extra=1)),
        ("format", lambda m: m.update(format=1)),
        ("checksums", lambda m: m.pop("checksums")),
    ],
)
def test_an_edited_manifest_field_is_refused_by_name(
    tmp_path: Path, tiny_setup: Any, field: str, edit: Any
) -> None:
    """The old manifest carried no checksum of its own: edits trained silently (k, teacher,
    tokens) or crashed (shard_size)."""
    import json

    teacher, tokenizer, train_set, spec = tiny_setup
    write_cache(teacher, train_set, tmp_path, spec, pad_token_id=tokenizer.pad_token_id)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    edit(manifest)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    before = _files(tmp_path)
    with pytest.raises(CacheError, match=field.replace("[", r"\[").replace("]", r"\]")):
        TeacherCache(tmp_path, CacheSpec(**{**spec.__dict__, "teacher": None, "k": None}))
    with pytest.raises(CacheError):
        write_cache(teacher, train_set, tmp_path, spec, pad_token_id=tokenizer.pad_token_id)
    assert _files(tmp_path) == before


def test_a_cache_without_its_manifest_is_never_written_over(
    tmp_path: Path, tiny_setup: Any
) -> None:
    teacher, tokenizer, train_set, spec = tiny_setup
    write_cache(teacher, train_set, tmp_path, spec, pad_token_id=tokenizer.pad_token_id)
    (tmp_path / "manifest.json").unlink()
    before = _files(tmp_path)
    other = CacheSpec(**{**spec.__dict__, "shard_size": 256})
    with pytest.raises(CacheError, match=r"no manifest\.json.*delete"):
        write_cache(teacher, train_set, tmp_path, other, pad_token_id=tokenizer.pad_token_id)
    assert _files(tmp_path) == before  # the old code rewrote shard-00000 with 256 examples


def test_an_unfinished_cache_with_another_shard_size_is_refused_and_kept(
    tmp_path: Path, tiny_setup: Any
) -> None:
    teacher, tokenizer, train_set, spec = tiny_setup
    write_cache(teacher, train_set[:4], tmp_path, spec, pad_token_id=tokenizer.pad_token_id)
    before = _files(tmp_path)
    other = CacheSpec(**{**spec.__dict__, "shard_size": 256})
    with pytest.raises(CacheError, match="shard_size: cache 4 != run 256"):
        write_cache(teacher, train_set, tmp_path, other, pad_token_id=tokenizer.pad_token_id)
    assert _files(tmp_path) == before


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("cache.k=16", "k: cache 32, config 16"),
        ("teacher.tiny_seed=7", "teacher_weights"),
        ("generate.max_new_tokens=20", "generate"),
    ],
)
def test_a_cache_teacher_checks_who_wrote_the_cache(
    tmp_path: Path, override: str, named: str
) -> None:
    from conftest import tiny_run_config

    from lmdistill.teachers.setup import open_teacher

    open_teacher(tiny_run_config(tmp_path, "teacher.kind=cache"))
    cache = tmp_path / "run" / "teacher_cache"
    before = _files(cache)
    with pytest.raises(CacheError, match=f"written by another teacher or settings.*{named}"):
        open_teacher(tiny_run_config(tmp_path, "teacher.kind=cache", override))
    assert _files(cache) == before


def test_a_served_teacher_says_that_cache_k_is_not_used() -> None:
    from conftest import ROOT

    from lmdistill.validate import load_config

    with pytest.warns(UserWarning, match="cache.k=32 is not used with teacher.kind=served"):
        load_config(ROOT / "configs" / "served.yaml", ["cache.k=32"])


@pytest.mark.slow
def test_a_cache_teacher_at_another_temperature_runs_end_to_end(tmp_path: Path) -> None:
    """`loss.temperature=2` with a cache teacher wrote the cache, then crashed in evaluation
    (fidelity is at temperature 1; the held-out cache was written at 2)."""
    from conftest import tiny_run_config

    from lmdistill.pipeline import run

    config = tiny_run_config(tmp_path, "teacher.kind=cache", "loss.temperature=2", "baseline=false")
    metrics = run(config)
    assert metrics.kd.after.fidelity.kl < metrics.before.fidelity.kl
    held_out = tmp_path / "run" / "teacher_cache" / "eval" / "manifest.json"
    assert '"temperature": 1.0' in held_out.read_text()
