"""Condensation by matching: learn a small synthetic training set for the student.

A synthetic example is a sequence of L soft tokens and L soft labels:
- inputs: logits `x` (L, V); the student sees `softmax(x / tau) @ E` through `inputs_embeds`,
  E its own input embedding. Mixtures over the vocabulary rather than free vectors in
  embedding space, so that the student's embedding matrix, which it needs at test time on
  real tokens, is trained by the synthetic set too.
- labels: logits `y` (L, V); position t's output is trained towards softmax(y[t]) (soft labels,
  initialised from the real next token or from the teacher's distribution), on the positions
  `mask` marks (the response part of the example the sequence started from).

The set starts from real examples (a random subset) and is then optimised so that training on
it resembles training on the real data:
- `dc` (Zhao et al. 2021, gradient matching): the student's gradient on the synthetic set
  should point where its gradient on real data points, layer by layer (sum over parameter
  tensors of 1 - cosine); between matches the student trains a few steps on the synthetic set.
- `dm` (Zhao & Bilen 2023, distribution matching): the mean hidden state of every layer over
  synthetic tokens should equal that over real tokens, for freshly initialised students.
- `mtt` (Cazenavette et al. 2022, trajectory matching): N student SGD steps on the synthetic set
  from an expert checkpoint should land where the expert landed after M steps on real data;
  unrolled with TESLA's (Cui et al. 2023) constant-memory scheme: a first pass runs the N steps
  without a graph to get theta_N, a second replays them and sends each step's share of the
  gradient, -lr * (dL/dtheta_N)^T dg_i/dX_i, to that step's synthetic batch, one step's graph at
  a time. Like TESLA's published formula it drops the terms through later steps' dependence on
  X_i (second order in the learning rate); for N = 1 it is exact (tested against autograd).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from lmdistill.config import CondenseConfig, TrainConfig
from lmdistill.data import IGNORE_INDEX, TokenizedExample, collate

MAX_LOGITS = 200_000_000  # S x L x V values per tensor beyond which the set would not fit


@dataclass
class SyntheticSet:
    x: torch.Tensor  # (S, L, V) input logits
    y: torch.Tensor  # (S, L, V) label logits: position t's target distribution
    mask: torch.Tensor  # (S, L) bool: positions whose output is trained
    attention: torch.Tensor  # (S, L) long: 1 where the sequence has a token
    ids: list[str] = field(default_factory=list)  # the real examples it started from

    def __len__(self) -> int:
        return self.x.shape[0]

    def batch(self, index: list[int]) -> SyntheticSet:
        return SyntheticSet(self.x[index], self.y[index], self.mask[index], self.attention[index])

    def state(self) -> dict[str, Any]:
        return {
            "x": self.x.detach(),
            "y": self.y.detach(),
            "mask": self.mask,
            "attention": self.attention,
            "ids": self.ids,
        }


def init_from_real(
    items: list[TokenizedExample],
    vocab_size: int,
    pad_token_id: int,
    *,
    confidence: float = 0.9,
    teacher: PreTrainedModel | None = None,
) -> SyntheticSet:
    """Soft copies of real examples: `confidence` on each real token; labels from the next
    token, or the teacher's distribution there when `teacher` is given."""
    count = len(items) * max(len(i.input_ids) for i in items) * vocab_size
    if count > MAX_LOGITS:
        raise ValueError(
            f"condensation: {len(items)} sequences x {max(len(i.input_ids) for i in items)} "
            f"tokens x {vocab_size} vocabulary = {count:,} logits per tensor is too many; use a "
            "smaller budget, shorter data.max_length or a smaller vocabulary"
        )
    batch = collate(items, pad_token_id)
    ids, labels = batch["input_ids"], batch["labels"]
    low = math.log((1 - confidence) / (vocab_size - 1))
    high = math.log(confidence)

    def soft(tokens: torch.Tensor) -> torch.Tensor:
        out = torch.full((*tokens.shape, vocab_size), low)
        return out.scatter_(-1, tokens.clamp(0, vocab_size - 1).unsqueeze(-1), high)

    x = soft(ids)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    following = torch.zeros_like(ids)
    following[:, :-1] = labels[:, 1:].clamp(min=0)
    if teacher is None:
        y = soft(following)
    else:
        with torch.no_grad():
            logits = teacher(input_ids=ids, attention_mask=batch["attention_mask"]).logits
        y = _wide(logits[..., :vocab_size]).log_softmax(-1)
    return SyntheticSet(x, y, mask, batch["attention_mask"], [i.id for i in items])


