"""LESS gradient features at 10,000 examples: peak memory, throughput, and resume.

Each measurement runs in a fresh subprocess, so its peak RSS (`ru_maxrss`) is its own:
- `streamed N`: `lmdistill.dd.gradients.gradient_features` over N lab examples (rows written
  to disk as each batch finishes), for N = 1,000 and 10,000: the peak should not grow with N;
- `naive N`: the same per-example LoRA gradients, kept in memory unprojected and projected at
  the end with a dense Gaussian matrix (what a script that collects gradients then projects
  does): its peak grows with N (run at 1,000, extrapolated to 10,000 when it would not fit);
- `resume`: the 10,000-example run is stopped after half its batches (as a kill would leave
  it) and started again; rows from before and after the stop must equal an uninterrupted
  run's on the same examples.

    .venv/bin/python benchmarks/dd_gradient_features.py            # ~10 min on 2 CPU cores
    .venv/bin/python benchmarks/dd_gradient_features.py --quick    # N = 200 / 1,000

Writes benchmarks/results/dd_gradient_features.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = {"layers": 3, "hidden": 128}  # the lab student's shape (0.6 M parameters)
# SmolLM2-135M with rank-8 LoRA on q_proj and v_proj: 30 layers x (576 + 192) x 8 rows of B.
SMOLLM2_LORA_ROWS = 30 * (576 + 192) * 8
LORA = {"modules": ["q_proj", "v_proj"], "rank": 8, "dim": 2048, "batch_size": 16}


def worker(
    kind: str, n: int, directory: str, stop_after: int | None, rows: list[int] | None = None
) -> dict:
    import numpy as np
    import torch

    from lmdistill.data import collate, tokenize_examples
    from lmdistill.data.lab import LabSpec, lab_examples
    from lmdistill.dd import gradients
    from lmdistill.models.tiny import build_tiny_llama, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_llama(len(tokenizer), MODEL["layers"], MODEL["hidden"], seed=0).eval()
    spec = LabSpec(steps=3, min_steps=1, start_max=9, operand_max=5, value_max=30)
    items, _ = tokenize_examples(lab_examples("train", n, spec=spec), tokenizer, 400)
    if rows is not None:  # only these examples (to check rows of a longer run)
        items = [items[i] for i in rows]
        n = len(items)
    pad = tokenizer.pad_token_id
    started = time.perf_counter()
    if kind == "streamed":
        features = gradients.gradient_features(
            model,
            items,
            pad,
            directory=Path(directory),
            identity={"benchmark": n},
            modules=LORA["modules"],
            rank=LORA["rank"],
            dim=LORA["dim"],
            batch_size=LORA["batch_size"],
            stop_after=stop_after,
        )
        digest = None
        if features is not None:  # read back in chunks: the check must not hold them all
            hasher = hashlib.sha256()
            for start in range(0, len(features), 1024):
                hasher.update(np.ascontiguousarray(features[start : start + 1024]).tobytes())
            digest = hasher.hexdigest()[:16]

    else:  # naive: every full LoRA gradient in memory, then one dense projection
        wrapped, adapters = gradients.add_lora(model, LORA["modules"], LORA["rank"], 16.0, 0)
        rows = []
        for start in range(0, n, LORA["batch_size"]):
            batch = collate(items[start : start + LORA["batch_size"]], pad)
            rows.append(gradients.per_example_grads(wrapped, adapters, batch))
            for adapter in adapters:
                adapter.lora_b.grad = None
        full = torch.cat(rows)
        matrix = torch.randn(full.shape[1], LORA["dim"]) / LORA["dim"] ** 0.5
        features = (full @ matrix).numpy()
        digest = None
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "kind": kind,
        "n": n,
        "seconds": seconds,
        "peak_rss_mb": peak,
        "digest": digest,
        "examples_per_s": n / seconds,
        "stopped": stop_after,
    }


def run_worker(
    kind: str, n: int, directory: Path, stop_after: int | None = None, rows: str = ""
) -> dict:
    args = [sys.executable, __file__, "--worker", kind, str(n), str(directory)]
    args += [str(stop_after if stop_after is not None else -1), rows]
    result = subprocess.run(args, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    import numpy as np

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    default = Path(__file__).parent / "results" / "dd_gradient_features.json"
    parser.add_argument("--out", default=str(default))
    args = parser.parse_args()
    small, large = (200, 1000) if args.quick else (1000, 10000)
    batches = -(-large // LORA["batch_size"])
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        results.append(run_worker("streamed", small, root / "small"))
        print(json.dumps(results[-1]), flush=True)
        # Stopped after half its batches (as a kill would leave it), then started again.
        stopped = run_worker("streamed", large, root / "large", stop_after=batches // 2)
        results.append({**stopped, "kind": "stopped"})
        results.append({**run_worker("streamed", large, root / "large"), "kind": "resumed"})
        print(json.dumps(results[-1]), flush=True)
        resumed = np.load(root / "large" / "features.npy")
        # Rows from before and after the interruption, computed by an uninterrupted run.
        probe = list(range(0, 64)) + list(range(large - 64, large))
        check = run_worker("streamed", large, root / "check", rows=",".join(map(str, probe)))
        results.append({**check, "kind": "uninterrupted rows"})
        reference = np.load(root / "check" / "features.npy")
        gap = float(np.abs(resumed[probe] - reference).max())
        results.append(run_worker("naive", small, root / "naive"))
        print(json.dumps(results[-1]), flush=True)
    # Rates over the examples each run computed (the stopped and resumed runs do half each;
    # the uninterrupted check only the probe rows).
    half = min(large, (batches // 2) * LORA["batch_size"])
    computed = {"stopped": half, "resumed": large - half, "uninterrupted rows": len(probe)}
    for r in results:
        r["examples_computed"] = computed.get(r["kind"], r["n"])
        r["examples_per_s"] = r["examples_computed"] / r["seconds"]
    by_kind = {r["kind"]: r for r in results}
    per_example_mb = 4 * _lora_rows() / 2**20
    summary = {
        "streamed_peak_mb": {small: by_kind["streamed"]["peak_rss_mb"]},
        "resumed_peak_mb_at_large": by_kind["resumed"]["peak_rss_mb"],
        "stopped_peak_mb_at_large": results[1]["peak_rss_mb"],
        "peak_growth_small_to_large": by_kind["resumed"]["peak_rss_mb"]
        / by_kind["streamed"]["peak_rss_mb"],
        "naive_peak_mb_at_small": by_kind["naive"]["peak_rss_mb"],
        "naive_gradients_mb_at_large": per_example_mb * large,
        "naive_gradients_mb_at_large_smollm2": 4 * SMOLLM2_LORA_ROWS * large / 2**20,
        "resumed_rows_max_abs_diff": gap,
        "resume_equals_uninterrupted": gap < 1e-5,
        "examples_per_s": {r["kind"]: r["examples_per_s"] for r in results},
    }
    from losses import code_info, machine_info

    out = {
        "command": " ".join(["python", *sys.argv]),
        "code": code_info(),
        "machine": machine_info(),
        "model": MODEL,
        "lora": LORA,
        "results": results,
        "summary": summary,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


def _lora_rows() -> int:
    # q_proj (hidden x hidden) and v_proj (kv_dim x hidden) per layer: B is (out x rank).
    from lmdistill.dd.gradients import lora_rows
    from lmdistill.models.tiny import build_tiny_llama, build_tiny_tokenizer

    model = build_tiny_llama(len(build_tiny_tokenizer()), MODEL["layers"], MODEL["hidden"], 0)
    return lora_rows(model, LORA["modules"], LORA["rank"])


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        kind, n, directory = sys.argv[2], int(sys.argv[3]), sys.argv[4]
        stop = int(sys.argv[5]) if int(sys.argv[5]) >= 0 else None
        rows = [int(i) for i in sys.argv[6].split(",")] if sys.argv[6] else None
        print(json.dumps(worker(kind, n, directory, stop, rows)))
    else:
        main()
