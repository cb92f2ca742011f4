"""LoRA students (`student.lora`, with `peft`): only the adapters train (and the modules named
in `student.lora.trainable`, in full).

The training code sees the student as the plain Hugging Face model it is, with the adapter
layers injected in place (`PeftModel.get_base_model()`): forward passes, generation, the
fused loss and evaluation need nothing else. The `PeftModel` around it is kept for saving:

- `student/`: the adapters merged into the weights, a plain model (loads with
  `AutoModelForCausalLM.from_pretrained`);
- `student_adapter/`: the adapter alone (loads with `PeftModel.from_pretrained` over its
  base);
- `student_base/`: the weights the adapter applies to, when they are nowhere else (a student
  made from the teacher's layers); with `student.init: path` the base is `student.path`.

Checkpoints hold the trained tensors only (lmdistill/kd/checkpoint.py): the base is rebuilt
from the config on resume, as it was built at the start.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from lmdistill.config import StudentConfig


def add_adapters(student: PreTrainedModel, spec: StudentConfig) -> Any:
    """The `PeftModel` with LoRA adapters on `student` (changed in place: its other weights
    frozen, the adapter layers injected); a module name that matches nothing is an error
    naming the field."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ValueError(
            "student.lora needs the peft package: pip install 'lmdistill[lora]'"
        ) from None
    lora = spec.lora
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft annotates int, uses it as a number
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        modules_to_save=list(lora.trainable) or None,
        task_type="CAUSAL_LM",
    )
    if "lm_head" in lora.target_modules:
        raise ValueError(
            "student.lora.target_modules: lm_head cannot carry an adapter (the loss reads the "
            "output matrix directly); train it in full with student.lora.trainable: [lm_head]"
        )
    tied = bool(getattr(student.config, "tie_word_embeddings", False))
    both = {"lm_head", "embed_tokens"} & {*lora.target_modules, *lora.trainable}
    if tied and both:
        raise ValueError(
            f"student.lora: {sorted(both)} with tied embeddings (the input embedding is the "
            "output matrix): adapting or training one would untie them; leave both out"
        )
    names = {name.rsplit(".", 1)[-1] for name, _ in student.named_modules()}
    fields = (
        ("target_modules", lora.target_modules, "q_proj, v_proj, gate_proj"),
        ("trainable", lora.trainable, "norm, lm_head (untied)"),
    )
    for field, wanted, examples in fields:
        missing = sorted(set(wanted) - names)
        if missing:
            raise ValueError(
                f"student.lora.{field}: {missing} name no module of the student "
                f"({type(student).__name__}); e.g. {examples}"
            )
    return get_peft_model(student, config)


def save_adapted(adapted: Any, tokenizer: Any, directory: Path, base_path: str | None) -> None:
    """`directory/student` merged, `directory/student_adapter`, and `directory/student_base`
    unless the base is `base_path` (a model on disk already); each written atomically."""
    from lmdistill.io import atomic_dir

    merged = copy.deepcopy(adapted).merge_and_unload()
    with atomic_dir(directory / "student") as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    del merged
    if base_path is None:
        base = copy.deepcopy(adapted).unload()  # the frozen weights, without the adapters
        with atomic_dir(directory / "student_base") as tmp:
            base.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        del base
        base_path = str((directory / "student_base").resolve())
    for config in adapted.peft_config.values():
        config.base_model_name_or_path = base_path
    with atomic_dir(directory / "student_adapter") as tmp:
        adapted.save_pretrained(tmp)
