"""The training loop: it distils, resumes exactly, and normalises the loss globally."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, tiny_run_config
from dist_train import train_tiny, two_processes

from lmdistill.cli import main
from lmdistill.config import LossConfig
from lmdistill.metrics import RunMetrics
from lmdistill.pipeline import OutputExistsError, run


def test_tiny_config_end_to_end_through_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "tiny"
    assert main(["run", str(ROOT / "configs" / "tiny.yaml"), f"output_dir={out}"]) == 0
    for artifact in (
        "report.md",
        "metrics.json",
        "config.yaml",
        "loss.png",
        "fidelity.png",
        "student/config.json",
        "student/model.safetensors",
        "student/tokenizer.json",
        "generate/teacher_responses.jsonl",
    ):
        assert (out / artifact).is_file(), artifact
    metrics = json.loads((out / "metrics.json").read_text())
    typed = RunMetrics.from_dict(metrics).as_dict()  # the types hold every key, in order
    assert json.dumps(typed) == json.dumps(metrics)
    history = [r["loss"] for r in metrics["kd"]["history"]]
    assert sum(history[-4:]) / 4 < 0.7 * sum(history[:4]) / 4  # the loss falls
    before, kd, ce = metrics["before"], metrics["kd"]["after"], metrics["baseline"]["after"]
    assert kd["kl"] < 0.6 * before["kl"]  # the student moved toward the teacher
    assert kd["kl"] < ce["kl"] and kd["top1_agreement"] > ce["top1_agreement"]
    assert "| KD student |" in (out / "report.md").read_text()

    # The saved student reloads and computes exactly what the trained one did.
    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                str(ROOT / "configs" / "tiny.yaml"),
                f"output_dir={out}",
                "--student",
                str(out / "student"),
            ]
        )
        == 0
    )
    reloaded = json.loads(capsys.readouterr().out)
    assert reloaded["kl"] == pytest.approx(kd["kl"], rel=1e-6, abs=1e-7)
    assert reloaded["top1_agreement"] == kd["top1_agreement"]


def test_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    straight, straight_history = train_tiny(4, 1, steps=6, checkpoint_dir=tmp_path / "a")
    # Stopped after step 5; the last checkpoint is step 4, so step 5 is redone on resume.
    train_tiny(4, 1, steps=6, checkpoint_dir=tmp_path / "b", stop_after=5)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["step-000002", "step-000004"]
    resumed, resumed_history = train_tiny(4, 1, steps=6, checkpoint_dir=tmp_path / "b", resume=True)
    for name, value in straight.items():
        assert torch.equal(value, resumed[name]), name
    timeless = [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in straight_history]
    assert [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in resumed_history] == (
        timeless
    )


def test_gradient_accumulation_equals_one_big_batch(tmp_path: Path) -> None:
    big, big_history = train_tiny(8, 1, steps=2, checkpoint_dir=tmp_path / "a")
    accumulated, acc_history = train_tiny(2, 4, steps=2, checkpoint_dir=tmp_path / "b")
    for a, b in zip(big_history, acc_history, strict=True):
        # grad_norm is measured before clipping: it catches a wrong normalisation that Adam's
        # scale invariance would hide in the weights.
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["tokens"] == b["tokens"]
    for name, value in big.items():
        torch.testing.assert_close(value, accumulated[name], rtol=1e-4, atol=1e-5)


def test_two_processes_equal_one_process_with_the_combined_batch(tmp_path: Path) -> None:
    two, weights = two_processes(tmp_path / "two", 29517)
    assert two["processes"] == 2 and two["type"] == "DistributedType.MULTI_CPU"
    one, one_history = train_tiny(8, 1, steps=2, checkpoint_dir=tmp_path / "one")
    for a, b in zip(one_history, two["history"], strict=True):
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["tokens"] == b["tokens"]
    for name, value in one.items():
        torch.testing.assert_close(value, weights[name], rtol=1e-4, atol=1e-5)


def test_a_second_run_into_the_same_directory_needs_resume(tmp_path: Path) -> None:
    config = tiny_run_config(tmp_path, "baseline=false", "eval.enabled=false")
    first = run(config)
    with pytest.raises(OutputExistsError, match="pass --resume"):
        run(config)
    again = run(config, resume=True)  # everything was done: nothing is retrained
    assert again.kd.resumed_from == first.kd.steps == 8
    assert again.setup["generate"]["generated"] == 0


def test_feature_losses_are_trained_logged_and_resumed(tmp_path: Path) -> None:
    loss = LossConfig(alpha=0.5, hidden_weight=1.0, hidden_kind="mse", attention_weight=1.0)
    straight, history = train_tiny(4, 1, steps=6, checkpoint_dir=tmp_path / "a", loss=loss)
    assert {"hidden", "attention", "kd", "ce"} <= set(history[0])
    assert history[-1]["hidden"] < history[0]["hidden"]
    assert history[-1]["attention"] < history[0]["attention"]
    # The projection's weights and optimizer state are in the checkpoint: resume is exact.
    train_tiny(4, 1, steps=6, checkpoint_dir=tmp_path / "b", stop_after=3, loss=loss)
    resumed, _ = train_tiny(4, 1, steps=6, checkpoint_dir=tmp_path / "b", resume=True, loss=loss)
    for name, value in straight.items():
        assert torch.equal(value, resumed[name]), name


def test_feature_losses_need_a_teacher(tmp_path: Path) -> None:
    from lmdistill.kd.train import train_student

    with pytest.raises(ValueError, match="need a teacher signal"):
        train_student(
            None,  # type: ignore[arg-type]
            None,
            [],
            train=tiny_run_config(tmp_path).train,
            loss=LossConfig(alpha=1.0, hidden_weight=1.0),
            vocab_size=10,
            pad_token_id=0,
            checkpoint_dir=tmp_path,
            config_hash="x",
        )


def test_the_checkpoint_estimate_is_what_a_checkpoint_takes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lmdistill.kd import train as train_module

    needs: list[int] = []
    real_check = train_module.check_room
    monkeypatch.setattr(
        train_module,
        "check_room",
        lambda d, need, keep, warn: (needs.append(need), real_check(d, need, keep, warn)),
    )
    train_tiny(4, 1, steps=2, checkpoint_dir=tmp_path / "c")
    written = sum(f.stat().st_size for f in (tmp_path / "c" / "step-000002").iterdir())
    assert len(needs) == 1 and 0.9 * written < needs[0] <= 1.1 * written


def test_a_run_whose_checkpoint_cannot_fit_is_refused_before_it_trains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lmdistill.io import DiskFullError
    from lmdistill.kd import checkpoint

    monkeypatch.setattr(checkpoint, "free_bytes", lambda path: 1000)
    with pytest.raises(DiskFullError, match=r"takes about \d+ MiB, and .* has 0 MiB free"):
        train_tiny(4, 1, steps=2, checkpoint_dir=tmp_path / "c")
    assert not (tmp_path / "c").exists()
    # Room for one checkpoint but not for the kept ones plus the next: a warning.
    need = 10 * 2**20
    monkeypatch.setattr(checkpoint, "free_bytes", lambda path: 2 * need)
    with pytest.warns(UserWarning, match="keep_checkpoints=2 checkpoints of about 10 MiB"):
        checkpoint.check_room(tmp_path, need, keep=2)


def test_a_full_disk_mid_run_is_named_and_the_run_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint write that fails for want of space raises an error that says so (not
    torch's "unexpected pos"), leaves no half-written checkpoint, and the run resumes."""
    from lmdistill import io
    from lmdistill.io import DiskFullError
    from lmdistill.kd import checkpoint

    real_save = torch.save
    saves = {"n": 0}

    def fill_the_disk(obj, path, *args, **kwargs):  # the 2nd checkpoint's rng.pt is cut short
        saves["n"] += 1
        if saves["n"] == 6:
            raise RuntimeError(
                "[enforce fail at inline_container.cc:672] . unexpected pos 5248 vs 5140"
            )
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", fill_the_disk)
    monkeypatch.setattr(io, "free_bytes", lambda path: 2**20)
    with pytest.raises(
        DiskFullError, match=r"writing .*step-000004 failed: the disk is full \(1 MiB free"
    ):
        train_tiny(4, 1, steps=6, checkpoint_dir=tmp_path / "b")
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["step-000002"]  # no temp dir left
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    resumed, _ = train_tiny(4, 1, steps=6, checkpoint_dir=tmp_path / "b", resume=True)
    straight, _ = train_tiny(4, 1, steps=6, checkpoint_dir=tmp_path / "a")
    for name, value in straight.items():
        assert torch.equal(value, resumed[name]), name


