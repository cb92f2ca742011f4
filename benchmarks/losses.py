"""Benchmark the distillation loss head: peak memory and time of forward + backward.

Shape: SmolLM2-135M's head, vocabulary V = 49,152, hidden H = 576, fp32, N tokens.
Variants, each from (h_s, W_s, h_t, W_t) to a scalar loss, then ``.backward()`` to h_s and W_s:

- ``naive``: full (N, V) student logits, teacher logits under no_grad, log_softmax on both,
  ``F.kl_div(..., log_target=True, reduction="sum")`` = forward KL(teacher || student).
- ``trl-dense``: TRL's ``GKDTrainer.generalized_jsd_loss`` (beta 0.5, reduction "sum") on the
  full logits, or, when ``trl`` is not installed, a verbatim copy of its dense computation.
- ``fused``: ``lmdistill.losses.fused_kd_loss`` (alpha 0) for forward_kl and generalized_jsd,
  at the default ``LossConfig().chunk_size`` and other chunk sizes.

Each (variant, N) runs in a fresh subprocess (``--worker``): it builds the inputs, records
the RSS baseline, resets the kernel's high-water mark, runs one warm-up and ``--repeats``
timed fwd + bwd, and reports the peak RSS over the baseline (memory the loss head needed
beyond its inputs, its gradients included) and the median time. The parent checks the fused
losses and gradients against the dense ones of the same divergence, prints a table with
ratios, and writes everything to JSON.

    .venv/bin/python benchmarks/losses.py                      # N = 2048 and 8192, ~15 min
    .venv/bin/python benchmarks/losses.py --quick              # smoke test, seconds
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import importlib
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

VOCAB = 49_152  # SmolLM2-135M
HIDDEN = 576
SEED = 0
JSD_BETA = 0.5
MIB = 2**20
DEFAULT_OUT = Path(__file__).parent / "results" / "losses.json"
TARGET_MEM_RATIO = 0.25  # the targets, at the largest N
TARGET_TIME_RATIO = 1.1
CHECK_RTOL = 1e-4  # relative error allowed between fused and dense losses / gradients
MEM_HEADROOM = 0.8  # skip a run whose extrapolated peak exceeds this share of free RAM


# ------------------------------------------------------------------------------- variants


@dataclass(frozen=True)
class Variant:
    """One loss-head implementation: ``kind`` in {naive, trl-dense, fused}."""

    kind: str
    divergence: str  # forward_kl | generalized_jsd
    chunk_size: int | None = None  # fused only

    @property
    def name(self) -> str:
        chunk = f" c={self.chunk_size}" if self.chunk_size is not None else ""
        return f"{self.kind} {self.divergence}{chunk}"

    @property
    def is_dense(self) -> bool:
        return self.kind != "fused"


DENSE = {
    "forward_kl": Variant("naive", "forward_kl"),
    "generalized_jsd": Variant("trl-dense", "generalized_jsd"),
}


def default_chunk_size() -> int:
    from lmdistill.config import LossConfig

    return LossConfig().chunk_size


# The divergences' parameters in the fused runs (generalized JSD as TRL's default beta).
PARAMS: dict[str, dict[str, float]] = {
    "generalized_jsd": {"beta": JSD_BETA},
    "skew_forward_kl": {"alpha": 0.1},
    "skew_reverse_kl": {"alpha": 0.1},
}
DIVERGENCES = [
    "forward_kl",
    "reverse_kl",
    "generalized_jsd",
    "skew_forward_kl",
    "skew_reverse_kl",
    "tvd",
]


def make_variants(chunk_sizes: list[int], divergences: list[str] | None = None) -> list[Variant]:
    chosen = divergences or list(DENSE)
    fused = [Variant("fused", d, c) for d in chosen for c in chunk_sizes]
    return [*DENSE.values(), *fused]


# ------------------------------------------------------------------------------- inputs


@dataclass
class Inputs:
    h_s: Tensor  # (N, H), requires grad
    w_s: Tensor  # (V, H), requires grad
    h_t: Tensor  # (N, H)
    w_t: Tensor  # (V, H)
    targets: Tensor  # (N,) long; unused at alpha = 0 but part of the API


def make_inputs(n: int) -> Inputs:
    """Deterministic inputs; logits have std ~2 (teacher ~3). In-place scaling: no temporaries."""
    g = torch.Generator().manual_seed(SEED)
    h_s = torch.randn(n, HIDDEN, generator=g)
    h_t = torch.randn(n, HIDDEN, generator=g)
    w_s = torch.randn(VOCAB, HIDDEN, generator=g).mul_(2.0 / HIDDEN**0.5)
    w_t = torch.randn(VOCAB, HIDDEN, generator=g).mul_(3.0 / HIDDEN**0.5)
    targets = torch.randint(0, VOCAB, (n,), generator=g)
    return Inputs(h_s.requires_grad_(), w_s.requires_grad_(), h_t, w_t, targets)


# ------------------------------------------------------------------------------- loss heads

LossHead = Callable[[Inputs], Tensor]


def naive_forward_kl(x: Inputs) -> Tensor:
    log_q = F.log_softmax(x.h_s @ x.w_s.T, dim=-1)  # (N, V) student, with grad
    with torch.no_grad():
        log_p = F.log_softmax(x.h_t @ x.w_t.T, dim=-1)  # (N, V) teacher
    return F.kl_div(log_q, log_p, reduction="sum", log_target=True)


def inline_trl_generalized_jsd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
) -> Tensor:
    """Copy of TRL's ``GKDTrainer.generalized_jsd_loss`` (trl/experimental/gkd/gkd_trainer.py)."""
    student_logits = student_logits / temperature
    teacher_logits = teacher_logits / temperature
    student_log_probs = F.log_softmax(student_logits, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits, dim=-1)
    if beta == 0:
        jsd = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
    else:
        beta_t = torch.tensor(beta, dtype=student_log_probs.dtype, device=student_log_probs.device)
        mixture_log_probs = torch.logsumexp(
            torch.stack(
                [student_log_probs + torch.log1p(-beta_t), teacher_log_probs + torch.log(beta_t)]
            ),
            dim=0,
        )
        kl_teacher = F.kl_div(
            mixture_log_probs, teacher_log_probs, reduction="none", log_target=True
        )
        kl_student = F.kl_div(
            mixture_log_probs, student_log_probs, reduction="none", log_target=True
        )
        jsd = beta_t * kl_teacher + (1 - beta_t) * kl_student
    mask = None
    if labels is not None:
        mask = labels != -100
        jsd = jsd[mask]
    if reduction == "batchmean":
        return jsd.sum() / mask.sum() if mask is not None else jsd.sum() / jsd.size(0)
    if reduction == "sum":
        return jsd.sum()
    if reduction == "mean":
        return jsd.mean()
    return jsd


