"""The data-efficiency protocol's table (`protocol.md`) and plot (`protocol.png`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmdistill.io import write_with
from lmdistill.report.text import short_source


def render_protocol(summary: dict[str, Any]) -> str:
    budgets = sorted(summary["budgets"])
    lines = [
        "# Data-efficiency protocol",
        "",
        f"Score: {summary['metric']}. Every student trains with the same steps; "
        "random is mean ± std over its seeds. `% of full` is the share of the full-data "
        "student's score.",
        "",
    ]
    lines += full_data_lines(summary)
    lines += arm_table(summary, budgets)
    lines += worst_group_table(summary, budgets)
    lines += verdict_lines(summary)
    lines += decomposition_lines(summary)
    lines += cost_lines(summary)
    if summary.get("failed"):
        lines += ["", f"Failed ({len(summary['failed'])}): " + "; ".join(summary["failed"])]
    if summary["missing"]:
        lines += ["", f"Not run yet ({len(summary['missing'])}): " + ", ".join(summary["missing"])]
    return "\n".join(lines) + "\n"


def full_data_lines(summary: dict[str, Any]) -> list[str]:
    """The full-data student: the reference for `% of full`."""
    lines: list[str] = []
    full = summary["full"]
    if full:
        steps = summary.get("full_steps") or summary.get("train_steps")
        lines.append(
            f"Full data ({steps} steps, the reference for `% of full`): **{full['mean']:.3f}**"
            + (f" ± {full['std']:.3f}" if full["n"] > 1 else "")
            + f" ({full['n']} seed(s), {summary['full_train_seconds']:.0f} s training)"
        )
        same = summary.get("full_same_steps")
        if same and steps != summary.get("train_steps"):
            lines.append(
                f"Full data at the subsets' {summary['train_steps']} steps: {same['mean']:.3f}"
            )
        lines.append("")
    return lines


def arm_table(summary: dict[str, Any], budgets: list[float]) -> list[str]:
    """Every arm's score at every budget."""
    header = "| arm | " + " | ".join(f"{100 * b:g}%" for b in budgets) + " |"
    lines = [header, "|---|" + "---|" * len(budgets)]
    for row in summary["table"]:
        cells = []
        for budget in budgets:
            cell = row["cells"].get(f"{budget:g}")
            if cell is None:
                planned = f"{row['arm']}@{budget:g}" in summary.get("planned", [])
                cells.append("not run" if planned else "")
                continue
            text = f"{cell['mean']:.3f}"
            if cell["n"] > 1:
                text += f" ± {cell['std']:.3f}"
            if "of_full" in cell:
                text += f" ({100 * cell['of_full']:.0f}%)"
            cells.append(text)
        lines.append(f"| {row['arm']} | " + " | ".join(cells) + " |")
    return lines


def worst_group_table(summary: dict[str, Any], budgets: list[float]) -> list[str]:
    """Where the scored rows carry groups: every arm's worst group and the gap to its best
    group (a subset that helps the average can still leave a group behind)."""
    rows = [r for r in summary["table"] if any("worst_group" in c for c in r["cells"].values())]
    if not rows:
        return []
    lines = ["", "Worst group (its score, and the gap to the best group, means over seeds):"]
    full = summary.get("full_worst_group")
    if full:
        lines.append(f"full data: worst group {full['mean']:.3f}")
    lines += ["", "| arm | " + " | ".join(f"{100 * b:g}%" for b in budgets) + " |"]
    lines.append("|---|" + "---|" * len(budgets))
    for row in rows:
        cells = []
        for budget in budgets:
            cell = row["cells"].get(f"{budget:g}") or {}
            worst, gap = cell.get("worst_group"), cell.get("group_gap")
            cells.append(f"{worst['mean']:.3f} (gap {gap['mean']:.3f})" if worst and gap else "")
        lines.append(f"| {row['arm']} | " + " | ".join(cells) + " |")
    return lines


