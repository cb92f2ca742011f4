"""The data-efficiency protocol: how much of the data does the student need, and is the gain
over a random subset due to the data chosen or to KD?

For each budget b (a fraction of data.train) it trains, with the same `train` settings:
- `random`: `protocol.seeds` random subsets of size b (the control every method must beat);
- each method in `protocol.methods` (a selection: scorer / features / selector), seed 0, and
  seeds up to `protocol.method_seeds` at `protocol.method_seed_budgets`;
- `random+KD` and `<method>+KD`: the same subsets with the `protocol.kd` settings (the
  teacher's soft labels), so the table separates the effect of the data from that of KD;
- `condensed-<dc|dm|mtt>` (and `+KD`, soft labels from the teacher) at budgets up to
  `protocol.condense_max_budget`: a synthetic set of that many sequences (lmdistill/dd/condense.py);
- and `full`: all the data.
Every arm keeps its artifacts under OUT/<budget>/<arm>/seed-<s>/ and a finished arm is read
back, not redone: a killed protocol resumes. Costs are counted per arm: selection (scoring
once, shared by the budgets), condensation and training seconds.

Writes OUT/protocol.md, protocol.json and protocol.png (budget vs score).
"""

from __future__ import annotations

import json
import random
import shutil
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch

from lmdistill.config import ProtocolConfig, RunConfig, save_config
from lmdistill.config.build import updated
from lmdistill.io import DiskFullError, atomic_write_json, atomic_write_text, write_with
from lmdistill.report.protocol import plot_protocol, render_protocol
from lmdistill.validate import load_config, validate


@dataclass(frozen=True)
class Arm:
    """One student of the protocol. Its identity is these fields; `label` and `name` are
    only how records and tables call it."""

    kind: Literal["full", "random", "method", "matched", "condensed"]
    budget: float | None  # None: full data
    seed: int
    kd: bool
    # A protocol.methods name (`method`; `matched`: random with as many tokens as it picked),
    # or the condensation method (`condensed`: dc, dm or mtt).
    method: str | None = None
    steps: int | None = None  # `full` trained for protocol.full_steps instead of train.max_steps

    @property
    def label(self) -> str:
        labels = {
            "full": "full" if self.steps is None else f"full@{self.steps}",
            "random": "random",
            "method": str(self.method),
            "matched": f"random~{self.method}",
            "condensed": f"condensed-{self.method}",
        }
        return labels[self.kind]

    @property
    def name(self) -> str:
        return self.label + ("+KD" if self.kd else "")

    def directory(self, out: Path) -> Path:
        budget = "full" if self.budget is None else f"b{self.budget:g}"
        return out / budget / self.name / f"seed-{self.seed}"


def plan(config: RunConfig) -> list[Arm]:
    """Every arm, most informative first: the full-data students, each budget's random seeds
    and methods, the condensed sets, the methods' further seeds, then the KD arms."""
    p = config.protocol
    arms = [Arm("full", None, s, False) for s in range(p.full_seeds)]
    if p.full_steps is not None:
        arms += [Arm("full", None, s, False, steps=p.full_steps) for s in range(p.full_seeds)]
    for budget in p.budgets:
        arms += [Arm("random", budget, s, False) for s in range(p.seeds)]
        arms += [Arm("method", budget, 0, False, m) for m in p.methods]
        if budget in p.token_matched_budgets:
            arms += [Arm("matched", budget, 0, False, m) for m in p.methods]
    for budget in p.budgets:
        if budget <= p.condense_max_budget:
            for kind in p.condense:
                arms += [Arm("condensed", budget, 0, kd, kind) for kd in (False, True)]
    seeded = p.budgets if p.method_seed_budgets is None else p.method_seed_budgets
    for budget in [b for b in p.budgets if b in seeded]:
        arms += [
            Arm("method", budget, s, False, m) for m in p.methods for s in range(1, p.method_seeds)
        ]
    for budget in p.budgets:
        arms.append(Arm("random", budget, 0, True))
        arms += [Arm("method", budget, 0, True, m) for m in p.methods if _with_kd(p, m)]
    return arms


def _with_kd(p: ProtocolConfig, method: str) -> bool:
    return method in p.kd_methods if isinstance(p.kd_methods, list) else p.kd_methods


def arm_config(
    base: RunConfig, arm: Arm, out: Path, records: list[dict[str, Any]] | None = None
) -> RunConfig:
    """The arm's config: the base config with the arm's selection, seed, steps, output
    directory and KD settings, checked as a loaded config is."""
    p, directory = base.protocol, arm.directory(out)
    train = replace(base.train, seed=arm.seed)
    if arm.steps is not None:
        train = replace(train, max_steps=arm.steps)
    select = replace(base.select, out=str(directory / "select"), scores_dir=str(out / "scores"))
    if arm.budget is not None:
        select = replace(select, budget=arm.budget, budget_unit="fraction", seed=arm.seed)
        if arm.kind == "method":
            assert arm.method is not None
            select = updated(select, p.methods[arm.method], f"protocol.methods.{arm.method}")
        else:  # random, the token-matched random subsets, the condensed sets' starting points
            select = replace(select, selector="random", scorer=None, features=None)
        if arm.kind == "matched":  # as many tokens as the method's subset
            tokens = matched_tokens(arm, records or [])
            select = replace(select, budget_unit="tokens", budget=float(tokens))
    config = replace(
        base,
        output_dir=str(directory),
        train=train,
        eval=replace(base.eval, before=False),
        select=select,
    )
    if arm.kd:
        config = updated(config, p.kd, "protocol.kd")
    else:
        loss = replace(config.loss, alpha=1.0, hidden_weight=0.0, attention_weight=0.0)
        config = replace(config, loss=loss)
    validate(config)
    return config


