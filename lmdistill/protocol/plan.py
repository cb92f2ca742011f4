"""The protocol's arms: which students it trains (`plan`), each one's config (`arm_config`),
and the number it is scored by (`arm_metric`)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from lmdistill.config import ProtocolConfig, RunConfig
from lmdistill.config.build import updated
from lmdistill.metrics import EvalMetrics
from lmdistill.validate import validate


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


def budget_label(arm: Arm) -> str:
    return "all data" if arm.budget is None else f"{100 * arm.budget:g}%"


def task_name(config: RunConfig) -> str:
    if not config.eval.tasks:
        raise ValueError("protocol: eval.tasks is empty; the protocol scores task accuracy")
    return config.eval.tasks[0]


def arm_metric(config: RunConfig, after: EvalMetrics | None) -> float:
    """The arm's number (the records keep it as `accuracy`): task exact match, or held-out
    top-1 agreement with the teacher."""
    if after is None:
        raise ValueError("protocol: the arm was not evaluated (eval.enabled is false)")
    if config.protocol.metric == "agreement":
        if after.fidelity is None:
            raise ValueError("protocol: metric agreement needs eval.fidelity")
        return after.fidelity.top1_agreement
    return after.exact_match(task_name(config))


def arm_group_gap(config: RunConfig, after: EvalMetrics | None) -> dict[str, Any] | None:
    """The arm's number per group, where the scored rows carry two groups or more: the worst
    and the best group and the gap (`EvalMetrics.group_gaps`); None without groups."""
    if after is None:
        return None
    gaps = after.group_gaps()
    if config.protocol.metric == "agreement":
        return gaps.get("top1_agreement")
    return gaps.get(f"exact_match {task_name(config)}")


def metric_title(config: RunConfig) -> str:
    if config.protocol.metric == "agreement":
        return f"top-1 agreement with the teacher on `{config.data.eval}`"
    return f"`{task_name(config)}` (exact match)"
