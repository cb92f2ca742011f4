"""Past one machine: mixed precision is refused where the hardware cannot do it, and gradient
checkpointing trains exactly as without it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmdistill.cli import main
from lmdistill.config import config_hash
from lmdistill.kd.train import MIXED_PRECISION, check_precision

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
FAST = ["train.max_steps=3", "train.checkpoint_every=0", "data.max_train_examples=16",
        "generate.max_new_tokens=16", "eval.num_samples=0", "baseline=false"]  # fmt: skip


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_the_cpu_is_refused_before_anything_is_written(
    tmp_path: Path, precision: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    code = main(
        ["run", TINY, f"output_dir={out}", "train.device=cpu", f"train.precision={precision}"]
    )
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"train.precision={precision} needs a CUDA GPU" in err
    assert not out.exists()


def test_precision_maps_to_accelerate_and_fp32_is_the_default() -> None:
    assert MIXED_PRECISION == {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
    check_precision("fp32", torch.device("cpu"))  # always allowed
    from lmdistill.validate import load_config

    assert load_config(TINY, []).train.precision == "fp32"
    assert config_hash(load_config(TINY, [])) == config_hash(
        load_config(TINY, ["train.precision=fp32", "train.gradient_checkpointing=false"])
    )


def test_gradient_checkpointing_trains_exactly_as_without(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    runs = {}
    for flag in ("false", "true"):
        out = tmp_path / flag
        assert main(["run", TINY, *FAST, f"output_dir={out}",
                     f"train.gradient_checkpointing={flag}"]) == 0  # fmt: skip
        runs[flag] = out
    history = [json.loads((runs[f] / "metrics.json").read_text())["kd"]["history"] for f in runs]
    assert [r["loss"] for r in history[0]] == pytest.approx([r["loss"] for r in history[1]])
    plain, checkpointed = (load_file(runs[f] / "student" / "model.safetensors") for f in runs)
    for name, weight in plain.items():
        torch.testing.assert_close(checkpointed[name], weight, rtol=1e-5, atol=1e-6)
    saved = json.loads((runs["true"] / "student" / "config.json").read_text())
    assert not saved.get("gradient_checkpointing")  # the saved student is a plain model


FSDP_LAUNCH = """compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_machines: 1
machine_rank: 0
num_processes: 2
mixed_precision: "no"
use_cpu: true
rdzv_backend: static
same_network: true
main_process_ip: 127.0.0.1
main_process_port: 29547
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: NO_WRAP
  fsdp_state_dict_type: FULL_STATE_DICT
"""


def test_an_fsdp_launch_is_refused_in_one_line_before_anything_is_written(tmp_path: Path) -> None:
    """On the CPU Accelerate turns an FSDP config into plain data parallelism without a word;
    lmdistill shards through train.sharding instead: it says so and stops, in every process."""
    import os
    import subprocess
    import sys

    launch = tmp_path / "fsdp.yaml"
    launch.write_text(FSDP_LAUNCH)
    out = tmp_path / "run"
    tiny = str(ROOT / "configs" / "tiny.yaml")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch),
               "-m", "lmdistill", "run", tiny, f"output_dir={out}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode != 0
    refused = [line for line in done.stderr.splitlines() if "lmdistill run: error:" in line]
    assert refused and all("FSDP was asked for" in line for line in refused)
    assert "set train.sharding=fsdp" in refused[0]
    # The launcher reports its failed children with a traceback of its own; none of
    # lmdistill's code is in it.
    assert "lmdistill/" not in "".join(
        line for line in done.stderr.splitlines() if line.lstrip().startswith("File ")
    )
    assert not out.exists()
