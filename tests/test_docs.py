"""The README and docs cannot drift from the data: every number in a README result table is in
the committed result file the table names, every relative link resolves, the README's config
example loads, and the README stays a front door."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmdistill.validate import load_config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
MARKER = re.compile(r"<!-- results: (\S+) -->")
# A figure: not part of a word or a name such as `top-1`, `6-layer` or `k=32`.
NUMBER = re.compile(r"(?<![\w.\-=/])-?\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?%?(?![\w.\-]*[A-Za-z])")


def tables(text: str) -> list[tuple[str | None, list[str]]]:
    """Each markdown table as (the results file its marker names, its rows)."""
    found: list[tuple[str | None, list[str]]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|"):
            start = i
            while i < len(lines) and lines[i].startswith("|"):
                i += 1
            before = [line for line in lines[:start] if line.strip()][-1:]
            marker = MARKER.fullmatch(before[0].strip()) if before else None
            found.append((marker.group(1) if marker else None, lines[start:i]))
        i += 1
    return found


def figures(row: str) -> list[str]:
    cells = [cell.strip().strip("*`") for cell in row.strip("|").split("|")]
    return [n for cell in cells for n in NUMBER.findall(cell)]


def leaves(data: Any) -> list[float]:
    if isinstance(data, bool):
        return []
    if isinstance(data, (int, float)):
        return [float(data)]
    if isinstance(data, dict):
        return [v for value in data.values() for v in leaves(value)]
    if isinstance(data, list):
        return [v for value in data for v in leaves(value)]
    return []


def written_as(value: float, figure: str) -> bool:
    """Whether `value`, written at `figure`'s precision, is `figure`."""
    plain = figure.replace(",", "")
    if plain.endswith("%"):  # a share, written as a percentage
        plain, value = plain[:-1], 100 * value
    if "e" in plain:  # scientific: the same significant digits
        mantissa = plain.split("e")[0]
        digits = len(mantissa.split(".")[1]) if "." in mantissa else 0
        return float(f"{value:.{digits}e}") == float(plain)
    digits = len(plain.split(".")[1]) if "." in plain else 0
    return f"{value:.{digits}f}" == plain


def test_figures_are_read_as_a_reader_would() -> None:
    row = "| **KD student** (forward KL, 48 steps) top-1 6-layer k=32 | **2.66** | 7.0e7 | 2,040 |"
    assert figures(row) == ["48", "2.66", "7.0e7", "2,040"]
    assert written_as(2.6612, "2.66") and not written_as(2.6662, "2.66")
    assert written_as(70_123_456.0, "7.0e7") and written_as(2040, "2,040")
    assert figures("| `cot` | 0.925 ± 0.063 | 94% |") == ["0.925", "0.063", "94%"]
    assert written_as(0.9403, "94%") and not written_as(0.9403, "0.94%")


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_result_tables_are_backed_by_their_result_files(page: Path) -> None:
    """Each table with a `<!-- results: FILE -->` marker: every number in it is in FILE,
    which records its command, commit and machine. (The README's demo table gets its marker
    when `make demo-results` has written docs/results/demo.json.)"""
    for source, rows in tables(page.read_text(encoding="utf-8")):
        if source is None:
            continue
        data = json.loads((ROOT / source).read_text())
        for key in ("command", "code", "machine"):
            assert key in data, f"{source} does not record its {key}"
        values = leaves(data)
        for row in rows:
            for figure in figures(row):
                assert any(written_as(v, figure) for v in values), (
                    f"{page.name}: {figure} (in {row.strip()[:60]}...) is not in {source}"
                )


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (page.parent / target.split("#")[0]).resolve()
        assert path.exists(), f"{page.relative_to(ROOT)}: link to {target} does not resolve"


def test_the_readme_config_example_loads() -> None:
    block = re.search(r"## A config in five lines\n\n```yaml\n(.*?)```", README.read_text(), re.S)
    assert block is not None
    raw = yaml.safe_load(block.group(1))
    assert len(block.group(1).strip().splitlines()) <= 5
    overrides = [f"{part}.{k}={json.dumps(v)}" for part, kv in raw.items() for k, v in kv.items()]
    config = load_config(None, overrides)  # every check, registered names included
    assert config.teacher.kind == "cache" and config.student.num_layers == 6


def test_the_readme_is_a_front_door() -> None:
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 150