def load_trl_jsd() -> tuple[Callable[..., Tensor], str]:
    """TRL's own ``generalized_jsd_loss`` if importable, else the inline copy; plus its source."""
    for module in ("trl.experimental.gkd", "trl.experimental.gkd.gkd_trainer", "trl"):
        try:
            trainer = importlib.import_module(module).GKDTrainer
            version = importlib.import_module("trl").__version__
        except Exception:  # not installed, moved, or broken: try the next location
            continue
        return trainer.generalized_jsd_loss, f"trl {version}: {module}.GKDTrainer"
    return inline_trl_generalized_jsd_loss, "inline copy (trl not importable)"


def make_loss_head(variant: Variant) -> tuple[LossHead, str]:
    """The loss head of ``variant`` and where its code comes from."""
    if variant.kind == "naive":
        return naive_forward_kl, "benchmarks/losses.py naive_forward_kl"
    if variant.kind == "trl-dense":
        jsd, source = load_trl_jsd()

        def trl_dense(x: Inputs) -> Tensor:
            student_logits = x.h_s @ x.w_s.T
            with torch.no_grad():
                teacher_logits = x.h_t @ x.w_t.T
            return jsd(student_logits, teacher_logits, beta=JSD_BETA, reduction="sum")

        return trl_dense, source
    from lmdistill.losses import fused_kd_loss

    params = PARAMS.get(variant.divergence, {})

    def fused(x: Inputs) -> Tensor:
        loss, _ = fused_kd_loss(
            x.h_s,
            x.w_s,
            x.targets,
            teacher_hidden=x.h_t,
            teacher_weight=x.w_t,
            vocab_size=VOCAB,
            divergence=variant.divergence,
            alpha=0.0,
            chunk_size=variant.chunk_size or default_chunk_size(),
            divergence_params=params,
        )
        return loss

    return fused, "lmdistill.losses.fused_kd_loss"


