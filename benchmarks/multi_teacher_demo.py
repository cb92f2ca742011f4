"""Two teachers of different quality with a real LLM: what each strategy makes of them.

    make demo-multi
    # = python benchmarks/multi_teacher_demo.py --out outputs/multi-teacher-demo --seeds 3

The teachers: SmolLM2-135M-Instruct and its own 15-of-30-layer copy (every other layer kept,
no training after the cut: the same tokenizer, a much worse model). The student: 6 of
SmolLM2's 30 layers, 48 KD steps (forward KL, alpha 0) on SmolLM2's sampled answers to 256
GSM8K questions, as in `make demo` (configs/experiments/multi-teacher-demo.yaml).

1. The weaker teacher is made and measured against the better one on the 32 held-out rows
   (`lmdistill eval`: KL(SmolLM2 || copy) and top-1 agreement on SmolLM2's answers).
2. The audit (`lmdistill conflicts`): how much the two disagree on the training answers.
3. Students, `--seeds` seeds each: the single better teacher, and each strategy with both.
   Each is measured on the held-out rows against the better teacher: KL(SmolLM2 || student)
   and top-1 agreement; and how much of its signal the strategy took from each teacher.

The first run's sampled answers are copied into every other run (nothing is generated
again); the teachers' caches are shared; finished runs are kept. Writes
docs/results/multi-teacher-demo.json (every run, per arm mean/std/n, the teachers' gap, the
audit, commit, command, machine) and docs/results/multi-teacher-demo.png.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from lab_results import provenance
from on_policy_lab import run, summary
from vs_trl import with_answers

ROOT = Path(__file__).resolve().parent.parent
CONFIG = "configs/experiments/multi-teacher-demo.yaml"
BETTER = "smollm2-135m-instruct"
KEEP_LAYERS = 15
STRATEGIES = ("mean", "product", "confidence", "vote", "route")
SINGLE = "single better teacher"


def weaker_teacher(out: Path) -> Path:
    """SmolLM2 with every other layer dropped, saved as a model directory."""
    path = out / f"teacher-{KEEP_LAYERS}"
    if not (path / "config.json").is_file():
        from lmdistill.config import ModelConfig
        from lmdistill.models.loading import load_model
        from lmdistill.models.students import layers_from_teacher
        from lmdistill.pipeline import save_student

        model, tokenizer = load_model(ModelConfig(path=BETTER))
        save_student(layers_from_teacher(model, KEEP_LAYERS), tokenizer, path)
    return path


def overrides(out: Path, weaker: Path) -> tuple[str, ...]:
    return (
        f"teachers=[{{name: smollm2, kind: cache, path: {BETTER}}}, "
        f"{{name: dropped{KEEP_LAYERS}, kind: cache, path: {weaker}}}]",
        f"cache.dir={out / 'cache'}",
        f"ensemble.answers_dir={out / 'answers'}",
    )


def single(out: Path) -> tuple[str, ...]:
    """The better teacher alone: its cache is the ensemble's (cache.dir is a lone teacher's)."""
    return (
        f"teachers=[{{name: smollm2, kind: cache, path: {BETTER}}}]",
        f"cache.dir={out / 'cache' / 'smollm2'}",
    )


def lmdistill_json(*command: str) -> dict[str, Any]:
    """Run `lmdistill COMMAND ...` and read the JSON it prints."""
    print("+", " ".join(command), flush=True)
    result = subprocess.run(
        [sys.executable, "-m", "lmdistill", *command],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    printed = result.stdout
    return dict(json.loads(printed[printed.index("{") :]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/multi-teacher-demo"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--strategies", nargs="*", default=list(STRATEGIES))
    parser.add_argument(
        "--result", type=Path, default=ROOT / "docs/results/multi-teacher-demo.json"
    )
    args = parser.parse_args()
    out: Path = args.out if args.out.is_absolute() else ROOT / args.out
    weaker = weaker_teacher(out)
    both = overrides(out, weaker)

    runs: list[dict[str, Any]] = []
    first = out / SINGLE.replace(" ", "-") / "s0"
    answers = first / "generate" / "teacher_responses.jsonl"
    for seed in range(args.seeds):
        for arm in (SINGLE, *args.strategies):
            where = out / arm.replace(" ", "-") / f"s{seed}"
            if where != first:  # the first run samples SmolLM2's answers; the others reuse them
                with_answers(where, answers)
            arm_overrides = single(out) if arm == SINGLE else (*both, f"ensemble.strategy={arm}")
            metrics = run(CONFIG, where, *arm_overrides, f"train.seed={seed}")
            after = metrics["kd"]["after"]
            conflicts = (metrics.get("ensemble") or {}).get("conflicts") or {}
            runs.append(
                {
                    "arm": arm,
                    "seed": seed,
                    "kl_to_better": after["kl"],
                    "top1_agreement": after["top1_agreement"],
                    "trust": conflicts.get("trust"),
                    "train_seconds": metrics["kd"]["train_seconds"],
                    "steps": metrics["kd"]["steps"],
                }
            )

    # The teachers' gap: the weaker one measured as a student of the better one.
    gap = lmdistill_json(
        "eval", CONFIG, f"output_dir={with_answers(out / 'gap', answers)}", *both,
        "--student", str(weaker),
    )  # fmt: skip
    audit_dir = out / "conflicts"
    if not (audit_dir / "conflicts.json").is_file():
        subprocess.run(
            [sys.executable, "-m", "lmdistill", "conflicts", CONFIG,
             f"output_dir={with_answers(out / 'audit', answers)}", *both, "ensemble.answers=true",
             "--out", str(audit_dir)],
            cwd=ROOT, check=True,
        )  # fmt: skip
    audit = json.loads((audit_dir / "conflicts.json").read_text())["conflicts"]
    arms = {
        arm: {
            key: summary([r[key] for r in runs if r["arm"] == arm])
            for key in ("kl_to_better", "top1_agreement", "train_seconds")
        }
        for arm in (SINGLE, *args.strategies)
    }
    for arm in args.strategies:
        trusted = [r["trust"] for r in runs if r["arm"] == arm and r["trust"]]
        arms[arm]["trust"] = {
            name: sum(t[name] for t in trusted) / len(trusted) for name in trusted[0]
        }
    result = {
        **provenance("multi-teacher-demo"),
        "setup": {
            "config": CONFIG,
            "teachers": {"better": BETTER, "weaker": f"{BETTER}, {KEEP_LAYERS} of 30 layers"},
            "seeds": args.seeds,
        },
        "weaker_teacher_vs_better": {"kl": gap["kl"], "top1_agreement": gap["top1_agreement"]},
        "audit": {
            key: audit[key]
            for key in (
                "examples",
                "mean_token_jsd",
                "top1_disagreement",
                "examples_with_top1_disagreement",
                "answers_differ",
            )
            if key in audit
        },
        "arms": arms,
        "runs": runs,
    }
    args.result.parent.mkdir(parents=True, exist_ok=True)
    args.result.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"wrote {args.result}")
    plot(result, args.result.with_suffix(".png"))
    print(tables(result))


def tables(result: dict[str, Any]) -> str:
    """The docs' table (docs/reasoning.md), from the result file."""
    gap = result["weaker_teacher_vs_better"]
    lines = [
        f"Weaker teacher against the better one: KL {gap['kl']:.3f}, top-1 agreement "
        f"{gap['top1_agreement']:.3f}.",
        "",
        "| student taught by | KL to SmolLM2 (held out) | top-1 agreement | share of signal "
        "from the weaker teacher |",
        "|---|---|---|---|",
    ]
    for arm, entry in result["arms"].items():
        kl, agree = entry["kl_to_better"], entry["top1_agreement"]
        trust = entry.get("trust")
        weak = "0" if trust is None else f"{trust[f'dropped{KEEP_LAYERS}']:.3f}"
        lines.append(
            f"| {arm} | {kl['mean']:.3f} ± {kl['std']:.3f} | {agree['mean']:.3f} ± "
            f"{agree['std']:.3f} | {weak} |"
        )
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    names = list(result["arms"])
    for ax, key, title in (
        (axes[0], "kl_to_better", "KL(SmolLM2 || student), held out (lower is better)"),
        (axes[1], "top1_agreement", "top-1 agreement with SmolLM2, held out"),
    ):
        for x, arm in enumerate(names):
            values = [r[key] for r in result["runs"] if r["arm"] == arm]
            ax.scatter([x] * len(values), values, color="C0" if x else "black")
            ax.hlines(sum(values) / len(values), x - 0.3, x + 0.3, color="grey")
        ax.set_xticks(range(len(names)), [n.replace(" ", "\n") for n in names], fontsize=7)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
