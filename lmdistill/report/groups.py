"""The report's section on groups (the data's `group` field): every measure per group, the
worst and best group and the gap, and a plain warning when a smaller gap came from the best
group getting worse (the trivial way to look fair)."""

from __future__ import annotations

from typing import Any

from lmdistill.metrics import GROUP_MEASURES, EvalMetrics, RunMetrics, TaskMetrics

# The largest drop of the best group that still counts as "not worse".
TOLERANCE = 0.02


def has_groups(metrics: RunMetrics) -> bool:
    after = metrics.kd.after
    return after is not None and bool(after.group_gaps())


def group_lines(metrics: RunMetrics, names: dict[str, str]) -> list[str]:
    """A table per model and group, the gaps, and the trivial-solution warnings."""
    arms: list[tuple[str, EvalMetrics]] = []
    if metrics.teacher is not None and metrics.teacher.group_gaps():
        arms.append(("teacher", metrics.teacher))
    arms += [(names[arm], values) for arm, values in metrics.arms() if values is not None]
    sources = [
        source
        for source, task in (metrics.kd.after.tasks if metrics.kd.after else {}).items()
        if isinstance(task, TaskMetrics) and task.groups
    ]
    header = ["model", "group", "KL ↓", "top-1 agreement ↑", "ECE ↓"]
    header += [f"exact match `{s}` ↑" for s in sources]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, values in arms:
        groups = sorted(
            {*values.groups}
            | {g for s in sources if isinstance(t := values.tasks.get(s), TaskMetrics)
               for g in t.groups}
        )  # fmt: skip
        for group in groups:
            f = values.groups.get(group)
            cells = [name, group]
            cells += [
                "" if f is None else f"{f.kl:.4f}",
                "" if f is None else f"{f.top1_agreement:.3f}",
            ]
            cells.append("" if f is None or f.student_ece is None else f"{f.student_ece:.3f}")
            for source in sources:
                task = values.tasks.get(source)
                part = task.groups.get(group) if isinstance(task, TaskMetrics) else None
                cells.append(
                    "" if part is None else f"{part['exact_match']:.3f} (n={part['examples']:.0f})"
                )
            rows.append("| " + " | ".join(cells) + " |")
    gaps = [
        "",
        "| model | measure | worst group | best group | gap |",
        "|---|---|---|---|---|",
    ]
    for name, values in arms:
        for measure, found in values.group_gaps().items():
            gaps.append(
                f"| {name} | {measure} | {found['worst_group']} ({found['worst']:.4g}) | "
                f"{found['best_group']} ({found['best']:.4g}) | {found['gap']:.4g} |"
            )
    warnings = []
    if metrics.baseline is not None and metrics.baseline.after is not None and metrics.kd.after:
        warnings += trivial_fairness(
            names["KD"], metrics.kd.after, names["CE-only"], metrics.baseline.after
        )
    return [*rows, *gaps, *(["", *warnings] if warnings else [])]


def trivial_fairness(
    name: str, values: EvalMetrics, reference_name: str, reference: EvalMetrics
) -> list[str]:
    """One line per measure where `values` has a smaller gap between groups than `reference`
    but its best group is worse by more than TOLERANCE: fairer by levelling down."""
    lines = []
    theirs = reference.group_gaps()
    for measure, found in values.group_gaps().items():
        other = theirs.get(measure)
        if other is None or found["gap"] >= other["gap"]:
            continue
        lower_is_better = GROUP_MEASURES.get(measure, False)
        worse = found["best"] - other["best"] if lower_is_better else other["best"] - found["best"]
        if worse > TOLERANCE:
            lines.append(
                f"**Trivial solution ({measure})**: {name}'s gap between groups "
                f"({found['gap']:.4g}) is smaller than {reference_name}'s ({other['gap']:.4g}) "
                f"because its best group got worse ({found['best']:.4g} against "
                f"{other['best']:.4g}), not because its worst group got better."
            )
    return lines


def worst_group_headline(arm: str, values: EvalMetrics, short: dict[str, str]) -> dict[str, Any]:
    """The sweep's columns: each measure's worst group's value and the gap, per arm."""
    out: dict[str, float] = {}
    for measure, found in values.group_gaps().items():
        label = measure
        if measure.startswith("exact_match "):
            source = measure.removeprefix("exact_match ")
            label = f"exact match {short.get(source, source)}"
        out[f"{arm} worst group {label}"] = float(found["worst"])
        out[f"{arm} group gap {label}"] = float(found["gap"])
    return out
