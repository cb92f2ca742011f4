"""lmdistill against TRL's GKDTrainer on the demo pair, arms interleaved in one run.

    pip install 'trl==1.16.0'      # a benchmark dependency only (lmdistill never imports it)
    python benchmarks/vs_trl.py    # -> benchmarks/results/vs_trl.json

The same teacher (SmolLM2-135M-Instruct, its GGUF read into fp32) and student (6 of its 30
layers, `layers_from_teacher`), the same 256 teacher answers (written once by
`lmdistill generate`), batch 8, 48 steps (16 for the on-policy arms: each samples), fp32,
the same batches in the same order (TRL is fed lmdistill's step order without shuffling),
learning rate 1e-3 with 4 warmup steps and cosine decay, no gradient checkpointing (TRL's
default turns it on, which also makes its sampling run without a KV cache), on 2 CPU
cores. Each arm is its own process (peak RSS is per arm):

- `trl-off`: GKDTrainer, lmbda 0, beta 0 (forward KL on the teacher's answers);
- `lmd-live`: `lmdistill run`, the teacher in memory scoring every batch;
- `lmd-cache`: `lmdistill run` from the teacher's top-32 cache (written before training,
  not timed);
- `trl-on`: GKDTrainer, lmbda 1 (every batch sampled by the student, 64 new tokens);
- `lmd-on`: `lmdistill run` with on_policy.fraction 1 (forward KL, 64 new tokens).

Per arm: response tokens per second of training (off-policy arms; the same tokens), optimizer
steps per second (on-policy arms, whose sampled lengths differ), peak RSS, the loss at the
first and last step, and afterwards the held-out KL(teacher || student) on 32 teacher answers
(`lmdistill eval`). The FLOP limit of the live KD step (2 x teacher + 6 x student parameters
per token) is set against this machine's fp32 matmul rate, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONFIG = "configs/experiments/demo-6-layer.yaml"
DATA = (
    "data.train=builtin:gsm8k-demo[:256]",
    "data.eval=builtin:gsm8k-demo[352:384]",
)
COMMON = (
    *DATA,
    "teacher.kind=local",
    "baseline=false",
    "eval.enabled=false",
    "train.batch_size=8",
    "train.lr=1e-3",
    "train.warmup_steps=4",
    "train.min_lr_ratio=0.0",
    "train.log_every=1",
    "train.checkpoint_every=0",
    "loss.divergence=forward_kl",
    "loss.alpha=0.0",
)
LMD_ARMS = {
    "lmd-live": (),
    "lmd-cache": ("teacher.kind=cache",),
    "lmd-on": (
        "on_policy.fraction=1",
        "on_policy.max_new_tokens=64",
        "on_policy.divergence=forward_kl",
    ),
}
ORDER = ("trl-off", "lmd-live", "lmd-cache", "trl-on", "lmd-on")


def lmdistill(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "lmdistill", *args], cwd=ROOT, check=True)


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    started = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * n**3 * repeats / (time.perf_counter() - started) / 1e9


# ---------------------------------------------------------------------------------------------
# The TRL arms (run in their own process: `--trl-arm off|on`)


def trl_arm(arm: str, responses: Path, out: Path, steps: int) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from lmdistill.config import ModelConfig, StudentConfig
    from lmdistill.data import tokenize_examples
    from lmdistill.kd.train import step_indices
    from lmdistill.models import build_student, load_model
    from lmdistill.pipeline import save_student

    torch.manual_seed(0)
    teacher, tokenizer = load_model(ModelConfig(path="smollm2-135m-instruct"))
    student, _ = build_student(StudentConfig(num_layers=6), teacher, tokenizer)
    rows = training_rows(responses)
    order = [i for step in range(steps) for i in step_indices(step, len(rows), 8, 0)]
    ordered = [rows[i] for i in order]
    dataset = Dataset.from_list([{"messages": [*r.messages, {"role": "assistant",
                                                            "content": r.response}]}
                                 for r in ordered])  # fmt: skip
    tokenized, _ = tokenize_examples(ordered, tokenizer, 256, "warn")
    tokens = sum(sum(1 for y in t.labels[1:] if y != -100) for t in tokenized)

    class Sequential(GKDTrainer):  # lmdistill's batches, in its order
        def _get_train_sampler(self, *args: Any, **kwargs: Any) -> Any:
            return SequentialSampler(self.train_dataset)

    losses: list[float] = []

    class Losses(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    config = GKDConfig(
        output_dir=str(out / "trainer"),
        per_device_train_batch_size=8,
        max_steps=steps,
        learning_rate=1e-3,
        lr_scheduler_type="cosine",
        warmup_steps=4,
        lmbda=1.0 if arm == "on" else 0.0,
        beta=0.0,
        temperature=1.0,
        max_new_tokens=64,
        max_length=256,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        weight_decay=0.0,
        # TRL's SFT-derived default is True (recompute activations, and generate without a KV
        # cache); lmdistill checkpoints nothing, so neither does TRL here: the same work.
        gradient_checkpointing=False,
        # TRL's base config turns bf16 on when fp16 is off (CPU autocast): fp32, as lmdistill.
        bf16=False,
        fp16=False,
    )
    trainer = Sequential(
        model=student,
        teacher_model=teacher,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[Losses()],
    )
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    save_student(student, tokenizer, out / "student")
    return {
        "arm": f"trl-{arm}",
        "train_seconds": seconds,
        "steps_per_s": steps / seconds,
        "tokens_per_s": tokens / seconds if arm == "off" else None,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "precision": {"bf16": trainer.args.bf16, "fp16": trainer.args.fp16},
    }


def training_rows(responses: Path) -> list[Any]:
    """The 256 training rows of the responses file, in the order lmdistill trains on them."""
    from lmdistill.data import Example, load_examples

    train_ids = [e.id for e in load_examples("builtin:gsm8k-demo[:256]")]
    answered = {}
    for line in responses.read_text().splitlines():
        row = json.loads(line)
        answered[row["id"]] = Example(row["id"], tuple(row["messages"]), row["response"])
    return [answered[i] for i in train_ids if i in answered]


# ---------------------------------------------------------------------------------------------
# The run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/bench/vs_trl"))
    parser.add_argument("--result", type=Path, default=ROOT / "benchmarks/results/vs_trl.json")
    parser.add_argument("--steps", type=int, default=48, help="steps of the off-policy arms")
    parser.add_argument("--on-policy-steps", type=int, default=16, help="steps of the others")
    parser.add_argument("--trl-arm", choices=["off", "on"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    out: Path = args.out
    responses = out / "responses" / "generate" / "teacher_responses.jsonl"
    if args.trl_arm:
        result = trl_arm(args.trl_arm, responses, out / f"trl-{args.trl_arm}", args.steps)
        (out / f"trl-{args.trl_arm}.json").write_text(json.dumps(result, indent=2))
        return

    started = Path("outputs/on-policy-demo/start/generate")  # the same answers, if written
    if not responses.is_file() and (started / "teacher_responses.jsonl").is_file():
        responses.parent.mkdir(parents=True)
        for name in ("teacher_responses.jsonl", "manifest.json"):
            (responses.parent / name).write_bytes((started / name).read_bytes())
    if not responses.is_file():  # the teacher's answers, once (sampled at temperature 1)
        lmdistill("generate", CONFIG, f"output_dir={out / 'responses'}", *DATA,
                  "teacher.kind=local")  # fmt: skip
    gflops = matmul_gflops()
    arms: dict[str, dict[str, Any]] = {}
    for arm in ORDER:
        print(f"== {arm}", flush=True)
        if arm.startswith("trl-"):
            kind = arm.removeprefix("trl-")
            steps = args.on_policy_steps if kind == "on" else args.steps
            command = [sys.executable, __file__, "--out", str(out), "--trl-arm", kind,
                       "--steps", str(steps)]  # fmt: skip
            subprocess.run(command, cwd=ROOT, check=True)
            arms[arm] = json.loads((out / f"{arm}.json").read_text())
            student = out / arm / "student"
        else:
            run_dir = with_answers(out / arm, responses)
            steps = f"train.max_steps={args.on_policy_steps if arm == 'lmd-on' else args.steps}"
            if not (run_dir / "metrics.json").is_file():  # a finished arm is kept
                lmdistill("run", CONFIG, f"output_dir={run_dir}", *COMMON, *LMD_ARMS[arm], steps)
            metrics = json.loads((run_dir / "metrics.json").read_text())
            kd, history = metrics["kd"], metrics["kd"]["history"]
            arms[arm] = {
                "arm": arm,
                "train_seconds": kd["train_seconds"],
                "steps_per_s": kd["steps"] / kd["train_seconds"],
                "tokens_per_s": kd["tokens_per_s"] if arm != "lmd-on" else None,
                "first_loss": history[0]["loss"],
                "last_loss": history[-1]["loss"],
                "peak_rss_mb": metrics["peak_rss_mb"],
                "parameters": {
                    "teacher": metrics["models"]["teacher_parameters"],
                    "student": metrics["models"]["student_parameters"],
                },
            }
            student = run_dir / "student"
        arms[arm]["held_out_kl"] = held_out_kl(out, student, responses)
    write(args, arms, gflops)


def with_answers(run_dir: Path, responses: Path) -> Path:
    """`run_dir` holding the teacher's answers (so nothing is generated again)."""
    generated = run_dir / "generate"
    if not generated.exists():
        generated.mkdir(parents=True)
        for name in ("teacher_responses.jsonl", "manifest.json"):
            (generated / name).write_bytes((responses.parent / name).read_bytes())
    return run_dir


