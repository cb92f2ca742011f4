"""Build a student from a teacher, and check that the two speak the same tokenizer."""

from __future__ import annotations

import copy
import re
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from lmdistill.config import ModelConfig, StudentConfig
from lmdistill.models.loading import load_model


class TokenizerMismatchError(ValueError):
    """Teacher and student tokenizers differ in more than vocabulary padding."""


def evenly_spaced_layers(total: int, keep: int) -> list[int]:
    """`keep` layer indices out of `total`, evenly spaced, first and last included."""
    if not 1 <= keep <= total:
        raise ValueError(f"student.num_layers: {keep} must be in [1, {total}] (teacher layers)")
    if keep == 1:
        return [0]
    return [round(i * (total - 1) / (keep - 1)) for i in range(keep)]


def build_student(
    spec: StudentConfig,
    teacher: PreTrainedModel | None,
    teacher_tokenizer: Any,
    calibration: dict[str, torch.Tensor] | None = None,
) -> tuple[PreTrainedModel, Any]:
    """Return `(student, tokenizer)`; the tokenizer is checked against the teacher's. With no
    teacher weights (a text-only teacher) the student is `spec.path` and its tokenizer the
    one given. `layers_by_importance` scores the teacher's layers on `calibration` (a
    collated batch: input_ids, attention_mask)."""
    if teacher is None:
        assert spec.init == "path" and spec.path is not None
        student, tokenizer = load_model(ModelConfig(path=spec.path, gguf_file=spec.gguf_file))
        check_tokenizers(teacher_tokenizer, tokenizer)
    elif spec.init == "layers_from_teacher":
        student = layers_from_teacher(teacher, spec.num_layers)
        tokenizer = teacher_tokenizer
    elif spec.init == "layers_by_importance":
        if calibration is None:
            raise ValueError("student.init=layers_by_importance needs calibration examples")
        scores = block_influence(teacher, calibration)
        keep = most_important_layers(scores, spec.num_layers)
        student = copy_layers(teacher, keep)
        student.config.lmdistill_layer_scores = [round(s, 6) for s in scores]
        tokenizer = teacher_tokenizer
    elif spec.init == "shrunk_config":
        student = shrunk_from_teacher(teacher, spec)
        tokenizer = teacher_tokenizer
    else:
        assert spec.path is not None
        student, tokenizer = load_model(ModelConfig(path=spec.path, gguf_file=spec.gguf_file))
        check_tokenizers(teacher_tokenizer, tokenizer)
    shared_vocab_size(teacher, student, teacher_tokenizer)
    if spec.freeze_embeddings:
        # Tied embeddings freeze the output projection too: the cheapest student to train.
        student.get_input_embeddings().weight.requires_grad_(False)
    return student, tokenizer


def layers_from_teacher(teacher: PreTrainedModel, num_layers: int) -> PreTrainedModel:
    """A shallower copy of the teacher (DistilBERT-style init) with evenly spaced layers."""
    return copy_layers(teacher, evenly_spaced_layers(teacher.config.num_hidden_layers, num_layers))


@torch.no_grad()
def block_influence(
    teacher: PreTrainedModel, batch: dict[str, torch.Tensor], rows: int = 4
) -> list[float]:
    """Per teacher layer, 1 - the mean cosine similarity between its input and its output
    hidden states over the real (non-padding) tokens of `batch` (ShortGPT's block influence:
    a layer that barely changes its input scores near 0). The decoder alone runs (no
    logits), `rows` examples at a time, and each layer's cosines are summed as they come."""
    decoder = teacher.get_decoder()
    layers = decoder.layers
    sums = [0.0] * len(layers)
    real = torch.empty(0, dtype=torch.bool)

    def hook(index: int) -> Any:
        def add(_: Any, args: tuple[Any, ...], output: Any) -> None:
            out = output[0] if isinstance(output, tuple) else output
            cosine = torch.nn.functional.cosine_similarity(args[0].float(), out.float(), dim=-1)
            sums[index] += float(cosine[real].sum())

        return add

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    device = next(teacher.parameters()).device
    try:
        for start in range(0, batch["input_ids"].shape[0], rows):
            mask = batch["attention_mask"][start : start + rows].to(device)
            real = mask.bool()
            decoder(
                input_ids=batch["input_ids"][start : start + rows].to(device), attention_mask=mask
            )
    finally:
        for handle in handles:
            handle.remove()
    tokens = int(batch["attention_mask"].sum())
    return [1.0 - total / tokens for total in sums]


