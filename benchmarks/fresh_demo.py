"""`make demo` from a fresh clone, timed from `git clone` to the report, set-up included.

    python benchmarks/fresh_demo.py [--out docs/results/demo.json]

Clones this repository's HEAD into a temporary directory, runs `make demo` there (it creates
the clone's own .venv, installs lmdistill and fetches the teacher, then runs `lmdistill
demo`), and writes the demo's figures (as `make demo-results` collects them) with the wall
time of the whole `make demo` and of its set-up (everything before `lmdistill demo`
started) into the result file the README quotes. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "docs" / "results" / "demo.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    with tempfile.TemporaryDirectory(prefix="fresh-demo-") as tmp:
        clone = Path(tmp) / "lmdistill"
        subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
        started = time.perf_counter()
        subprocess.run(["make", "demo"], cwd=clone, env=env, check=True)
        seconds = time.perf_counter() - started
        subprocess.run(
            [str(clone / ".venv" / "bin" / "python"), "benchmarks/lab_results.py", "demo"],
            cwd=clone,
            env=env,
            check=True,
        )
        result = json.loads((clone / "docs" / "results" / "demo.json").read_text())
    run_seconds = result["metrics"]["wall_seconds"]
    result["command"] = "python " + shlex.join(["benchmarks/fresh_demo.py", *sys.argv[1:]])
    result["fresh_clone"] = {
        "make_demo_seconds": seconds,
        "setup_seconds": seconds - run_seconds,
        "note": "git clone, then `make demo` (venv, install, teacher fetch, lmdistill demo)",
    }
    args.out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"wrote {args.out}: make demo took {seconds / 60:.1f} min from a fresh clone")


if __name__ == "__main__":
    main()
