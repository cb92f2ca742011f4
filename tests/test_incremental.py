"""Incremental distillation: a finished run leaves a memory (at most 1% of its data, chosen by
k-center over the student's features, and its Fisher estimate) that belongs to its student;
a continuing run reads only that of the old data, records its lineage, trains with the
previous student as a retention teacher (zero loss where they agree) and an anchor whose
penalty and gradient are the definition's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ROOT

from lmdistill.cli import main
from lmdistill.config import ConfigError, StudentConfig
from lmdistill.data import DataError, load_examples, tokenize_examples
from lmdistill.data.memory import open_memory
from lmdistill.kd.incremental import Anchor, fisher_diagonal
from lmdistill.models import build_student
from lmdistill.models.tiny import build_tiny_llama, build_tiny_tokenizer
from lmdistill.validate import load_config

PHASE1 = [
    "generate.enabled=false",
    "data.train=lab:train:200:0:operations=add+subtract",
    "data.eval_size=16",
    "data.max_train_examples=null",
    "memory.fraction=0.01",
    "memory.fisher=true",
    "memory.fisher_examples=32",
    "train.max_steps=8",
    "eval.num_samples=1",
]


@pytest.fixture(scope="module")
def phase1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("incremental") / "phase1"
    assert main(["run", str(ROOT / "configs/tiny.yaml"), f"output_dir={out}", *PHASE1]) == 0
    return out


def test_a_run_leaves_a_memory_of_at_most_one_percent(phase1: Path) -> None:
    manifest = json.loads((phase1 / "memory/manifest.json").read_text())
    assert manifest["old_examples"] == 184 and manifest["examples"] == 1
    assert manifest["fraction"] <= 0.01 and manifest["selector"] == "kcenter"
    kept = load_examples(str(phase1 / "memory/examples.jsonl"))
    assert [e.id for e in kept] == manifest["ids"]
    assert manifest["fisher"] == {"examples": 32}
    assert (phase1 / "memory/fisher.safetensors").is_file()
    metrics = json.loads((phase1 / "metrics.json").read_text())
    assert metrics["memory"]["examples"] == 1 and "lineage" not in metrics
    assert "## Memory left for continuing runs" in (phase1 / "report.md").read_text()


def test_a_continued_run_records_its_lineage_and_keeps_to_its_past(
    phase1: Path, tmp_path: Path
) -> None:
    out = tmp_path / "phase2"
    overrides = [
        f"output_dir={out}",
        f"student.path={phase1 / 'student'}",
        f"incremental.memory={phase1 / 'memory'}",
        "train.log_every=1",
    ]
    assert main(["run", str(ROOT / "configs/tiny-incremental.yaml"), *overrides]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    lineage = metrics["lineage"]
    assert lineage["continued"] == str(phase1 / "student")
    assert lineage["memory"]["replayed_examples"] == 1
    assert lineage["memory"]["old_examples"] == 184
    assert lineage["new_examples"] == 80 and lineage["anchor"] == "ewc"
    assert metrics["data"]["train_examples"] == 81  # the new examples and the replayed one
    history = metrics["kd"]["history"]
    # The retention teacher is the student as it started: no divergence at the first step.
    assert history[0]["retention"] == pytest.approx(0.0, abs=1e-6)
    assert history[0]["anchor"] == 0.0
    assert history[-1]["retention"] > 0 and history[-1]["anchor"] > 0
    assert "## Lineage (a continued student)" in (out / "report.md").read_text()


def test_a_memory_of_another_student_is_refused(
    phase1: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = phase1 / "baseline" / "student"  # the same run's CE-only student
    code = main(
        [
            "run",
            str(ROOT / "configs/tiny-incremental.yaml"),
            f"output_dir={tmp_path / 'x'}",
            f"student.path={other}",
            f"incremental.memory={phase1 / 'memory'}",
        ]
    )
    error = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(error) == 1
    assert "a memory belongs to the student it was made with" in error[0]
    assert not (tmp_path / "x").exists()  # refused before anything was written
    with pytest.raises(DataError, match="not a memory an lmdistill run wrote"):
        open_memory(phase1, phase1 / "student")


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["memory.fraction=0.05"], "memory.fraction"),
        (["incremental.retention_weight=1"], "student.init"),
        (["student.init=path", "student.path=x", "incremental.anchor=ewc"], "anchor_weight"),
        (
            ["student.init=path", "student.path=x", "incremental.anchor=ewc",
             "incremental.anchor_weight=1"],
            "incremental.memory",
        ),
        (["memory.selector=top"], "memory.selector"),
    ],
)  # fmt: skip
def test_incremental_settings_are_checked(overrides: list[str], field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(ROOT / "configs/tiny.yaml", overrides)


def test_anchor_penalty_and_gradient_are_the_definition() -> None:
    model = torch.nn.Linear(3, 2)
    fisher = {"weight": torch.rand(2, 3), "bias": torch.rand(2)}
    anchor = Anchor(model, 4.0, fisher)
    with torch.no_grad():
        model.weight += 0.5
        model.bias -= 0.25
    assert anchor.penalty(model) == pytest.approx(
        0.5 * 4.0 * float((fisher["weight"] * 0.25).sum() + (fisher["bias"] * 0.0625).sum())
    )
    model.zero_grad()
    anchor.add_gradient(model)
    assert model.weight.grad is not None and model.bias.grad is not None
    torch.testing.assert_close(model.weight.grad, 4.0 * fisher["weight"] * 0.5)
    torch.testing.assert_close(model.bias.grad, 4.0 * fisher["bias"] * -0.25)
    with pytest.raises(ValueError, match="made for another model"):
        Anchor(model, 1.0, {"weight": fisher["weight"]})


def test_fisher_is_the_mean_squared_gradient_of_each_examples_log_likelihood() -> None:
    tokenizer = build_tiny_tokenizer()
    teacher = build_tiny_llama(len(tokenizer), layers=2, hidden=32, seed=0)
    student, _ = build_student(StudentConfig(num_layers=1), teacher, tokenizer)
    items, _ = tokenize_examples(load_examples("lab:train:3:0"), tokenizer, max_length=256)
    fisher = fisher_diagonal(student, items, tokenizer.pad_token_id)
    head = dict(student.named_parameters())
    name = next(n for n in head if n.endswith("embed_tokens.weight"))
    naive = torch.zeros_like(head[name])
    for item in items:
        ids = torch.tensor([item.input_ids])
        labels = torch.tensor([item.labels])
        logits = student(input_ids=ids).logits[0, :-1]
        nll = torch.nn.functional.cross_entropy(
            logits, labels[0, 1:], ignore_index=-100, reduction="sum"
        )
        (grad,) = torch.autograd.grad(nll, [head[name]])
        naive += grad**2
    torch.testing.assert_close(fisher[name], naive / len(items), rtol=1e-4, atol=1e-10)


def test_replay_off_still_checks_the_memory_before_anything_is_written(
    phase1: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        "run",
        str(ROOT / "configs/tiny-incremental.yaml"),
        f"output_dir={tmp_path / 'y'}",
        f"student.path={phase1 / 'baseline' / 'student'}",
        f"incremental.memory={phase1 / 'memory'}",
        "incremental.replay=false",
    ]
    assert main(args) != 0
    assert "a memory belongs to the student it was made with" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


def test_a_plain_run_from_a_model_path_has_no_lineage(phase1: Path) -> None:
    from lmdistill.incremental import lineage

    config = load_config(
        ROOT / "configs/tiny.yaml", ["student.init=path", f"student.path={phase1 / 'student'}"]
    )
    assert lineage(config, load_examples("lab:train:3:0")) is None


def _lab() -> Any:
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import incremental_lab

    return incremental_lab


def test_the_lab_experiment_scores_its_targets_against_the_rerun() -> None:
    lab = _lab()

    def entry(arm: str, a: float, b: float, tokens: int, seconds: float) -> dict[str, Any]:
        found = {"arm": arm, "a_exact_match": a, "b_exact_match": b}
        found |= {"tokens": tokens, "train_seconds": seconds}
        if arm not in (lab.RERUN, "phase 1"):
            found["retention"] = a / 0.8
        return found

    runs = [
        entry("phase 1", 0.8, 0.1, 100, 10.0),
        entry(lab.RERUN, 0.8, 0.6, 1000, 100.0),
        entry("KD + retention + replay", 0.78, 0.57, 240, 20.0),
        entry("fine-tune on B", 0.4, 0.6, 240, 30.0),
    ]
    arms = lab.summarise(runs)
    good = arms["KD + retention + replay"]
    assert good["retention"]["mean"] == pytest.approx(0.975)
    assert good["b_of_rerun"] == pytest.approx(0.95)
    assert good["targets"] == {
        "retention >= 0.95": True,
        "B >= 0.9 of re-run": True,
        "compute <= 0.25 of re-run": True,
    }
    forgets = arms["fine-tune on B"]["targets"]
    assert not forgets["retention >= 0.95"]
    assert not forgets["compute <= 0.25 of re-run"]  # 30 of the re-run's 100 seconds
    assert "| KD + retention + replay | 0.780 ± 0.000 | 0.975" in lab.tables({"arms": arms})


@pytest.mark.slow
def test_the_lab_experiment_runs_end_to_end_on_tiny_models(tmp_path: Path) -> None:
    import subprocess
    import sys

    result = tmp_path / "incremental.json"
    command = [
        sys.executable, str(ROOT / "benchmarks/incremental_lab.py"), "--out", str(tmp_path),
        "--seeds", "1", "--result", str(result), "teacher.path=tiny-llama",
        "teacher.tiny_layers=2", "train.max_steps=3", "memory.fisher_examples=8",
        "eval.task_max_new_tokens=8", "train.checkpoint_every=0",
    ]  # fmt: skip
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=900)
    found = json.loads(result.read_text())
    assert set(found["arms"]) == {"phase 1", *_lab().ARMS}
    replay = next(r for r in found["runs"] if r["arm"] == "KD + retention + replay")
    assert replay["lineage"]["memory"]["replayed_examples"] == 10
    assert (tmp_path / "KD-and-retention-and-anchor/s0/metrics.json").is_file()
    assert result.with_suffix(".png").is_file()
