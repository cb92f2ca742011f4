"""LoRA against full fine-tuning of the demo's student: peak memory and seconds per step.

    python benchmarks/lora.py [--steps 8] [--out benchmarks/results/lora.json]

The student is the demo's: 6 of SmolLM2-135M-Instruct's 30 layers (the teacher's weights),
trained on the builtin GSM8K answers (CE, batch 8, max_length 256, fp32, the same batches)
with every weight trained, then with LoRA r = 8 on every projection. Each variant runs in a
fresh process, one after the other, so that its peak resident memory is its own; the first
step is not timed. Writes the result with the commit, the command and the machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path(__file__).parent / "results" / "lora.json"
VARIANTS = {"full fine-tuning": 0, "LoRA r=8": 8}


def prepare(directory: Path, layers: int = 6) -> None:
    """A student of `layers` of SmolLM2's 30 (evenly spaced; 6: the old demo's), saved: the
    workers load it alone, so that their peak memory is the student's training, not the
    teacher's loading. (benchmarks/sharding.py uses it too.)"""
    import lmdistill  # noqa: F401  (threading defaults before torch loads)
    from lmdistill.config import ModelConfig, StudentConfig
    from lmdistill.models import build_student, load_model

    teacher, tokenizer = load_model(ModelConfig(path="smollm2-135m-instruct"))
    student, _ = build_student(StudentConfig(num_layers=layers), teacher, tokenizer)
    student.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def train_ce(
    student: Any, tokenizer: Any, train_set: list[Any], train: Any
) -> tuple[Any, float, int]:
    """CE-only training of `student` (no teacher), checkpoints in a temporary directory:
    the result, and the seconds and response tokens of the steps after the first (the first
    takes allocation, first touch), the seconds at the run's average token rate.
    (benchmarks/sharding.py uses it too.)"""
    from lmdistill.config import LossConfig
    from lmdistill.kd.train import train_student

    with tempfile.TemporaryDirectory() as tmp:
        result = train_student(student, None, train_set, train=train, loss=LossConfig(alpha=1.0),
                               vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                               checkpoint_dir=Path(tmp), config_hash="bench")  # fmt: skip
    history = result.state.history
    later = history[-1]["tokens"] - history[0]["tokens"]
    return result, result.seconds * later / history[-1]["tokens"], later


def measure(student_dir: Path, rank: int, steps: int) -> dict[str, Any]:
    """One variant, in this process: trainable parameters, seconds per step, peak RSS."""
    import lmdistill  # noqa: F401  (threading defaults before torch loads)
    from lmdistill.config import (
        ModelConfig,
        StudentConfig,
        StudentLoraConfig,
        TrainConfig,
    )
    from lmdistill.data import load_examples, tokenize_examples
    from lmdistill.models import load_model
    from lmdistill.models.lora import add_adapters

    student, tokenizer = load_model(ModelConfig(path=str(student_dir)))
    loaded_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    spec = StudentConfig(init="path", lora=StudentLoraConfig(r=rank, alpha=2.0 * rank))
    if rank:
        student = add_adapters(student, spec).get_base_model()
    examples = load_examples("builtin:gsm8k-demo")[: 8 * (steps + 1)]
    train_set, _ = tokenize_examples(examples, tokenizer, 256, "warn")
    train = TrainConfig(max_steps=steps + 1, batch_size=8, lr=1e-4, warmup_steps=1,
                        checkpoint_every=0, device="cpu", log_every=1)  # fmt: skip
    _, seconds, later = train_ce(student, tokenizer, train_set, train)
    return {
        "rank": rank,
        "parameters": sum(p.numel() for p in student.parameters()),
        "trainable_parameters": sum(p.numel() for p in student.parameters() if p.requires_grad),
        "steps_timed": steps,
        "seconds_per_step": seconds / steps,
        "tokens_per_s": later / seconds,
        "loaded_rss_mib": loaded_mib,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--student", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--prepare", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.prepare is not None:
        prepare(args.prepare)
        return
    if args.worker is not None:
        print(json.dumps(measure(args.student, args.worker, args.steps)))
        return
    found = {}
    with tempfile.TemporaryDirectory() as tmp:
        student = Path(tmp) / "student"
        subprocess.run([sys.executable, __file__, "--prepare", str(student)], check=True)
        for name, rank in VARIANTS.items():
            done = subprocess.run(
                [sys.executable, __file__, "--worker", str(rank), "--steps", str(args.steps),
                 "--student", str(student)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            found[name] = json.loads(done.stdout.strip().splitlines()[-1])
    full, lora = found["full fine-tuning"], found["LoRA r=8"]
    sys.path.insert(0, str(Path(__file__).parent))
    from losses import code_info, machine_info

    report = {
        "benchmark": "LoRA vs full fine-tuning, the demo's 6-layer SmolLM2 student",
        "command": f"python benchmarks/lora.py --steps {args.steps}",
        "setup": "CE on builtin GSM8K answers, batch 8, max_length 256, fp32, AdamW",
        "variants": found,
        "lora_memory_of_full": lora["peak_rss_mib"] / full["peak_rss_mib"],
        # What training added to the loaded student's memory (weights, gradients, AdamW,
        # activations), LoRA over full.
        "lora_training_memory_of_full": (lora["peak_rss_mib"] - lora["loaded_rss_mib"])
        / (full["peak_rss_mib"] - full["loaded_rss_mib"]),
        "lora_time_of_full": lora["seconds_per_step"] / full["seconds_per_step"],
        "code": code_info(),
        "machine": machine_info(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("lora_memory_of_full", "lora_time_of_full")}))


if __name__ == "__main__":
    main()
