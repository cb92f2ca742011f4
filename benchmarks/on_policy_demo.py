"""On-policy against off-policy distillation with a real LLM, at equal training wall time.

    make demo-on-policy
    # = python benchmarks/on_policy_demo.py --out outputs/on-policy-demo --seeds 3 --budget-s 200

1. Start: the demo's off-policy KD student as the demo was until 2026-12-07
   (configs/experiments/demo-6-layer.yaml with the teacher in memory, 48 steps;
   SmolLM2-135M-Instruct -> 6 of its 30 layers), on fixed train / held-out rows.
2. Calibration: each arm of configs/experiments/on-policy-demo.yaml trains a few steps from
   the start; its seconds per step set its step count for `--budget-s` seconds of training.
3. The arms, `--seeds` seeds each: off-policy (the teacher's sampled answers) and on-policy
   (the student's own samples), the same divergence (generalized JSD, beta 0.5), learning
   rate and budget. Each is evaluated on the held-out rows: KL(teacher || student) on the
   teacher's text, and on its own greedy answers (eval.answers) the share of repeated
   4-grams, the share that end by themselves, the teacher's NLL per token and
   KL(student || teacher).

The teacher's answers of the start run are copied into every arm (nothing is generated again);
finished runs are kept. docs/results/on-policy-demo.json holds every run, the per-arm
mean/std and the costs; docs/results/on-policy-demo.png plots them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from lab_results import provenance
from on_policy_lab import calibrate, run, summary
from vs_trl import with_answers

ROOT = Path(__file__).resolve().parent.parent
CONFIG = "configs/experiments/on-policy-demo.yaml"
ARMS = {"off-policy": 0.0, "on-policy": 1.0}
DATA = ("data.train=builtin:gsm8k-demo[:256]", "data.eval=builtin:gsm8k-demo[352:384]")
CALIBRATION_STEPS = 6
MEASURES = (
    "kl_teacher_text",
    "repetition",
    "ended",
    "teacher_nll",
    "reverse_kl_own_text",
    "tokens_per_answer",
    "train_seconds",
    "teacher_tokens_scored",
    "student_tokens_sampled",
    "steps",
)


def measures(evaluated: dict[str, Any]) -> dict[str, float | None]:
    answers = evaluated["answers"]
    return {
        "kl_teacher_text": evaluated["kl"],
        "repetition": answers["repetition"],
        "ended": answers["ended"],
        "teacher_nll": answers["teacher_nll"],
        "reverse_kl_own_text": answers["reverse_kl"],
        "tokens_per_answer": answers["mean_tokens"],
    }


def with_start_answers(out: Path, start: Path) -> Path:
    """`out` holding the start run's teacher answers (so the arm generates nothing)."""
    return with_answers(out, start / "generate" / "teacher_responses.jsonl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/on-policy-demo"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=200.0)
    parser.add_argument("--result", type=Path, default=ROOT / "docs/results/on-policy-demo.json")
    args = parser.parse_args()
    out = args.out

    start_dir = out / "start"
    start = run(
        "configs/experiments/demo-6-layer.yaml",
        start_dir,
        "teacher.kind=local",
        *DATA,
        "baseline=false",
        "eval.answers=32",
        "eval.answer_max_new_tokens=128",
    )
    print(f"start: {measures(start['kd']['after'])}", flush=True)

    seconds_per_step, steps = calibrate(
        CONFIG,
        ARMS,
        lambda arm: with_start_answers(out / "calibrate" / arm, start_dir),
        CALIBRATION_STEPS,
        args.budget_s,
    )
    print(f"seconds per step {seconds_per_step} -> steps {steps}", flush=True)

    runs = []
    for seed in range(args.seeds):
        for arm, fraction in ARMS.items():
            metrics = run(
                CONFIG,
                with_start_answers(out / f"{arm}-seed{seed}", start_dir),
                f"on_policy.fraction={fraction}",
                f"train.max_steps={steps[arm]}",
                f"train.seed={seed}",
            )
            kd = metrics["kd"]
            sampling = kd.get("on_policy") or {}
            runs.append(
                {
                    "arm": arm,
                    "seed": seed,
                    "steps": kd["steps"],
                    **measures(kd["after"]),
                    "train_seconds": kd["train_seconds"],
                    "teacher_tokens_scored": kd["tokens"],
                    "student_tokens_sampled": sampling.get("sampled_tokens", 0),
                    "sample_tokens_per_s": sampling.get("sample_tokens_per_s", 0.0),
                }
            )
    arms = {
        arm: {
            key: summary([r[key] for r in runs if r["arm"] == arm and r[key] is not None])
            for key in MEASURES
        }
        for arm in ARMS
    }
    on, off = arms["on-policy"], arms["off-policy"]
    result = {
        **provenance("on-policy-demo"),
        "setup": {
            "config": CONFIG,
            "start": "configs/experiments/demo-6-layer.yaml teacher.kind=local "
            "(48 off-policy KD steps)",
            "budget_seconds": args.budget_s,
            "calibration_steps": CALIBRATION_STEPS,
            "seconds_per_step": seconds_per_step,
            "steps": steps,
            "seeds": args.seeds,
        },
        "start": measures(start["kd"]["after"]),
        "teacher": measures_of_teacher(start),
        "arms": arms,
        "runs": runs,
        "target": {
            "claim": "on-policy cuts the repetition rate and the teacher NLL of the student's "
            "answers against off-policy at equal training time",
            "repetition_on_minus_off": on["repetition"]["mean"] - off["repetition"]["mean"],
            "teacher_nll_on_minus_off": on["teacher_nll"]["mean"] - off["teacher_nll"]["mean"],
            "met": on["repetition"]["mean"] < off["repetition"]["mean"]
            and on["teacher_nll"]["mean"] < off["teacher_nll"]["mean"],
        },
    }
    args.result.parent.mkdir(parents=True, exist_ok=True)
    args.result.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.result}")
    plot(runs, result["start"], result["teacher"], args.result.with_name("on-policy-demo.png"))


def measures_of_teacher(start: dict[str, Any]) -> dict[str, Any] | None:
    answers = (start.get("teacher") or {}).get("answers")
    if not answers:
        return None
    return {
        "repetition": answers["repetition"],
        "ended": answers["ended"],
        "teacher_nll": answers["teacher_nll"],
        "tokens_per_answer": answers["mean_tokens"],
    }


def plot(
    runs: list[dict[str, Any]],
    start: dict[str, Any],
    teacher: dict[str, Any] | None,
    path: Path,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("repetition", "repeated 4-grams in own answers"),
        ("teacher_nll", "teacher NLL per token of own answers"),
        ("kl_teacher_text", "KL(teacher || student) on teacher text"),
    )
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, (key, title) in zip(axes, panels, strict=True):
        ax.axhline(start[key], color="grey", ls=":", label="start (off-policy KD)")
        if teacher is not None and key in teacher:
            ax.axhline(teacher[key], color="black", ls="--", label="teacher")
        for arm in ARMS:
            mine = [r for r in runs if r["arm"] == arm]
            ax.scatter([r["train_seconds"] for r in mine], [r[key] for r in mine], label=arm)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("training seconds (equal budget)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
