"""Collect a finished experiment into a committed result file.

    make lab-e1        # runs the sweep, then: python benchmarks/lab_results.py e1
    make demo-results  # runs the demo, then:  python benchmarks/lab_results.py demo
    make lab-dd        # runs the protocol, then: python benchmarks/lab_results.py lab-dd

The runs' own files stay in git-ignored directories (outputs/lab/, lmdistill-demo/); this
copies what the docs quote into docs/results/: for a lab sweep its summary (every run's
headline numbers and the mean/std table) and the lab teacher's task metrics
(lab-E.json, cited by docs/reasoning.md); for the demo its metrics.json without the sampled
texts (demo.json, cited by the README). Each file records the commit, the command and the
machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = {
    "e1": "make lab-e1",
    "e2": "make lab-e2",
    "demo": "make demo-results",
    "demo-trial": "lmdistill run configs/demo.yaml (with the trial's overrides)",
    "lab-dd": "make lab-dd",
    "demo-dd": "make demo-dd",
    "on-policy": "make lab-on-policy",
    "on-policy-demo": "make demo-on-policy",
    "multi-teacher": "make lab-multi",
    "multi-teacher-demo": "make demo-multi",
    "incremental": "make lab-incremental",
    "fairness": "make lab-fair",
}
OUTPUTS = {
    "demo": "demo.json",
    "e1": "lab-e1.json",
    "e2": "lab-e2.json",
    "lab-dd": "lab-dd.json",
    "demo-dd": "demo-dd.json",
}


def write_result(
    result: dict[str, Any],
    path: Path,
    plot: Callable[[dict[str, Any], Path], None],
    tables: Callable[[dict[str, Any]], str],
) -> None:
    """An experiment's result file, its plot beside it (.png), and its docs tables printed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"wrote {path}")
    plot(result, path.with_suffix(".png"))
    print(tables(result))


def provenance(experiment: str) -> dict[str, Any]:
    """What every result file records: the experiment, its command, when it was collected,
    the commit and the machine."""
    # Here, not at the top: losses imports torch, and a script that imports lmdistill after it
    # would run torch with OpenMP's busy wait (generation many times slower; lmdistill/__init__).
    from losses import code_info, machine_info

    return {
        "experiment": experiment,
        "command": COMMANDS[experiment],
        "collected": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "code": code_info(),
        "machine": machine_info(),
    }


def collect_demo(run: Path) -> dict[str, Any]:
    metrics_path = run / "metrics.json"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{metrics_path}: not found; run `make demo` first")
    metrics = json.loads(metrics_path.read_text())
    metrics.pop("samples", None)  # side-by-side texts: in report.md, not figures
    return {
        **provenance("demo"),
        "metrics": metrics,
    }


def collect_protocol(experiment: str, out: Path) -> dict[str, Any]:
    """A data-efficiency protocol's protocol.json (its table, decomposition, verdicts and
    every arm's record), as docs/dataset-distillation.md quotes it."""
    path = out / "protocol.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; run `{COMMANDS[experiment]}` first")
    return {
        # The commit when collected: a protocol resumes, so its arms may have run at earlier
        # commits (each arm's metrics.json records the lmdistill version it ran with).
        **provenance(experiment),
        "protocol": json.loads(path.read_text()),
    }


def collect(experiment: str, lab: Path) -> dict[str, Any]:
    sweep_path = lab / experiment / "sweep.json"
    teacher_path = lab / "teacher" / "metrics.json"
    for path in (sweep_path, teacher_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found; run `{COMMANDS[experiment]}` first")
    teacher = json.loads(teacher_path.read_text())
    return {
        **provenance(experiment),
        "teacher": {
            "tasks": teacher["kd"]["after"]["tasks"],
            "wall_seconds": teacher["wall_seconds"],
        },
        "sweep": (sweep := json.loads(sweep_path.read_text())),
        "share_of_teacher": share_of_teacher(sweep["table"]),
        "rationale_checks": rationale_checks(lab / experiment),
    }


def share_of_teacher(table: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per cell, each student's mean exact match as a share of the teacher's on that set."""
    shares: dict[str, dict[str, float]] = {}
    for entry in table:
        for key, value in entry.items():
            if " exact match " not in key or key.startswith("teacher "):
                continue
            task = key.split(" exact match ")[-1]
            teacher = entry.get(f"teacher exact match {task}")
            if isinstance(value, dict) and isinstance(teacher, dict) and teacher["mean"]:
                shares.setdefault(entry["cell"], {})[key] = value["mean"] / teacher["mean"]
    return shares


def rationale_checks(root: Path) -> list[dict[str, Any]]:
    """Per run, what the sweep's table leaves out of the rationale checks: how many
    annotations a student writes per answer and the share the checker could read (an
    unreadable one counts as wrong in `annotation_accuracy`)."""
    rows = []
    for path in sorted(root.glob("*/seed-*/metrics.json")):
        metrics = json.loads(path.read_text())
        tasks = ((metrics.get("kd") or {}).get("after") or {}).get("tasks") or {}
        rows.append(
            {
                "cell": path.parent.parent.name,
                "seed": int(path.parent.name.removeprefix("seed-")),
                "tasks": {
                    source: {
                        key: task[key]
                        for key in (
                            "exact_match",
                            "annotations_per_answer",
                            "annotation_accuracy",
                            "annotations_readable",
                        )
                        if key in task
                    }
                    for source, task in tasks.items()
                },
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", choices=sorted(COMMANDS))
    parser.add_argument("--lab", type=Path, default=ROOT / "outputs" / "lab")
    parser.add_argument("--demo", type=Path, default=ROOT / "lmdistill-demo")
    parser.add_argument("--demo-dd", type=Path, default=ROOT / "outputs" / "dd" / "protocol-demo")
    parser.add_argument("--trial", help="demo-trial: its name (docs/results/demo-trial-NAME)")
    parser.add_argument("--trial-command", help="demo-trial: the command that ran it")
    args = parser.parse_args(argv)
    try:
        if args.experiment == "demo-trial":  # a variant of the demo, run from --demo
            if not args.trial or not args.trial_command:
                raise ValueError("demo-trial needs --trial NAME and --trial-command COMMAND")
            result = {**collect_demo(args.demo), "experiment": f"demo-trial-{args.trial}",
                      "command": args.trial_command}  # fmt: skip
            OUTPUTS["demo-trial"] = f"demo-trial-{args.trial}.json"
        elif args.experiment == "demo":
            result = collect_demo(args.demo)
        elif args.experiment == "lab-dd":
            result = collect_protocol(args.experiment, args.lab / "dd")
        elif args.experiment == "demo-dd":
            result = collect_protocol(args.experiment, args.demo_dd)
        else:
            result = collect(args.experiment, args.lab)
    except (OSError, ValueError, KeyError) as error:
        print(f"lab_results: {error}", file=sys.stderr)
        return 2
    out = ROOT / "docs" / "results" / OUTPUTS[args.experiment]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    tmp.replace(out)
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
