"""Collect a finished reasoning-lab experiment into a committed result file.

    make lab-e1     # runs the sweep, then: python benchmarks/lab_results.py e1

The sweep's own files stay in git-ignored outputs/lab/; this copies its summary (every run's
headline numbers and the mean/std table), the lab teacher's task metrics, the commit, the
command and the machine into benchmarks/results/lab-E.json, which the README's tables cite.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any

from losses import code_info, machine_info

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = {"e1": "make lab-e1", "e2": "make lab-e2"}


def collect(experiment: str, lab: Path) -> dict[str, Any]:
    sweep_path = lab / experiment / "sweep.json"
    teacher_path = lab / "teacher" / "metrics.json"
    for path in (sweep_path, teacher_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found; run `{COMMANDS[experiment]}` first")
    teacher = json.loads(teacher_path.read_text())
    return {
        "experiment": experiment,
        "command": COMMANDS[experiment],
        "collected": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "code": code_info(),
        "machine": machine_info(),
        "teacher": {
            "tasks": teacher["kd"]["after"]["tasks"],
            "wall_seconds": teacher["wall_seconds"],
        },
        "sweep": json.loads(sweep_path.read_text()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", choices=sorted(COMMANDS))
    parser.add_argument("--lab", type=Path, default=ROOT / "outputs" / "lab")
    args = parser.parse_args(argv)
    try:
        result = collect(args.experiment, args.lab)
    except (OSError, ValueError, KeyError) as error:
        print(f"lab_results: {error}", file=sys.stderr)
        return 2
    out = ROOT / "benchmarks" / "results" / f"lab-{args.experiment}.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    tmp.replace(out)
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
