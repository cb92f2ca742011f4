"""Each section's range checks, and the couplings between sections that need no registry.
Every error names the field (`train.lr`) and what is allowed."""

from __future__ import annotations

import re
from typing import Any

from lmdistill.config.build import updated
from lmdistill.config.schema import ConfigError, RunConfig, SelectConfig, SynthesiseConfig


def check_sections(config: RunConfig) -> None:
    """Range checks that types alone cannot express, and the couplings between sections that
    need no registry."""
    loss, train = config.loss, config.train
    check(0.0 <= loss.alpha <= 1.0, "loss.alpha", loss.alpha, "a number in [0, 1]")
    check(0.0 <= loss.beta <= 1.0, "loss.beta", loss.beta, "a number in [0, 1]")
    check(loss.temperature > 0, "loss.temperature", loss.temperature, "a number > 0")
    check(loss.chunk_size >= 1, "loss.chunk_size", loss.chunk_size, "an integer >= 1")
    check(0.0 <= loss.skew_alpha < 1.0, "loss.skew_alpha", loss.skew_alpha, "in [0, 1)")
    for weight in ("hidden_weight", "attention_weight"):
        value = getattr(loss, weight)
        check(value >= 0, f"loss.{weight}", value, "a number >= 0")
    for name in (
        "max_steps",
        "batch_size",
        "grad_accum",
        "log_every",
        "keep_checkpoints",
        "process_group_timeout_minutes",
    ):
        value = getattr(train, name)
        check(value >= 1, f"train.{name}", value, "an integer >= 1")
    check(train.lr > 0, "train.lr", train.lr, "a number > 0")
    check(train.warmup_steps >= 0, "train.warmup_steps", train.warmup_steps, "an integer >= 0")
    check(0 <= train.min_lr_ratio <= 1, "train.min_lr_ratio", train.min_lr_ratio, "in [0, 1]")
    check(train.max_grad_norm > 0, "train.max_grad_norm", train.max_grad_norm, "a number > 0")
    check(train.checkpoint_every >= 0, "train.checkpoint_every", train.checkpoint_every, ">= 0")
    check(
        0 < train.curriculum_start <= 1,
        "train.curriculum_start",
        train.curriculum_start,
        "a fraction in (0, 1]",
    )
    check(train.curriculum_steps >= 0, "train.curriculum_steps", train.curriculum_steps, ">= 0")
    check(train.dro_step_size > 0, "train.dro_step_size", train.dro_step_size, "a number > 0")
    _check_incremental(config)
    if train.group_objective != "none":
        check(
            loss.hidden_weight == 0 and loss.attention_weight == 0,
            "train.group_objective",
            train.group_objective,
            "'none' with feature losses (loss.hidden_weight, loss.attention_weight): the group "
            "objectives weigh the token losses (CE and the divergence), which feature losses "
            "are not",
        )
    check(config.data.max_length >= 8, "data.max_length", config.data.max_length, "an int >= 8")
    check(config.eval.task_samples >= 0, "eval.task_samples", config.eval.task_samples, ">= 0")
    check(config.eval.answers >= 0, "eval.answers", config.eval.answers, ">= 0")
    check(
        config.eval.answer_max_new_tokens >= 1,
        "eval.answer_max_new_tokens",
        config.eval.answer_max_new_tokens,
        ">= 1",
    )
    check(config.data.eval_size >= 0, "data.eval_size", config.data.eval_size, "an int >= 0")
    student = config.student
    check(student.num_layers >= 1, "student.num_layers", student.num_layers, "an integer >= 1")
    if student.init == "path":
        check(bool(student.path), "student.path", student.path, "a model path when init=path")
    if student.init == "layers_by_importance":  # the first and the last are always kept
        check(student.num_layers >= 2, "student.num_layers", student.num_layers,
              "an integer >= 2 with layers_by_importance")  # fmt: skip
    check(
        train.precision != "fp16" or config.incremental.anchor == "none",
        "train.precision",
        train.precision,
        "fp32 or bf16 with incremental.anchor (the anchor's gradient is added outside fp16's "
        "loss scaling)",
    )
    if train.sharding == "fsdp":
        _check_sharding(config)
    calibration = student.calibration_examples
    check(calibration >= 1, "student.calibration_examples", calibration, "an integer >= 1")
    lora = student.lora
    check(lora.r >= 0, "student.lora.r", lora.r, "an integer >= 0 (0: no LoRA)")
    if lora.r > 0:
        check(lora.alpha > 0, "student.lora.alpha", lora.alpha, "a number > 0")
        check(0 <= lora.dropout < 1, "student.lora.dropout", lora.dropout, "in [0, 1)")
        check(bool(lora.target_modules), "student.lora.target_modules", [], "module names")
        check(
            student.init != "shrunk_config",
            "student.init",
            student.init,
            "layers_from_teacher, layers_by_importance or path with student.lora (LoRA adapts "
            "pretrained weights; shrunk_config starts from random ones)",
        )
        check(
            not config.memory.fisher or config.memory.fraction == 0,
            "memory.fisher",
            config.memory.fisher,
            "false with student.lora (an EWC anchor continues the merged student, whose "
            "weights the adapters' Fisher estimate does not cover)",
        )
        check(
            config.incremental.anchor == "none",
            "incremental.anchor",
            config.incremental.anchor,
            "none with student.lora (the adapters leave the previous weights as they are)",
        )
    check(config.cache.k >= 1, "cache.k", config.cache.k, "an integer >= 1")
    check(config.cache.shard_size >= 1, "cache.shard_size", config.cache.shard_size, ">= 1")
    _check_teacher(config)
    _check_on_policy(config)
    _check_select(config.select)
    _check_protocol(config)
    _check_synthesise(config.synthesise)
    gen = config.generate
    check(gen.max_new_tokens >= 1, "generate.max_new_tokens", gen.max_new_tokens, ">= 1")
    check(gen.temperature > 0, "generate.temperature", gen.temperature, "a number > 0")
    check(0 < gen.top_p <= 1, "generate.top_p", gen.top_p, "a number in (0, 1]")
    check(gen.batch_size >= 1, "generate.batch_size", gen.batch_size, "an integer >= 1")
    check(gen.samples >= 1, "generate.samples", gen.samples, "an integer >= 1")
    if gen.samples > 1:
        check(gen.do_sample, "generate.do_sample", gen.do_sample, "true when generate.samples > 1")
    if gen.keep_per_prompt is not None:
        check(
            1 <= gen.keep_per_prompt <= gen.samples,
            "generate.keep_per_prompt",
            gen.keep_per_prompt,
            f"null or an integer in [1, generate.samples={gen.samples}]",
        )
    if gen.keep == "majority":
        check(
            gen.samples > 1,
            "generate.samples",
            gen.samples,
            "> 1 with generate.keep=majority (one sample is its own majority)",
        )
    check(gen.min_chars >= 0, "generate.min_chars", gen.min_chars, "an integer >= 0")
    if gen.max_chars is not None:
        check(
            gen.max_chars > gen.min_chars,
            "generate.max_chars",
            gen.max_chars,
            f"null or an integer > generate.min_chars={gen.min_chars}",
        )