def held_out_kl(out: Path, student: Path, responses: Path) -> float:
    """KL(teacher || student) on the 32 held-out teacher answers (`lmdistill eval`)."""
    evaluated = with_answers(out / "eval", responses)
    result = subprocess.run(
        [sys.executable, "-m", "lmdistill", "eval", CONFIG, f"output_dir={evaluated}",
         *DATA, "teacher.kind=local", "--student", str(student)],
        cwd=ROOT, check=True, capture_output=True, text=True,
    )  # fmt: skip
    printed = result.stdout
    return float(json.loads(printed[printed.index("{") :])["kl"])


def write(args: argparse.Namespace, arms: dict[str, dict[str, Any]], gflops: float) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from losses import code_info, machine_info

    live, trl_off = arms["lmd-live"], arms["trl-off"]
    params = live["parameters"]
    flops_per_token = 2 * params["teacher"] + 6 * params["student"]
    limit = gflops * 1e9 / flops_per_token
    ratios = {
        "live_vs_trl_tokens_per_s": live["tokens_per_s"] / trl_off["tokens_per_s"],
        "cache_vs_trl_tokens_per_s": arms["lmd-cache"]["tokens_per_s"] / trl_off["tokens_per_s"],
        "live_vs_trl_peak_rss": live["peak_rss_mb"] / trl_off["peak_rss_mb"],
        "on_policy_vs_trl_steps_per_s": arms["lmd-on"]["steps_per_s"]
        / arms["trl-on"]["steps_per_s"],
        "live_share_of_flop_limit": live["tokens_per_s"] / limit,
    }
    result = {
        "benchmark": "vs_trl",
        "command": " ".join(["python benchmarks/vs_trl.py", *sys.argv[1:]]),
        "collected": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "code": code_info(),
        "machine": machine_info(),
        "trl_version": _version("trl"),
        "setup": "demo pair (SmolLM2-135M-Instruct -> 6 of 30 layers), 256 teacher answers, "
        f"batch 8, {args.steps} steps ({args.on_policy_steps} on-policy), forward KL, fp32, the "
        "same batches in the same order, no gradient checkpointing in either",
        "fp32_matmul_gflops": gflops,
        "kd_flops_per_token": flops_per_token,
        "kd_tokens_per_s_flop_limit": limit,
        "arms": arms,
        "ratios": ratios,
        "targets": {
            "off_policy_live_2x_trl_tokens_per_s": ratios["live_vs_trl_tokens_per_s"] >= 2.0,
            "off_policy_live_half_trl_memory": ratios["live_vs_trl_peak_rss"] <= 0.5,
            "on_policy_2x_trl": ratios["on_policy_vs_trl_steps_per_s"] >= 2.0,
            "live_90pct_of_flop_limit": ratios["live_share_of_flop_limit"] >= 0.9,
        },
    }
    args.result.parent.mkdir(parents=True, exist_ok=True)
    args.result.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(ratios, indent=2))
    print(f"wrote {args.result}")


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
