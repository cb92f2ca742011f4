"""Loading a config for a command: the config package reads and checks each section; here the
names that other packages register are checked against their registries (divergences,
objectives, scorers, features, selectors). This sits at the top of the import graph so that
`config` depends on no subsystem."""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path
from typing import Any

from lmdistill.config import RunConfig, SelectConfig, build_config, check_sections
from lmdistill.config.checks import check
from lmdistill.dd.select import SELECTORS
from lmdistill.dd.stage import FEATURES, SCORERS
from lmdistill.kd.rationale import OBJECTIVES
from lmdistill.kd.tracking import TRACKERS, missing_package
from lmdistill.losses import LOSSES
from lmdistill.registry import Registry
from lmdistill.teachers.ensemble import STRATEGIES
from lmdistill.teachers.setup import TEACHERS


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
    registered(LOSSES, loss.divergence)
    registered(TEACHERS, config.teacher.kind)
    TEACHERS[config.teacher.kind].check(config)
    _validate_objective(config)
    _validate_on_policy(config)
    _validate_select(config.select)
    _validate_ensemble(config)
    _validate_memory(config)
    _validate_tracking(config.train.report_to)
    _validate_lm_eval(config)


def _validate_tracking(names: list[str]) -> None:
    """Each tracker is one Accelerate knows, named once, and its package is installed."""
    for name in names:
        check(name in TRACKERS, "train.report_to", name, f"trackers among {', '.join(TRACKERS)}")
        package = missing_package(name)
        check(
            package is None,
            "train.report_to",
            name,
            f"a tracker whose package is installed (pip install {package}; "
            "`pip install 'lmdistill[track]'` installs tensorboard)",
        )
    check(len(set(names)) == len(names), "train.report_to", names, "each tracker named once")


def _validate_lm_eval(config: RunConfig) -> None:
    """lm-eval is installed when tasks are named; a task file is there; a limit is >= 1."""
    tasks, limit = config.eval.lm_eval_tasks, config.eval.lm_eval_limit
    if not tasks:
        return
    check(
        importlib.util.find_spec("lm_eval") is not None,
        "eval.lm_eval_tasks",
        tasks,
        "lm-evaluation-harness installed (pip install 'lmdistill[eval]')",
    )
    files = [task for task in tasks if task.endswith((".yaml", ".yml"))]
    for task in files:
        check(Path(task).is_file(), "eval.lm_eval_tasks", task, "a task YAML file that exists")
        check(
            _plain_task_file(Path(task)),
            "eval.lm_eval_tasks",
            task,
            "a task file that runs no code: plain YAML, no `!function` tag or `include` "
            "(lm-eval imports the Python they name)",
        )
    names = [task for task in tasks if task not in files]
    if names:  # lm-eval's own index of its tasks (a few seconds to build)
        from lm_eval.tasks import TaskManager

        known = set(TaskManager().all_tasks)
        for name in names:
            check(
                name in known, "eval.lm_eval_tasks", name, "a task lm-eval knows, or a .yaml file"
            )
    check(limit is None or limit >= 1, "eval.lm_eval_limit", limit, "null or documents >= 1")
    shots = config.eval.lm_eval_num_fewshot
    check(shots is None or shots >= 0, "eval.lm_eval_num_fewshot", shots, "null or >= 0")
    check(len(set(tasks)) == len(tasks), "eval.lm_eval_tasks", tasks, "each task named once")


def _plain_task_file(path: Path) -> bool:
    """Whether a task file is data only: it parses as plain YAML (a `!function` tag does
    not) and includes no other file."""
    import yaml

    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        return False
    return isinstance(loaded, dict) and "include" not in loaded


def _validate_memory(config: RunConfig) -> None:
    """The replay memory's selector: registered, and needing no scores (it runs on the
    finished student's features alone)."""
    memory = config.memory
    check(
        memory.selector in SELECTORS and not SELECTORS[memory.selector].needs_scores,
        "memory.selector",
        memory.selector,
        "one of " + ", ".join(name for name in SELECTORS if not SELECTORS[name].needs_scores),
    )
    if SELECTORS[memory.selector].needs_features:
        check(
            memory.features != "none",
            "memory.features",
            memory.features,
            f"'hidden' with memory.selector={memory.selector}",
        )


def registered(registry: Registry[Any], name: str) -> None:
    """`name` must be registered; the error lists what is."""
    check(name in registry, registry.field, name, registry.allowed())