def _check_incremental(config: RunConfig) -> None:
    memory, inc = config.memory, config.incremental
    check(
        0.0 <= memory.fraction <= 0.01,
        "memory.fraction",
        memory.fraction,
        "a fraction in [0, 0.01] (a replay memory holds at most 1% of the training examples)",
    )
    check(memory.fisher_examples >= 1, "memory.fisher_examples", memory.fisher_examples, ">= 1")
    for name in ("retention_weight", "anchor_weight"):
        value = getattr(inc, name)
        check(value >= 0 and value == value, f"incremental.{name}", value, "a number >= 0")
    if inc.used():
        check(
            config.student.init == "path",
            "student.init",
            config.student.init,
            "'path' (the finished student to continue) with the incremental section",
        )
    if inc.anchor != "none":
        check(
            inc.anchor_weight > 0,
            "incremental.anchor_weight",
            inc.anchor_weight,
            "> 0 with an anchor",
        )
    if inc.anchor == "ewc":
        check(
            inc.memory is not None,
            "incremental.memory",
            inc.memory,
            "the earlier run's memory directory with anchor=ewc (it holds the Fisher estimate)",
        )


FSDP_TORCH = (2, 6)  # torch.distributed.fsdp.fully_shard and torch.distributed.tensor


def _check_sharding(config: RunConfig) -> None:
    """What a sharded student does not run yet, refused before anything is loaded."""
    import importlib.metadata

    version = importlib.metadata.version("torch")
    numbers = re.match(r"(\d+)\.(\d+)", version)
    found = (int(numbers.group(1)), int(numbers.group(2))) if numbers else (0, 0)
    for ok, allowed in (
        (
            found >= FSDP_TORCH,
            f"none with torch {version} (FSDP2 needs torch >= 2.6: pip install 'torch>=2.6')",
        ),
        (config.student.lora.r == 0, "none with student.lora (LoRA students are not sharded)"),
        (
            config.on_policy.fraction == 0,
            "none with on-policy steps (a sharded student generates only in lockstep across "
            "processes, and each process samples answers of its own lengths)",
        ),
        (
            config.incremental.anchor == "none",
            "none with incremental.anchor (the anchor reads the whole weights)",
        ),
        (
            config.train.precision != "fp16",
            "none with train.precision=fp16 (its loss scaling is not sharded; use bf16)",
        ),
    ):
        check(ok, "train.sharding", config.train.sharding, allowed)


