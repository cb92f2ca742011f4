"""E3: on-policy against off-policy distillation on the reasoning lab, at equal wall time.

    make lab-on-policy
    # = python benchmarks/on_policy_lab.py --out outputs/lab/on-policy --seeds 3 --budget-s 150

1. Warm-up: the CoT student of configs/lab/student.yaml, stopped at `--warmup-steps`
   (well below the teacher); evaluated, it is every arm's starting point.
2. Calibration: each arm trains a few steps from the warm-up (evaluation off); the seconds
   per optimizer step of each (on-policy steps also sample) set each arm's step count so that
   its training takes `--budget-s` seconds.
3. The arms (configs/lab/on-policy.yaml; off-policy, on-policy, mixed), `--seeds` seeds each,
   every run evaluated on the in- and out-of-distribution lab tasks.

Finished runs (their metrics.json) are kept and not run again. The result file
docs/results/on-policy.json holds every run's figures, the per-arm mean/std, the costs
(teacher tokens scored, student tokens sampled, wall time), the commit, command and machine;
docs/results/on-policy-lab.png plots exact match against training seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lab_results import provenance

ROOT = Path(__file__).resolve().parent.parent
LMDISTILL = [sys.executable, "-m", "lmdistill"]
CONFIG = "configs/lab/on-policy.yaml"
ARMS = {"off-policy": 0.0, "on-policy": 1.0, "mixed": 0.5}
TEST = "lab:test:200:0:steps=3:min_steps=1:start_max=9:operand_max=5:value_max=30"
OOD = "lab:ood:200:0:steps=3:min_steps=1:start_max=9:operand_max=5:value_max=30"
CALIBRATION_STEPS = 20


def run(config: str, out: Path, *overrides: str) -> dict[str, Any]:
    """`lmdistill run` into `out` unless it already finished there; its metrics.json."""
    metrics = out / "metrics.json"
    if not metrics.is_file():
        command = [*LMDISTILL, "run", config, f"output_dir={out}", *overrides]
        print("+", " ".join(command[2:]), flush=True)
        subprocess.run(command, cwd=ROOT, check=True)
    return dict(json.loads(metrics.read_text()))


def tasks_of(evaluated: dict[str, Any]) -> dict[str, float | None]:
    tasks = evaluated["tasks"]
    return {
        "test_exact_match": tasks[TEST]["exact_match"],
        "ood_exact_match": tasks[OOD]["exact_match"],
        "test_annotation_accuracy": tasks[TEST]["annotation_accuracy"],
        "ood_annotation_accuracy": tasks[OOD]["annotation_accuracy"],
    }


def calibrate(
    config: str,
    arms: dict[str, float],
    directory: Callable[[str], Path],
    calibration_steps: int,
    budget_s: float,
    *overrides: str,
) -> tuple[dict[str, float], dict[str, int]]:
    """Each arm (its on_policy.fraction) trains `calibration_steps` steps without evaluation;
    its seconds per step give it the steps that fill `budget_s` seconds of training."""
    seconds_per_step = {}
    for arm, fraction in arms.items():
        metrics = run(
            config,
            directory(arm),
            f"on_policy.fraction={fraction}",
            f"train.max_steps={calibration_steps}",
            "eval.enabled=false",
            *overrides,
        )
        seconds_per_step[arm] = metrics["kd"]["train_seconds"] / metrics["kd"]["steps"]
    steps = {arm: max(1, round(budget_s / s)) for arm, s in seconds_per_step.items()}
    return seconds_per_step, steps


def summary(values: list[float]) -> dict[str, float | int]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/lab/on-policy"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=150.0)
    parser.add_argument("--warmup-steps", type=int, default=200)
    parser.add_argument("--result", type=Path, default=ROOT / "docs/results/on-policy.json")
    args = parser.parse_args()
    out = args.out

    warmup = run(
        "configs/lab/student.yaml",
        out / "warmup",
        f"train.max_steps={args.warmup_steps}",
        "eval.num_samples=0",
    )
    start = tasks_of(warmup["kd"]["after"])
    print(f"warm-up ({args.warmup_steps} steps): {start}", flush=True)

    seconds_per_step, steps = calibrate(
        CONFIG, ARMS, lambda arm: out / "calibrate" / arm, CALIBRATION_STEPS, args.budget_s,
        "train.checkpoint_every=0",
    )  # fmt: skip
    print(f"seconds per step {seconds_per_step} -> steps {steps}", flush=True)

    runs = []
    for seed in range(args.seeds):
        for arm, fraction in ARMS.items():
            metrics = run(
                CONFIG,
                out / f"{arm}-seed{seed}",
                f"on_policy.fraction={fraction}",
                f"train.max_steps={steps[arm]}",
                f"train.seed={seed}",
            )
            kd = metrics["kd"]
            sampling = kd.get("on_policy") or {}
            runs.append(
                {
                    "arm": arm,
                    "fraction": fraction,
                    "seed": seed,
                    "steps": kd["steps"],
                    **tasks_of(kd["after"]),
                    "train_seconds": kd["train_seconds"],
                    "teacher_tokens_scored": kd["tokens"],
                    "student_tokens_sampled": sampling.get("sampled_tokens", 0),
                    "sample_seconds": sampling.get("sample_seconds", 0.0),
                    "sample_tokens_per_s": sampling.get("sample_tokens_per_s", 0.0),
                    "on_policy_steps": sampling.get("on_policy_steps", 0),
                }
            )
    arms = {}
    for arm in ARMS:
        mine = [r for r in runs if r["arm"] == arm]
        arms[arm] = {
            key: summary([r[key] for r in mine if r[key] is not None])
            for key in (
                "test_exact_match",
                "ood_exact_match",
                "test_annotation_accuracy",
                "ood_annotation_accuracy",
                "train_seconds",
                "teacher_tokens_scored",
                "student_tokens_sampled",
                "steps",
            )
        }
    gain = (
        arms["on-policy"]["test_exact_match"]["mean"]
        - arms["off-policy"]["test_exact_match"]["mean"]
    )
    result = {
        **provenance("on-policy"),
        "setup": {
            "config": CONFIG,
            "warmup_steps": args.warmup_steps,
            "budget_seconds": args.budget_s,
            "calibration_steps": CALIBRATION_STEPS,
            "seconds_per_step": seconds_per_step,
            "steps": steps,
            "seeds": args.seeds,
        },
        "warmup": start,
        "teacher": tasks_of(warmup["teacher"]) if warmup.get("teacher") else None,
        "arms": arms,
        "runs": runs,
        "target": {
            "claim": "on-policy >= +5 points in-distribution exact match over off-policy "
            "at equal training wall time",
            "on_policy_minus_off_policy_points": 100 * gain,
            "met": 100 * gain >= 5.0,
        },
    }
    args.result.parent.mkdir(parents=True, exist_ok=True)
    args.result.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.result}")
    plot(runs, start, args.result.with_name("on-policy-lab.png"))


def plot(runs: list[dict[str, Any]], start: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, title in (
        (axes[0], "test_exact_match", "in distribution"),
        (axes[1], "ood_exact_match", "out of distribution"),
    ):
        ax.axhline(start[key], color="grey", ls=":", label="warm-up (start)")
        for arm in ARMS:
            mine = [r for r in runs if r["arm"] == arm]
            ax.scatter(
                [r["train_seconds"] for r in mine], [r[key] for r in mine], label=arm, alpha=0.8
            )
        ax.set_title(f"exact match, {title}")
        ax.set_xlabel("training seconds (equal budget)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