def _validate_on_policy(config: RunConfig) -> None:
    spec = config.on_policy
    check(spec.divergence in LOSSES, "on_policy.divergence", spec.divergence, LOSSES.allowed())
    if spec.fraction > 0:
        kind = config.teacher.kind
        scoring = " or ".join(k for k in TEACHERS if TEACHERS[k].scores_text)
        check(
            TEACHERS[kind].scores_text,
            "on_policy.fraction",
            spec.fraction,
            f"0 with teacher.kind={kind}: on-policy steps need a teacher that scores the text "
            f"the student writes, and a {kind} teacher cannot score new text"
            + (" (a cache holds its signal on fixed text only)" if kind == "cache" else "")
            + f"; use teacher.kind={scoring}",
        )


def _validate_objective(config: RunConfig) -> None:
    objective = config.objective
    registered(OBJECTIVES, objective.kind)
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
            TEACHERS[config.teacher.kind].in_process,
            "teacher.kind",
            config.teacher.kind,
            f"'local' with objective.kind={objective.kind} (a cached or served signal belongs "
            "to the responses as the teacher wrote them)",
        )


def _validate_select(select: SelectConfig) -> None:
    if select.scorer is not None:
        registered(SCORERS, select.scorer)
    if select.features is not None:
        registered(FEATURES, select.features)
    registered(SELECTORS, select.selector)
    if SELECTORS[select.selector].needs_scores:
        check(
            select.scorer is not None,
            "select.scorer",
            select.scorer,
            f"a scorer with select.selector={select.selector}",
        )
    if SELECTORS[select.selector].needs_features:
        check(
            select.features is not None,
            "select.features",
            select.features,
            f"a feature kind with select.selector={select.selector}",
        )


def _validate_ensemble(config: RunConfig) -> None:
    """Several teachers (`teachers:`): names, weights and kinds that can be combined."""
    spec = config.ensemble
    registered(STRATEGIES, spec.strategy)
    check(spec.k is None or spec.k >= 1, "ensemble.k", spec.k, "an integer >= 1")
    check(spec.confidence_temperature > 0, "ensemble.confidence_temperature",
          spec.confidence_temperature, "a number > 0")  # fmt: skip
    check(spec.answer_max_new_tokens >= 1, "ensemble.answer_max_new_tokens",
          spec.answer_max_new_tokens, "an integer >= 1")  # fmt: skip
    if not config.teachers:
        return
    names = [t.name for t in config.teachers]
    check(len(set(names)) == len(names), "teachers[].name", names, "distinct names")
    for name in names:  # a name is a directory under cache.dir and ensemble.answers_dir
        check(bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", str(name)))
              and name not in ("train", "eval"), "teachers[].name", name,
              "letters, digits, '.', '_' and '-' (not 'train' or 'eval')")  # fmt: skip
    loss = config.loss
    check(loss.hidden_weight == 0 and loss.attention_weight == 0,
          "loss.hidden_weight/attention_weight", [loss.hidden_weight, loss.attention_weight],
          "0 with several teachers (feature losses match one teacher's layers)")  # fmt: skip
    for i, teacher in enumerate(config.teachers):
        where = f"teachers[{i}]"
        check(teacher.weight > 0 and math.isfinite(teacher.weight), f"{where}.weight",
              teacher.weight, "a finite number > 0")  # fmt: skip
        registered(TEACHERS, teacher.kind)
        check(TEACHERS[teacher.kind].scores_text or TEACHERS[teacher.kind].caches_signal,
              f"{where}.kind", teacher.kind,
              "a teacher that gives scores (local, served, cache): a text-only teacher has "
              "nothing to combine")  # fmt: skip
        if i == 0:
            continue  # the run's own teacher: checked as `teacher` above
        check(bool(teacher.path), f"{where}.path", teacher.path, "a model path (its tokenizer)")
        if teacher.kind == "served":
            for name in ("base_url", "model"):
                value = getattr(teacher, name)
                check(bool(value), f"{where}.{name}", value, "a value with kind=served")
            check(loss.temperature == 1.0, "loss.temperature", loss.temperature,
                  f"1.0 with {where}.kind=served (a server scores at temperature 1)")  # fmt: skip
        if config.on_policy.fraction > 0:
            check(TEACHERS[teacher.kind].scores_text, "on_policy.fraction",
                  config.on_policy.fraction,
                  f"0 with {where}.kind={teacher.kind}: every teacher of an on-policy run must "
                  "score the text the student writes")  # fmt: skip
        if config.objective.kind != "cot":
            check(TEACHERS[teacher.kind].in_process, f"{where}.kind", teacher.kind,
                  f"'local' with objective.kind={config.objective.kind}")  # fmt: skip
