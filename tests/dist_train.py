"""Train a tiny student for a few steps and save what it learned; run under torchrun or not.

Used by test_train.py to check that 2 processes with batch B give the update of 1 process
with batch 2B (the loss is normalised by the global token count).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState

import lmdistill  # noqa: F401  (threading defaults before torch loads)
from lmdistill.config import (
    LossConfig,
    OnPolicyConfig,
    StudentConfig,
    StudentLoraConfig,
    TrainConfig,
)
from lmdistill.data import load_examples, tokenize_examples
from lmdistill.kd.on_policy import OnPolicy
from lmdistill.kd.train import train_student
from lmdistill.models import build_student
from lmdistill.models.lora import add_adapters
from lmdistill.models.tiny import build_tiny_llama, build_tiny_tokenizer
from lmdistill.teachers.base import LocalTeacher

JSD = LossConfig(divergence="generalized_jsd", alpha=0.3, temperature=2.0, chunk_size=37)
FEATURES = LossConfig(alpha=0.5, hidden_weight=1.0, hidden_kind="mse", chunk_size=37)
# Every step on-policy; stop tokens common enough in a random student's samples that they
# end at different lengths (the normalisation by generated tokens is exercised).
ON_POLICY = OnPolicy(
    OnPolicyConfig(fraction=1.0, max_new_tokens=12, top_p=0.95, divergence="reverse_kl"),
    (258, 5, 17, 40, 71),
    259,
)


def train_tiny(
    batch_size: int,
    grad_accum: int,
    steps: int,
    checkpoint_dir: Path,
    stop_after: int | None = None,
    resume: bool = False,
    loss: LossConfig = JSD,
    on_policy: OnPolicy | None = None,
    group_objective: str = "none",
    groups: int = 0,
    lora: int = 0,
    sharding: str = "none",
) -> tuple[dict, list]:
    """`groups` > 0: the examples get that many groups, one in four in the last one and the
    others shared among the rest (1: every example in one group). `lora` > 0: the student
    trains LoRA adapters of that rank only. `sharding`: train.sharding."""
    tokenizer = build_tiny_tokenizer()
    teacher = build_tiny_llama(len(tokenizer), layers=4, hidden=64, seed=0).eval()
    spec = StudentConfig(num_layers=2, lora=StudentLoraConfig(r=lora))
    student, _ = build_student(spec, teacher, tokenizer)
    if lora:
        torch.manual_seed(0)  # the adapters' init
        student = add_adapters(student, spec).get_base_model()
    examples = load_examples("builtin:gsm8k-demo")[:40]
    if groups:
        examples = [
            dataclasses.replace(e, group=f"g{groups - 1 if i % 4 == 3 else i % max(groups - 1, 1)}")
            for i, e in enumerate(examples)
        ]
    train_set, report = tokenize_examples(examples, tokenizer, max_length=640)
    assert report.dropped == 0
    train = TrainConfig(
        max_steps=steps,
        batch_size=batch_size,
        grad_accum=grad_accum,
        lr=1e-3,
        warmup_steps=1,
        checkpoint_every=2,
        device="cpu",
        group_objective=group_objective,  # type: ignore[arg-type]
        dro_step_size=0.5,
        sharding=sharding,  # type: ignore[arg-type]
    )
    result = train_student(
        student,
        LocalTeacher(teacher, tokenizer, "tiny"),
        train_set,
        train=train,
        loss=loss,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        checkpoint_dir=checkpoint_dir,
        config_hash="test",
        resume=resume,
        stop_after=stop_after,
        on_policy=on_policy,
    )
    return student.state_dict(), result.state.history


def two_processes(out: Path, port: int, *flags: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """This script under torchrun, 2 processes of batch 4, 2 steps: (run.json, weights)."""
    paths = [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, paths))}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port),
        __file__,
        "--batch-size",
        "4",
        *flags,
        "--out",
        str(out),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    run["output"] = done.stdout + done.stderr
    return run, torch.load(out / "weights.pt")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--on-policy", action="store_true")
    parser.add_argument("--group-objective", default="none")
    parser.add_argument("--groups", type=int, default=0)
    parser.add_argument("--lora", type=int, default=0)
    parser.add_argument("--sharding", default="none")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--features", action="store_true", help="hidden-state MSE as well")
    parser.add_argument("--ckpt", type=Path, help="checkpoint directory (default OUT/ckpt)")
    parser.add_argument("--stop-after", type=int)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    state = PartialState(cpu=True)
    policy = ON_POLICY if args.on_policy else None
    weights, history = train_tiny(
        args.batch_size,
        args.grad_accum,
        args.steps,
        args.ckpt or args.out / "ckpt",
        stop_after=args.stop_after,
        resume=args.resume,
        loss=FEATURES if args.features else JSD,
        on_policy=policy,
        group_objective=args.group_objective,
        groups=args.groups,
        lora=args.lora,
        sharding=args.sharding,
    )
    if state.is_main_process:
        args.out.mkdir(parents=True, exist_ok=True)
        torch.save(weights, args.out / "weights.pt")
        info = {"processes": state.num_processes, "type": str(state.distributed_type)}
        (args.out / "run.json").write_text(json.dumps({"history": history, **info}))
    # Tear gloo down before exit: left to the interpreter's shutdown, a worker can abort in a
    # C++ destructor ("terminate called without an active exception") after finishing.
    state.wait_for_everyone()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
