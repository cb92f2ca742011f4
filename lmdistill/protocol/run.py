"""Running the protocol: each arm in turn (a finished arm is read back, not redone), each
arm's selection, training and scoring, and the condensed arms."""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from lmdistill.config import ProtocolConfig, RunConfig, config_hash, save_config
from lmdistill.data import collate, load_examples, tokenize_examples
from lmdistill.dd import condense
from lmdistill.dd.stage import load_pool, run_select
from lmdistill.eval.task import task_accuracy
from lmdistill.io import DiskFullError, atomic_write_json, atomic_write_text, write_with
from lmdistill.kd.rationale import apply_objective, eval_prompts
from lmdistill.metrics import EvalMetrics
from lmdistill.models import build_student, load_model, shared_vocab_size
from lmdistill.pipeline import run
from lmdistill.protocol.plan import (
    Arm,
    arm_config,
    arm_group_gap,
    arm_metric,
    budget_label,
    plan,
    task_name,
)
from lmdistill.protocol.table import summarise
from lmdistill.report.protocol import plot_protocol, render_protocol
from lmdistill.validate import load_config


def run_protocol(
    path: str | Path | None,
    overrides: list[str],
    *,
    out: Path | None = None,
    report_only: bool = False,
) -> dict[str, Any]:
    base = load_config(path, overrides)
    if base.data.eval is None:
        raise ValueError(
            "protocol: set data.eval (held-out examples); without it every arm would hold out "
            "data.eval_size of its own subset, and small budgets would train on less than "
            "they selected"
        )
    if not base.eval.enabled:
        raise ValueError("protocol: eval.enabled is false; every arm is scored by the evaluation")
    if base.protocol.metric == "task":
        task_name(base)  # before any arm trains
    out = Path(out or Path(base.output_dir) / "protocol")
    arms = plan(base)
    records: list[dict[str, Any]] = []
    failed: list[str] = []
    for number, arm in enumerate(arms, 1):
        directory = arm.directory(out)
        record_path = directory / "arm.json"
        if record_path.is_file():
            record = json.loads(record_path.read_text())
            _check_arm(record, base, arm, out, records)
            records.append(record)
            if not base.protocol.keep_checkpoints and not report_only:
                drop_checkpoints(directory)  # arms recorded before this rule
            continue
        if report_only:
            continue
        print(
            f"\n=== protocol arm {number}/{len(arms)}: {arm.name} at {budget_label(arm)}, seed "
            f"{arm.seed} ===",
            flush=True,
        )
        try:
            config = arm_config(base, arm, out, records)
            record = {**run_arm(config, arm), "settings_hash": arm_hash(config)}
        except DiskFullError:
            raise  # every later arm would fail the same way
        except Exception as error:  # one arm's failure must not cost the others
            import traceback

            traceback.print_exc()
            failed.append(f"{arm.name} @ {budget_label(arm)} seed {arm.seed}: {error}")
            continue
        atomic_write_json(record_path, record)
        records.append(record)
        if not base.protocol.keep_checkpoints:
            drop_checkpoints(directory)
    summary = summarise(base, records, arms)
    summary["failed"] = failed
    atomic_write_json(out / "protocol.json", summary)
    atomic_write_text(out / "protocol.md", render_protocol(summary))
    if summary["table"]:
        plot_protocol(summary, out / "protocol.png")
    print(render_protocol(summary))
    if failed:
        raise RuntimeError(
            f"protocol: {len(failed)} arm(s) failed (the others are in the table; run again to "
            "retry them): " + "; ".join(failed)
        )
    return summary


def drop_checkpoints(arm_dir: Path) -> None:
    """A recorded arm is never trained again: its checkpoints (weights, optimizer moments)
    only take disk. The student, metrics and report stay."""
    for checkpoints in (arm_dir / "checkpoints", arm_dir / "baseline" / "checkpoints"):
        shutil.rmtree(checkpoints, ignore_errors=True)


def arm_hash(config: RunConfig) -> str:
    """What decides an arm's result: its config without the protocol section (which lists
    the other arms, but for the metric the arm's number is) and without where its files go
    (so a moved protocol still reads back); like every config hash, only the settings that
    differ from lmdistill's defaults."""
    located = replace(config.select, out=None, scores_dir=None)
    protocol = ProtocolConfig(metric=config.protocol.metric)
    return config_hash(replace(config, protocol=protocol, output_dir="", select=located))


def _check_arm(
    record: dict[str, Any],
    base: RunConfig,
    arm: Arm,
    out: Path,
    records: list[dict[str, Any]],
) -> None:
    """A finished arm is reused only if it ran with the settings this protocol would use."""
    saved = record.get("settings_hash")
    if saved is None:
        return  # written before arms recorded their settings
    config = arm_config(base, arm, out, records)
    if arm_hash(config) != saved:
        raise ValueError(
            f"protocol: {arm.directory(out)} finished with other settings than this config "
            "gives it (a method's select settings, train.*, data.* or the teacher changed); "
            "use a new --out or delete that arm's directory"
        )


