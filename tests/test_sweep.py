"""`lmdistill sweep`: a grid over seeds, kept, read back when finished, one table."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from conftest import ROOT

from lmdistill.config import ConfigError
from lmdistill.metrics import ArmMetrics, EvalMetrics, RunMetrics, TaskMetrics
from lmdistill.report.sweep import render_sweep as render
from lmdistill.sweep import aggregate, cells, headline, split_overrides


def test_axes_are_the_overrides_with_several_values() -> None:
    fixed, axes = split_overrides(
        ["loss.temperature=1,2", "train.max_steps=3", "loss.layer_map=[1, 2]", "a.b=x,y,z"]
    )
    assert fixed == ["train.max_steps=3", "loss.layer_map=[1, 2]"]
    assert axes == [("loss.temperature", ["1", "2"]), ("a.b", ["x", "y", "z"])]
    assert len(cells(axes)) == 6 and cells(axes)[0] == ["loss.temperature=1", "a.b=x"]
    with pytest.raises(ConfigError, match="at least one axis"):
        split_overrides(["train.max_steps=3"])
    with pytest.raises(ConfigError, match="empty value"):
        split_overrides(["loss.temperature=1,"])


def test_mean_and_sample_std_across_seeds() -> None:
    rows = [{"cell": "a", "seed": s, "KD kl": v} for s, v in enumerate([1.0, 2.0, 4.0])]
    (entry,) = aggregate(rows)
    assert entry["KD kl"]["mean"] == pytest.approx(7 / 3)
    assert entry["KD kl"]["std"] == pytest.approx(statistics.stdev([1.0, 2.0, 4.0]))


def test_task_table_shares_of_the_teacher_and_columns_a_reference_lacks() -> None:
    def metrics(em: float, annotations: float | None) -> RunMetrics:
        source = "lab:test:200:0:steps=3"
        return RunMetrics(
            lmdistill_version="test",
            config_hash="",
            data={},
            models={},
            teacher=EvalMetrics(tasks={source: TaskMetrics(4, 0.8, 0.0, None, None, None)}),
            kd=ArmMetrics(
                EvalMetrics(tasks={source: TaskMetrics(4, em, 1.0, annotations, None, None)}),
                steps=1,
                tokens=1,
                train_seconds=1.0,
                tokens_per_s=1.0,
            ),
        )

    rows = [
        {"cell": "reference,objective.kind=label_only", "seed": 0, **headline(metrics(0.2, None))},
        {"cell": "objective.kind=cot", "seed": 0, **headline(metrics(0.6, 0.9))},
        {"cell": "objective.kind=cot", "seed": 1, **headline(metrics(0.7, 0.95))},
    ]
    summary = {
        "axes": {"objective.kind": ["cot"]},
        "reference": ["objective.kind=label_only"],
        "seeds": 2,
        "runs": rows,
        "table": aggregate(rows),
    }
    text = render(summary)
    assert "Teacher exact match: lab:test 0.800" in text
    header = "| cell | KD exact match lab:test | KD annotations right lab:test |"
    assert header in text  # the label-only reference writes no annotations; cot does
    assert "| `objective.kind=cot` | 0.65 ± 0.071 (81%) | 0.925 ± 0.035 |" in text
    assert "| `objective.kind=cot` | +0.45 |  |" in text  # vs the reference, where it has one


def test_a_tiny_sweep_runs_every_cell_and_seed_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lmdistill.cli import main

    args = [
        "sweep",
        str(ROOT / "configs" / "tiny.yaml"),
        "loss.temperature=1,2",
        "data.max_train_examples=16",
        "data.eval_size=4",
        "generate.max_new_tokens=8",
        "train.max_steps=2",
        "train.batch_size=4",
        "eval.num_samples=1",
        "eval.sample_max_new_tokens=4",
        "baseline=false",
        "--seeds",
        "2",
        "--out",
        str(tmp_path / "sw"),
        "--reference",
        "loss.alpha=1.0",
    ]
    assert main(args) == 0
    summary = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert [e["cell"] for e in summary["table"]] == [
        "reference,loss.alpha=1.0",
        "loss.temperature=1",
        "loss.temperature=2",
    ]
    assert all(e["runs"] == 2 for e in summary["table"])
    reference = tmp_path / "sw" / "reference,loss.alpha=1.0" / "seed-0" / "metrics.json"
    assert json.loads(reference.read_text())["kd"]["steps"] == 2
    report = (tmp_path / "sw" / "sweep.md").read_text()
    kl = [e["KD kl"]["mean"] for e in summary["table"]]
    assert f"| `loss.temperature=2` | {kl[2] - kl[0]:+.4g} |" in report  # vs the reference
    runs = {(r["cell"], r["seed"]): r["KD kl"] for r in summary["runs"]}
    cell = summary["table"][2]["KD kl"]
    two = [runs[("loss.temperature=2", s)] for s in (0, 1)]
    assert cell["mean"] == pytest.approx(sum(two) / 2) and two[0] != two[1]  # seeds differ
    metrics = tmp_path / "sw" / "loss.temperature=2" / "seed-1" / "metrics.json"
    assert json.loads(metrics.read_text())["models"]["student_layers"] == 2
    assert (tmp_path / "sw" / "sweep.png").stat().st_size > 0
    assert "| `loss.temperature=1` |" in (tmp_path / "sw" / "sweep.md").read_text()
    # Started again, the finished runs are read back, not redone.
    stamp = metrics.stat().st_mtime_ns
    assert main(args) == 0
    assert metrics.stat().st_mtime_ns == stamp
    # --report-only with a changed config and one more cell: nothing runs, the table says so.
    assert args[2] == "loss.temperature=1,2"
    changed = [*args[:2], "loss.temperature=1,2,3", "train.lr=0.5", *args[3:], "--report-only"]
    assert main(changed) == 0
    assert metrics.stat().st_mtime_ns == stamp
    assert not (tmp_path / "sw" / "loss.temperature=3").exists()
    text = (tmp_path / "sw" / "sweep.md").read_text()
    assert "`loss.temperature=3` seed 0: not run" in text
    assert "`loss.temperature=2` seed 1: run with train.lr (0.003 then, 0.5 now) different" in text
