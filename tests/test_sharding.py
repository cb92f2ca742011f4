"""Sharded training (`train.sharding: fsdp`, torch's FSDP2 over gloo): 2 processes that each
hold half the student give the update of 1 process with the combined batch; checkpoints hold
whole tensors, so a sharded run resumes unsharded and the other way round; what sharding
cannot run yet is refused in one line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from dist_train import FEATURES, train_tiny, two_processes

from lmdistill.cli import main
from lmdistill.config import ConfigError
from lmdistill.validate import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
# 2 processes x micro-batch 2 x 2 accumulated = 1 process x batch 8; the feature loss puts
# the objective's projection into the sharded root unit.
SHARDED = ("--sharding", "fsdp", "--batch-size", "2", "--grad-accum", "2", "--features")


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for name, value in a.items():
        torch.testing.assert_close(value, b[name], rtol=1e-4, atol=1e-5, msg=name)


def test_fsdp_two_processes_equal_one_and_resume_across(tmp_path: Path) -> None:
    one, history = train_tiny(8, 1, steps=4, checkpoint_dir=tmp_path / "one", loss=FEATURES)
    # Steps 1-2 sharded, stopped; the checkpoint (written whole) resumed by 1 plain process.
    two, _ = two_processes(
        tmp_path / "a", 29561, *SHARDED, "--steps", "4", "--stop-after", "2",
        "--ckpt", str(tmp_path / "a-ckpt"),
    )  # fmt: skip
    assert two["processes"] == 2 and two["type"] == "DistributedType.MULTI_CPU"
    # Sharded for real: each process holds about half of the student.
    share = re.search(r"fsdp: .* sharded over 2 processes .* \(([\d.]+)%\)", two["output"])
    assert share is not None, two["output"][-2000:]
    assert 45 < float(share.group(1)) < 55
    for a, b in zip(history[:2], two["history"], strict=True):
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["hidden"] == pytest.approx(b["hidden"], rel=1e-5)
        assert a["tokens"] == b["tokens"]
    resumed, _ = train_tiny(
        8, 1, steps=4, checkpoint_dir=tmp_path / "a-ckpt", resume=True, loss=FEATURES
    )
    _same(one, resumed)
    # Steps 1-2 by 1 plain process; steps 3-4 sharded, from its checkpoint.
    train_tiny(8, 1, steps=4, checkpoint_dir=tmp_path / "b-ckpt", stop_after=2, loss=FEATURES)
    two, weights = two_processes(
        tmp_path / "b", 29563, *SHARDED, "--steps", "4", "--resume",
        "--ckpt", str(tmp_path / "b-ckpt"),
    )  # fmt: skip
    for a, b in zip(history[2:], two["history"][-2:], strict=True):
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    _same(one, weights)  # the student every process ends with is the whole, trained one
    # The last checkpoint, written by the sharded processes, is the plain run's.
    last = tmp_path / "b-ckpt" / "step-000004"
    plain = tmp_path / "one" / "step-000004"
    optim_a = torch.load(last / "optimizer.pt", weights_only=True)
    optim_b = torch.load(plain / "optimizer.pt", weights_only=True)
    assert optim_a["param_groups"] == optim_b["param_groups"]
    for key, entry in optim_b["state"].items():
        for name, value in entry.items():
            torch.testing.assert_close(optim_a["state"][key][name], value, rtol=1e-4, atol=1e-6)


def test_fsdp_with_one_process_says_it_trains_plain(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="nothing to shard over"):
        train_tiny(4, 1, steps=1, checkpoint_dir=tmp_path / "c", sharding="fsdp")


def test_what_sharding_cannot_run_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fsdp = "train.sharding=fsdp"
    with pytest.raises(ConfigError, match=r"train\.sharding: 'fsdp'.*LoRA"):
        load_config(TINY, [fsdp, "student.lora.r=4"])
    with pytest.raises(ConfigError, match=r"train\.sharding: 'fsdp'.*on-policy"):
        load_config(TINY, [fsdp, "on_policy.fraction=0.5"])
    with pytest.raises(ConfigError, match=r"train\.sharding: 'fsdp'.*anchor"):
        load_config(
            TINY,
            [
                fsdp,
                "incremental.anchor=l2",
                "incremental.anchor_weight=1",
                "student.init=path",
                "student.path=outputs/x/student",
            ],
        )
    with pytest.raises(ConfigError, match=r"train\.sharding: 'fsdp'.*fp16"):
        load_config(TINY, [fsdp, "train.precision=fp16"])
    with pytest.raises(ConfigError, match=r"train\.sharding: 'zero'"):
        load_config(TINY, ["train.sharding=zero"])
    assert main(["run", TINY, f"output_dir={tmp_path / 'x'}", fsdp, "student.lora.r=4"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_a_sharded_run_from_the_command_line_saves_a_whole_student(tmp_path: Path) -> None:
    """`torchrun ... lmdistill run CONFIG train.sharding=fsdp`: trained, evaluated and saved
    as any run; the student it writes is a plain whole model."""
    import json
    import os
    import socket
    import subprocess
    import sys

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(port), "-m", "lmdistill", "run", TINY, f"output_dir={out}",
               "train.sharding=fsdp", "baseline=false"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "sharded over 2 processes" in done.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["kd"]["after"]["kl"] < 0.5 * metrics["before"]["kl"]
    student = AutoModelForCausalLM.from_pretrained(out / "student")
    assert not getattr(student, "is_quantized", False)
    # The last checkpoint (gathered from the shards) holds the saved student's weights.
    checkpoint = sorted((out / "checkpoints").iterdir())[-1] / "model.safetensors"
    saved = load_file(checkpoint)
    weights = student.state_dict()
    compared = [name for name in weights if f"student.{name}" in saved]
    assert len(compared) >= len(saved) - 1  # all but a tied copy
    for name in compared:
        torch.testing.assert_close(saved[f"student.{name}"], weights[name])


def test_sharding_needs_torch_2_6_and_no_fp16_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    from lmdistill.kd.train import check_launch_plugins

    real = importlib.metadata.version
    monkeypatch.setattr(
        importlib.metadata, "version", lambda name: "2.5.1" if name == "torch" else real(name)
    )
    with pytest.raises(ConfigError, match=r"train\.sharding: 'fsdp'.*torch 2\.5\.1"):
        load_config(TINY, ["train.sharding=fsdp"])
    load_config(TINY, ["train.sharding=none"])  # older torch runs unsharded
    monkeypatch.undo()
    # `accelerate launch --mixed_precision fp16` reaches the run as this variable.
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(ValueError, match="fp16's loss scaling is not sharded"):
        check_launch_plugins("fsdp")
    check_launch_plugins("none")
