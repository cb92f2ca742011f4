"""The off-policy KD training loop: one recipe, read top to bottom.

Each optimizer step takes a fixed global batch (micro-batch x accumulation x processes) that is
a pure function of the step number and the seed, so a resumed run and an N-process run see
exactly the batches a single uninterrupted process would.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from lmdistill.config import LossConfig, TrainConfig
from lmdistill.data import IGNORE_INDEX, TokenizedExample, collate, to_device
from lmdistill.kd.checkpoint import (
    TrainState,
    check_room,
    checkpoint_bytes,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from lmdistill.kd.groups import GroupBalance
from lmdistill.kd.incremental import Anchor
from lmdistill.kd.objective import PARTS, KDObjective
from lmdistill.kd.on_policy import OnPolicy, SamplingStats, is_on_policy, on_policy_batches
from lmdistill.kd.optim import build_optimizer, build_scheduler
from lmdistill.kd.sharding import ShardedStudent, WholeOptimizer, shard_student, whole
from lmdistill.kd.tracking import Tracking
from lmdistill.models.forward import uses_attention
from lmdistill.models.loading import resolve_device
from lmdistill.teachers.base import Teacher


@dataclass
class TrainResult:
    state: TrainState
    seconds: float  # wall time of the steps run in this call
    tokens_per_second: float  # response tokens per second, all processes
    resumed_from: int  # step the run resumed from (0 for a fresh run)
    sampling: SamplingStats | None = None  # on-policy runs: the student's sampling, apart


def use_cpu(device: str) -> bool:
    return resolve_device(device).type == "cpu"


MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def make_accelerator(device: str, precision: str = "fp32", sharding: str = "none") -> Accelerator:
    # On CPU, `cpu=True` makes a torchrun / accelerate launch use gloo (MULTI_CPU).
    check_precision(precision, resolve_device(device))
    # fp32 leaves Accelerate's own setting (e.g. `accelerate launch --mixed_precision`) alone.
    mixed = MIXED_PRECISION[precision] if precision != "fp32" else None
    check_launch_plugins(sharding)
    return Accelerator(cpu=use_cpu(device), mixed_precision=mixed)


SHARDING = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed"}


def check_launch_plugins(sharding: str = "none") -> None:
    """An `accelerate launch` config that asks for Accelerate's FSDP or DeepSpeed plugin is
    refused in one line: lmdistill shards the student itself (`train.sharding: fsdp`, torch's
    FSDP2, tested on the CPU), and on the CPU Accelerate silently turns an FSDP config into
    plain data parallelism. DeepSpeed ZeRO is not supported. So is a launch's fp16 (loss
    scaling) with a sharded student, as `train.precision=fp16` is."""
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if sharding == "fsdp" and launched == "fp16":
        raise ValueError(
            "the accelerate launch asks for fp16 (mixed_precision), and fp16's loss scaling "
            "is not sharded: launch with bf16 or no mixed precision, or train.sharding=none"
        )
    for variable, name in SHARDING.items():
        if os.environ.get(variable, "false").lower() in ("true", "1"):
            raise ValueError(
                f"{name} was asked for by the accelerate launch config; lmdistill does not run "
                "under Accelerate's sharding plugins: launch with data parallelism "
                "(configs/accelerate/multi_cpu.yaml, or torchrun) and set train.sharding=fsdp "
                "to shard the student (docs/distributed.md)"
            )


def checkpointing(model: PreTrainedModel, on: bool) -> None:
    """Activation (gradient) checkpointing on or off: transformers >= 5.2x names it
    `activation_checkpointing_*`, earlier 5.x `gradient_checkpointing_*`."""
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def check_precision(precision: str, device: torch.device) -> None:
    """`train.precision` other than fp32 needs a GPU that computes in it: one line if not."""
    if precision == "fp32":
        return
    if device.type != "cuda":
        raise ValueError(
            f"train.precision={precision} needs a CUDA GPU, and this run trains on the CPU: use "
            "fp32 (CPU autocast has no fp16, and bf16 matmuls are slow on most CPUs)"
        )
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ValueError(
            f"train.precision=bf16: this GPU ({torch.cuda.get_device_name(device)}) does not "
            "compute in bf16; use fp16 or fp32"
        )


def train_student(
    student: PreTrainedModel,
    teacher: Teacher | None,
    train_set: list[TokenizedExample],
    *,
    train: TrainConfig,
    loss: LossConfig,
    vocab_size: int,
    pad_token_id: int,
    checkpoint_dir: Path,
    config_hash: str,
    resume: bool = False,
    desc: str = "train",
    stop_after: int | None = None,
    on_policy: OnPolicy | None = None,
    retention: Teacher | None = None,
    retention_weight: float = 0.0,
    anchor: Anchor | None = None,
    tracking: Tracking | None = None,
) -> TrainResult:
    """Train `student` in place on `teacher`'s signal (any backend: in-process, cache).
    `stop_after` ends the call after that many steps (as a kill would), leaving the
    checkpoints a resumed call continues from. With `on_policy` (and a teacher), a share of
    the steps trains on responses the student samples (lmdistill/kd/on_policy.py). With
    `retention` (the previous student, frozen) its divergence joins the loss at
    `retention_weight`; `anchor` pulls the weights toward the previous ones
    (lmdistill/kd/incremental.py). `tracking` receives every record the history keeps."""
    accelerator = make_accelerator(train.device, train.precision, train.sharding)
    if train.gradient_checkpointing:  # until the end of training (evaluation keeps its cache)
        checkpointing(student, True)
    # On-policy steps always need the teacher (it scores the samples); off-policy steps only
    # when the loss does (loss.alpha = 1 with on-policy: CE off-policy, the divergence on).
    on_policy = on_policy if teacher is not None else None  # the CE baseline stays off-policy
    scorer = (on_policy.scorer or teacher) if on_policy is not None else None
    teacher = used_teacher(teacher, loss)
    torch.manual_seed(train.seed)
    teacher_config = teacher.model_config if teacher is not None else None
    objective: torch.nn.Module = KDObjective(
        student,
        loss,
        vocab_size,
        teacher_config,
        retention_weight=retention_weight if retention is not None else 0.0,
    )
    shards = shard_student(objective, train.sharding, accelerator.num_processes, accelerator.device)
    if shards is not None:  # train the sharded copy; `objective` gets its weights back
        if accelerator.is_main_process:
            print(shards.describe(), file=sys.stderr)
        objective = shards.model
    optimizer = build_optimizer(objective, train)
    scheduler = build_scheduler(optimizer, train)
    if shards is None:
        objective, optimizer = accelerator.prepare(objective, optimizer)
    else:  # no DDP wrapper: FSDP reduce-scatters the gradients itself
        optimizer = accelerator.prepare(optimizer)
    if anchor is not None:
        anchor.to(accelerator.device)
    # The retention teacher scores the text only: no hidden states or attentions.
    retention_loss = dataclasses.replace(loss, hidden_weight=0.0, attention_weight=0.0)
    for prepared in {id(t): t for t in (teacher, scorer, retention) if t is not None}.values():
        prepared.prepare(accelerator.device, loss)

    state = start_state(
        accelerator, objective, optimizer, scheduler, checkpoint_dir, config_hash, train, resume,
        shards,
    )  # fmt: skip
    if shards is not None:  # from here the shards hold the weights
        shards.release()
    resumed_from = state.step
    logged = [
        k
        for k in PARTS
        if (k not in ("hidden", "attention") or getattr(loss, f"{k}_weight"))
        and (k != "retention" or retention is not None)
    ]
    last_step = train.max_steps if stop_after is None else min(train.max_steps, stop_after)
    bar = progress_bar(train.max_steps, state.step, desc, show=accelerator.is_main_process)
    batches = StepBatches(train_set, train, loss, pad_token_id, accelerator, on_policy)
    balance = GroupBalance(train_set, train) if train.group_objective != "none" else None
    if balance is not None and not state.group_weights:
        state.group_weights = balance.initial_weights()
    elif balance is not None and set(state.group_weights) != set(balance.names):
        raise ValueError(
            f"the checkpoint's group weights are for the groups {sorted(state.group_weights)}, "
            f"and the training data has {balance.names}: resume with the same data"
        )
    started, tokens_at_start = time.perf_counter(), state.tokens
    objective.train()
    while state.step < last_step:
        student_model = accelerator.unwrap_model(objective).student
        chunks, micro, override = batches.for_step(state.step, student_model)
        sums, global_tokens, grad_norm, by_group = optimizer_step(
            accelerator,
            objective,
            optimizer,
            scheduler,
            scorer if override is not None else teacher,
            micro,
            chunks,
            override or loss,
            train,
            balance,
            state.group_weights,
            retention,
            anchor,
            retention_loss,
        )
        state.step += 1
        state.tokens += global_tokens
        rate = (state.tokens - tokens_at_start) / max(time.perf_counter() - started, 1e-9)
        record = {
            "step": state.step,
            **{k: float(v) for k, v in zip(PARTS, sums, strict=True) if k in logged},
            "lr": float(scheduler.get_last_lr()[0]),
            "grad_norm": float(grad_norm),
            "tokens": state.tokens,
            "tokens_per_s": rate,
            **({"on_policy": float(override is not None)} if on_policy is not None else {}),
        }
        if anchor is not None:
            record["anchor"] = anchor.last_penalty
        if balance is not None and by_group is not None:
            record.update(balance.record(state.group_weights, *by_group))
            state.group_weights = balance.update(state.group_weights, *by_group)
        if state.step % train.log_every == 0 or state.step == train.max_steps:
            state.history.append(record)
            if tracking is not None:
                tracking.log(
                    {f"train/{k}": v for k, v in record.items() if k != "step"}, state.step
                )
        bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{rate:.0f}")
        bar.update(1)
        if train.checkpoint_every and (
            state.step % train.checkpoint_every == 0 or state.step == train.max_steps
        ):
            checkpoint(
                accelerator, checkpoint_dir, objective, optimizer, scheduler, state, train, shards
            )
    bar.close()
    if shards is not None:  # the trained weights, whole, on every process
        objective = shards.gather().to(accelerator.device)
    objective.eval()
    if train.gradient_checkpointing:
        checkpointing(student, False)
    elapsed = time.perf_counter() - started
    rate = (state.tokens - tokens_at_start) / max(elapsed, 1e-9)
    return TrainResult(state, elapsed, rate, resumed_from, batches.sampled(accelerator))


class StepBatches:
    """This process's micro-batches of each optimizer step: the dataset's examples in the
    step's order (per-epoch permutations, or a curriculum), or, on an on-policy step, the
    same examples' prompts with the student's own samples (and the loss that replaces the
    run's for that step)."""

    def __init__(
        self,
        train_set: list[TokenizedExample],
        train: TrainConfig,
        loss: LossConfig,
        pad_token_id: int,
        accelerator: Accelerator,
        on_policy: OnPolicy | None,
    ) -> None:
        self.train_set, self.train, self.pad_token_id = train_set, train, pad_token_id
        self.loss = loss
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.on_policy = on_policy
        self.sampling = SamplingStats() if on_policy is not None else None
        self.global_batch = train.batch_size * train.grad_accum * self.world
        easy_first = train.curriculum == "easy_to_hard"
        self.difficulty_order = easy_to_hard(train_set) if easy_first else None
        self.deepest = max((max(item.ranks) for item in train_set if item.ranks), default=0)

    def for_step(
        self, step: int, student: PreTrainedModel
    ) -> tuple[list[list[int]], list[dict[str, torch.Tensor]], LossConfig | None]:
        """(the dataset indices of each micro-batch, the micro-batches, the loss override)."""
        train = self.train
        indices = (
            curriculum_indices(step, self.difficulty_order, self.global_batch, train)
            if self.difficulty_order is not None
            else step_indices(step, len(self.train_set), self.global_batch, train.seed)
        )
        chunks = rank_slices(indices, train, self.rank, self.world)
        spec = self.on_policy
        if (
            spec is None
            or self.sampling is None
            or not is_on_policy(train.seed, step, spec.spec.fraction)
        ):
            micro = micro_batches(
                self.train_set, chunks, self.pad_token_id, train, step, self.deepest
            )
            return chunks, micro, None
        micro = on_policy_batches(
            student,
            self.train_set,
            chunks,
            spec,
            seed=train.seed,
            step=step,
            pad_token_id=self.pad_token_id,
            stats=self.sampling,
        )
        return chunks, micro, spec.loss(self.loss)

    def sampled(self, accelerator: Accelerator) -> SamplingStats | None:
        """The student's sampling in this call, its tokens counted over every process."""
        if self.sampling is None:
            return None
        counted = torch.tensor([self.sampling.tokens], device=accelerator.device)
        self.sampling.tokens = int(accelerator.reduce(counted, "sum"))
        return self.sampling


def progress_bar(total: int, initial: int, desc: str, *, show: bool) -> Any:
    """Steps done of `total` (one bar, on the main process), with loss and tokens/s."""
    return tqdm(
        total=total, initial=initial, desc=desc, unit="step", disable=not show, dynamic_ncols=True
    )


def optimizer_step(
    accelerator: Accelerator,
    objective: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    teacher: Teacher | None,
    micro: list[dict[str, torch.Tensor]],
    chunks: list[list[int]],
    loss: LossConfig,
    train: TrainConfig,
    balance: GroupBalance | None = None,
    group_weights: dict[str, float] | None = None,
    retention: Teacher | None = None,
    anchor: Anchor | None = None,
    retention_loss: LossConfig | None = None,
) -> tuple[torch.Tensor, int, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """One optimizer step over this process's micro-batches: gradients normalised by the
    global count of trained tokens, clipped, applied. Returns the loss parts per token
    (summed over processes), the global tokens, the gradient norm and, with a group
    objective, each group's loss sum and tokens in this step (over every process). `loss`
    is this step's (an on-policy step's replaces the run's)."""
    global_tokens, normaliser = token_counts(micro, accelerator, train)
    groups = None
    if balance is not None:
        local = balance.tokens(micro, chunks, trained=train.curriculum == "progressive_steps")
        group_tokens = accelerator.reduce(local.to(accelerator.device), "sum").cpu()
        groups = (balance, balance.scales(group_tokens, group_weights or {}))
    sums, group_sums = accumulate_gradients(
        accelerator,
        objective,
        teacher,
        micro,
        chunks,
        loss,
        max(normaliser, 1),
        groups,
        retention,
        retention_loss,
    )
    if anchor is not None:  # after the all-reduce: the same on every process
        student = accelerator.unwrap_model(objective).student
        anchor.last_penalty = anchor.penalty(student)
        anchor.add_gradient(student)
    grad_norm = whole(accelerator.clip_grad_norm_(objective.parameters(), train.max_grad_norm))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    by_group = None
    if group_sums is not None:
        by_group = (accelerator.reduce(group_sums, "sum").cpu(), group_tokens)
    return (
        accelerator.reduce(sums, "sum") / max(normaliser, 1),
        global_tokens,
        grad_norm,
        by_group,
    )


def start_state(
    accelerator: Accelerator,
    objective: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    checkpoint_dir: Path,
    config_hash: str,
    train: TrainConfig,
    resume: bool,
    shards: ShardedStudent | None = None,
) -> TrainState:
    """A fresh state, or (with `resume`) the last checkpoint's, its weights, optimizer and
    schedule restored; before a step runs, a check that the checkpoints will fit on disk.
    A sharded run reads the checkpoint's whole tensors and keeps its shard of each."""
    state = TrainState(config_hash=config_hash)
    model = accelerator.unwrap_model(objective) if shards is None else shards.whole
    whole_optimizer = optimizer if shards is None else WholeOptimizer(optimizer)
    if resume and (checkpoints := list_checkpoints(checkpoint_dir)):
        state = resumed_state(checkpoints[-1], model, whole_optimizer, scheduler, config_hash)
        if shards is not None:
            shards.scatter()
    if train.checkpoint_every and state.step < train.max_steps:
        # Every process checks (none is left waiting in a collective for one that stopped).
        need = checkpoint_bytes(model, whole_optimizer)
        check_room(checkpoint_dir, need, train.keep_checkpoints, warn=accelerator.is_main_process)
    return state


def used_teacher(teacher: Teacher | None, loss: LossConfig) -> Teacher | None:
    """The teacher the loss needs, or None for CE only (no teacher forward pass is paid)."""
    needs_teacher = loss.alpha < 1.0 or loss.hidden_weight > 0 or uses_attention(loss)
    if needs_teacher and teacher is None:
        raise ValueError(
            "loss.alpha < 1 and the feature losses need a teacher signal, but no teacher was given"
        )
    return teacher if needs_teacher else None


def easy_to_hard(train_set: list[TokenizedExample]) -> list[int]:
    """Example indices by response length (ties by position): the easy-to-hard order."""
    lengths = [sum(1 for y in item.labels if y != IGNORE_INDEX) for item in train_set]
    return sorted(range(len(train_set)), key=lambda i: (lengths[i], i))


def resumed_state(
    path: Path, objective: torch.nn.Module, optimizer: Any, scheduler: Any, config_hash: str
) -> TrainState:
    """The state of the checkpoint at `path`, loaded into the objective, optimizer and
    scheduler; a checkpoint another config wrote is refused."""
    state = load_checkpoint(path, objective, optimizer, scheduler)
    if state.config_hash != config_hash:
        raise ValueError(
            f"{path} was written by a different config "
            f"({state.config_hash} != {config_hash}: the settings that differ from the "
            "defaults are hashed; checkpoints from before that rule hashed every setting); "
            "use a new output_dir or drop --resume"
        )
    return state


def micro_batches(
    train_set: list[TokenizedExample],
    chunks: list[list[int]],
    pad_token_id: int,
    train: TrainConfig,
    step: int,
    deepest: int,
) -> list[dict[str, torch.Tensor]]:
    """This process's micro-batches of one step; under the progressive curriculum, with the
    rationale lines not yet visible at `step` weighted 0."""
    progressive = train.curriculum == "progressive_steps"
    micro = [
        collate([train_set[i] for i in chunk], pad_token_id, ranks=progressive) for chunk in chunks
    ]
    if progressive:
        visible = visible_steps(step, deepest, train)
        micro = [gate_steps(b, visible) for b in micro]
    return micro


def token_counts(
    micro: list[dict[str, torch.Tensor]], accelerator: Accelerator, train: TrainConfig
) -> tuple[int, int]:
    """(response tokens in this optimizer step over every process, the loss's normaliser).

    Normalise by the *global* number of response tokens in this optimizer step, so that
    gradient accumulation and N processes give the gradient of one big batch. The
    progressive curriculum normalises by the tokens it trains on this step (lines not yet
    visible carry weight 0), so the early steps are not scaled down."""
    progressive = train.curriculum == "progressive_steps"
    local_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
    local_trained = sum(trained_tokens(b) for b in micro) if progressive else 0
    local = torch.tensor([local_tokens, local_trained], device=accelerator.device)
    global_tokens, global_trained = (int(v) for v in accelerator.reduce(local, "sum"))
    return global_tokens, global_trained if progressive else global_tokens


def checkpoint(
    accelerator: Accelerator,
    directory: Path,
    objective: torch.nn.Module,
    optimizer: Any,
    scheduler: Any,
    state: TrainState,
    train: TrainConfig,
    shards: ShardedStudent | None = None,
) -> None:
    """The main process writes the checkpoint; every process waits for it. A sharded run's
    weights and optimizer state are gathered whole first (every process takes part)."""
    model, whole_optimizer = accelerator.unwrap_model(objective), optimizer
    if shards is not None:  # whole on the main process only, the others drop each tensor
        keep = accelerator.is_main_process
        model = shards.gather(keep)
        whole_optimizer = WholeOptimizer(optimizer).snapshot(keep)
    if accelerator.is_main_process:
        save_checkpoint(directory, model, whole_optimizer, scheduler, state, train.keep_checkpoints)
    accelerator.wait_for_everyone()
    if shards is not None:
        shards.release()


def accumulate_gradients(
    accelerator: Accelerator,
    objective: torch.nn.Module,
    teacher: Teacher | None,
    micro: list[dict[str, torch.Tensor]],
    chunks: list[list[int]],
    loss: LossConfig,
    global_tokens: int,
    groups: tuple[GroupBalance, torch.Tensor] | None = None,
    retention: Teacher | None = None,
    retention_loss: LossConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Backward over this process's micro-batches; return the local sums of `PARTS` and,
    with `groups` (the balance and the step's factor per group), the local sum of each
    group's token losses."""
    world = accelerator.num_processes
    sums = torch.zeros(len(PARTS), device=accelerator.device)
    group_sums = None
    if groups is not None:
        group_sums = torch.zeros(len(groups[1]), device=accelerator.device, dtype=torch.float64)
    for i, (batch, chunk) in enumerate(zip(micro, chunks, strict=True)):
        batch = to_device(batch, accelerator.device)
        signal = teacher.score(batch, chunk, loss) if teacher is not None else None
        sparse = signal.sparse if signal is not None else None
        kept = None
        if retention is not None:
            kept = retention.score(batch, chunk, retention_loss or loss)
        # Under DDP only the last micro-batch synchronises gradients across processes; a
        # sharded student (no `no_sync`) reduce-scatters each micro-batch's gradients into
        # its shards, which keeps no whole gradient between micro-batches. Autocast as
        # Accelerate's prepared model has it (a sharded one is not prepared).
        sync = nullcontext() if i == len(micro) - 1 else accelerator.no_sync(objective)
        with sync, accelerator.autocast():
            loss_sum, parts = objective(
                **batch,
                teacher_states=signal.states if signal else None,
                teacher_weight=signal.weight if signal else None,
                teacher_signal=sparse.to(accelerator.device) if sparse is not None else None,
                teacher_hidden_states=signal.hidden_states if signal else None,
                teacher_attentions=signal.attentions if signal else None,
                loss=loss,
                **(
                    {}
                    if groups is None
                    else {
                        "groups": groups[0].rows(chunk).to(accelerator.device),
                        "group_scales": groups[1],
                    }
                ),
                **(
                    {}
                    if kept is None
                    else {"retention_states": kept.states, "retention_head": kept.weight}
                ),
            )
            # DDP averages gradients over processes; multiply by `world` to undo it.
            accelerator.backward(loss_sum * world / max(global_tokens, 1))
        parts["loss"] = loss_sum.detach()
        sums += torch.stack([parts.get(k, torch.zeros(())).to(sums) for k in PARTS])
        if group_sums is not None:
            group_sums += parts["groups"].to(group_sums)
    return sums, group_sums


def step_indices(step: int, n: int, global_batch: int, seed: int) -> list[int]:
    """The dataset indices of optimizer step `step`: a walk over per-epoch permutations."""
    start = step * global_batch
    return [_epoch_order(seed, j // n, n)[j % n] for j in range(start, start + global_batch)]


@lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, n: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def visible_steps(step: int, deepest: int, train: TrainConfig) -> int:
    """KPOD's progressive schedule: the deepest step rank (from the end) trained at `step`,
    from 0 (the last line alone) to `deepest` (every line) at `curriculum_steps`."""
    ramp = train.curriculum_steps or max(1, train.max_steps // 2)
    return math.floor(deepest * min(1.0, step / ramp))


def trained_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Response tokens with a loss weight above zero."""
    trained = batch["labels"][:, 1:] != IGNORE_INDEX
    if "weights" in batch:
        trained &= batch["weights"][:, 1:] > 0
    return int(trained.sum())


def gate_steps(batch: dict[str, torch.Tensor], visible: int) -> dict[str, torch.Tensor]:
    """Zero the loss weight of rationale lines ranked deeper than `visible` from the end
    (and take the ranks out of the batch: the model does not read them)."""
    batch = dict(batch)
    ranks = batch.pop("ranks", None)
    if ranks is None:
        return batch
    weights = batch.get("weights", torch.ones(ranks.shape))
    batch["weights"] = weights * (ranks <= visible).to(weights.dtype)
    return batch


def curriculum_indices(
    step: int, order: list[int], global_batch: int, train: TrainConfig
) -> list[int]:
    """Step `step` of an easy-to-hard curriculum: a seeded draw (without replacement while
    the pool allows) from the easiest `share(step)` of the examples, `order` listing them
    easiest first. A pure function of the step, so resumed and N-process runs agree."""
    ramp = train.curriculum_steps or max(1, train.max_steps // 2)
    share = train.curriculum_start + (1 - train.curriculum_start) * min(1.0, step / ramp)
    pool = max(1, min(len(order), round(share * len(order))))
    generator = torch.Generator().manual_seed(train.seed * 1_000_003 + step)
    draws = [
        int(i)
        for _ in range(-(-global_batch // pool))
        for i in torch.randperm(pool, generator=generator)
    ]
    return [order[j] for j in draws[:global_batch]]


def rank_slices(indices: list[int], train: TrainConfig, rank: int, world: int) -> list[list[int]]:
    """This process's micro-batches: micro-batch i of rank r is the (i * world + r)-th slice."""
    size = train.batch_size
    return [
        indices[(i * world + rank) * size : (i * world + rank + 1) * size]
        for i in range(train.grad_accum)
    ]
