"""Which teacher layers the demo's student keeps: by importance (block influence on
calibration data, `student.init: layers_by_importance`) against evenly spaced
(`layers_from_teacher`), at the same size; held-out KL to the teacher before training and
after the demo's KD steps.

    python benchmarks/layer_choice.py [--out benchmarks/results/layer_choice.json]

Both runs are the demo (`lmdistill demo` with its config) without the CE-only baseline,
reading one teacher cache (the first run writes it), one after the other on this machine.
Any overrides after the options apply to both (the demo's size and steps, e.g.
student.num_layers=15). Writes the result with the commit, the command and the machine.
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
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "layer_choice.json"
INITS = {"evenly spaced": "layers_from_teacher", "by importance": "layers_by_importance"}


def one(init: str, cache: Path, out: Path, overrides: list[str]) -> dict[str, Any]:
    settings = [f"student.init={init}", f"cache.dir={cache}", "baseline=false", *overrides]
    command = [sys.executable, "-m", "lmdistill", "demo", "--out", str(out), *settings]
    subprocess.run(command, cwd=ROOT, check=True)
    metrics = json.loads((out / "metrics.json").read_text())
    after = metrics["kd"]["after"]
    return {
        "init": init,
        "kept_layers": metrics["models"].get("student_layer_map"),
        "layer_scores": metrics["models"].get("layer_scores"),
        "kl_before": metrics["before"]["kl"],
        "agreement_before": metrics["before"]["top1_agreement"],
        "kl_after": after["kl"],
        "agreement_after": after["top1_agreement"],
        "answers_after": after.get("answers"),
        "steps": metrics["kd"]["steps"],
        "train_seconds": metrics["kd"]["train_seconds"],
    }


def tables(result: dict[str, Any]) -> str:
    lines = [
        "| teacher layers kept | KL before ↓ | KL after ↓ | agreement after ↑ | kept |",
        "|---|---|---|---|---|",
    ]
    for name, arm in result["arms"].items():
        lines.append(
            f"| {name} | {arm['kl_before']:.2f} | {arm['kl_after']:.2f} | "
            f"{arm['agreement_after']:.3f} | {arm['kept_layers']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--tables", action="store_true", help="print the docs' table and stop")
    parser.add_argument("overrides", nargs="*", help="key=value for both runs")
    args = parser.parse_args()
    if args.tables:
        print(tables(json.loads(args.out.read_text())))
        return
    arms = {}
    with tempfile.TemporaryDirectory(prefix="layer-choice-") as tmp:
        for name, init in INITS.items():
            arms[name] = one(init, Path(tmp) / "cache", Path(tmp) / init, args.overrides)
            print(name, arms[name]["kl_before"], arms[name]["kl_after"], flush=True)
    sys.path.insert(0, str(Path(__file__).parent))
    from losses import run_header

    result = {
        **run_header("layer-choice", "benchmarks/layer_choice.py"),
        "overrides": args.overrides,
        "arms": arms,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"wrote {args.out}")
    print(tables(result))


if __name__ == "__main__":
    main()
