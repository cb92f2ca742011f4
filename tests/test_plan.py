"""`lmdistill plan`: the probe runs the config on a slice and leaves nothing behind; the sizes
it predicts are those a real run writes; what it cannot predict is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmdistill.cli import main
from lmdistill.config import ConfigError
from lmdistill.plan import make_plan
from lmdistill.validate import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
SMALL = ["data.max_train_examples=24", "generate.max_new_tokens=16", "eval.num_samples=0",
         "train.max_steps=6", "train.checkpoint_every=2"]  # fmt: skip


def test_the_plan_predicts_what_the_run_writes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    config = load_config(TINY, [*SMALL, f"output_dir={out}", "train.keep_checkpoints=1"])
    plan = make_plan(config, probe_steps=2)
    assert not out.exists()  # the probe ran elsewhere and is gone
    assert plan.steps == 6 and plan.probe_steps == 2
    assert plan.seconds_per_step > 0 and plan.baseline_seconds_per_step is not None
    assert plan.train_seconds == pytest.approx(
        6 * (plan.seconds_per_step + plan.baseline_seconds_per_step)
    )
    assert plan.prompts == 24 + config.data.eval_size
    assert plan.generation_seconds is not None and plan.generation_seconds > 0
    parts = {k: v for k, v in plan.memory_mb.items() if k != "peak"}
    assert sum(parts.values()) == pytest.approx(plan.memory_mb["peak"])
    assert main(["run", TINY, *SMALL, f"output_dir={out}", "train.keep_checkpoints=1"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert plan.prompts == metrics["generate"]["prompts"]
    # One kept checkpoint (weights + AdamW's moments) per trained student, and the two saved
    # students, as written.
    kept = [out / "checkpoints", out / "baseline" / "checkpoints"]
    assert all(len(list(d.iterdir())) == 1 for d in kept)
    written = sum(
        f.stat().st_size
        for d in (*kept, out / "student", out / "baseline" / "student")
        for f in d.rglob("*.safetensors")
    ) + sum(f.stat().st_size for d in kept for f in d.rglob("optimizer.pt"))
    assert plan.checkpoint_bytes == pytest.approx(written, rel=0.05)
    assert plan.fits_disk


def test_plan_prints_the_prediction_and_writes_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "plan.json"
    args = ["plan", TINY, *SMALL, f"output_dir={tmp_path / 'run'}", "--probe-steps", "1"]
    assert main([*args, "--json", str(target)]) == 0
    shown = capsys.readouterr().out
    for words in ("time per step: KD", "peak resident memory:", "disk: checkpoints", "teacher"):
        assert words in shown
    assert json.loads(target.read_text())["probe_steps"] == 1
    assert main([*args, "--json", str(target)]) == 2  # an existing file is never overwritten
    assert "exists" in capsys.readouterr().err


def test_time_per_step_counts_steps_not_log_records() -> None:
    """With train.log_every > 1 the records are steps apart: the time is per step."""
    from lmdistill.metrics import ArmMetrics
    from lmdistill.plan import _seconds_per_step

    history = [  # 1 s for the first step, then 2 s a step; a record every 10 steps
        {"step": 1, "tokens": 100, "tokens_per_s": 100.0},
        {"step": 11, "tokens": 1100, "tokens_per_s": 1100 / 21},
        {"step": 21, "tokens": 2100, "tokens_per_s": 2100 / 41},
    ]
    arm = ArmMetrics(None, 21, 2100, 41.0, 2100 / 41, history=history)
    assert _seconds_per_step(arm) == pytest.approx(2.0)


def test_plan_refuses_what_it_cannot_probe(tmp_path: Path) -> None:
    config = load_config(TINY, [f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="--probe-steps"):
        make_plan(config, probe_steps=0)
    served = load_config(
        TINY,
        [
            "teacher.kind=served",
            "cache.k=20",
            "teacher.model=m",
            "teacher.base_url=http://127.0.0.1:9/v1",
        ],
    )
    with pytest.raises(ConfigError, match="one teacher in this process"):
        make_plan(served)
    sharded = load_config(TINY, [f"output_dir={tmp_path}", "train.sharding=fsdp"])
    with pytest.raises(ConfigError, match=r"plan it with train\.sharding=none"):
        make_plan(sharded)
