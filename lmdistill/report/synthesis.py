"""A synthesis run's summary (`synthesise.md`)."""

from __future__ import annotations

from typing import Any


def render_synthesis(summary: dict[str, Any]) -> str:
    lines = [
        "# Synthetic data",
        "",
        f"- teacher: `{summary['teacher']}`; seeds: `{summary['seeds']}` "
        f"({summary['seed_examples']} examples)",
        f"- attempts: {summary['attempts']}, kept: **{summary['kept']}** "
        f"({100 * summary['acceptance']:.1f}%), verification: {summary['verify']}",
        f"- time: {summary['seconds']:.0f} s",
        "",
        "| dropped because | count |",
        "|---|---|",
    ]
    lines += [f"| {reason} | {count} |" for reason, count in sorted(summary["dropped"].items())]
    lines += ["", "First kept examples:", ""]
    for example in summary["examples"]:
        lines += [
            f"> **Problem:** {example['problem']}",
            ">",
            "> " + example["solution"].replace("\n", "\n> "),
            "",
        ]
    return "\n".join(lines) + "\n"
