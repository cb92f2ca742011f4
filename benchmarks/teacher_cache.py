"""Teacher-signal cache: bytes per token and reconstruction error, ours vs int32 + bf16.

Runs the real SmolLM2-135M-Instruct teacher over GSM8K answers (the builtin prompt set), and
for k in {8, 32, 64} stores each response token's top-k log-probs two ways:

- lmdistill: uint16 ids, fp16 top-1, uint8 codes of sqrt(top - logprob),
             fp16 tail mass                                               (3k + 3 bytes)
- reference: int32 ids + bf16 log-probs                                   (6k bytes)

Reconstruction error is KL(exact || stored) over the k + 1 buckets the training loss sees
(the k ids and the tail that holds the rest of the mass), per token, averaged.

    python benchmarks/teacher_cache.py [--examples 24] [--out benchmarks/results/teacher_cache.json]

Training throughput from the cache vs the live teacher is not measured yet: training from
the cache (`teacher.kind: cache`) is not wired into the loop.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import lmdistill  # noqa: F401  (threading defaults before torch loads)
from lmdistill.config import ModelConfig
from lmdistill.data import collate, load_examples, tokenize_examples
from lmdistill.kd.objective import response_hidden
from lmdistill.models import load_model
from lmdistill.teachers.cache import bytes_per_token, dequantize, quantize

DEFAULT_OUT = Path(__file__).parent / "results" / "teacher_cache.json"


TAIL_FLOOR = 1e-7  # a stored tail that rounding emptied still holds a trace of mass


def bucket_logprobs(logprobs: torch.Tensor, floor: float = 0.0) -> torch.Tensor:
    """(T, k) top-k log-probs -> (T, k + 1) with the tail bucket log(max(1 - sum, floor))."""
    tail = (1 - logprobs.exp().sum(-1)).clamp(min=floor)
    return torch.cat([logprobs, tail.log()[:, None]], dim=1)


def bucket_kl(exact: torch.Tensor, stored: torch.Tensor) -> float:
    """Mean over tokens of KL(exact || stored) on the k + 1 buckets; the stored tail is floored
    at TAIL_FLOOR (both formats alike) and the buckets renormalised."""
    p_log = bucket_logprobs(exact.double()).float()
    q_log = torch.log_softmax(bucket_logprobs(stored.double(), TAIL_FLOOR).float(), dim=-1)
    p = p_log.exp()
    terms = torch.where(p > 0, p * (p_log - q_log), torch.zeros_like(p))
    return float(terms.sum(-1).mean())


@torch.no_grad()
def teacher_logprobs(examples: int) -> torch.Tensor:
    """(T, V) exact teacher log-probs at every response position of `examples` examples."""
    teacher, tokenizer = load_model(ModelConfig(path="smollm2-135m-instruct"))
    rows = load_examples("builtin:gsm8k-demo")[:examples]
    items, _ = tokenize_examples(rows, tokenizer, max_length=320)
    weight = teacher.get_output_embeddings().weight
    parts = []
    for lo in range(0, len(items), 4):
        states, _ = response_hidden(teacher, **collate(items[lo : lo + 4], tokenizer.pad_token_id))
        parts.append(torch.log_softmax((states @ weight.T).float(), dim=-1))
    return torch.cat(parts)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", type=int, default=24)
    parser.add_argument("--ks", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    started = time.perf_counter()
    full = teacher_logprobs(args.examples)  # (T, V)
    vocab = full.shape[1]
    rows = []
    for k in args.ks:
        exact = full.topk(k, dim=-1).values  # (T, k), sorted descending
        ours = dequantize(*quantize(exact))
        reference = exact.to(torch.bfloat16).float()
        rows.append(
            {
                "k": k,
                "bytes_per_token": bytes_per_token(k, vocab),
                "reference_bytes_per_token": 6 * k,
                "kl_ours": bucket_kl(exact, ours),
                "kl_int32_bf16": bucket_kl(exact, reference),
                "tail_mass_mean": float(1 - exact.exp().sum(-1).mean()),
            }
        )
    result = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "teacher": "smollm2-135m-instruct",
        "tokens": int(full.shape[0]),
        "vocab": vocab,
        "seconds": time.perf_counter() - started,
        "rows": rows,
    }
    print(f"{full.shape[0]} response tokens, V = {vocab}")
    print(
        f"{'k':>4} {'bytes/tok':>10} {'ref bytes':>10} {'KL ours':>10} {'KL int32+bf16':>14}"
        f" {'tail mass':>10}"
    )
    for r in rows:
        print(
            f"{r['k']:>4} {r['bytes_per_token']:>10} {r['reference_bytes_per_token']:>10} "
            f"{r['kl_ours']:>10.2e} {r['kl_int32_bf16']:>14.2e} {r['tail_mass_mean']:>10.4f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
