"""Loading a config for a command: the config package reads and checks each section; here the
names that other packages register are checked against their registries (divergences,
objectives, scorers, features, selectors). This sits at the top of the import graph so that
`config` depends on no subsystem."""

from __future__ import annotations

from pathlib import Path

from lmdistill.config import RunConfig, SelectConfig, build_config, check_sections
from lmdistill.config.checks import check
from lmdistill.dd.scores import FEATURES, SCORERS
from lmdistill.dd.select import NEEDS_FEATURES, NEEDS_SCORES, SELECTORS
from lmdistill.kd.rationale import OBJECTIVES
from lmdistill.losses import LOSSES


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load YAML (or the defaults when `path` is None), apply `a.b=value` overrides, validate:
    types, ranges, couplings between sections, and every registered name."""
    config = build_config(path, overrides)
    validate(config)
    return config


def validate(config: RunConfig) -> None:
    """Every check of a built config: each section's ranges and couplings, then the names
    other packages register."""
    check_sections(config)
    loss = config.loss
    check(loss.divergence in LOSSES, "loss.divergence", loss.divergence, f"one of {sorted(LOSSES)}")
    _validate_objective(config)
    _validate_select(config.select)


def _validate_objective(config: RunConfig) -> None:
    objective = config.objective
    check(
        objective.kind in OBJECTIVES,
        "objective.kind",
        objective.kind,
        f"one of {sorted(OBJECTIVES)}",
    )
    for name in ("rationale_weight", "keypoint_weight"):
        value = getattr(objective, name)
        check(value >= 0, f"objective.{name}", value, "a number >= 0")
    if config.train.curriculum == "progressive_steps":
        check(
            objective.kind in ("kpod", "step_by_step_kpod"),
            "train.curriculum",
            config.train.curriculum,
            "'progressive_steps' only with objective.kind kpod or step_by_step_kpod (they mark "
            "the rationale's steps)",
        )
    if objective.kind != "cot":
        check(
            config.teacher.kind == "local",
            "teacher.kind",
            config.teacher.kind,
            f"'local' with objective.kind={objective.kind} (a cached or served signal belongs "
            "to the responses as the teacher wrote them)",
        )


def _validate_select(select: SelectConfig) -> None:
    if select.scorer is not None:
        check(select.scorer in SCORERS, "select.scorer", select.scorer, f"one of {SCORERS}")
    if select.features is not None:
        allowed = f"one of {FEATURES}"
        check(select.features in FEATURES, "select.features", select.features, allowed)
    check(select.selector in SELECTORS, "select.selector", select.selector, f"one of {SELECTORS}")
    if select.selector in NEEDS_SCORES:
        check(
            select.scorer is not None,
            "select.scorer",
            select.scorer,
            f"a scorer with select.selector={select.selector}",
        )
    if select.selector in NEEDS_FEATURES:
        check(
            select.features is not None,
            "select.features",
            select.features,
            f"a feature kind with select.selector={select.selector}",
        )
