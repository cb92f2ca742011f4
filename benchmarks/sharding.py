"""Sharded (FSDP2) against replicated (DDP) data parallelism, 2 CPU processes over gloo:
peak memory per process, seconds per step, and the same trained weights.

    python benchmarks/sharding.py [--steps 8] [--batches 8 2] [--out FILE]
    python benchmarks/sharding.py --table      # docs/distributed.md's table from the file

The student is the demo's size: 8 of SmolLM2-135M-Instruct's 30 layers (the teacher's
weights, evenly spaced: the memory does not depend on which), trained on the builtin GSM8K
answers (CE, fp32, AdamW, max_length 256, the same batches). For each global batch B (8: the
activations and the 49,152-wide logits weigh most; 2: the weights, gradients and AdamW's
moments do), three variants, one after the other, each in fresh processes: 1 process with
batch B; 2 processes with batch B/2 each, `train.sharding: none` (DDP); the same with
`fsdp`. Each process records its resident memory after loading the student and its peak
while training (sampled every 5 ms), and the seconds per step of the steps after the first
at the run's average token rate (the first step's time is part of that rate). Rank 0
keeps the trained weights; they are compared with the one-process run's. Writes the result
with the commit, the command and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path(__file__).parent / "results" / "sharding.json"
LAYERS = 8
VARIANTS = {"1 process": (1, "none"), "DDP, 2 processes": (2, "none"),
            "FSDP, 2 processes": (2, "fsdp")}  # fmt: skip


def rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakSampler:
    """The highest resident memory of this process while the block runs."""

    def __enter__(self) -> PeakSampler:
        self.peak, self.running = rss_mib(), True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, rss_mib())
            time.sleep(0.005)

    def __exit__(self, *exc: object) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, rss_mib())


def measure(student_dir: Path, sharding: str, batch: int, steps: int, out: Path) -> None:
    """One process of a variant: memory, time per step; rank 0 saves the weights."""
    import lmdistill  # noqa: F401, I001  (threading defaults before torch loads)
    import torch
    from accelerate import PartialState

    from lmdistill.config import ModelConfig, TrainConfig
    from lmdistill.data import load_examples, tokenize_examples
    from lmdistill.models import load_model
    from lora import train_ce  # this script's directory is on sys.path

    state = PartialState(cpu=True)
    student, tokenizer = load_model(ModelConfig(path=str(student_dir)))
    examples = load_examples("builtin:gsm8k-demo")[: batch * state.num_processes * (steps + 1)]
    train_set, _ = tokenize_examples(examples, tokenizer, 256, "warn")
    train = TrainConfig(max_steps=steps + 1, batch_size=batch, lr=1e-4, warmup_steps=1,
                        checkpoint_every=0, device="cpu", log_every=1,
                        sharding=sharding)  # type: ignore[arg-type]  # fmt: skip
    loaded = rss_mib()
    with PeakSampler() as peak:
        result, seconds, _ = train_ce(student, tokenizer, train_set, train)
    history = result.state.history
    found = {
        "processes": state.num_processes,
        "rank": state.process_index,
        "parameters": sum(p.numel() for p in student.parameters()),
        "loaded_rss_mib": loaded,
        "peak_rss_mib": peak.peak,
        "seconds_per_step": seconds / steps,
        "final_loss": history[-1]["loss"],
    }
    (out / f"rank{state.process_index}.json").write_text(json.dumps(found))
    if state.is_main_process:
        torch.save(student.state_dict(), out / "weights.pt")
    state.wait_for_everyone()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def run_variant(
    student: Path, processes: int, sharding: str, batch: int, steps: int, out: Path
) -> None:
    worker = [__file__, "--worker", sharding, "--batch", str(batch // processes),
              "--steps", str(steps), "--student", str(student), "--to", str(out)]  # fmt: skip
    if processes == 1:
        command = [sys.executable, *worker]
        env = dict(os.environ)
    else:
        with socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            port = free.getsockname()[1]
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                   str(processes), "--master_port", str(port), *worker]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one core per process
    subprocess.run(command, env=env, check=True, capture_output=True, text=True)


def setting(student: Path, batch: int, steps: int, tmp: Path) -> dict[str, Any]:
    """The three variants at global batch `batch`, and FSDP's memory and time over DDP's."""
    import torch

    found: dict[str, Any] = {"global_batch": batch}
    weights = {}
    for name, (processes, sharding) in VARIANTS.items():
        out = tmp / sharding / str(processes)
        out.mkdir(parents=True)
        print(f"global batch {batch}: {name} ...", flush=True)
        run_variant(student, processes, sharding, batch, steps, out)
        ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]
        found[name] = {
            "processes": processes,
            "sharding": sharding,
            "batch_per_process": batch // processes,
            "ranks": ranks,
            "peak_rss_mib_per_process": max(r["peak_rss_mib"] for r in ranks),
            # What training added to the loaded student (weights' copies, gradients,
            # AdamW, activations, communication buffers).
            "training_rss_mib_per_process": max(
                r["peak_rss_mib"] - r["loaded_rss_mib"] for r in ranks
            ),
            "seconds_per_step": max(r["seconds_per_step"] for r in ranks),
        }
        weights[name] = torch.load(out / "weights.pt")
    reference = weights["1 process"]
    for name, trained in weights.items():
        found[name]["max_weight_difference_from_one_process"] = max(
            float((trained[k] - v).abs().max()) for k, v in reference.items()
        )
    ddp, fsdp = found["DDP, 2 processes"], found["FSDP, 2 processes"]
    found["fsdp_peak_memory_of_ddp"] = (
        fsdp["peak_rss_mib_per_process"] / ddp["peak_rss_mib_per_process"]
    )
    found["fsdp_training_memory_of_ddp"] = (
        fsdp["training_rss_mib_per_process"] / ddp["training_rss_mib_per_process"]
    )
    found["fsdp_time_of_ddp"] = fsdp["seconds_per_step"] / ddp["seconds_per_step"]
    return found


def table(report: dict[str, Any]) -> str:
    """The docs' table (docs/distributed.md) from a result file."""
    rows = [
        "| global batch | run | peak memory per process | added by training | of DDP "
        "| seconds per step | of DDP | largest weight difference from 1 process |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for found in report["settings"]:
        for name in VARIANTS:
            run = found[name]
            fsdp = name.startswith("FSDP")
            memory = f"**{found['fsdp_training_memory_of_ddp']:.2f}**" if fsdp else ""
            time_of = f"{found['fsdp_time_of_ddp']:.2f}" if fsdp else ""
            differs = run["max_weight_difference_from_one_process"]
            rows.append(
                f"| {found['global_batch']} | {name} | {run['peak_rss_mib_per_process']:,.0f} MiB "
                f"| {run['training_rss_mib_per_process']:,.0f} MiB | {memory} "
                f"| {run['seconds_per_step']:.2f} | {time_of} "
                f"| {f'{differs:.1e}' if run['processes'] > 1 else ''} |"
            )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 2], help="global batches")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--table", action="store_true", help="print the docs' table of --out")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--student", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--to", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--prepare", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.out.read_text())))
        return
    if args.prepare is not None:
        from lora import prepare

        prepare(args.prepare, LAYERS)
        return
    if args.worker is not None:
        measure(args.student, args.worker, args.batch, args.steps, args.to)
        return
    settings = []
    with tempfile.TemporaryDirectory() as tmp:
        student = Path(tmp) / "student"
        subprocess.run([sys.executable, __file__, "--prepare", str(student)], check=True)
        for batch in args.batches:
            settings.append(setting(student, batch, args.steps, Path(tmp) / f"b{batch}"))
    sys.path.insert(0, str(Path(__file__).parent))
    from losses import run_header

    report = {
        **run_header(f"FSDP vs DDP, {LAYERS}-layer SmolLM2 student", "benchmarks/sharding.py"),
        "setup": "CE on builtin GSM8K answers, max_length 256, fp32, AdamW; 2 processes x 1 "
        "thread (gloo), or 1 process; peak resident memory per process while training",
        "settings": settings,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    keys = ("fsdp_peak_memory_of_ddp", "fsdp_training_memory_of_ddp", "fsdp_time_of_ddp")
    print(json.dumps([{k: found[k] for k in ("global_batch", *keys)} for found in settings]))


if __name__ == "__main__":
    main()
