"""Teacher-signal cache: bytes per token and reconstruction error, ours vs int32 + bf16.

Runs the real SmolLM2-135M-Instruct teacher over GSM8K answers (the builtin prompt set), and
for k in {8, 32, 64} stores each response token's top-k log-probs two ways:

- lmdistill: uint16 ids, fp16 top-1, uint8 codes of sqrt(top - logprob),
             fp16 tail mass                                               (3k + 3 bytes)
- reference: int32 ids + bf16 log-probs                                   (6k bytes)

Reconstruction error is KL(exact || stored) over the k + 1 buckets the training loss sees
(the k ids and the tail that holds the rest of the mass), per token, averaged.

    python benchmarks/teacher_cache.py [--examples 24] [--out benchmarks/results/teacher_cache.json]

Then training throughput for the demo's student (6 of SmolLM2's 30 layers, forward KL,
batch 8): response tokens/s with the live in-process teacher vs from a k = 32 cache written
once beforehand (its one-time cost is reported too), same student init, same batches.

    python benchmarks/teacher_cache.py --train-steps 12 --train-examples 96
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from losses import code_info, machine_info

import lmdistill  # noqa: F401  (threading defaults before torch loads)
from lmdistill.config import LossConfig, ModelConfig, StudentConfig, TrainConfig
from lmdistill.data import collate, load_examples, tokenize_examples
from lmdistill.kd.train import train_student
from lmdistill.models import build_student, load_model
from lmdistill.models.forward import response_hidden
from lmdistill.teachers.base import CachedTeacher, LocalTeacher
from lmdistill.teachers.cache import (
    CacheSpec,
    TeacherCache,
    bytes_per_token,
    dequantize,
    quantize,
    tokenizer_identity,
    write_cache,
)

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


def training_throughput(examples: int, steps: int, k: int = 32) -> dict[str, float]:
    """Response tokens/s of the demo student's KD steps: live teacher vs cache."""
    import copy
    import tempfile

    teacher, tokenizer = load_model(ModelConfig(path="smollm2-135m-instruct"))
    rows = load_examples("builtin:gsm8k-demo")[:examples]
    items, _ = tokenize_examples(rows, tokenizer, max_length=256)
    torch.manual_seed(0)
    student, _ = build_student(StudentConfig(num_layers=6), teacher, tokenizer)
    train = TrainConfig(
        max_steps=steps, batch_size=8, lr=1e-3, warmup_steps=2, checkpoint_every=0, device="cpu"
    )
    common = dict(
        train=train,
        loss=LossConfig(divergence="forward_kl"),
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        config_hash="bench",
    )
    with tempfile.TemporaryDirectory() as tmp:
        spec = CacheSpec(
            teacher="smollm2",
            data_hash="bench",
            k=k,
            temperature=1.0,
            vocab_size=len(tokenizer),
            **tokenizer_identity(tokenizer),
        )
        started = time.perf_counter()
        write_cache(teacher, items, Path(tmp) / "c", spec, pad_token_id=tokenizer.pad_token_id)
        cache_seconds = time.perf_counter() - started
        cached = CachedTeacher(TeacherCache(Path(tmp) / "c", spec))
        live_student = copy.deepcopy(student)
        live = train_student(
            live_student,
            LocalTeacher(teacher, tokenizer, "smollm2"),
            items,
            checkpoint_dir=Path(tmp) / "a",
            desc="KD, live teacher",
            **common,  # type: ignore[arg-type]
        )
        from_cache = train_student(
            student,
            cached,
            items,
            checkpoint_dir=Path(tmp) / "b",
            desc="KD, from cache",
            **common,  # type: ignore[arg-type]
        )
    cache_tokens = sum(1 for item in items for y in item.labels[1:] if y != -100)
    return {
        "examples": len(items),
        "steps": steps,
        "k": k,
        "live_tokens_per_s": live.tokens_per_second,
        "cache_tokens_per_s": from_cache.tokens_per_second,
        "speedup": from_cache.tokens_per_second / live.tokens_per_second,
        "cache_write_seconds": cache_seconds,
        "cache_write_tokens_per_s": cache_tokens / cache_seconds,
        "final_loss_live": live.state.history[-1]["loss"],
        "final_loss_cache": from_cache.state.history[-1]["loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", type=int, default=24)
    parser.add_argument("--ks", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--train-steps", type=int, default=12, help="0 skips the training part")
    parser.add_argument("--train-examples", type=int, default=96)
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
        "command": " ".join(["python", *sys.argv]),
        "code": code_info(),
        "machine": machine_info(),
        "teacher": "smollm2-135m-instruct",
        "tokens": int(full.shape[0]),
        "vocab": vocab,
        "seconds": time.perf_counter() - started,
        "rows": rows,
    }
    if args.train_steps:
        result["training"] = training_throughput(args.train_examples, args.train_steps)
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
    if "training" in result:
        t = result["training"]
        print(
            f"training (demo student, {t['steps']} steps): live teacher "
            f"{t['live_tokens_per_s']:.0f} tok/s, from cache {t['cache_tokens_per_s']:.0f} tok/s "
            f"({t['speedup']:.2f}x); writing the cache once: {t['cache_write_seconds']:.1f} s"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
