"""Incremental distillation on the reasoning lab: can a student learn capability B without
reading capability A's data again, and keep A?

    make lab-incremental
    # = python benchmarks/incremental_lab.py --out outputs/lab/incremental --seeds 3

Phase 1 (configs/lab/incremental.yaml): the E2-size CoT student (3 layers, 128 wide) distils
capability A, problems with + and - only, from the lab teacher (which knows + - x), 350
steps; it leaves a memory: 10 of its 1,000 examples (k-center over its hidden states) and
its Fisher estimate. Phase 2, from each phase-1 student, `--phase2-steps` steps on
capability B, problems with + and x (70% hold a multiplication), by arm:

  (i)   fine-tune on B:         CE on B's worked solutions alone (the forgetting baseline)
  (ii)  KD on B:                the teacher's signal on B (alpha 0.5, as phase 1)
  (iii) + retention:            (ii) and the phase-1 student as a retention teacher
  (iv)  + retention + replay:   (iii) and the memory's 10 examples
  (v)   + retention + anchor:   (iii) and an EWC anchor (the memory's Fisher estimate)
  (vi)  re-run on A + B:        from scratch on both data sets, phase 1's steps + phase 2's
                                (the upper bound that reads everything again)

Each student answers 100 held-out problems of A and 100 of B (exact match). Retention is an
arm's A exact match over its phase-1 student's; compute is the arm's trained tokens and
training seconds (phase 2 only for (i)-(v); (vi) all of its own). The targets: A retention
>= 95% and B >= 90% of (vi)'s, at <= 25% of (vi)'s compute. Finished runs are kept and not
run again. Writes docs/results/incremental.json (every run, per arm mean/std/n, the targets
met or missed, commit, command, machine) and docs/results/incremental.png (A against B).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

from lab_results import provenance, write_result
from on_policy_lab import run, summary

ROOT = Path(__file__).resolve().parent.parent
CONFIG = "configs/lab/incremental.yaml"
KNOBS = "steps=3:min_steps=1:start_max=9:operand_max=5:value_max=30"
TRAIN_A = f"lab:train:1000:11:{KNOBS}:operations=add+subtract"  # the config's data.train
TRAIN_B = f"lab:train:1000:12:{KNOBS}:operations=add+multiply"
TEST_A = f"lab:test:100:0:{KNOBS}:operations=add+subtract"  # the config's eval.tasks
TEST_B = f"lab:test:100:0:{KNOBS}:operations=add+multiply"
EVAL_B = f"lab:test:64:0:{KNOBS}:operations=add+multiply"
PHASE1_STEPS = 350
DEFAULT_ARGS = ["--out", "outputs/lab/incremental", "--seeds", "3"]  # make lab-incremental
RERUN = "re-run on A + B"
ARMS = (
    "fine-tune on B",
    "KD on B",
    "KD + retention",
    "KD + retention + replay",
    "KD + retention + anchor",
    RERUN,
)


def arm_overrides(
    arm: str, phase1: Path, steps: int, retention: float, anchor: float, both: Path
) -> list[str]:
    """What an arm changes in the config (phase 1's settings otherwise)."""
    if arm == RERUN:  # from scratch on A and B, as long as phase 1 and phase 2 together
        return [f"data.train={both}", f"train.max_steps={PHASE1_STEPS + steps}"]
    common = [
        "student.init=path",
        f"student.path={phase1 / 'student'}",
        f"data.train={TRAIN_B}",
        f"data.eval={EVAL_B}",
        f"train.max_steps={steps}",
        "train.lr=2.0e-3",
        "train.warmup_steps=10",
        "memory.fraction=0",
        "memory.fisher=false",
    ]
    memory = f"incremental.memory={phase1 / 'memory'}"
    extra = {
        "fine-tune on B": ["loss.alpha=1.0"],
        "KD on B": [],
        "KD + retention": [f"incremental.retention_weight={retention}"],
        "KD + retention + replay": [f"incremental.retention_weight={retention}", memory],
        "KD + retention + anchor": [
            f"incremental.retention_weight={retention}",
            memory,
            "incremental.replay=false",
            "incremental.anchor=ewc",
            f"incremental.anchor_weight={anchor}",
        ],
    }[arm]
    return common + extra


def arm_directory(arm: str, retention: float) -> str:
    """An arm's directory; a retention arm at another weight than 1 has its own (`-r0.3`), so
    that a sweep over the weight reuses phase 1 and the re-run and nothing else."""
    name = arm.replace(" ", "-").replace("+", "and")
    return f"{name}-r{retention:g}" if "retention" in arm and retention != 1.0 else name


def measured(metrics: dict[str, Any]) -> dict[str, float]:
    kd = metrics["kd"]
    tasks = kd["after"]["tasks"]
    return {
        "a_exact_match": tasks[TEST_A]["exact_match"],
        "b_exact_match": tasks[TEST_B]["exact_match"],
        "tokens": kd["tokens"],
        "train_seconds": kd["train_seconds"],
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per arm: mean/std/n of each measure, retention, compute against the re-run, and the
    targets met or missed."""
    arms: dict[str, Any] = {}
    phase1 = [r for r in runs if r["arm"] == "phase 1"]
    if phase1:
        arms["phase 1"] = {
            k: summary([r[k] for r in phase1])
            for k in ("a_exact_match", "b_exact_match", "tokens", "train_seconds")
        }
    rerun = [r for r in runs if r["arm"] == RERUN]
    for arm in ARMS:
        mine = [r for r in runs if r["arm"] == arm]
        if not mine:
            continue
        cell: dict[str, Any] = {
            k: summary([r[k] for r in mine])
            for k in ("a_exact_match", "b_exact_match", "tokens", "train_seconds")
        }
        if arm != RERUN:
            cell["retention"] = summary([r["retention"] for r in mine])
        if rerun and arm != RERUN:
            b_rerun = statistics.fmean(r["b_exact_match"] for r in rerun)
            tokens_rerun = statistics.fmean(r["tokens"] for r in rerun)
            seconds_rerun = statistics.fmean(r["train_seconds"] for r in rerun)
            cell["b_of_rerun"] = cell["b_exact_match"]["mean"] / b_rerun if b_rerun else None
            cell["tokens_of_rerun"] = cell["tokens"]["mean"] / tokens_rerun
            cell["seconds_of_rerun"] = cell["train_seconds"]["mean"] / seconds_rerun
            cell["targets"] = {
                "retention >= 0.95": cell["retention"]["mean"] >= 0.95,
                "B >= 0.9 of re-run": cell["b_of_rerun"] is not None and cell["b_of_rerun"] >= 0.9,
                "compute <= 0.25 of re-run": max(cell["tokens_of_rerun"], cell["seconds_of_rerun"])
                <= 0.25,
            }
        arms[arm] = cell
    return arms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/lab/incremental"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--phase2-steps", type=int, default=110)
    parser.add_argument("--retention-weight", type=float, default=1.0)
    parser.add_argument("--anchor-weight", type=float, default=100.0)
    parser.add_argument("--arms", nargs="*", default=list(ARMS))
    parser.add_argument(
        "--only-seeds",
        nargs="*",
        type=int,
        help="run these seeds' runs and write no result: a second process (on another core) "
        "shares the work; finished runs are kept, so a last call without it writes the result",
    )
    parser.add_argument("--result", type=Path, default=ROOT / "docs/results/incremental.json")
    parser.add_argument("--tables", action="store_true", help="print the docs' table and stop")
    parser.add_argument(
        "overrides", nargs="*", help="key=value for every run (e.g. a smaller smoke test)"
    )
    args = parser.parse_args()
    if args.tables:
        print(tables(json.loads(args.result.read_text())))
        return
    out: Path = args.out if args.out.is_absolute() else ROOT / args.out
    from lmdistill.data import load_examples, write_examples

    both = out / "a-and-b.jsonl"  # the re-run's data: A's examples, then B's
    if not both.is_file():
        both.parent.mkdir(parents=True, exist_ok=True)
        write_examples(both, load_examples(TRAIN_A) + load_examples(TRAIN_B))
    runs: list[dict[str, Any]] = []
    seeds = range(args.seeds) if args.only_seeds is None else args.only_seeds
    for seed in seeds:
        phase1 = out / f"phase1-s{seed}"
        if args.only_seeds is not None and args.arms == [RERUN]:  # needs no phase 1
            run(CONFIG, out / "re-run-on-A-and-B" / f"s{seed}",
                *arm_overrides(RERUN, phase1, args.phase2_steps, 0, 0, both),
                f"train.seed={seed}", "eval.before=false", *args.overrides)  # fmt: skip
            continue
        # The untrained students' scores are no part of the result (eval.before=false).
        first = measured(
            run(CONFIG, phase1, f"train.seed={seed}", "eval.before=false", *args.overrides)
        )
        runs.append({"arm": "phase 1", "seed": seed, **first})
        for arm in args.arms:
            where = out / arm_directory(arm, args.retention_weight) / f"s{seed}"
            overrides = arm_overrides(
                arm, phase1, args.phase2_steps, args.retention_weight, args.anchor_weight, both
            )
            metrics = run(
                CONFIG,
                where,
                *overrides,
                f"train.seed={seed}",
                "eval.before=false",
                *args.overrides,
            )
            found = measured(metrics)
            entry = {"arm": arm, "seed": seed, **found}
            if arm != RERUN:
                entry["retention"] = (
                    found["a_exact_match"] / first["a_exact_match"]
                    if first["a_exact_match"]
                    else 0.0
                )
                entry["lineage"] = metrics.get("lineage")
            runs.append(entry)
    if args.only_seeds is not None:
        return
    result = {
        **provenance("incremental"),
        # The command that wrote this file: `make lab-incremental`, or the script with its
        # own arguments (a sweep over the retention weight).
        **({"command": "python " + shlex.join(sys.argv)} if sys.argv[1:] != DEFAULT_ARGS else {}),
        "setup": {
            "config": CONFIG,
            "capability_a": TRAIN_A,
            "capability_b": TRAIN_B,
            "tests": {"a": TEST_A, "b": TEST_B},
            "phase1_steps": PHASE1_STEPS,
            "phase2_steps": args.phase2_steps,
            "retention_weight": args.retention_weight,
            "anchor_weight": args.anchor_weight,
            "seeds": args.seeds,
            "overrides": args.overrides,
        },
        "arms": summarise(runs),
        "runs": runs,
    }
    write_result(result, args.result, plot, tables)


def tables(result: dict[str, Any]) -> str:
    """The docs' table (docs/incremental.md), every figure as the result file holds it."""
    lines = [
        "| arm | A exact match ↑ | A retention ↑ | B exact match ↑ | B of re-run's | tokens "
        "| of re-run's | training s | of re-run's |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, cell in result["arms"].items():
        a, b = cell["a_exact_match"], cell["b_exact_match"]
        retention = cell.get("retention")
        of = cell.get("b_of_rerun")
        lines.append(
            f"| {arm} | {a['mean']:.3f} ± {a['std']:.3f} | "
            + (f"{retention['mean']:.3f} ± {retention['std']:.3f}" if retention else "")
            + f" | {b['mean']:.3f} ± {b['std']:.3f} | "
            + (f"{of:.3f}" if of is not None else "")
            + f" | {cell['tokens']['mean']:,.0f} | "
            + (f"{cell['tokens_of_rerun']:.3f}" if "tokens_of_rerun" in cell else "")
            + f" | {cell['train_seconds']['mean']:.0f} | "
            + (f"{cell['seconds_of_rerun']:.3f}" if "seconds_of_rerun" in cell else "")
            + " |"
        )
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """A against B exact match per arm (mean ± std over seeds), phase 1 for reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, (arm, cell) in enumerate(result["arms"].items()):
        a, b = cell["a_exact_match"], cell["b_exact_match"]
        ax.errorbar(
            b["mean"], a["mean"], xerr=b["std"], yerr=a["std"], fmt="o", color=f"C{i}",
            capsize=3, label=arm,
        )  # fmt: skip
    ax.set_xlabel("B exact match (problems with x, 100 held out)")
    ax.set_ylabel("A exact match (problems with + and -, 100 held out)")
    ax.set_title("Incremental distillation: keep A, learn B", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