def test_only_a_full_disk_is_reported_as_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors import SafetensorError

    from lmdistill import io
    from lmdistill.io import DiskFullError, atomic_dir, explain_write_failure

    with pytest.raises(DiskFullError, match=r"the disk is full .*No space left on device"):
        explain_write_failure(tmp_path / "x", OSError(28, "No space left on device"))
    # safetensors' error is a bare Exception: caught too, and the temp dir is still removed.
    full = r"writing .*weights failed: the disk is full"
    with pytest.raises(DiskFullError, match=full), atomic_dir(tmp_path / "weights"):
        raise SafetensorError("Error while serializing: No space left on device (os error 28)")
    assert list(tmp_path.iterdir()) == []
    # torch's short write is a full disk only when the disk is (nearly) full.
    short = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 5248 vs 5140")
    monkeypatch.setattr(io, "free_bytes", lambda path: 2**40)
    explain_write_failure(tmp_path / "x", short)  # passes through as it was
    monkeypatch.setattr(io, "free_bytes", lambda path: 2**20)
    with pytest.raises(DiskFullError):
        explain_write_failure(tmp_path / "x", short)
    explain_write_failure(tmp_path / "x", PermissionError(13, "denied"))
    # Other errors leave the block as they were.
    with pytest.raises(ValueError, match="not a write"), atomic_dir(tmp_path / "other"):
        raise ValueError("not a write")


def test_two_processes_write_one_teacher_cache_and_train_from_it(tmp_path: Path) -> None:
    """The cache path under torchrun: the main process writes the cache while the other waits
    (in a collective with train.process_group_timeout_minutes), then both train from it."""
    import socket

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "two"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(port), "--log-dir", str(tmp_path / "logs"), "--redirects", "3",
        "-m", "lmdistill.cli", "run",
        str(ROOT / "configs" / "tiny.yaml"), f"output_dir={out}", "teacher.kind=cache",
        "baseline=false",
    ]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    logs = {p.parent.name: p.read_text() for p in (tmp_path / "logs").rglob("stderr.log")}
    assert done.returncode == 0, done.stderr[-3000:] + logs.get("1", "")[-3000:]
    # One writer: the cache's progress bar is in process 0's log only (both, before the fix).
    assert "cache:" in logs["0"] and "cache:" not in logs["1"]
    metrics = json.loads((out / "metrics.json").read_text())
    for split, examples in (("train", "train_examples"), ("eval", "eval_examples")):
        manifest = json.loads((out / "teacher_cache" / split / "manifest.json").read_text())
        names = [shard["name"] for shard in manifest["shards"]]
        assert len(names) == len(set(names))  # each shard once
        assert sum(s["examples"] for s in manifest["shards"]) == metrics["data"][examples]
    assert metrics["kd"]["after"]["kl"] < 0.5 * metrics["before"]["kl"]
