"""The protocol's table: per arm and budget the mean, std and cost; what the data and KD each
add over a random subset; and the verdicts (95% of full data, beats random)."""

from __future__ import annotations

import statistics
from typing import Any

from lmdistill.config import RunConfig
from lmdistill.protocol.plan import Arm, budget_label, metric_title


def _stats(values: list[float]) -> dict[str, Any]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def summarise(config: RunConfig, records: list[dict[str, Any]], arms: list[Arm]) -> dict[str, Any]:
    """protocol.json: the table, the decomposition, the verdicts, every record, what is
    missing."""
    p = config.protocol
    same_steps = [r for r in records if r["method"] == "full"]
    longer = [r for r in records if r["method"] == f"full@{p.full_steps}"]
    reference = longer if p.full_steps is not None and longer else same_steps
    full = [r["accuracy"] for r in reference]
    full_mean = statistics.fmean(full) if full else None
    table = arm_table(config, records, arms, full_mean)
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
        "full_worst_group": _stats([r["groups"]["worst"] for r in reference])
        if reference and all(r.get("groups") for r in reference)
        else None,
        "train_steps": config.train.max_steps,
        "table": table,
        "decomposition": decomposition(config, records, table),
        "runs": records,
        "missing": [
            a.name + f" @ {budget_label(a)} seed {a.seed}" for a in arms if not _done(a, records)
        ],
        "planned": sorted({f"{a.name}@{a.budget:g}" for a in arms if a.budget is not None}),
    }


def arm_table(
    config: RunConfig, records: list[dict[str, Any]], arms: list[Arm], full_mean: float | None
) -> list[dict[str, Any]]:
    """Per arm (in plan order) and budget: the metric's mean, std and n over its seeds, the
    mean seconds of each stage, the examples selected, the share of the full-data mean, and
    where the scored rows carry groups, the worst group's score and the gap (over seeds)."""
    names = []
    for arm in arms:
        if arm.budget is not None and arm.name not in names:
            names.append(arm.name)
    table = []
    for name in names:
        row: dict[str, Any] = {"arm": name, "cells": {}}
        for budget in sorted(config.protocol.budgets):
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
            grouped = [r["groups"] for r in runs if r.get("groups")]
            if len(grouped) == len(runs):  # every seed scored per group
                cell["worst_group"] = _stats([g["worst"] for g in grouped])
                cell["group_gap"] = _stats([g["gap"] for g in grouped])
            row["cells"][f"{budget:g}"] = cell
        table.append(row)
    return table


def decomposition(
    config: RunConfig, records: list[dict[str, Any]], table: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Per budget and method, over random at the same budget: what the data adds (the method
    without KD), what KD adds (random with and without KD, same subset and seed), both."""
    p = config.protocol
    found = []
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
            found.append(entry)
    return found


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