def matched_tokens(arm: Arm, records: list[dict[str, Any]]) -> int:
    for record in records:
        first_seed = (record["budget"], record["kd"], record["seed"]) == (arm.budget, False, 0)
        if record["method"] == arm.method and first_seed:
            return int(record["selection"]["selected_tokens"])
    raise ValueError(f"protocol: {arm.name} needs the {arm.method} arm at that budget first")


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
            f"\n=== protocol arm {number}/{len(arms)}: {arm.name} at {_budget(arm)}, seed "
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
            failed.append(f"{arm.name} @ {_budget(arm)} seed {arm.seed}: {error}")
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
    from lmdistill.config import config_hash

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


def _budget(arm: Arm) -> str:
    return "all data" if arm.budget is None else f"{100 * arm.budget:g}%"


def task_name(config: RunConfig) -> str:
    if not config.eval.tasks:
        raise ValueError("protocol: eval.tasks is empty; the protocol scores task accuracy")
    return config.eval.tasks[0]


def arm_metric(config: RunConfig, after: dict[str, Any]) -> float:
    """The arm's number (the records keep it as `accuracy`): task exact match, or held-out
    top-1 agreement with the teacher."""
    if config.protocol.metric == "agreement":
        return float(after["top1_agreement"])
    return float(after["tasks"][task_name(config)]["exact_match"])


def metric_title(config: RunConfig) -> str:
    if config.protocol.metric == "agreement":
        return f"top-1 agreement with the teacher on `{config.data.eval}`"
    return f"`{task_name(config)}` (exact match)"


def run_arm(config: RunConfig, arm: Arm) -> dict[str, Any]:
    from lmdistill.dd.stage import run_select
    from lmdistill.pipeline import run

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
        metrics = run_condensed(config, arm, Path(train_source))
    else:
        # The protocol section lists the other arms; it is no part of this arm's run (and
        # its checkpoints stay valid when an arm is added).
        arm_config = replace(
            config, data=replace(config.data, train=train_source), protocol=ProtocolConfig()
        )
        metrics = run(arm_config, resume=True)
    record.update(
        accuracy=arm_metric(config, metrics["kd"]["after"]),
        steps=config.train.max_steps,
        train_seconds=metrics["kd"]["train_seconds"],
        condense_seconds=metrics.get("condense", {}).get("seconds", 0.0),
        train_examples=metrics.get("data", {}).get("train_examples"),
        wall_seconds=time.perf_counter() - started,
        output_dir=config.output_dir,
    )
    return record


def run_condensed(config: RunConfig, arm: Arm, subset: Path) -> dict[str, Any]:
    """Condense a synthetic set that starts from the random subset, train a student on it
    alone, and score it on the task (metrics shaped like a pipeline run's)."""
    from lmdistill.data import load_examples, tokenize_examples
    from lmdistill.dd import condense
    from lmdistill.dd.stage import load_pool
    from lmdistill.eval.task import task_accuracy
    from lmdistill.kd.rationale import apply_objective, eval_prompts
    from lmdistill.models import build_student, load_model, shared_vocab_size

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
        from lmdistill.data import collate

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
    metrics = {
        "condense": {k: v for k, v in info.items() if k != "history"},
        "condense_history": info["history"],
        "kd": {"after": {"tasks": {task: accuracy}}, **trained},
        "data": {"train_examples": len(syn)},
    }
    atomic_write_json(out / "metrics.json", metrics)
    return metrics


# ---------------------------------------------------------------------------------------------
# The table


