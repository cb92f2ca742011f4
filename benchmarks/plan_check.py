"""`lmdistill plan` against measured runs: predicted and measured time per step, training
time, teacher generation time and peak memory, for three sizes of run.

    python benchmarks/plan_check.py [--out benchmarks/results/plan.json]

Cases: configs/tiny.yaml (random tiny models), the fairness lab's student
(configs/lab/fair.yaml at 60 steps: needs `make outputs/lab/fair-teacher/student/config.json`)
and the demo (configs/demo.yaml, SmolLM2-135M-Instruct). For each, `lmdistill plan` runs in
its own process, then `lmdistill run` with the same config in another (so each peak
resident memory is its own), one after the other on a quiet machine; `--measured-demo DIR`
compares the demo's plan with a finished `make demo` run (its directory, or the result file
benchmarks/fresh_demo.py writes) instead of running it again.
Measured time per step is the run's, computed as the plan computes it (the steps after the
first); the ratio is predicted / measured. Writes the result with the commit, the command
and the machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "plan.json"
LMDISTILL = [sys.executable, "-m", "lmdistill"]
CASES = {
    "tiny": ("configs/tiny.yaml", []),
    "lab student": ("configs/lab/fair.yaml", ["train.max_steps=60", "eval.enabled=false"]),
    "demo": ("configs/demo.yaml", []),
}
TARGET = 0.25  # within 25%


def seconds_per_step(history: list[dict[str, Any]], steps: int, seconds: float) -> float:
    """As lmdistill/plan.py: the mean of the steps after the first logged one."""
    records = [r for r in history if r.get("tokens_per_s")]
    if len(records) < 2:
        return seconds / max(steps, 1)
    first, last = records[0], records[-1]
    elapsed = last["tokens"] / last["tokens_per_s"] - first["tokens"] / first["tokens_per_s"]
    return float(elapsed / (last["step"] - first["step"]))


def one_case(
    config: str, overrides: list[str], where: Path, measured_run: Path | None = None
) -> dict[str, Any]:
    """Plan, then run (or read `measured_run`, a finished run of the same config)."""
    predicted_file = where / "plan.json"
    out = measured_run or where / "run"
    common = [config, f"output_dir={where / 'run'}", *overrides]
    subprocess.run([*LMDISTILL, "plan", *common, "--json", str(predicted_file)], cwd=ROOT,
                   check=True)  # fmt: skip
    if measured_run is None:
        subprocess.run([*LMDISTILL, "run", *common], cwd=ROOT, check=True)
    predicted = json.loads(predicted_file.read_text())
    if out.suffix == ".json":  # a result file (docs/results/demo.json): its run's metrics
        metrics = json.loads(out.read_text())["metrics"]
    else:
        metrics = json.loads((out / "metrics.json").read_text())
    kd = metrics["kd"]
    measured = {
        "seconds_per_step": seconds_per_step(kd["history"], kd["steps"], kd["train_seconds"]),
        "train_seconds": kd["train_seconds"]
        + (metrics["baseline"]["train_seconds"] if metrics.get("baseline") else 0.0),
        "generation_seconds": (metrics.get("generate") or {}).get("seconds"),
        "peak_memory_mb": metrics["peak_rss_mb"],
        "wall_seconds": metrics["wall_seconds"],
    }
    guess = {
        "seconds_per_step": predicted["seconds_per_step"],
        "train_seconds": predicted["train_seconds"],
        "generation_seconds": predicted["generation_seconds"],
        "peak_memory_mb": predicted["memory_mb"]["peak"],
    }
    ratios = {
        key: guess[key] / measured[key]
        for key in guess
        if guess[key] is not None and measured.get(key)
    }
    return {
        "config": config,
        "overrides": overrides,
        "predicted": guess,
        "measured": measured,
        "ratio": ratios,
        "within_25_percent": {k: abs(r - 1) <= TARGET for k, r in ratios.items()},
        "plan": predicted,
    }


def tables(result: dict[str, Any]) -> str:
    """The docs' table (docs/plan.md)."""
    lines = [
        "| run | time per step: predicted / measured (ratio) | training s | generation s "
        "| peak memory MB |",
        "|---|---|---|---|---|",
    ]

    def cell(case: dict[str, Any], key: str, digits: int) -> str:
        p, m = case["predicted"][key], case["measured"][key]
        if p is None or m is None:
            return "-"
        return f"{p:.{digits}f} / {m:.{digits}f} ({case['ratio'][key]:.2f})"

    for name, case in result["cases"].items():
        lines.append(
            f"| {name} | {cell(case, 'seconds_per_step', 3)} | {cell(case, 'train_seconds', 1)} "
            f"| {cell(case, 'generation_seconds', 1)} | {cell(case, 'peak_memory_mb', 0)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    parser.add_argument(
        "--measured-demo",
        type=Path,
        help="a finished `make demo` run (lmdistill-demo/, or the result file "
        "docs/results/demo.json) to compare the demo's plan with, instead of running it again",
    )
    parser.add_argument("--tables", action="store_true", help="print the docs' table and stop")
    args = parser.parse_args()
    if args.tables:
        print(tables(json.loads(args.out.read_text())))
        return
    cases = {}
    with tempfile.TemporaryDirectory(prefix="plan-check-") as tmp:
        for name in args.cases:
            config, overrides = CASES[name]
            where = Path(tmp) / name.replace(" ", "-")
            where.mkdir()
            measured = (
                args.measured_demo.resolve() if name == "demo" and args.measured_demo else None
            )
            cases[name] = one_case(config, overrides, where, measured)
            if measured is not None:
                cases[name]["measured_run"] = str(args.measured_demo)
            print(name, json.dumps(cases[name]["ratio"]), flush=True)
    sys.path.insert(0, str(Path(__file__).parent))
    from losses import run_header

    result = {
        **run_header("plan-check", "benchmarks/plan_check.py"),
        "target": f"within {TARGET:.0%} of the measured run",
        "cases": cases,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"wrote {args.out}")
    print(tables(result))


if __name__ == "__main__":
    main()
