"""LoRA students (`student.lora`): only the adapters train; the saved student is a plain
merged model, the adapter loads with peft over its base; resume and two processes as
without LoRA; bad settings get one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dist_train import train_tiny, two_processes

from lmdistill.cli import main
from lmdistill.config import ConfigError
from lmdistill.validate import load_config

peft = pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
FAST = ["train.max_steps=4", "train.checkpoint_every=2", "data.max_train_examples=16",
        "generate.max_new_tokens=16", "eval.num_samples=0", "student.lora.r=4",
        "student.lora.alpha=8", "train.lr=1e-2"]  # fmt: skip
PROMPT = torch.tensor([[256, 72, 105, 33, 10, 50, 51]])


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=PROMPT).logits


def test_a_lora_run_trains_the_adapters_and_saves_a_plain_merged_student(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    assert main(["run", TINY, *FAST, f"output_dir={out}"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    # 2 layers x 7 projections, each r x (in + out): q, o: 64+64; k, v: 64+32; MLP: 64+128.
    per_layer = 4 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 128) * 3)
    assert metrics["models"]["student_trainable_parameters"] == 2 * per_layer
    assert metrics["kd"]["history"][-1]["loss"] < metrics["kd"]["history"][0]["loss"]
    for arm in (out, out / "baseline"):
        student = AutoModelForCausalLM.from_pretrained(arm / "student")
        assert type(student).__name__ == "LlamaForCausalLM"
        assert not any("lora" in name for name in student.state_dict())
        base = AutoModelForCausalLM.from_pretrained(arm / "student_base")
        before = _logits(base)  # peft injects the adapter into `base` itself
        adapted = PeftModel.from_pretrained(base, arm / "student_adapter")
        torch.testing.assert_close(_logits(adapted), _logits(student), rtol=1e-4, atol=1e-5)
        # The adapters changed the student; its base is the untrained start.
        assert not torch.allclose(before, _logits(student), atol=1e-3)
        student.save_pretrained(tmp_path / "again")  # a plain model round-trips
    from lmdistill.config import ModelConfig
    from lmdistill.models import load_model
    from lmdistill.models.students import layers_from_teacher

    teacher, _ = load_model(ModelConfig(path="tiny-llama", tiny_layers=4, tiny_hidden=64))
    untrained = layers_from_teacher(teacher, 2)
    starts = [
        AutoModelForCausalLM.from_pretrained(a / "student_base") for a in (out, out / "baseline")
    ]
    for name, value in untrained.state_dict().items():
        assert torch.equal(starts[0].state_dict()[name], value), name  # the untrained start
    for (name, a), b in zip(
        starts[0].state_dict().items(), starts[1].state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name  # the KD and the CE students start from one base
    # Checkpoints hold the trained tensors alone.
    from safetensors.torch import load_file

    saved = load_file(out / "checkpoints" / "step-000004" / "model.safetensors")
    assert saved and all("lora_" in name for name in saved)
    assert "LoRA r=4" in (out / "report.md").read_text()


def test_lora_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    straight, _ = train_tiny(4, 1, steps=6, checkpoint_dir=tmp_path / "a", lora=4)
    train_tiny(4, 1, steps=6, checkpoint_dir=tmp_path / "b", stop_after=5, lora=4)
    resumed, _ = train_tiny(4, 1, steps=6, checkpoint_dir=tmp_path / "b", resume=True, lora=4)
    for name, value in straight.items():
        assert torch.equal(value, resumed[name]), name


def test_lora_two_processes_equal_one_process(tmp_path: Path) -> None:
    two, weights = two_processes(tmp_path / "two", 29541, "--lora", "4")
    one, history = train_tiny(8, 1, steps=2, checkpoint_dir=tmp_path / "one", lora=4)
    for a, b in zip(history, two["history"], strict=True):
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    for name, value in one.items():
        torch.testing.assert_close(value, weights[name], rtol=1e-4, atol=1e-5)


def test_bad_lora_settings_get_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match=r"student\.init: 'shrunk_config'"):
        load_config(TINY, ["student.lora.r=4", "student.init=shrunk_config"])
    with pytest.raises(ConfigError, match=r"student\.lora\.dropout"):
        load_config(TINY, ["student.lora.r=4", "student.lora.dropout=1.5"])
    with pytest.raises(ConfigError, match=r"memory\.fisher: True"):
        load_config(TINY, ["student.lora.r=4", "memory.fraction=0.01", "memory.fisher=true"])
    out = tmp_path / "run"
    lm_head = ["student.lora.target_modules=[lm_head]"]
    assert main(["run", TINY, *FAST, f"output_dir={out}", *lm_head]) == 2
    assert "lm_head cannot carry an adapter" in capsys.readouterr().err
    assert main(["run", TINY, *FAST, f"output_dir={out}", "student.lora.trainable=[lm_head]"]) == 2
    assert "with tied embeddings" in capsys.readouterr().err
    assert (
        main(["run", TINY, *FAST, f"output_dir={out}", "student.lora.target_modules=[qproj]"]) == 2
    )
    err = capsys.readouterr().err
    assert "student.lora.target_modules: ['qproj'] name no module" in err
    # One error line (the teacher's progress bars came before it).
    assert [line for line in err.splitlines() if "error" in line] == [err.strip().splitlines()[-1]]
