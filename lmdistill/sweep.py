"""`lmdistill sweep CONFIG key=v1,v2 ... [--seeds N]`: a grid of runs, kept, then one table.

Every cell of the grid (each combination of the listed values) runs once per seed
(`train.seed` = 0..N-1) into `OUT/<key=value,...>/seed-<s>/`, with all of a normal run's
artifacts. A cell whose `metrics.json` is already there (same resolved config) is read back,
not run again, so a killed sweep picks up where it stopped. `OUT/sweep.md` and `sweep.json`
hold mean +- std across seeds of every headline metric; `OUT/sweep.png` plots them.

`--reference key=v ...` adds one more cell, outside the grid (e.g. `loss.alpha=1.0`, the
CE-only student at the same steps), and the table says how far each cell is from it. With a
teacher that answers the task sets (`eval.task_teacher`), its accuracy heads the table and
each cell's share of it is shown. `--report-only` writes the table from the runs already on
disk and runs nothing (runs made with an earlier config are included and named).
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import yaml

from lmdistill.config import ConfigError, RunConfig, config_hash, to_dict
from lmdistill.io import atomic_write_json, atomic_write_text
from lmdistill.metrics import RunMetrics, TaskMetrics
from lmdistill.pipeline import run
from lmdistill.report.groups import worst_group_headline
from lmdistill.report.sweep import RATIONALE_METRICS, REFERENCE, plot_sweep, render_sweep
from lmdistill.report.text import short_source
from lmdistill.validate import load_config


def split_overrides(overrides: list[str]) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """Fixed overrides and grid axes: `key=v1,v2` is an axis, `key=v` (or a YAML list
    `key=[a, b]`) a fixed override."""
    fixed, axes = [], []
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and "," in value and not value.lstrip().startswith(("[", "{")):
            values = [v.strip() for v in value.split(",")]
            if any(not v for v in values):
                raise ConfigError(f"sweep axis {item!r} has an empty value")
            axes.append((key, values))
        else:
            fixed.append(item)
    if not axes:
        raise ConfigError("a sweep needs at least one axis, e.g. loss.temperature=1,2,4")
    return fixed, axes


def cells(axes: list[tuple[str, list[str]]]) -> list[list[str]]:
    """Every combination of the axes' values, as override lists."""
    keys = [key for key, _ in axes]
    return [
        [f"{k}={v}" for k, v in zip(keys, combo, strict=True)]
        for combo in itertools.product(*(values for _, values in axes))
    ]


def run_sweep(
    config_path: str,
    overrides: list[str],
    *,
    seeds: int,
    out: Path | None = None,
    reference: list[str] | None = None,
    report_only: bool = False,
) -> dict[str, Any]:
    """Run (or, with `report_only`, only read back) every run of the grid, then write the
    table, JSON and plot."""
    fixed, axes = split_overrides(overrides)
    base = load_config(config_path, fixed)
    root = Path(out or Path(base.output_dir) / "sweep")
    planned: list[tuple[str, int, RunConfig]] = []
    grid = cells(axes)
    if reference:
        if any("," in item and "=" in item for item in reference if "[" not in item):
            raise ConfigError(f"--reference {reference}: one value per key, not an axis")
        grid = [[REFERENCE, *reference], *grid]
    for cell in grid:  # every config is validated before anything runs
        name = ",".join(cell)
        cell = [c for c in cell if c != REFERENCE]
        for seed in range(seeds):
            where = root / name / f"seed-{seed}"
            config = load_config(
                config_path, [*fixed, *cell, f"train.seed={seed}", f"output_dir={where}"]
            )
            planned.append((name, seed, config))
    # Seed-major: every cell's first seed finishes before any second seed starts.
    planned.sort(key=lambda item: item[1])
    rows = []
    notes = []
    for name, seed, config in planned:
        print(f"sweep: {name} seed {seed} -> {config.output_dir}")
        metrics = _finished(config)
        if metrics is None and report_only:
            path = Path(config.output_dir) / "metrics.json"
            if not path.is_file():
                notes.append(f"`{name}` seed {seed}: not run")
                continue
            metrics = RunMetrics.from_dict(json.loads(path.read_text()))
            changed = _changed_fields(Path(config.output_dir) / "config.yaml", config)
            if changed:
                notes.append(f"`{name}` seed {seed}: run with {', '.join(changed)} different")
        elif metrics is None:
            resume = (Path(config.output_dir) / "checkpoints").is_dir()
            metrics = run(config, resume=resume)
        rows.append({"cell": name, "seed": seed, **headline(metrics)})
    if not rows:
        raise ConfigError(f"{root}: no finished runs to report")
    summary = {
        "axes": dict(axes),
        "notes": notes,
        "reference": reference,
        "seeds": seeds,
        "runs": rows,
        "table": aggregate(rows),
    }
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(root / "sweep.json", summary)
    atomic_write_text(root / "sweep.md", render_sweep(summary))
    plot_sweep(summary, root / "sweep.png")
    return summary