def run_arm(config: RunConfig, arm: Arm) -> dict[str, Any]:
    started = time.perf_counter()
    record: dict[str, Any] = {
        "budget": arm.budget,
        "method": arm.label,
        "kd": arm.kd,
        "seed": arm.seed,
        "name": arm.name,
    }
    train_source = config.data.train
    if arm.budget is not None:
        selection = run_select(config)
        record["selection"] = {k: v for k, v in selection.items() if k != "ids"}
        record["select_seconds"] = time.perf_counter() - started
        train_source = selection["subset"]
    if arm.kind == "condensed":
        outcome = run_condensed(config, arm, Path(train_source))
    else:
        # The protocol section lists the other arms; it is no part of this arm's run (and
        # its checkpoints stay valid when an arm is added).
        arm_config = replace(
            config, data=replace(config.data, train=train_source), protocol=ProtocolConfig()
        )
        metrics = run(arm_config, resume=True)
        outcome = ArmOutcome(
            metrics.kd.after, metrics.kd.train_seconds, metrics.data.get("train_examples")
        )
    record.update(
        accuracy=arm_metric(config, outcome.after),
        steps=config.train.max_steps,
        train_seconds=outcome.train_seconds,
        condense_seconds=outcome.condense_seconds,
        train_examples=outcome.train_examples,
        wall_seconds=time.perf_counter() - started,
        output_dir=config.output_dir,
    )
    if (groups := arm_group_gap(config, outcome.after)) is not None:
        record["groups"] = groups  # the worst and the best group of the arm's number
    return record


@dataclass(frozen=True)
class ArmOutcome:
    """What an arm's record keeps of its run: the evaluation, the training (and condensation)
    seconds, and how many examples it trained on."""

    after: EvalMetrics | None
    train_seconds: float
    train_examples: int | None
    condense_seconds: float = 0.0


def run_condensed(config: RunConfig, arm: Arm, subset: Path) -> ArmOutcome:
    """Condense a synthetic set that starts from the random subset, train a student on it
    alone, and score it on the task (its metrics.json shaped like a pipeline run's)."""
    teacher, tokenizer = load_model(config.teacher)
    pad = tokenizer.pad_token_id
    method = arm.method
    assert method in ("dc", "dm", "mtt")
    spec = replace(config.condense, method=method)  # type: ignore[arg-type]
    # The student trains on what its objective makes of the examples, as in a pipeline arm.
    pool = load_pool(config, tokenizer)
    pool_items, _ = tokenize_examples(
        apply_objective(pool.examples, config.objective), tokenizer, config.data.max_length, "warn"
    )
    start = apply_objective(load_examples(str(subset)), config.objective)
    items, _ = tokenize_examples(start, tokenizer, config.data.max_length, "warn")

    def fresh(seed: int) -> Any:
        torch.manual_seed(seed)
        model, _ = build_student(config.student, teacher, tokenizer)
        return model.float()

    vocab = shared_vocab_size(teacher, fresh(0), tokenizer)
    syn = condense.init_from_real(items, vocab, pad, teacher=teacher if arm.kd else None)
    rng = random.Random(config.train.seed)

    def real_batch(_: int) -> dict[str, torch.Tensor]:
        chosen = rng.sample(range(len(pool_items)), min(spec.real_batch, len(pool_items)))
        return collate([pool_items[i] for i in chosen], pad)

    info = condense.condense(syn, fresh, real_batch, vocab, spec, seed=config.train.seed)
    out = Path(config.output_dir)
    write_with(out / "synthetic.pt", lambda tmp: torch.save(syn.state(), tmp))
    student = fresh(config.train.seed)
    trained = condense.train_on_synthetic(student, syn, config.train, spec.input_temperature)
    task = task_name(config)
    asked = load_examples(task, split=config.data.split, format=config.data.format)
    questions = eval_prompts(asked, config.objective)
    accuracy = task_accuracy(
        student,
        tokenizer,
        questions,
        max_new_tokens=config.eval.task_max_new_tokens,
        batch_size=config.eval.task_batch_size,
    )
    save_config(config, out / "config.yaml")
    after = EvalMetrics(tasks={task: accuracy})
    metrics = {
        "condense": {k: v for k, v in info.items() if k != "history"},
        "condense_history": info["history"],
        "kd": {"after": after.as_dict(), **trained},
        "data": {"train_examples": len(syn)},
    }
    atomic_write_json(out / "metrics.json", metrics)
    return ArmOutcome(after, trained["train_seconds"], len(syn), info["seconds"])