def most_important_layers(scores: list[float], keep: int) -> list[int]:
    """The first and the last layer, and the `keep - 2` others with the highest scores (ties:
    the earlier layer), in order."""
    total = len(scores)
    if not 2 <= keep <= total:
        raise ValueError(
            f"student.num_layers: {keep} must be in [2, {total}] with layers_by_importance "
            "(the first and the last layer are always kept)"
        )
    middle = sorted(range(1, total - 1), key=lambda i: (-scores[i], i))[: keep - 2]
    return sorted([0, *middle, total - 1])


def copy_layers(teacher: PreTrainedModel, keep: list[int]) -> PreTrainedModel:
    """A shallower copy of the teacher: the layers `keep` (in order), the embeddings, the
    final norm and the output head, all with the teacher's weights."""
    num_layers = len(keep)
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = num_layers
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[j] for j in keep]
    student = AutoModelForCausalLM.from_config(config, dtype=teacher.dtype)
    source = {j: i for i, j in enumerate(keep)}
    state: dict[str, torch.Tensor] = {}
    layer_key = re.compile(r"^(.*\.layers\.)(\d+)(\..*)$")
    for key, value in teacher.state_dict().items():
        match = layer_key.match(key)
        if match is None:
            state[key] = value  # load_state_dict copies
        elif int(match.group(2)) in source:
            state[f"{match.group(1)}{source[int(match.group(2))]}{match.group(3)}"] = value
    missing, unexpected = student.load_state_dict(state, strict=False)
    # A tied head is reported missing; it is the embedding and was loaded through it.
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"layer copy failed: missing {missing}, unexpected {unexpected}")
    student.config.lmdistill_layer_map = keep
    return student.eval()


def shrunk_from_teacher(teacher: PreTrainedModel, spec: StudentConfig) -> PreTrainedModel:
    """The teacher's architecture, smaller, with fresh random weights."""
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = spec.num_layers
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[: spec.num_layers]
    if spec.hidden_size is not None:
        head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads
        )
        heads = max(1, spec.hidden_size // head_dim)
        kv_heads = max(1, min(getattr(config, "num_key_value_heads", heads), heads))
        while heads % kv_heads:
            kv_heads -= 1
        config.hidden_size = spec.hidden_size
        config.num_attention_heads = heads
        config.num_key_value_heads = kv_heads
        config.head_dim = head_dim
    if spec.intermediate_size is not None:
        config.intermediate_size = spec.intermediate_size
    if spec.init_std is not None:
        config.initializer_range = spec.init_std
    return AutoModelForCausalLM.from_config(config, dtype=teacher.dtype).eval()


def check_tokenizers(teacher_tokenizer: Any, student_tokenizer: Any) -> None:
    """Raise `TokenizerMismatchError` unless both map every token to the same id."""
    teacher_vocab, student_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if teacher_vocab != student_vocab:
        differing = sorted(
            t
            for t in set(teacher_vocab) | set(student_vocab)
            if teacher_vocab.get(t) != student_vocab.get(t)
        )
        raise TokenizerMismatchError(
            f"teacher and student tokenizers differ ({len(teacher_vocab)} vs {len(student_vocab)}"
            f" tokens; {len(differing)} tokens map differently, e.g. {differing[:5]}). "
            "Token-level KD needs one tokenizer; use a student of the teacher's family."
        )
    for attr in ("eos_token_id", "bos_token_id"):
        if getattr(teacher_tokenizer, attr) != getattr(student_tokenizer, attr):
            raise TokenizerMismatchError(f"teacher and student disagree on {attr}")
    if teacher_tokenizer.chat_template != student_tokenizer.chat_template:
        raise TokenizerMismatchError("teacher and student have different chat templates")


def shared_vocab_size(
    teacher: PreTrainedModel | None, student: PreTrainedModel, tokenizer: Any
) -> int:
    """The vocabulary both heads score: the tokenizer's ids. Rows beyond it are padding
    (models round their embedding up, e.g. to a multiple of 64) and are masked out."""
    real = len(tokenizer)
    for name, model in (("teacher", teacher), ("student", student)):
        if model is None:
            continue
        rows = model.get_output_embeddings().weight.shape[0]
        if rows < real:
            raise TokenizerMismatchError(
                f"the {name}'s output head has {rows} rows but the tokenizer has {real} tokens"
            )
    return real
