"""Train a tiny student for a few steps and save what it learned; run under torchrun or not.

Used by test_train.py to check that 2 processes with batch B give the update of 1 process
with batch 2B (the loss is normalised by the global token count).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from accelerate import PartialState

import lmdistill  # noqa: F401  (threading defaults before torch loads)
from lmdistill.config import LossConfig, StudentConfig, TrainConfig
from lmdistill.data import load_examples, tokenize_examples
from lmdistill.kd.train import train_student
from lmdistill.models import build_student
from lmdistill.models.tiny import build_tiny_llama, build_tiny_tokenizer
from lmdistill.teachers.base import LocalTeacher

JSD = LossConfig(divergence="generalized_jsd", alpha=0.3, temperature=2.0, chunk_size=37)


def train_tiny(
    batch_size: int,
    grad_accum: int,
    steps: int,
    checkpoint_dir: Path,
    stop_after: int | None = None,
    resume: bool = False,
    loss: LossConfig = JSD,
) -> tuple[dict, list]:
    tokenizer = build_tiny_tokenizer()
    teacher = build_tiny_llama(len(tokenizer), layers=4, hidden=64, seed=0).eval()
    student, _ = build_student(StudentConfig(num_layers=2), teacher, tokenizer)
    examples = load_examples("builtin:gsm8k-demo")[:40]
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
    )
    return student.state_dict(), result.state.history


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    state = PartialState(cpu=True)
    weights, history = train_tiny(args.batch_size, 1, args.steps, args.out / "ckpt")
    if state.is_main_process:
        torch.save(weights, args.out / "weights.pt")
        info = {"processes": state.num_processes, "type": str(state.distributed_type)}
        (args.out / "run.json").write_text(json.dumps({"history": history, **info}))
    # Tear gloo down before exit: left to the interpreter's shutdown, a worker can abort in a
    # C++ destructor ("terminate called without an active exception") after finishing.
    state.wait_for_everyone()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
