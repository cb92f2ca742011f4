"""A short lab run where distilling the rationale already beats distilling the label alone.

Two small students learn two-step lab problems for the same number of steps, one on the full
worked solution (`cot`), one on the final answer alone (`label_only`); both are scored by exact
match on held-out problems. No download: the tokenizer is the built-in byte-level one and the
students start from scratch (a CE-only lab run; the lab's full experiment distils a trained
lab teacher, see configs/lab/).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lmdistill.pipeline import run
from lmdistill.validate import load_config

ROOT = Path(__file__).resolve().parents[1]
SPEC = "steps=2:min_steps=2:start_max=9:operand_max=5:value_max=30"
TEST = f"lab:test:100:0:{SPEC}"


def _exact_match(tmp_path: Path, kind: str) -> float:
    config = load_config(
        ROOT / "configs" / "lab" / "teacher.yaml",
        [
            f"output_dir={tmp_path / kind}",
            f"objective.kind={kind}",
            f"data.train=lab:train:6000:0:{SPEC}",
            f"data.eval=lab:test:8:0:{SPEC}",
            "student.num_layers=2",
            "student.hidden_size=128",
            "student.intermediate_size=384",
            "train.max_steps=220",
            "train.batch_size=32",
            "train.lr=4e-3",
            "train.warmup_steps=10",
            "train.checkpoint_every=0",
            "train.log_every=20",
            f"eval.tasks=['{TEST}']",
            "eval.task_max_new_tokens=90",
            "eval.task_batch_size=50",
            "eval.num_samples=1",
            "eval.sample_max_new_tokens=8",
        ],
    )
    metrics = run(config)
    return metrics.kd.after.exact_match(TEST)


@pytest.mark.slow
def test_rationale_objective_beats_label_only_on_a_short_lab_run(tmp_path: Path) -> None:
    label_only = _exact_match(tmp_path, "label_only")
    cot = _exact_match(tmp_path, "cot")
    assert cot >= label_only + 0.15, (cot, label_only)
