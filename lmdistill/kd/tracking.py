"""Experiment tracking (`train.report_to`): each arm's training records and held-out measures
sent to the trackers a user already has, through Accelerate's tracker classes (TensorBoard,
Weights & Biases, MLflow, ...). Off by default; on the main process only.

One tracker run per arm: `kd` (the KD student) and `baseline` (the CE-only student), each
under `train.tracking_dir` (default OUTPUT_DIR/tracking) for trackers that write files
(TensorBoard: `tracking/kd/`); trackers with projects (W&B, Comet, MLflow's experiment)
get the project `<output_dir's name>-<arm>`. The
run's config is stored as its hyperparameters (flattened: `loss.alpha`, ...). Every record
the history keeps (`train.log_every`) is logged as `train/<part>` at its step (loss, ce, kd,
lr, grad_norm, tokens, tokens_per_s, group losses, ...); after evaluation, the held-out
measures as `eval/<measure>` at the last step (KL, agreement, ECE, each task's exact match,
per group too).
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lmdistill.metrics import EvalMetrics

# What each tracker needs installed (Accelerate imports it only when the tracker starts).
PACKAGES = {
    "tensorboard": ("tensorboard", "tensorboardX"),
    "wandb": ("wandb",),
    "mlflow": ("mlflow",),
    "comet_ml": ("comet_ml",),
    "aim": ("aim",),
    "clearml": ("clearml",),
    "dvclive": ("dvclive",),
    "swanlab": ("swanlab",),
    "trackio": ("trackio",),
}


TRACKERS = tuple(PACKAGES)


def missing_package(name: str) -> str | None:
    """The package tracker `name` needs when none of its choices is installed, else None."""
    choices = PACKAGES.get(name, ())
    if any(importlib.util.find_spec(package) is not None for package in choices):
        return None
    return choices[0] if choices else name


class Tracking:
    """The trackers of one arm; `log` and `finish` do nothing on other processes."""

    def __init__(
        self, names: list[str], directory: Path, run_name: str, project: str, config: Mapping
    ) -> None:
        from accelerate import PartialState
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        self.trackers: list[Any] = []
        if not PartialState().is_main_process:
            return
        for name in names:
            kind = LOGGER_TYPE_TO_CLASS[name]
            try:
                if getattr(kind, "requires_logging_directory", False):
                    tracker = kind(run_name, directory)  # DIRECTORY/<arm>
                else:  # a project per run and arm; files (MLflow) under the directory too
                    accepted = inspect.signature(kind.__init__).parameters
                    where = {"logging_dir": str(directory)} if "logging_dir" in accepted else {}
                    tracker = kind(f"{project}-{run_name}", **where)
                tracker.start()
                tracker.store_init_configuration(flat_config(config))
            except Exception as error:  # a tracker's own failure (no login, no server)
                self.finish()
                text = " ".join(str(error).split())[:300] or type(error).__name__
                raise RuntimeError(f"train.report_to: {name} could not start: {text}") from None
            self.trackers.append(tracker)

    def log(self, values: Mapping[str, Any], step: int) -> None:
        numbers = {k: float(v) for k, v in values.items() if isinstance(v, int | float)}
        for tracker in self.trackers:
            tracker.log(numbers, step=step)

    def log_evaluation(self, after: EvalMetrics | None, step: int) -> None:
        if after is not None and self.trackers:
            self.log({f"eval/{k}": v for k, v in eval_values(after).items()}, step)

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []


def open_tracking(
    names: list[str], directory: Path, run_name: str, project: str, config: Mapping
) -> Tracking | None:
    """The arm's trackers, or None when `train.report_to` is empty."""
    return Tracking(names, directory, run_name, project, config) if names else None


def flat_config(config: Mapping, prefix: str = "") -> dict[str, Any]:
    """`{"loss": {"alpha": 0.5}}` -> `{"loss.alpha": 0.5}`; lists and None as text (trackers
    take numbers, strings and booleans as hyperparameters)."""
    found: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            found.update(flat_config(value, f"{name}."))
        elif isinstance(value, bool | int | float | str):
            found[name] = value
        else:
            found[name] = str(value)
    return found


def eval_values(after: EvalMetrics) -> dict[str, float]:
    """The held-out measures as numbers: fidelity's, each task's exact match or accuracy,
    and each group's where rows carry groups."""
    found: dict[str, float] = {}
    if after.fidelity is not None:
        fidelity = after.fidelity.as_dict()
        found.update({k: v for k, v in fidelity.items() if isinstance(v, int | float)})
    for source, task in after.tasks.items():
        measures = task.as_dict()
        for key in ("exact_match", "accuracy", "accuracy_norm", "accuracy_per_token"):
            if isinstance(measures.get(key), int | float):
                found[f"{source}/{key}"] = measures[key]
        for group, part in (measures.get("groups") or {}).items():
            found[f"{source}/exact_match[{group}]"] = part["exact_match"]
    for group, fidelity_of_group in after.groups.items():
        for key, value in fidelity_of_group.as_dict().items():
            if isinstance(value, int | float):
                found[f"{key}[{group}]"] = value
    return found