def embed(model: PreTrainedModel, x: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(S, L, V) logits -> (S, L, H) expected input embeddings under the student's table."""
    table: torch.Tensor = model.get_input_embeddings().weight  # type: ignore[assignment]
    return (x / temperature).softmax(-1) @ table[: x.shape[-1]]


def synthetic_loss(
    model: PreTrainedModel,
    syn: SyntheticSet,
    temperature: float = 1.0,
    params: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Soft-label cross-entropy over the marked positions (mean per position)."""
    inputs = {"inputs_embeds": None, "attention_mask": syn.attention}
    if params is None:
        inputs["inputs_embeds"] = embed(model, syn.x, temperature)
        logits = model(**inputs).logits
    else:
        table = params[_embedding_name(model)]
        inputs["inputs_embeds"] = (syn.x / temperature).softmax(-1) @ table[: syn.x.shape[-1]]
        logits = functional_call(model, params, (), inputs).logits
    vocab = syn.y.shape[-1]
    logp = _wide(logits[..., :vocab]).log_softmax(-1)
    per_position = -(syn.y.softmax(-1) * logp).sum(-1)
    return (per_position * syn.mask).sum() / syn.mask.sum().clamp(min=1)


def real_loss(
    model: PreTrainedModel, batch: dict[str, torch.Tensor], vocab_size: int
) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    return F.cross_entropy(
        _wide(logits[:, :-1, :vocab_size]).transpose(1, 2),
        targets,
        ignore_index=IGNORE_INDEX,
    )


def _wide(t: torch.Tensor) -> torch.Tensor:
    """At least float32 (half-precision logits are upcast; float64 stays float64)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _embedding_name(model: PreTrainedModel) -> str:
    table = model.get_input_embeddings().weight
    return next(name for name, p in model.named_parameters() if p is table)


def double_backward_ready(model: PreTrainedModel) -> PreTrainedModel:
    """Eager attention: the fused CPU/GPU attention kernels have no second derivative, which
    gradient and trajectory matching need."""
    if model.config._attn_implementation != "eager":
        model.set_attn_implementation("eager")
    return model


def gradient_distance(real: list[torch.Tensor], syn: list[torch.Tensor]) -> torch.Tensor:
    """DC's layer-wise distance: sum over parameter tensors of 1 - cos(g_real, g_syn)."""
    total = torch.zeros(())
    for r, s in zip(real, syn, strict=True):
        total = total + 1 - F.cosine_similarity(r.flatten(), s.flatten(), dim=0, eps=1e-12)
    return total


def dc_loss(
    model: PreTrainedModel,
    real_batch: dict[str, torch.Tensor],
    syn: SyntheticSet,
    vocab_size: int,
    temperature: float = 1.0,
) -> torch.Tensor:
    """The gradient-matching loss, differentiable wrt `syn.x` and `syn.y`."""
    double_backward_ready(model)
    params = [p for p in model.parameters() if p.requires_grad]
    real = torch.autograd.grad(real_loss(model, real_batch, vocab_size), params)
    synthetic = torch.autograd.grad(
        synthetic_loss(model, syn, temperature), params, create_graph=True
    )
    return gradient_distance([r.detach() for r in real], list(synthetic))


def mean_states(
    model: PreTrainedModel,
    mask: torch.Tensor,
    *,
    input_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    attention_mask: torch.Tensor,
) -> list[torch.Tensor]:
    """Every layer's hidden state averaged over the marked positions."""
    out = model.get_decoder()(
        input_ids=input_ids,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        output_hidden_states=True,
    )
    weights = mask.unsqueeze(-1).float()
    return [(h * weights).sum((0, 1)) / weights.sum().clamp(min=1) for h in out.hidden_states]


def dm_loss(
    model: PreTrainedModel,
    real_batch: dict[str, torch.Tensor],
    syn: SyntheticSet,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Distribution matching: sum over layers of || mean_real - mean_syn ||^2."""
    real_mask = torch.zeros_like(real_batch["labels"], dtype=torch.bool)
    real_mask[:, :-1] = real_batch["labels"][:, 1:] != IGNORE_INDEX
    with torch.no_grad():
        real = mean_states(
            model,
            real_mask,
            input_ids=real_batch["input_ids"],
            attention_mask=real_batch["attention_mask"],
        )
    synthetic = mean_states(
        model,
        syn.mask,
        inputs_embeds=embed(model, syn.x, temperature),
        attention_mask=syn.attention,
    )
    total = torch.zeros(())
    for r, s in zip(real, synthetic, strict=True):
        total = total + ((r - s) ** 2).sum()
    return total / len(real)


# ---------------------------------------------------------------------------------------------
# Trajectory matching (MTT) with constant-memory unrolling (TESLA)


def expert_trajectory(
    model: PreTrainedModel,
    batches: Callable[[int], dict[str, torch.Tensor]],
    vocab_size: int,
    *,
    steps: int,
    every: int,
    lr: float,
) -> list[dict[str, torch.Tensor]]:
    """Plain SGD on real data from the model's weights; parameters kept every `every` steps."""
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    kept = [{n: p.clone() for n, p in params.items()}]
    for step in range(steps):
        for p in params.values():
            p.requires_grad_(True)
        batch = batches(step)
        logits = functional_call(
            model,
            params,
            (),
            {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
        ).logits
        loss = F.cross_entropy(
            _wide(logits[:, :-1, :vocab_size]).transpose(1, 2),
            batch["labels"][:, 1:],
            ignore_index=IGNORE_INDEX,
        )
        grads = torch.autograd.grad(loss, list(params.values()))
        params = {n: (p - lr * g).detach() for (n, p), g in zip(params.items(), grads, strict=True)}
        if (step + 1) % every == 0:
            kept.append({n: p.clone() for n, p in params.items()})
    return kept


def trajectory_loss_and_grads(
    model: PreTrainedModel,
    syn: SyntheticSet,
    start: dict[str, torch.Tensor],
    target: dict[str, torch.Tensor],
    batches: list[list[int]],
    log_lr: torch.Tensor,
    temperature: float = 1.0,
) -> float:
    """MTT's normalised distance after unrolling one SGD step per entry of `batches` from
    `start`; accumulates its gradient (TESLA's constant-memory form) into `syn.x.grad`,
    `syn.y.grad` and `log_lr.grad`. Returns the loss."""
    lr = float(log_lr.exp())
    names = list(start)

    def step_grads(params: dict[str, torch.Tensor], index: list[int], graph: bool) -> Any:
        live = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        loss = synthetic_loss(model, syn.batch(index), temperature, live)
        grads = torch.autograd.grad(loss, list(live.values()), create_graph=graph)
        return grads

    # Pass 1: where the unrolled steps end (no graph kept).
    params = {n: p.detach() for n, p in start.items()}
    for index in batches:
        grads = step_grads(params, index, graph=False)
        params = {n: params[n] - lr * g for n, g in zip(names, grads, strict=True)}
    span = sum(((target[n] - start[n]) ** 2).sum() for n in names)
    gap = {n: params[n] - target[n] for n in names}
    loss = float(sum((g**2).sum() for g in gap.values()) / span)
    d_theta = {n: 2 * g / span for n, g in gap.items()}  # dL / d theta_N

    # Pass 2: replay; each step's synthetic batch gets -lr * (dL/dtheta_N)^T dg_i / dX_i.
    params = {n: p.detach() for n, p in start.items()}
    d_lr = 0.0
    leaves = [syn.x, syn.y]
    for index in batches:
        grads = step_grads(params, index, graph=True)
        inner = sum((d_theta[n] * g).sum() for n, g in zip(names, grads, strict=True))
        assert isinstance(inner, torch.Tensor)
        pulled = torch.autograd.grad(-lr * inner, leaves, allow_unused=True)
        for leaf, value in zip(leaves, pulled, strict=True):
            if value is not None:
                leaf.grad = value if leaf.grad is None else leaf.grad + value
        d_lr += -float(inner.detach())  # dL/dlr through this step
        params = {n: params[n] - lr * g.detach() for n, g in zip(names, grads, strict=True)}
    grad_log_lr = torch.tensor(d_lr * lr, dtype=log_lr.dtype)  # d lr / d log_lr = lr
    log_lr.grad = grad_log_lr if log_lr.grad is None else log_lr.grad + grad_log_lr
    return loss


# ---------------------------------------------------------------------------------------------
# The condensation loop and training on the result


def condense(
    syn: SyntheticSet,
    fresh_student: Callable[[int], PreTrainedModel],
    real_batch: Callable[[int], dict[str, torch.Tensor]],
    vocab_size: int,
    spec: CondenseConfig,
    *,
    seed: int = 0,
) -> dict[str, Any]:
    """Optimise `syn` in place with `spec.method`; returns the loss history and time."""
    started = time.perf_counter()
    syn.x.requires_grad_(True)
    syn.y.requires_grad_(spec.method != "dm")  # DM matches inputs only; labels stay as set
    leaves = [syn.x] + ([syn.y] if spec.method != "dm" else [])
    log_lr = torch.tensor(math.log(spec.student_lr), requires_grad=True)
    optimizer = torch.optim.Adam(leaves + ([log_lr] if spec.method == "mtt" else []), lr=spec.lr)
    rng = random.Random(seed)
    history: list[float] = []
    per_student = max(1, spec.iterations // spec.init_students)
    model: PreTrainedModel | None = None
    experts: list[dict[str, torch.Tensor]] = []
    bar = tqdm(range(spec.iterations), desc=f"condense ({spec.method})", unit="it")
    for iteration in bar:
        if iteration % per_student == 0:
            model = double_backward_ready(fresh_student(seed * 1000 + iteration // per_student))
            model.train()
            if spec.method == "mtt":
                experts = expert_trajectory(
                    model,
                    real_batch,
                    vocab_size,
                    steps=spec.expert_steps,
                    every=spec.expert_every,
                    lr=spec.student_lr,
                )
        assert model is not None
        optimizer.zero_grad(set_to_none=True)
        index = rng.sample(range(len(syn)), min(len(syn), spec.real_batch))
        if spec.method == "mtt":
            value = mtt_step(model, syn, experts, log_lr, spec, rng)
        else:
            batch = real_batch(iteration)
            part = syn.batch(index)
            if spec.method == "dc":
                loss = dc_loss(model, batch, part, vocab_size, spec.input_temperature)
            else:
                loss = dm_loss(model, batch, part, spec.input_temperature)
            loss.backward()
            value = float(loss.detach())
        optimizer.step()
        history.append(value)
        bar.set_postfix(loss=f"{value:.4f}")
        if spec.method == "dc":  # DC alternates: the student learns from the synthetic set
            dc_inner_steps(model, syn, spec, rng)
    syn.x.requires_grad_(False)
    syn.y.requires_grad_(False)
    return {
        "method": spec.method,
        "iterations": spec.iterations,
        "first_loss": history[0] if history else None,
        "last_loss": history[-1] if history else None,
        "history": history,
        "seconds": time.perf_counter() - started,
        "learned_student_lr": float(log_lr.exp()) if spec.method == "mtt" else None,
    }


def mtt_step(
    model: PreTrainedModel,
    syn: SyntheticSet,
    experts: list[dict[str, torch.Tensor]],
    log_lr: torch.Tensor,
    spec: CondenseConfig,
    rng: random.Random,
) -> float:
    """MTT: from a random point of the expert trajectory, unroll the student on the synthetic
    set and match where the expert was `match_span` steps later; gradients into the set."""
    span = max(1, spec.match_span // spec.expert_every)
    first = rng.randrange(0, len(experts) - span)
    steps = [
        rng.sample(range(len(syn)), min(len(syn), spec.real_batch))
        for _ in range(spec.unroll_steps)
    ]
    return trajectory_loss_and_grads(
        model, syn, experts[first], experts[first + span], steps, log_lr, spec.input_temperature
    )


def dc_inner_steps(
    model: PreTrainedModel, syn: SyntheticSet, spec: CondenseConfig, rng: random.Random
) -> None:
    """DC's inner loop: the student takes `inner_steps` SGD steps on the (fixed) set."""
    inner = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=spec.inner_lr)
    detached = SyntheticSet(syn.x.detach(), syn.y.detach(), syn.mask, syn.attention)
    for _ in range(spec.inner_steps):
        inner.zero_grad(set_to_none=True)
        step_index = rng.sample(range(len(syn)), min(len(syn), spec.real_batch))
        synthetic_loss(model, detached.batch(step_index), spec.input_temperature).backward()
        inner.step()


def train_on_synthetic(
    student: PreTrainedModel,
    syn: SyntheticSet,
    train: TrainConfig,
    temperature: float = 1.0,
) -> dict[str, Any]:
    """Train the student on the synthetic set (AdamW, the run's schedule); returns timing."""
    from lmdistill.kd.optim import build_optimizer, build_scheduler

    torch.manual_seed(train.seed)
    optimizer = build_optimizer(student, train)
    scheduler = build_scheduler(optimizer, train)
    rng = random.Random(train.seed)
    fixed = SyntheticSet(syn.x.detach(), syn.y.detach(), syn.mask, syn.attention)
    started = time.perf_counter()
    student.train()
    losses = []
    for _ in tqdm(range(train.max_steps), desc="train on synthetic", unit="step"):
        index = [rng.randrange(len(fixed)) for _ in range(train.batch_size)]
        loss = synthetic_loss(student, fixed.batch(index), temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
    student.eval()
    return {
        "steps": train.max_steps,
        "train_seconds": time.perf_counter() - started,
        "loss": losses,
    }