def _check_on_policy(config: RunConfig) -> None:
    spec = config.on_policy
    check(0 <= spec.fraction <= 1, "on_policy.fraction", spec.fraction, "a number in [0, 1]")
    check(spec.max_new_tokens >= 1, "on_policy.max_new_tokens", spec.max_new_tokens, ">= 1")
    check(spec.temperature > 0, "on_policy.temperature", spec.temperature, "a number > 0")
    check(0 < spec.top_p <= 1, "on_policy.top_p", spec.top_p, "a number in (0, 1]")
    check(0 <= spec.beta <= 1, "on_policy.beta", spec.beta, "a number in [0, 1]")
    if spec.fraction > 0:
        features = config.loss.hidden_weight > 0 or config.loss.attention_weight > 0
        check(
            not features,
            "on_policy.fraction",
            spec.fraction,
            "0 with feature losses (loss.hidden_weight, loss.attention_weight): feature losses "
            "train on the teacher's text only",
        )


def _check_select(select: SelectConfig) -> None:
    if select.scorer == "divergence":
        check(
            select.model != "teacher",
            "select.model",
            select.model,
            "the student side of scorer=divergence: 'student' or a model path, not 'teacher' "
            "(the teacher's divergence from itself is 0)",
        )
    if select.scorer == "gradient":
        check(
            bool(select.target), "select.target", select.target, "a data source (scorer=gradient)"
        )
    check(select.budget > 0, "select.budget", select.budget, "a number > 0")
    if select.budget_unit == "fraction":
        check(select.budget <= 1, "select.budget", select.budget, "a fraction in (0, 1]")
    for name in ("strata", "lora_rank", "grad_dim", "clusters", "batch_size", "target_size"):
        value = getattr(select, name)
        check(value >= 1, f"select.{name}", value, "an integer >= 1")
    check(-1 <= select.threshold <= 1, "select.threshold", select.threshold, "in [-1, 1]")
    check(bool(select.lora_modules), "select.lora_modules", select.lora_modules, "module names")


def _check_synthesise(spec: SynthesiseConfig) -> None:
    for name in ("shots", "attempts", "count", "max_new_tokens", "batch_size"):
        value = getattr(spec, name)
        check(value >= 1, f"synthesise.{name}", value, "an integer >= 1")
    if spec.seed_count is not None:
        check(spec.seed_count >= 1, "synthesise.seed_count", spec.seed_count, "null or >= 1")
    check(
        0 < spec.dedup_threshold <= 1,
        "synthesise.dedup_threshold",
        spec.dedup_threshold,
        "in (0, 1] (1: drop exact copies only)",
    )
    check(spec.temperature > 0, "synthesise.temperature", spec.temperature, "a number > 0")
    check(0 < spec.top_p <= 1, "synthesise.top_p", spec.top_p, "a number in (0, 1]")