def verdict_lines(summary: dict[str, Any]) -> list[str]:
    """Per budget, the best method against the two bars."""
    lines: list[str] = []
    if summary.get("verdicts"):
        lines += [
            "",
            "Per budget, the best selection method (highest mean without KD) and each condensed "
            "set, against the two bars: 95% of the full-data student, and random's mean plus "
            "one of random's stds:",
            "",
            "| budget | best of | method | score | % of full | random | >= 95% of full | "
            "> random + 1 std |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for v in summary["verdicts"]:
            value = f"{v['mean']:.3f}" + (f" ± {v['std']:.3f} (n={v['n']})" if v["n"] > 1 else "")
            of_full = "-" if v["of_full"] is None else f"{100 * v['of_full']:.0f}%"
            lines.append(
                f"| {100 * v['budget']:g}% | {v['kind']} | {v['method']} | {value} | {of_full} "
                f"| {v['random_mean']:.3f} ± {v['random_std']:.3f} | "
                f"{_yes(v['reaches_95_of_full'])} | {_yes(v['beats_random_by_1_std'])} |"
            )
    return lines


def decomposition_lines(summary: dict[str, Any]) -> list[str]:
    """The gain over random, split into the data's share and KD's."""
    lines: list[str] = []
    if summary["decomposition"]:
        lines += [
            "",
            "Gain over random (points of the score), split into the data's share (method vs "
            "random's mean, both without KD; and vs a random subset with as many tokens), KD's "
            "share (random+KD vs random on the same subset and seed) and both together "
            "(method+KD vs random's mean):",
            "",
            "| budget | method | data | in random's stds | vs random, same tokens | KD | "
            "data + KD |",
            "|---|---|---|---|---|---|---|",
        ]
        for d in summary["decomposition"]:
            stds = d["beats_random_by_std"]
            lines.append(
                f"| {100 * d['budget']:g}% | {d['method']} | {100 * d['data_effect']:+.1f} | "
                + ("-" if stds is None else f"{stds:+.1f}")
                + f" | {_points(d.get('vs_random_same_tokens'))}"
                + f" | {_points(d.get('kd_effect'))} | {_points(d.get('both'))} |"
            )
    return lines


def cost_lines(summary: dict[str, Any]) -> list[str]:
    """Seconds per run: selection, condensation, training."""
    lines: list[str] = []
    lines += [
        "",
        "Costs (seconds per run: selection incl. scoring when first computed, "
        "condensation, training):",
        "",
        "| arm | budget | select | condense | train |",
        "|---|---|---|---|---|",
    ]
    for row in summary["table"]:
        for key, cell in row["cells"].items():
            lines.append(
                f"| {row['arm']} | {100 * float(key):g}% | {cell['select_seconds']:.0f} | "
                f"{cell['condense_seconds']:.0f} | {cell['train_seconds']:.0f} |"
            )
    return lines


def _yes(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "no")


def _points(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.1f}"


def plot_protocol(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    tab20 = plt.get_cmap("tab20")
    axis.set_prop_cycle(color=[tab20(i) for i in range(20)])  # many arms: no colour twice
    for row in summary["table"]:
        keys = sorted(row["cells"], key=float)
        if not keys:
            continue
        xs = [100 * float(k) for k in keys]
        means = [row["cells"][k]["mean"] for k in keys]
        stds = [row["cells"][k]["std"] for k in keys]
        style = "--" if row["arm"].endswith("+KD") else "-"
        line = axis.errorbar(
            xs, means, yerr=stds, fmt=style, marker="o", capsize=3, label=row["arm"]
        )
        if row["arm"] == "random":
            axis.fill_between(
                xs,
                [m - s for m, s in zip(means, stds, strict=True)],
                [m + s for m, s in zip(means, stds, strict=True)],
                color=line[0].get_color(),
                alpha=0.15,
            )
    if summary["full"]:
        axis.axhline(summary["full"]["mean"], color="black", linestyle=":", label="full data")
    axis.set_xscale("log")
    budgets = sorted(summary["budgets"])
    axis.set_xticks([100 * b for b in budgets], [f"{100 * b:g}%" for b in budgets])
    axis.minorticks_off()
    axis.set_xlabel("budget (% of the training examples)")
    agreement = summary.get("metric_kind") == "agreement"
    axis.set_ylabel("top-1 agreement with the teacher" if agreement else "exact match")
    axis.set_title(f"Data efficiency, scored on {short_source(summary['data'])}")
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    write_with(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120))
    plt.close(figure)