# ------------------------------------------------------------------------------- memory probes


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def rss_mib() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / MIB
    except ImportError:
        return _proc_status_kib("VmRSS") / 1024


def hwm_mib() -> float:
    return _proc_status_kib("VmHWM") / 1024


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def available_mib() -> float:
    """RAM available to a new process (MemAvailable)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    raise KeyError("MemAvailable")


def cap_data_segment() -> None:
    """Make an allocation beyond free RAM fail with an error here, not wake the OOM killer."""
    limit = (_proc_status_kib("VmData") / 1024 + 0.9 * available_mib()) * MIB
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard == resource.RLIM_INFINITY or limit < hard:
        resource.setrlimit(resource.RLIMIT_DATA, (int(limit), hard))


def reset_hwm() -> bool:
    """Reset VmHWM (and ru_maxrss) to the current RSS (Linux >= 4.0); False if unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


# ------------------------------------------------------------------------------- worker


def run_worker(variant: Variant, n: int, repeats: int, result: Path, dump: Path | None) -> None:
    """Measure one (variant, N) in this (fresh) process; write a JSON dict to ``result``."""
    head, source = make_loss_head(variant)
    x = make_inputs(n)
    cap_data_segment()
    gc.collect()
    baseline = rss_mib()
    hwm_reset = reset_hwm()
    load_start = os.getloadavg()[0]
    times, cpu_times, losses, hwm_samples = [], [], [], []
    for _ in range(1 + repeats):  # the first one is the warm-up
        x.h_s.grad = x.w_s.grad = None
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = head(x)
        loss.backward()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        hwm_samples.append(hwm_mib())
        losses.append(loss.item())
    peak_hwm, peak_maxrss = hwm_mib(), maxrss_mib()
    record = {
        "variant": variant.name,
        **asdict(variant),
        "n": n,
        "source": source,
        "loss_code_sha256_12": loss_code_digest(),
        "baseline_rss_mib": baseline,
        "hwm_reset": hwm_reset,
        "peak_hwm_mib": peak_hwm,
        "peak_maxrss_mib": peak_maxrss,
        # conservative: the larger of the two kernel high-water marks
        "peak_delta_mib": max(peak_hwm, peak_maxrss) - baseline,
        "hwm_delta_per_run_mib": [h - baseline for h in hwm_samples],
        "warmup_s": times[0],
        "times_s": times[1:],
        "median_s": statistics.median(times[1:]),
        # CPU seconds of this process (all threads): less swayed by other processes than wall
        # time, though a thread waiting at a barrier for a descheduled one still spins
        "cpu_times_s": cpu_times[1:],
        "median_cpu_s": statistics.median(cpu_times[1:]),
        "loss": losses[-1],
        "loadavg_1min": [load_start, os.getloadavg()[0]],  # other processes skew times
        "losses": losses,
    }
    if dump is not None:
        assert x.h_s.grad is not None and x.w_s.grad is not None
        torch.save({"loss": loss.detach(), "grad_h": x.h_s.grad, "grad_w": x.w_s.grad}, dump)
    result.write_text(json.dumps(record))


# ------------------------------------------------------------------------------- parent