def _check_protocol(config: RunConfig) -> None:
    protocol, condense = config.protocol, config.condense
    for budget in protocol.budgets:
        check(0 < budget < 1, "protocol.budgets", protocol.budgets, "fractions in (0, 1)")
    check(protocol.seeds >= 1, "protocol.seeds", protocol.seeds, "an integer >= 1")
    check(protocol.full_seeds >= 1, "protocol.full_seeds", protocol.full_seeds, ">= 1")
    if isinstance(protocol.kd_methods, list):
        for method in protocol.kd_methods:
            check(
                method in protocol.methods,
                "protocol.kd_methods",
                protocol.kd_methods,
                f"true, false or names among protocol.methods={sorted(protocol.methods)}",
            )
    if protocol.metric == "agreement":
        check(
            config.eval.fidelity,
            "protocol.metric",
            protocol.metric,
            "'task', or 'agreement' with eval.fidelity: true (it is the fidelity evaluation)",
        )
        check(
            not protocol.condense,
            "protocol.metric",
            protocol.metric,
            "'task' when protocol.condense is set (condensed arms score task accuracy only)",
        )
    check(protocol.method_seeds >= 1, "protocol.method_seeds", protocol.method_seeds, ">= 1")
    if protocol.method_seeds > 1:
        check(
            protocol.method_seed_budgets != [],
            "protocol.method_seed_budgets",
            protocol.method_seed_budgets,
            "null (every budget) or some budgets when protocol.method_seeds > 1",
        )
    if protocol.full_steps is not None:
        check(protocol.full_steps >= 1, "protocol.full_steps", protocol.full_steps, "null or >= 1")
    for name, selection in protocol.methods.items():
        reserved = ("full", "random", "condensed")
        check(
            not name.startswith(reserved) and "+" not in name,
            f"protocol.methods.{name}",
            name,
            "a name not starting with full / random / condensed and without '+'",
        )
        updated(config.select, selection, f"protocol.methods.{name}")  # names each bad field
    updated(config, protocol.kd, "protocol.kd")
    among = f"budgets among protocol.budgets={protocol.budgets}"
    for field_name in ("token_matched_budgets", "method_seed_budgets"):
        chosen = getattr(protocol, field_name) or []
        for budget in chosen:
            check(budget in protocol.budgets, f"protocol.{field_name}", chosen, among)
    for method in protocol.condense:
        allowed = "a list of dc / dm / mtt"
        check(method in ("dc", "dm", "mtt"), "protocol.condense", protocol.condense, allowed)
    for name in ("iterations", "real_batch", "init_students", "expert_steps", "unroll_steps"):
        value = getattr(condense, name)
        check(value >= 1, f"condense.{name}", value, "an integer >= 1")
    check(condense.lr > 0, "condense.lr", condense.lr, "a number > 0")
    check(condense.inner_lr > 0, "condense.inner_lr", condense.inner_lr, "a number > 0")
    check(condense.student_lr > 0, "condense.student_lr", condense.student_lr, "a number > 0")
    check(condense.expert_every >= 1, "condense.expert_every", condense.expert_every, ">= 1")
    check(
        condense.match_span % condense.expert_every == 0,
        "condense.match_span",
        condense.match_span,
        f"a multiple of condense.expert_every={condense.expert_every} (experts are kept every "
        "expert_every steps)",
    )
    check(
        1 <= condense.match_span <= condense.expert_steps,
        "condense.match_span",
        condense.match_span,
        f"an integer in [1, condense.expert_steps={condense.expert_steps}]",
    )


def _check_teacher(config: RunConfig) -> None:
    teacher = config.teacher
    check(teacher.max_concurrency >= 1, "teacher.max_concurrency", teacher.max_concurrency, ">= 1")
    check(teacher.timeout_s > 0, "teacher.timeout_s", teacher.timeout_s, "a number > 0")
    check(teacher.max_retries >= 0, "teacher.max_retries", teacher.max_retries, ">= 0")
    check(teacher.top_logprobs >= 1, "teacher.top_logprobs", teacher.top_logprobs, ">= 1")
    check(teacher.probe_tolerance > 0, "teacher.probe_tolerance", teacher.probe_tolerance, "> 0")


def check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {value!r} is not allowed; expected {allowed}")