def _changed_fields(saved: Path, config: RunConfig) -> list[str]:
    """The fields a finished run's saved config sets differently from `config` (fields added
    to lmdistill since it ran are not differences: they did not exist)."""
    if not saved.is_file():
        return ["an unknown config"]
    old, new = yaml.safe_load(saved.read_text()), to_dict(config)
    changed: list[str] = []

    def walk(a: Any, b: Any, where: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in a.keys() & b.keys():
                walk(a[key], b[key], f"{where}.{key}" if where else key)
        elif a != b and where != "output_dir":
            changed.append(f"{where} ({a!r} then, {b!r} now)")

    walk(old, new, "")
    # Settings of a stage that is off in both runs change nothing.
    off = not (old.get("generate") or {}).get("enabled") and not new["generate"]["enabled"]
    return sorted(c for c in changed if not (off and c.startswith("generate.")))


def _finished(config: RunConfig) -> RunMetrics | None:
    path = Path(config.output_dir) / "metrics.json"
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text())
    if metrics.get("config_hash") != config_hash(config):
        return None
    return RunMetrics.from_dict(metrics)


def headline(metrics: RunMetrics) -> dict[str, float]:
    """The numbers a sweep compares: fidelity and task accuracy of each trained arm (and the
    teacher's task accuracy, the same in every cell)."""
    out: dict[str, float] = {}
    evaluated = [("KD", metrics.kd.after)]
    if metrics.baseline is not None:
        evaluated.append(("CE-only", metrics.baseline.after))
    teacher = metrics.teacher.tasks if metrics.teacher is not None else {}
    sources = [*teacher, *(s for _, after in evaluated for s in (after.tasks if after else {}))]
    names = _short_names(sources)
    for source, task in teacher.items():
        if isinstance(task, TaskMetrics):
            out[f"teacher exact match {names[source]}"] = task.exact_match
    for arm, after in evaluated:
        if after is None:
            continue
        if after.fidelity is not None:
            for name in ("kl", "top1_agreement", "student_ppl"):
                out[f"{arm} {name}"] = float(getattr(after.fidelity, name))
        for source, task in after.tasks.items():
            name = names[source]
            if not isinstance(task, TaskMetrics):
                out[f"{arm} accuracy {name}"] = task.accuracy
                continue
            out[f"{arm} exact match {name}"] = task.exact_match
            # Rationale quality without ground truth (absent when none is written).
            written = task.as_dict()
            for key, label in RATIONALE_METRICS.items():
                value = written.get(key)
                if isinstance(value, (int, float)):
                    out[f"{arm} {label} {name}"] = float(value)
        # Data with groups: each measure's worst group and the gap (absent otherwise).
        out.update(worst_group_headline(arm, after, names))
    return out


def _short_names(sources: list[str]) -> dict[str, str]:
    """Short names for the task sets, the full source wherever two would collide."""
    short = {s: short_source(s) for s in dict.fromkeys(sources)}
    clashes = {n for n in short.values() if list(short.values()).count(n) > 1}
    return {s: s if n in clashes else n for s, n in short.items()}


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and (sample) std across seeds of every metric, per cell."""
    table = []
    for cell in dict.fromkeys(r["cell"] for r in rows):  # in grid order
        runs = [r for r in rows if r["cell"] == cell]
        # Every metric any seed has; `n` says how many seeds it is averaged over.
        metrics = dict.fromkeys(k for r in runs for k in r if k not in ("cell", "seed"))
        entry: dict[str, Any] = {"cell": cell, "runs": len(runs)}
        for metric in metrics:
            values = [r[metric] for r in runs if metric in r]
            mean = sum(values) / len(values)
            var = (
                sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
            )
            entry[metric] = {"mean": mean, "std": math.sqrt(var), "n": len(values)}
        table.append(entry)
    return table
