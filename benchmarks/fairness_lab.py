"""Fairness-aware distillation on the reasoning lab: a fair teacher, an imbalanced training
set with a shortcut only the majority group has; which objective keeps the minority group's
accuracy without learning the shortcut or levelling the majority down?

    make lab-fair
    # = python benchmarks/fairness_lab.py --out outputs/lab/fair --seeds 3
    # two cores: `--only-seeds 0 1 2 --arms 'plain KD' 'CE only'` and the same with
    # `--arms reweight dro` side by side, then the plain call writes the result

The teacher (configs/lab/fair-teacher.yaml) learnt the lab from balanced data of two groups
that differ in surface form only (names and items), each problem with one distractor
sentence whose number is random. The students (configs/lab/fair.yaml; 3 layers, 128 wide)
distil from it on 2,000 problems, 90% from the majority group, in every one of which the
distractor's number is the answer: copying it is a shortcut the minority group lacks. Arms,
`--seeds` seeds each: plain KD, CE only (the worked solutions, no teacher), `reweight`,
`dro`. Each student answers 200 balanced held-out problems (random distractors: exact match
per group, worst group, gap) and 200 counter-shortcut ones (the distractor's number is never
the answer: the shortcut always fails there). The targets (against plain KD): worst-group
exact match +10 points or the gap halved, the average within 2 points, the best group not
worse by more than 2. Finished runs are kept. Writes docs/results/fairness.json and
docs/results/fairness.png (per-group exact match per arm).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from lab_results import provenance, write_result
from on_policy_lab import run, summary

ROOT = Path(__file__).resolve().parent.parent
CONFIG = "configs/lab/fair.yaml"
TEACHER = "outputs/lab/fair-teacher/student"
KNOBS = "steps=3:min_steps=1:start_max=9:operand_max=5:value_max=30:groups=2:distractors=1"
TEST = f"lab:test:200:0:{KNOBS}"  # the config's eval.tasks
COUNTER = f"lab:test:200:1:{KNOBS}:counter=1"
PLAIN = "plain KD"
ARMS = {
    PLAIN: ["train.group_objective=none"],
    "CE only": ["train.group_objective=none", "loss.alpha=1.0"],
    "reweight": ["train.group_objective=reweight"],
    "dro": ["train.group_objective=dro"],
}


def measured(after: dict[str, Any]) -> dict[str, Any]:
    """Exact match per group, average, worst, best, gap; counter-shortcut accuracy."""
    test, counter = after["tasks"][TEST], after["tasks"][COUNTER]
    groups = {g: part["exact_match"] for g, part in test["groups"].items()}
    worst, best = (
        min(groups, key=lambda g: (groups[g], g)),
        max(groups, key=lambda g: (groups[g], g)),
    )
    return {
        "groups": groups,
        "average": test["exact_match"],
        "worst_group": worst,
        "worst": groups[worst],
        "best": groups[best],
        "gap": groups[best] - groups[worst],
        "counter_shortcut": counter["exact_match"],
        "counter_shortcut_groups": {g: p["exact_match"] for g, p in counter["groups"].items()},
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per arm: mean/std/n of every measure (per group too) and the targets against plain KD
    (means over seeds), with the levelling-down case named."""
    arms: dict[str, Any] = {}
    for arm in dict.fromkeys(r["arm"] for r in runs):
        mine = [r for r in runs if r["arm"] == arm]
        cell: dict[str, Any] = {
            key: summary([r[key] for r in mine])
            for key in ("average", "worst", "best", "gap", "counter_shortcut")
        }
        names = sorted({g for r in mine for g in r["groups"]})
        cell["groups"] = {g: summary([r["groups"][g] for r in mine]) for g in names}
        arms[arm] = cell
    plain = arms.get(PLAIN)
    if plain is None:
        return arms
    for arm, cell in arms.items():
        if arm == PLAIN:
            continue
        worst_gain = cell["worst"]["mean"] - plain["worst"]["mean"]
        gap_ratio = cell["gap"]["mean"] / plain["gap"]["mean"] if plain["gap"]["mean"] else None
        best_drop = plain["best"]["mean"] - cell["best"]["mean"]
        cell["against_plain_kd"] = {
            "worst_group_gain": worst_gain,
            "gap_ratio": gap_ratio,
            "average_change": cell["average"]["mean"] - plain["average"]["mean"],
            "best_group_drop": best_drop,
        }
        fairer = worst_gain >= 0.10 or (gap_ratio is not None and gap_ratio <= 0.5)
        cell["targets"] = {
            "worst +10 points or gap halved": fairer,
            "average within 2 points": abs(cell["average"]["mean"] - plain["average"]["mean"])
            <= 0.02,
            "best group not worse by > 2 points": best_drop <= 0.02,
        }
        cell["levelled_down"] = (
            gap_ratio is not None and gap_ratio < 1 and best_drop > 0.02 and worst_gain <= 0.02
        )
    return arms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/lab/fair"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--arms", nargs="*", default=list(ARMS))
    parser.add_argument(
        "--only-seeds",
        nargs="*",
        type=int,
        help="run these seeds' runs and write no result: a second process (on another core) "
        "shares the work; finished runs are kept, so a last call without it writes the result",
    )
    parser.add_argument("--result", type=Path, default=ROOT / "docs/results/fairness.json")
    parser.add_argument("--tables", action="store_true", help="print the docs' table and stop")
    parser.add_argument("overrides", nargs="*", help="key=value for every run (a smoke test)")
    args = parser.parse_args()
    if args.tables:
        print(tables(json.loads(args.result.read_text())))
        return
    out: Path = args.out if args.out.is_absolute() else ROOT / args.out
    runs: list[dict[str, Any]] = []
    teacher: dict[str, Any] | None = None
    seeds = range(args.seeds) if args.only_seeds is None else args.only_seeds
    for seed in seeds:
        for arm in args.arms:
            where = out / arm.replace(" ", "-") / f"s{seed}"
            # The teacher is the same in every run: its answers are scored once (plain KD's
            # first seed, whichever process runs it). The untrained students' scores are no
            # part of the result.
            scorer = (0, PLAIN if PLAIN in args.arms else args.arms[0])
            once = [] if (seed, arm) == scorer else ["eval.task_teacher=false"]
            metrics = run(
                CONFIG,
                where,
                *ARMS[arm],
                f"train.seed={seed}",
                "eval.before=false",
                *once,
                *args.overrides,
            )
            runs.append({"arm": arm, "seed": seed, **measured(metrics["kd"]["after"])})
            if teacher is None and metrics.get("teacher"):
                teacher = measured(metrics["teacher"])
    if args.only_seeds is not None:
        return
    result = {
        **provenance("fairness"),
        "setup": {
            "config": CONFIG,
            "teacher": TEACHER,
            "tests": {"balanced": TEST, "counter_shortcut": COUNTER},
            "seeds": args.seeds,
            "overrides": args.overrides,
        },
        "teacher": teacher,
        "arms": summarise(runs),
        "runs": runs,
    }
    write_result(result, args.result, plot, tables)


