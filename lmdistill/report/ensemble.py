"""Where several teachers contradicted each other: the report section (`report.md` of a run,
`conflicts.md` of `lmdistill conflicts`) and its histogram."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def conflict_histogram(conflicts: dict[str, Any], path: Path) -> None:
    """Examples per conflict bin (the mean token JSD among the teachers)."""
    edges = conflicts["histogram"]["upper_edges"]
    counts = conflicts["histogram"]["counts"]
    width = edges[0]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar([e - width / 2 for e in edges], counts, width=width * 0.9)
    ax.set_xlabel("per-example conflict: mean token JSD among the teachers (nats)")
    ax.set_ylabel("examples")
    ax.set_title(f"Conflict among {len(conflicts['teachers'])} teachers")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def conflict_lines(conflicts: dict[str, Any], plot: str | None = None) -> list[str]:
    """The section: the teachers and the trust each got, the conflict rates, the histogram,
    the most conflicting examples side by side."""
    names = conflicts["teachers"]
    lines = [
        f"Strategy `{conflicts['strategy']}` over {len(names)} teachers, "
        f"{conflicts['examples']} examples ({conflicts['tokens']:,} response tokens).",
        "",
        "| teacher | weight | trust (share of tokens) |",
        "|---|---|---|",
    ]
    for name in names:
        lines.append(
            f"| {name} | {conflicts['weights'][name]:.3f} | {conflicts['trust'][name]:.3f} |"
        )
    differ = conflicts.get("answers_differ")
    ending = "." if differ is None else f"; their final answers differ on {differ:.1%} of them."
    lines += [
        "",
        f"Mean token JSD among the teachers {conflicts['mean_token_jsd']:.4f} nats; their top-1 "
        f"tokens differ on {conflicts['top1_disagreement']:.1%} of tokens, on some token of "
        f"{conflicts['examples_with_top1_disagreement']:.1%} of examples" + ending,
    ]
    since = conflicts.get("scored_since_step")
    if since:
        lines += ["", f"(The run resumed at step {since}: these figures cover the examples "
                  "scored after it.)"]  # fmt: skip
    if plot:
        lines += ["", f"![conflict]({plot})"]
    shown = conflicts["most_conflicting"]
    if shown:
        answers = "answers" in shown[0]
        header = "| example | conflict | max JSD | top-1 differ |"
        header += "".join(f" {n}: answer / trust |" for n in names) if answers else ""
        header += "" if answers else "".join(f" {n}: trust |" for n in names)
        lines += ["", "The most conflicting examples:", "", header,
                  "|" + "---|" * (4 + len(names))]  # fmt: skip
        for row in shown:
            cells = [
                str(row["id"]).replace("|", "\\|"),
                f"{row['conflict']:.3f}",
                f"{row['max_jsd']:.3f}",
                f"{row['top1_disagreement']:.1%}",
            ]
            for name in names:
                trust = f"{row['trust'][name]:.2f}"
                cells.append(f"{row['answers'][name]} / {trust}" if answers else trust)
            lines.append("| " + " | ".join(cells) + " |")
    return lines
