"""A data selection's summary (`select.md`)."""

from __future__ import annotations

import json
from typing import Any


def render_selection(summary: dict[str, Any]) -> str:
    what = summary["selector"]
    if summary["scorer"]:
        what += f" by {summary['scorer']}"
    if summary["features"]:
        what += f" on {summary['features']} features"
    lines = [
        "# Data selection",
        "",
        f"- pool: `{summary['source']}` ({summary['pool_examples']} examples, "
        f"{summary['pool_tokens']} tokens, data hash {summary['data_hash']})",
        f"- method: {what}" + (f" (model: {summary['model']})" if summary["model"] else ""),
        f"- budget: {summary['budget']} ({summary['budget_unit']})",
        f"- selected: {summary['selected']} examples "
        f"({100 * summary['fraction_examples']:.1f}%), {summary['selected_tokens']} tokens "
        f"({100 * summary['fraction_tokens']:.1f}%)",
        f"- time: {summary['seconds']:.1f} s",
        f"- subset: `{summary['subset']}`",
    ]
    for key, value in summary["info"].items():
        if key not in ("budget_kind", "budget_limit"):
            lines.append(f"- {key.replace('_', ' ')}: {json.dumps(value)}")
    return "\n".join(lines) + "\n"
