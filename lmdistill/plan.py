"""`lmdistill plan CONFIG`: what a run will need, predicted from a probe on this machine.

The probe is the run itself on a slice: the same teacher, student, data format and settings
in a temporary directory, with `probe_steps + 1` training steps on just enough examples
(the teacher writes their responses and its cache as the run would), the trained students
evaluated on one batch as the run evaluates them (the peak memory can be there; task sets
and lm-eval are not probed), no checkpoints. Each stage's measured cost is scaled to the full run:

- **time per step** (KD, and the CE-only baseline when the run has one): the mean of the
  probe's steps after the first (warm-up) one; training time = steps x that;
- **generation**: the teacher's seconds per prompt in the probe x the run's prompts (an
  upper bound when the probe's answers hit `max_new_tokens` more often than the run's);
- **teacher cache**: the probe cache's bytes per example x the run's examples
  (`teacher.kind: cache`);
- **checkpoints**: the bytes of one checkpoint (weights, or a LoRA student's trained
  tensors, and AdamW's two moments) x the checkpoints kept, for each trained student,
  plus the saved students;
- **peak memory**: the probe process's peak resident memory, with its parts named: the
  models' weights, gradients and optimizer state (from their parameter counts), the
  teacher's weights, one chunk of the loss head, and the rest (activations, the runtime);
  on a GPU, the probe's peak allocated GPU memory against the GPU's size (untested: no GPU
  was available);
- whether that fits this machine: peak memory against the memory available now, disk
  against the free space where `output_dir` will be.

Evaluation and writing the teacher cache are not timed (not in the prediction). Checked
against measured runs by `benchmarks/plan_check.py` (docs/plan.md).
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmdistill.config import ConfigError, RunConfig
from lmdistill.metrics import ArmMetrics, RunMetrics
from lmdistill.models.loading import resolve_device
from lmdistill.teachers.setup import load_splits

MB = 1024 * 1024
ADAM_MOMENTS = 2


@dataclass(frozen=True)
class Plan:
    """The prediction; every figure for the whole run as configured."""

    probe_steps: int
    probe_examples: int
    probe_seconds: float
    seconds_per_step: float
    baseline_seconds_per_step: float | None
    steps: int
    train_seconds: float  # KD and (when configured) the baseline
    generation_seconds: float | None  # None: the teacher writes no responses
    prompts: int
    memory_mb: dict[str, float]  # the parts of the peak, and `peak`
    memory_device: str  # where that peak is: `cpu` (resident memory) or `cuda` (allocated)
    available_memory_mb: float | None
    cache_bytes: int | None
    checkpoint_bytes: int
    disk_bytes: int
    free_disk_bytes: int
    fits_memory: bool | None
    fits_disk: bool

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def lines(self) -> list[str]:
        """What `lmdistill plan` prints."""
        memory = self.memory_mb
        parts = ", ".join(f"{k} {v:,.0f}" for k, v in memory.items() if k != "peak")
        total = self.train_seconds + (self.generation_seconds or 0.0)
        fits = {True: "fits", False: "DOES NOT FIT", None: "unknown"}
        base = (
            f", CE-only baseline {self.baseline_seconds_per_step:.2f} s"
            if self.baseline_seconds_per_step is not None
            else ""
        )
        out = [
            f"probe: {self.probe_steps + 1} steps on {self.probe_examples} examples "
            f"({self.probe_seconds:.0f} s, the first step not counted)",
            f"time per step: KD {self.seconds_per_step:.2f} s{base}; {self.steps} steps: "
            f"training {_minutes(self.train_seconds)}",
        ]
        if self.generation_seconds is not None:
            out.append(
                f"teacher responses: {self.prompts} prompts, {_minutes(self.generation_seconds)}"
            )
        out.append(
            f"generation and training: {_minutes(total)} (writing the teacher cache and "
            "evaluating not counted)"
        )
        available = self.available_memory_mb
        where = "GPU" if self.memory_device == "cuda" else "resident"
        out.append(
            f"peak {where} memory: {memory['peak']:,.0f} MB ({parts} MB); available "
            + (f"{available:,.0f} MB" if available is not None else "unknown")
            + f": {fits[self.fits_memory]}"
        )
        cache = f"teacher cache {self.cache_bytes / MB:,.1f} MB, " if self.cache_bytes else ""
        out.append(
            f"disk: {cache}checkpoints {self.checkpoint_bytes / MB:,.0f} MB, in all "
            f"{self.disk_bytes / MB:,.0f} MB; free {self.free_disk_bytes / MB:,.0f} MB: "
            f"{fits[self.fits_disk]}"
        )
        return out


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def make_plan(config: RunConfig, probe_steps: int = 3) -> Plan:
    """Probe `config` on a slice (module docstring) and scale each stage to the full run."""
    from lmdistill.pipeline import peak_rss_mb, run

    if probe_steps < 1:
        raise ConfigError(f"--probe-steps must be >= 1, got {probe_steps}")
    if config.teachers or config.teacher.kind not in ("local", "cache"):
        raise ConfigError(
            "lmdistill plan predicts runs with one teacher in this process (teacher.kind "
            f"local or cache); this config's teacher is {config.teacher.kind!r}"
            + (" with several teachers" if config.teachers else "")
        )
    if config.train.sharding != "none":
        raise ConfigError(
            "lmdistill plan predicts one process, and train.sharding=fsdp splits the student "
            "over the processes of a launch: plan it with train.sharding=none (per process, an "
            "upper bound on the sharded run's memory)"
        )
    train = config.train
    train_examples, held_out = load_splits(config)
    per_step = train.batch_size * train.grad_accum
    steps = probe_steps + 1
    # Enough examples for the probe's steps and at least one generation batch, no more
    # than the run has; the held-out split shrinks with it (it is only generated for).
    probe_examples = min(len(train_examples), max(per_step * steps, config.generate.batch_size))
    eval_size = min(config.data.eval_size, config.generate.batch_size)
    with tempfile.TemporaryDirectory(prefix="lmdistill-plan-") as tmp:
        probe = dataclasses.replace(
            config,
            output_dir=str(Path(tmp) / "probe"),
            data=dataclasses.replace(
                config.data,
                max_train_examples=probe_examples,
                eval_size=eval_size if config.data.eval is None else config.data.eval_size,
            ),
            train=dataclasses.replace(
                train,
                max_steps=steps,
                checkpoint_every=0,
                report_to=[],
                warmup_steps=0,
                log_every=1,  # every probe step timed
            ),
            # Evaluated as the run evaluates its students, on one batch (its memory is the
            # run's: the peak can be there); task sets and lm-eval are not probed.
            eval=dataclasses.replace(
                config.eval,
                before=False,
                tasks=[],
                lm_eval_tasks=[],
                num_samples=min(config.eval.num_samples, 1),
                answers=min(config.eval.answers, config.eval.batch_size),
            ),
            # The probe's cache is its own (a shared cache directory is never touched).
            cache=dataclasses.replace(config.cache, dir=None),
        )
        metrics = run(probe)
        peak = peak_rss_mb()
    device = resolve_device(config.train.device)
    available = _available_memory_mb()
    if device.type == "cuda":  # the parts live on the GPU: its peak, against its size
        peak = torch.cuda.max_memory_allocated(device) / MB
        available = torch.cuda.get_device_properties(device).total_memory / MB
    kd_step = _seconds_per_step(metrics.kd)
    base_step = _seconds_per_step(metrics.baseline) if metrics.baseline is not None else None
    train_seconds = train.max_steps * (kd_step + (base_step or 0.0))
    probe_seconds = metrics.kd.train_seconds + (
        metrics.baseline.train_seconds if metrics.baseline else 0.0
    )
    # The teacher answers both splits, each training question `generate.samples` times.
    prompts = len(train_examples) * config.generate.samples + len(held_out)
    generated = metrics.setup.get("generate")
    generation_seconds = None
    if generated and generated.get("prompts"):
        generation_seconds = generated["seconds"] / generated["prompts"] * prompts
    cache_bytes = _cache_bytes(metrics, prompts)
    checkpoint_bytes, memory = _sizes(metrics, config, peak)
    disk = (cache_bytes or 0) + checkpoint_bytes
    out = Path(config.output_dir).resolve()
    where = next(p for p in (out, *out.parents) if p.exists())
    free = shutil.disk_usage(where).free
    return Plan(
        probe_steps=probe_steps,
        probe_examples=probe_examples,
        probe_seconds=probe_seconds,
        seconds_per_step=kd_step,
        baseline_seconds_per_step=base_step,
        steps=train.max_steps,
        train_seconds=train_seconds,
        generation_seconds=generation_seconds,
        prompts=prompts,
        memory_mb=memory,
        memory_device=device.type,
        available_memory_mb=available,
        cache_bytes=cache_bytes,
        checkpoint_bytes=checkpoint_bytes,
        disk_bytes=disk,
        free_disk_bytes=free,
        fits_memory=None if available is None else memory["peak"] <= available,
        fits_disk=disk <= free,
    )


def _seconds_per_step(arm: ArmMetrics) -> float:
    """The mean seconds of the steps after the first logged one: each record's cumulative
    tokens over its cumulative rate is the time since training started (records may be
    `train.log_every` steps apart)."""
    records = [r for r in arm.history if r.get("tokens_per_s")]
    if len(records) < 2:
        return arm.train_seconds / max(arm.steps, 1)
    first, last = records[0], records[-1]
    elapsed = last["tokens"] / last["tokens_per_s"] - first["tokens"] / first["tokens_per_s"]
    return elapsed / (last["step"] - first["step"])


def _cache_bytes(metrics: RunMetrics, prompts: int) -> int | None:
    """The probe cache's bytes per example, for every example of the run."""
    cache = metrics.setup.get("cache")
    if not cache:
        return None
    examples = sum(split["examples"] for split in cache.values())
    written = sum(split["bytes"] for split in cache.values())
    return math.ceil(written / max(examples, 1) * prompts)