def tables(result: dict[str, Any]) -> str:
    """The docs' table (docs/groups.md), every figure as the result file holds it."""
    lines = [
        "| arm | g0 (majority) ↑ | g1 (minority) ↑ | average ↑ | worst group ↑ | gap ↓ "
        "| counter-shortcut ↑ |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, cell in result["arms"].items():

        def text(found: dict[str, Any]) -> str:
            return f"{found['mean']:.3f} ± {found['std']:.3f}"

        groups = cell["groups"]
        lines.append(
            f"| {arm} | {text(groups['g0'])} | {text(groups['g1'])} | {text(cell['average'])} | "
            f"{text(cell['worst'])} | {text(cell['gap'])} | {text(cell['counter_shortcut'])} |"
        )
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """Exact match per group and on counter-shortcut problems, per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(result["arms"])
    fig, ax = plt.subplots(figsize=(7, 3.8))
    bars = (("g0", "majority group"), ("g1", "minority group"), (None, "counter-shortcut"))
    for j, (group, label) in enumerate(bars):
        cells = [
            result["arms"][a]["groups"][group] if group else result["arms"][a]["counter_shortcut"]
            for a in arms
        ]
        ax.bar(
            [x + (j - 1) * 0.27 for x in range(len(arms))],
            [c["mean"] for c in cells],
            width=0.27,
            yerr=[c["std"] for c in cells],
            capsize=2,
            label=label,
        )
    ax.set_xticks(range(len(arms)), arms, fontsize=8)
    ax.set_ylabel("exact match (held out)")
    ax.set_ylim(0, 1)
    ax.set_title("Students of a fair teacher on imbalanced data with a shortcut", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
