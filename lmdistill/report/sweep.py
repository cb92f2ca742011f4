"""A sweep's table (`sweep.md`) and plot (`sweep.png`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lmdistill.metrics import GROUP_MEASURES
from lmdistill.report.groups import TOLERANCE

REFERENCE = "reference"
RATIONALE_METRICS = {
    "annotation_accuracy": "annotations right",
    "teacher_step_agreement": "steps as teacher's",
}


def render_sweep(summary: dict[str, Any]) -> str:
    table = summary["table"]
    metrics = _compared(table)
    teacher = {
        k.removeprefix("teacher exact match "): v["mean"]
        for entry in table
        for k, v in entry.items()
        if k.startswith("teacher exact match ")
    }
    axes = ", ".join(f"`{k}` in {v}" for k, v in summary["axes"].items())
    lines = [
        "# lmdistill sweep",
        "",
        f"Axes: {axes}; {summary['seeds']} seed(s) each (train.seed = 0..{summary['seeds'] - 1});"
        " mean ± std across seeds.",
    ]
    if summary.get("reference"):
        lines.append(f"Reference cell: `{' '.join(summary['reference'])}`.")
    if summary.get("notes"):
        lines.append("Read back with `--report-only`: " + "; ".join(summary["notes"]) + ".")
    if teacher:
        lines.append(
            "Teacher exact match: "
            + ", ".join(f"{name} {value:.3f}" for name, value in teacher.items())
            + "; `(x%)` is a cell's share of it."
        )
    lines += ["", "| cell | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for entry in table:
        texts = []
        for m in metrics:
            if m not in entry:
                texts.append("")
                continue
            text = f"{entry[m]['mean']:.4g} ± {entry[m]['std']:.2g}"
            if entry[m].get("n", entry["runs"]) < entry["runs"]:
                text += f" (n={entry[m]['n']})"
            share = teacher.get(m.split(" exact match ")[-1]) if " exact match " in m else None
            if share:
                text += f" ({entry[m]['mean'] / share:.0%})"
            texts.append(text)
        lines.append(f"| `{entry['cell']}` | " + " | ".join(texts) + " |")
    reference = next((e for e in table if e["cell"].startswith(REFERENCE)), None)
    if reference is not None:
        lines += [
            "",
            "Difference from the reference cell (mean):",
            "",
            "| cell | " + " | ".join(metrics) + " |",
            "|---|" + "---|" * len(metrics),
        ]
        for entry in table:
            if entry is reference:
                continue
            texts = [
                f"{round(entry[m]['mean'] - reference[m]['mean'], 9):+.4g}"
                if m in entry and m in reference
                else ""
                for m in metrics
            ]
            lines.append(f"| `{entry['cell']}` | " + " | ".join(texts) + " |")
        levelled = [
            line
            for entry in table
            if entry is not reference
            for line in levelled_down(entry, reference)
        ]
        if levelled:
            lines += ["", *levelled]
    lines += ["", "![sweep](sweep.png)", ""]
    return "\n".join(lines)


def levelled_down(entry: dict[str, Any], reference: dict[str, Any]) -> list[str]:
    """A line per group measure where the cell's gap between groups is smaller than the
    reference cell's but its best group is worse (best = worst +- gap; means over seeds)."""
    lines = []
    for key in entry:
        arm, found, label = key.partition(" group gap ")
        worst_key = f"{arm} worst group {label}"
        if (
            not found
            or key not in reference
            or worst_key not in entry
            or worst_key not in reference
        ):
            continue
        gap, their_gap = entry[key]["mean"], reference[key]["mean"]
        lower_is_better = GROUP_MEASURES.get(label, False)
        sign = -1.0 if lower_is_better else 1.0
        best = entry[worst_key]["mean"] + sign * gap
        their_best = reference[worst_key]["mean"] + sign * their_gap
        worse = sign * (their_best - best)
        if gap < their_gap and worse > TOLERANCE:
            lines.append(
                f"**Trivial solution** (`{entry['cell']}`, {arm} {label}): the gap between groups "
                f"({gap:.4g}) is smaller than the reference's ({their_gap:.4g}) because the best "
                f"group got worse ({best:.4g} against {their_best:.4g})."
            )
    return lines


def _compared(table: list[dict[str, Any]]) -> list[str]:
    """The metrics that differ between cells (the teacher's accuracy heads the table)."""
    keys = dict.fromkeys(k for entry in table for k in entry)  # a cell may lack some
    shown = [k for k in keys if k not in ("cell", "runs") and not k.startswith("teacher ")]
    # Accuracy first, then the rationale checks, each over the task sets in order.
    order = [" exact match ", " accuracy ", *(f" {label} " for label in RATIONALE_METRICS.values())]
    return sorted(shown, key=lambda k: next((i for i, o in enumerate(order) if o in k), -1))


def plot_sweep(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = summary["table"]
    compared = _compared(table)
    # Task accuracy when there is any (the rest is in the table), else everything.
    metrics = [m for m in compared if " exact match " in m or " accuracy " in m] or compared
    if not metrics:
        return
    figure, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.2), squeeze=False)
    names = [entry["cell"] for entry in table]
    for axis, metric in zip(axes[0], metrics, strict=True):
        means = [entry[metric]["mean"] if metric in entry else math.nan for entry in table]
        stds = [entry[metric]["std"] if metric in entry else 0.0 for entry in table]
        axis.bar(range(len(names)), means, yerr=stds, capsize=4, color="#4c72b0")
        axis.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
        axis.set_title(metric, fontsize=8)
        if " exact match " in metric:  # the teacher's accuracy on the same task set
            teacher = f"teacher exact match {metric.split(' exact match ')[-1]}"
            levels = [entry[teacher]["mean"] for entry in table if teacher in entry]
            if levels:
                axis.axhline(levels[0], color="#c44e52", linestyle="--", label="teacher")
                axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