def _sizes(metrics: RunMetrics, config: RunConfig, peak_mb: float) -> tuple[int, dict[str, float]]:
    """One checkpoint's bytes x the kept ones, plus the saved students; the peak's parts."""
    models = metrics.models
    student = models["student_parameters"]
    trained = models.get("student_trainable_parameters") or student
    saved_weights = trained if config.student.lora.r > 0 else student
    checkpoint = 4 * (saved_weights + ADAM_MOMENTS * trained)
    arms = 2 if config.baseline else 1  # each trained student keeps its own checkpoints
    every, steps = config.train.checkpoint_every, config.train.max_steps
    kept = min(config.train.keep_checkpoints, math.ceil(steps / every)) if every > 0 else 0
    checkpoints = arms * (checkpoint * kept + 4 * student)  # and the saved students
    teacher = models.get("teacher_parameters") or 0
    vocab = models["vocab_size"]
    memory = {
        "student weights": 4 * student / MB,
        "gradients": 4 * trained / MB,
        "optimizer": 4 * ADAM_MOMENTS * trained / MB,
        "teacher weights": 4 * teacher / MB,
        # One chunk of the fused loss head: the student's and the teacher's log-probs.
        "loss chunk": 2 * 4 * config.loss.chunk_size * vocab / MB,
    }
    memory["activations and runtime"] = max(peak_mb - sum(memory.values()), 0.0)
    memory["peak"] = peak_mb
    return checkpoints, memory


def _available_memory_mb() -> float | None:
    """MemAvailable (Linux); None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None