def spawn_worker(variant: Variant, n: int, repeats: int, tmp: Path) -> dict[str, Any]:
    tag = f"{variant.kind}-{variant.divergence}-{variant.chunk_size}-{n}"
    result, dump = tmp / f"{tag}.json", tmp / f"{tag}.pt"
    cmd = [sys.executable, __file__, "--worker", variant.kind, variant.divergence]
    cmd += [str(variant.chunk_size or 0), str(n), "--repeats", str(repeats)]
    cmd += ["--result", str(result), "--dump", str(dump)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        error = proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        return {"variant": variant.name, **asdict(variant), "n": n, "error": error[0]}
    record: dict[str, Any] = json.loads(result.read_text())
    record["dump"] = str(dump)
    return record


def measured(record: dict[str, Any]) -> bool:
    return "median_s" in record


def extrapolated_peak_mib(records: list[dict[str, Any]], variant: Variant, n: int) -> float | None:
    """Peak of ``variant`` at N = n, scaled linearly from its largest smaller-N measurement."""
    smaller = [r for r in records if r["variant"] == variant.name and measured(r) and r["n"] < n]
    if not smaller:
        return None
    ref = max(smaller, key=lambda r: r["n"])
    return float(ref["peak_delta_mib"] * n / ref["n"])


def measure_or_skip(
    records: list[dict[str, Any]], variant: Variant, n: int, repeats: int, tmp: Path
) -> dict[str, Any]:
    """Run the worker, unless the extrapolated peak would not fit in the free RAM."""
    estimate, free = extrapolated_peak_mib(records, variant, n), available_mib()
    if estimate is not None and estimate > MEM_HEADROOM * free:
        return {
            "variant": variant.name,
            **asdict(variant),
            "n": n,
            "skipped": f"extrapolated peak {estimate / 1024:.1f} GiB > "
            f"{MEM_HEADROOM:.0%} of {free / 1024:.1f} GiB free RAM",
            "estimated_peak_delta_mib": estimate,
        }
    return spawn_worker(variant, n, repeats, tmp)


def rel_err(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def check_against_dense(record: dict[str, Any], dense: dict[str, Any]) -> dict[str, float]:
    """Relative errors of a fused run's loss and gradients against the dense run."""
    got, ref = torch.load(record["dump"]), torch.load(dense["dump"])
    errors = {k: rel_err(got[k], ref[k]) for k in ("loss", "grad_h", "grad_w")}
    return {**errors, "ok": float(max(errors.values()) < CHECK_RTOL)}


def add_ratios(records: list[dict[str, Any]]) -> None:
    """Ratios to naive forward_kl ("naive") and to the dense run of the same divergence."""
    by_key = {(r["kind"], r["divergence"], r["n"]): r for r in records if measured(r)}
    for r in records:
        if not measured(r):
            continue
        naive = by_key.get(("naive", "forward_kl", r["n"]))
        dense_v = DENSE.get(r["divergence"])
        dense = by_key.get((dense_v.kind, dense_v.divergence, r["n"])) if dense_v else None
        for label, ref in (("naive", naive), ("dense", dense)):
            if ref is not None:
                r[f"mem_ratio_{label}"] = r["peak_delta_mib"] / ref["peak_delta_mib"]
                r[f"time_ratio_{label}"] = r["median_s"] / ref["median_s"]
                if "median_cpu_s" in r and "median_cpu_s" in ref:
                    r[f"cpu_ratio_{label}"] = r["median_cpu_s"] / ref["median_cpu_s"]
        if r["kind"] == "fused" and dense is not None:
            r["check_vs_dense"] = check_against_dense(r, dense)


def evaluate_targets(records: list[dict[str, Any]], chunk: int) -> list[dict[str, Any]]:
    """The issue's targets for the fused loss at the default chunk and the largest N.

    Judged against naive forward_kl (the issue's "naive") and, where it differs and was
    measured, against the dense run of the same divergence.
    """
    ok = [r for r in records if measured(r)]
    if not ok:
        return []
    n_max = max(r["n"] for r in ok)
    out = []
    for r in ok:
        if r["kind"] != "fused" or r["chunk_size"] != chunk or r["n"] != n_max:
            continue
        dense_v = DENSE.get(r["divergence"], DENSE["forward_kl"])
        refs = {"naive": DENSE["forward_kl"].name, "dense": dense_v.name}
        for label, ref in refs.items():
            mem, tim = r.get(f"mem_ratio_{label}"), r.get(f"time_ratio_{label}")
            if mem is None or tim is None or (label == "dense" and ref == refs["naive"]):
                continue
            out.append(
                {
                    "variant": r["variant"],
                    "n": n_max,
                    "vs": ref,
                    "mem_ratio": mem,
                    "mem_target": TARGET_MEM_RATIO,
                    "mem_met": mem <= TARGET_MEM_RATIO,
                    "time_ratio": tim,
                    "time_target": TARGET_TIME_RATIO,
                    "time_met": tim <= TARGET_TIME_RATIO,
                    "cpu_ratio": r.get(f"cpu_ratio_{label}"),  # informational
                }
            )
    return out


def loss_code_digest() -> str:
    """Short hash of the lmdistill loss sources this process imports (they change over time)."""
    import lmdistill.losses

    digest = hashlib.sha256()
    for path in sorted(Path(lmdistill.losses.__file__).parent.glob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def code_info() -> dict[str, Any]:
    """Git commit of the repo and whether lmdistill/ has uncommitted changes."""

    def git(*cmd: str) -> str:
        proc = subprocess.run(["git", *cmd], capture_output=True, text=True, check=False)
        return proc.stdout.strip() if proc.returncode == 0 else "unknown"

    root = Path(__file__).resolve().parent.parent
    dirty = git("-C", str(root), "status", "--porcelain", "--", "lmdistill")
    return {
        "git_commit": git("-C", str(root), "rev-parse", "HEAD"),
        "lmdistill_uncommitted": dirty.splitlines() if dirty != "unknown" else dirty,
        "loss_code_sha256_12": loss_code_digest(),
    }


def machine_info() -> dict[str, Any]:
    cpu_model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "total_ram_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
        "loadavg": os.getloadavg(),
    }


# ------------------------------------------------------------------------------- report


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(records: list[dict[str, Any]]) -> None:
    head = f"{'variant':<30}{'N':>6}{'peak MiB':>10}{'mem/naive':>10}{'mem/dense':>10}"
    head += f"{'time s':>8}{'t/naive':>8}{'t/dense':>8}{'cpu/naive':>10}{'load':>6}"
    head += "  check (rel. err loss, dh, dW)"
    print(head)
    print("-" * len(head))
    for r in records:
        if not measured(r):
            why = f"ERROR: {r['error']}" if "error" in r else f"skipped: {r['skipped']}"
            print(f"{r['variant']:<30}{r['n']:>6}  {why}")
            continue
        check = r.get("check_vs_dense")
        check_s = ""
        if check is not None:
            verdict = "ok" if check["ok"] else "MISMATCH"
            errs = ", ".join(f"{check[k]:.1e}" for k in ("loss", "grad_h", "grad_w"))
            check_s = f"{verdict} ({errs})"
        mem = "".join(f"{_fmt(r.get(f'mem_ratio_{k}'), '.3f'):>10}" for k in ("naive", "dense"))
        tim = "".join(f"{_fmt(r.get(f'time_ratio_{k}'), '.2f'):>8}" for k in ("naive", "dense"))
        cpu, load = _fmt(r.get("cpu_ratio_naive"), ".2f"), max(r["loadavg_1min"])
        print(
            f"{r['variant']:<30}{r['n']:>6}{r['peak_delta_mib']:>10.0f}{mem}"
            f"{r['median_s']:>8.2f}{tim}{cpu:>10}{load:>6.1f}  {check_s}"
        )


def print_targets(targets: list[dict[str, Any]]) -> None:
    for t in targets:
        mem = "met" if t["mem_met"] else "MISSED"
        tim = "met" if t["time_met"] else "MISSED"
        print(
            f"target @ N={t['n']}, {t['variant']} vs {t['vs']}: "
            f"memory {t['mem_ratio']:.3f} <= {t['mem_target']} {mem}; "
            f"time {t['time_ratio']:.2f} <= {t['time_target']} {tim}"
        )


# ------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[2048, 8192], help="token counts N")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions after 1 warm-up")
    p.add_argument(
        "--chunk-sizes",
        type=int,
        nargs="+",
        default=None,
        help="fused chunk sizes (default: LossConfig().chunk_size and 1024)",
    )
    p.add_argument(
        "--divergences",
        nargs="+",
        default=None,
        help=f"fused divergences (default: {' '.join(DENSE)}; 'all': {' '.join(DIVERGENCES)})",
    )
    p.add_argument("--quick", action="store_true", help="smoke test: N=256, 1 repeat, 1 chunk")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    # internal: one measurement in this process
    p.add_argument(
        "--worker", nargs=4, metavar=("KIND", "DIV", "CHUNK", "N"), help=argparse.SUPPRESS
    )
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--dump", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def build_report(
    info: dict[str, Any],
    code: dict[str, Any],
    config: dict[str, Any],
    records: list[dict[str, Any]],
) -> dict[str, Any]:
    kept = [{k: v for k, v in r.items() if k != "dump"} for r in records]
    targets = evaluate_targets(kept, config["default_chunk_size"])
    return {
        "command": " ".join(["python", *sys.argv]),
        "machine": info,
        "code": code,
        "config": config,
        "measurements": kept,
        "targets": targets,
    }


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        kind, div, chunk, n = args.worker
        variant = Variant(kind, div, int(chunk) or None)
        run_worker(variant, int(n), args.repeats, args.result, args.dump)
        return
    # a SIGTERM unwinds normally: the temporary directory (gradient dumps) is removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))

    default_chunk = default_chunk_size()
    chunks = args.chunk_sizes or sorted({default_chunk, 1024})
    divergences = DIVERGENCES if args.divergences == ["all"] else args.divergences
    sizes, repeats = args.sizes, args.repeats
    if args.quick:
        sizes, repeats, chunks = [256], 1, [default_chunk]
    info, code = machine_info(), code_info()
    config = {
        "vocab": VOCAB,
        "hidden": HIDDEN,
        "dtype": "float32",
        "sizes": sizes,
        "repeats": repeats,
        "chunk_sizes": chunks,
        "default_chunk_size": default_chunk,
        "jsd_beta": JSD_BETA,
        "divergence_params": PARAMS,
        "logits_mib_per_1k_tokens": 1024 * VOCAB * 4 / MIB,
        "check_rtol": CHECK_RTOL,
    }
    print(f"V={VOCAB} H={HIDDEN} fp32, sizes={sizes}, repeats={repeats}, chunks={chunks}")
    print(f"{info['cpu_count']} CPUs ({info['cpu_model']}), torch {info['torch']}, ", end="")
    print(f"{info['torch_threads']} threads, load {info['loadavg']}")
    print(f"commit {code['git_commit'][:10]}, loss code {code['loss_code_sha256_12']}")

    partial = args.out.with_suffix(".partial.json")  # progress, in case the run is cut short
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="lmdistill-bench-") as tmp:
        for n in sizes:
            for variant in make_variants(chunks, divergences):
                record = measure_or_skip(records, variant, n, repeats, Path(tmp))
                status = record.get("error") or record.get("skipped") or ""
                status = f"{record['median_s']:.2f} s" if measured(record) else status
                print(f"  {variant.name:<30} N={n:<6} {status}", flush=True)
                records.append(record)
                write_json(partial, build_report(info, code, config, records))
        add_ratios(records)
    info["loadavg_end"] = os.getloadavg()
    report = build_report(info, code, config, records)

    print()
    print("peak = max RSS over the inputs' baseline during 1 warm-up + repeats of fwd+bwd;")
    print("time = median fwd+bwd (wall); cpu = median CPU time of the process; naive = naive")
    print("forward_kl; dense = dense run of the same divergence; load = 1-min load average: the")
    print(f"run alone adds ~{torch.get_num_threads()}, more means other processes skewed its times")
    print()
    print_table(report["measurements"])
    print()
    print_targets(report["targets"])
    write_json(args.out, report)
    partial.unlink(missing_ok=True)
    print(f"\nwrote {args.out}")


def run_header(experiment: str, script: str) -> dict[str, Any]:
    """A benchmark's result header: the experiment, the command that ran it (this script
    with its own arguments), the commit and the machine."""
    import shlex
    import sys

    return {
        "experiment": experiment,
        "command": "python " + shlex.join([script, *sys.argv[1:]]),
        "code": code_info(),
        "machine": machine_info(),
    }


if __name__ == "__main__":
    main()
