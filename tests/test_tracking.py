"""Experiment tracking (`train.report_to`): TensorBoard event files read back hold what the
run's history and metrics hold; off by default; a tracker added on resume is the same run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmdistill.cli import main
from lmdistill.config import config_hash
from lmdistill.kd.tracking import TRACKERS, eval_values, flat_config
from lmdistill.validate import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
FAST = ["train.max_steps=4", "train.checkpoint_every=0", "data.max_train_examples=16",
        "generate.max_new_tokens=16", "eval.num_samples=0"]  # fmt: skip


def _scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def test_tensorboard_events_hold_the_history_and_the_held_out_measures(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    overrides = [f"output_dir={out}", "train.report_to=[tensorboard]", "train.log_every=2"]
    assert main(["run", TINY, *FAST, *overrides]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for arm, section in (("kd", metrics["kd"]), ("baseline", metrics["baseline"])):
        scalars = _scalars(out / "tracking" / arm)
        history = section["history"]
        assert [step for step, _ in scalars["train/loss"]] == [r["step"] for r in history]
        for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
            logged = [value for _, value in scalars[f"train/{key}"]]
            assert logged == pytest.approx([r[key] for r in history], rel=1e-6)
        after = section["after"]
        assert scalars["eval/kl"] == [(4, pytest.approx(after["kl"], rel=1e-6))]
        assert scalars["eval/top1_agreement"][0][1] == pytest.approx(after["top1_agreement"])
    # The config is stored as the run's hyperparameters, next to the events.
    assert list((out / "tracking" / "kd").glob("*/hparams.yml"))


def test_tracking_is_off_by_default_and_changes_no_hash(tmp_path: Path) -> None:
    assert load_config(TINY, []).train.report_to == []
    plain = load_config(TINY, [])
    tracked = load_config(TINY, ["train.report_to=[tensorboard]", f"train.tracking_dir={tmp_path}"])
    # A run resumed with a tracker added is the same run (its checkpoints stay valid).
    assert config_hash(plain) == config_hash(tracked)
    out = tmp_path / "run"
    assert main(["run", TINY, *FAST, f"output_dir={out}", "baseline=false"]) == 0
    assert not (out / "tracking").exists()


def test_unknown_or_missing_trackers_get_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    assert set(TRACKERS) <= set(LOGGER_TYPE_TO_CLASS)
    assert main(["run", TINY, "train.report_to=[tensorbord]"]) == 2
    err = capsys.readouterr().err
    assert "train.report_to: 'tensorbord' is not allowed" in err and len(err.splitlines()) == 1
    assert main(["run", TINY, "train.report_to=[tensorboard, tensorboard]"]) == 2
    assert "each tracker named once" in capsys.readouterr().err


def test_config_and_measures_flatten_to_numbers_and_text() -> None:
    assert flat_config({"loss": {"alpha": 0.5, "x": None}, "tasks": ["a", "b"]}) == {
        "loss.alpha": 0.5,
        "loss.x": "None",
        "tasks": "['a', 'b']",
    }
    from lmdistill.metrics import EvalMetrics, TaskMetrics

    groups = {"g0": {"examples": 2, "exact_match": 0.5}, "g1": {"examples": 2, "exact_match": 1.0}}
    after = EvalMetrics(
        tasks={"lab:test:4": TaskMetrics(4, 0.75, 0.0, None, None, None, groups=groups)}
    )
    assert eval_values(after) == {
        "lab:test:4/exact_match": 0.75,
        "lab:test:4/exact_match[g0]": 0.5,
        "lab:test:4/exact_match[g1]": 1.0,
    }
