"""`student.init: layers_by_importance`: block influence against its definition, the choice
(first and last always), the copy, and a run that records both."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from lmdistill.cli import main
from lmdistill.data import Example, collate, tokenize_examples
from lmdistill.models.students import (
    block_influence,
    copy_layers,
    layers_from_teacher,
    most_important_layers,
)

ROOT = Path(__file__).resolve().parents[1]


def _batch(tokenizer: Any) -> dict[str, torch.Tensor]:
    examples = [
        Example(str(i), ({"role": "user", "content": q},), a)
        for i, (q, a) in enumerate(
            [("What is 2+3?", "5"), ("Name a fruit.", "An apple, often red.")]
        )
    ]
    items, _ = tokenize_examples(examples, tokenizer, 128, "error")
    return collate(items, tokenizer.pad_token_id)  # two lengths: padding is masked out


def test_block_influence_is_one_minus_the_cosine_of_each_layers_input_and_output(
    tiny_teacher: Any, tiny_tokenizer: Any
) -> None:
    batch = _batch(tiny_tokenizer)
    scores = block_influence(tiny_teacher, batch)
    assert len(scores) == tiny_teacher.config.num_hidden_layers
    with torch.no_grad():
        states = tiny_teacher(**{k: batch[k] for k in ("input_ids", "attention_mask")},
                              output_hidden_states=True).hidden_states  # fmt: skip
    real = batch["attention_mask"].bool()
    # hidden_states[i] enters layer i and hidden_states[i + 1] leaves it (the last one has the
    # final norm applied, so the last layer is checked by the hook path alone).
    for i in range(len(scores) - 1):
        pairs = [
            (states[i][b, t], states[i + 1][b, t])
            for b in range(real.shape[0])
            for t in range(real.shape[1])
            if real[b, t]
        ]
        naive = 1 - sum(float(torch.dot(x, y) / (x.norm() * y.norm())) for x, y in pairs) / len(
            pairs
        )
        assert scores[i] == pytest.approx(naive, abs=1e-5)


def test_the_first_and_last_layers_stay_and_the_most_influential_others_join() -> None:
    scores = [0.9, 0.1, 0.5, 0.05, 0.5, 0.3, 0.2]
    assert most_important_layers(scores, 4) == [0, 2, 4, 6]  # ties: the earlier layer first
    assert most_important_layers(scores, 3) == [0, 2, 6]
    assert most_important_layers(scores, 2) == [0, 6]
    with pytest.raises(ValueError, match=r"student\.num_layers: 1 must be in \[2, 7\]"):
        most_important_layers(scores, 1)


def test_copying_evenly_spaced_layers_is_layers_from_teacher(tiny_teacher: Any) -> None:
    evenly = layers_from_teacher(tiny_teacher, 2)
    copied = copy_layers(tiny_teacher, evenly.config.lmdistill_layer_map)
    for (name, a), b in zip(evenly.state_dict().items(), copied.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_a_run_chooses_by_importance_and_reports_the_scores(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["run", str(ROOT / "configs" / "tiny.yaml"), f"output_dir={out}",
            "student.init=layers_by_importance", "student.num_layers=3",
            "student.calibration_examples=8", "train.max_steps=2", "train.checkpoint_every=0",
            "data.max_train_examples=16", "generate.max_new_tokens=16", "eval.num_samples=0",
            "baseline=false"]  # fmt: skip
    assert main(args) == 0
    models = json.loads((out / "metrics.json").read_text())["models"]
    scores = models["layer_scores"]
    assert len(scores) == 4 and models["student_layer_map"] == most_important_layers(scores, 3)
    saved = json.loads((out / "student" / "config.json").read_text())
    assert saved["num_hidden_layers"] == 3
    assert "Block influence per teacher layer" in (out / "report.md").read_text()