def _stats(values: list[float]) -> dict[str, Any]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def summarise(config: RunConfig, records: list[dict[str, Any]], arms: list[Arm]) -> dict[str, Any]:
    p = config.protocol
    same_steps = [r for r in records if r["method"] == "full"]
    longer = [r for r in records if r["method"] == f"full@{p.full_steps}"]
    reference = longer if p.full_steps is not None and longer else same_steps
    full = [r["accuracy"] for r in reference]
    full_mean = statistics.fmean(full) if full else None
    names = []
    for arm in arms:
        if arm.budget is not None and arm.name not in names:
            names.append(arm.name)
    table = []
    for name in names:
        row: dict[str, Any] = {"arm": name, "cells": {}}
        for budget in sorted(p.budgets):
            runs = [r for r in records if r["name"] == name and r["budget"] == budget]
            if not runs:
                continue
            cell = _stats([r["accuracy"] for r in runs])
            cell["train_seconds"] = statistics.fmean(r["train_seconds"] for r in runs)
            cell["select_seconds"] = statistics.fmean(r.get("select_seconds", 0.0) for r in runs)
            cell["condense_seconds"] = statistics.fmean(r["condense_seconds"] for r in runs)
            cell["examples"] = runs[0].get("selection", {}).get("selected")
            if full_mean:
                cell["of_full"] = cell["mean"] / full_mean
            row["cells"][f"{budget:g}"] = cell
        table.append(row)
    decomposition = []
    by_name = {row["arm"]: row["cells"] for row in table}
    for budget in sorted(p.budgets):
        key = f"{budget:g}"
        random_ce = by_name.get("random", {}).get(key)
        random_kd = by_name.get("random+KD", {}).get(key)
        if not random_ce:
            continue
        for method in list(p.methods) + [f"condensed-{k}" for k in p.condense]:
            ce = by_name.get(method, {}).get(key)
            kd = by_name.get(f"{method}+KD", {}).get(key)
            if not ce:
                continue
            entry = {
                "budget": budget,
                "method": method,
                "data_effect": ce["mean"] - random_ce["mean"],
                "beats_random_by_std": (ce["mean"] - random_ce["mean"]) / random_ce["std"]
                if random_ce["std"] > 0
                else None,
            }
            matched = by_name.get(f"random~{method}", {}).get(key)
            if matched:
                entry["vs_random_same_tokens"] = ce["mean"] - matched["mean"]
            paired = [
                r["accuracy"]
                for r in records
                if (r["name"], r["budget"], r["seed"]) == ("random", budget, 0)
            ]
            if random_kd and paired:  # the same subset and seed, with and without KD
                entry["kd_effect"] = random_kd["mean"] - paired[0]
            if kd:
                entry["both"] = kd["mean"] - random_ce["mean"]
            decomposition.append(entry)
    return {
        "metric": metric_title(config),
        "metric_kind": config.protocol.metric,
        "data": config.eval.tasks[0] if config.protocol.metric == "task" else config.data.eval,
        "budgets": p.budgets,
        "verdicts": verdicts(config, table, full_mean),
        "full": _stats(full) if full else None,
        "full_steps": reference[0].get("steps") if reference else None,
        "full_train_seconds": statistics.fmean(r["train_seconds"] for r in reference)
        if reference
        else None,
        "full_same_steps": _stats([r["accuracy"] for r in same_steps]) if same_steps else None,
        "train_steps": config.train.max_steps,
        "table": table,
        "decomposition": decomposition,
        "runs": records,
        "missing": [
            a.name + f" @ {_budget(a)} seed {a.seed}" for a in arms if not _done(a, records)
        ],
        "planned": sorted({f"{a.name}@{a.budget:g}" for a in arms if a.budget is not None}),
    }


def verdicts(
    config: RunConfig, table: list[dict[str, Any]], full_mean: float | None
) -> list[dict[str, Any]]:
    """Per budget, the best selection method (by mean accuracy without KD) and each condensed
    set against random: does it reach 95% of the full-data student, and does it beat random's
    mean by more than one of random's stds?"""
    p = config.protocol
    by_name = {row["arm"]: row["cells"] for row in table}
    found = []
    for budget in sorted(p.budgets):
        key = f"{budget:g}"
        random_cell = by_name.get("random", {}).get(key)
        if not random_cell:
            continue
        candidates = [(m, by_name[m][key]) for m in p.methods if key in by_name.get(m, {})]
        # The best of several single runs is biased upwards: where some methods have more
        # seeds, only those compete.
        most = max((cell["n"] for _, cell in candidates), default=0)
        candidates = [(m, cell) for m, cell in candidates if cell["n"] == most]
        condensed = [f"condensed-{k}" for k in p.condense]
        entries = []
        if candidates:
            entries.append(("selection", *max(candidates, key=lambda c: c[1]["mean"])))
        entries += [
            ("condensed", m, by_name[m][key]) for m in condensed if key in by_name.get(m, {})
        ]
        for kind, method, cell in entries:
            margin = cell["mean"] - random_cell["mean"]
            found.append(
                {
                    "budget": budget,
                    "kind": kind,
                    "method": method,
                    "mean": cell["mean"],
                    "std": cell["std"],
                    "n": cell["n"],
                    "of_full": cell["mean"] / full_mean if full_mean else None,
                    "random_mean": random_cell["mean"],
                    "random_std": random_cell["std"],
                    "random_n": random_cell["n"],
                    "reaches_95_of_full": cell["mean"] >= 0.95 * full_mean if full_mean else None,
                    "beats_random_by_1_std": margin > random_cell["std"]
                    if random_cell["n"] > 1
                    else None,
                }
            )
    return found


def _done(arm: Arm, records: list[dict[str, Any]]) -> bool:
    return any(
        r["name"] == arm.name and r["budget"] == arm.budget and r["seed"] == arm.seed
        for r in records
    )
