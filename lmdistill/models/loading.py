"""Load a teacher or student: HF directory, Hub id, GGUF file, known alias, or `tiny-llama`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from lmdistill.config import ModelConfig
from lmdistill.models.registry import ALIASES, resolve_alias
from lmdistill.models.tiny import build_tiny_llama, build_tiny_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TINY = "tiny-llama"


def describe(spec: ModelConfig) -> str:
    """A stable identity string for manifests and reports."""
    return spec.path if spec.gguf_file is None else f"{spec.path}::{spec.gguf_file}"


def resolve_device(setting: str) -> torch.device:
    """`train.device` as this process's torch device: `auto` is the GPU when torch sees one;
    under torchrun, each process's own GPU (LOCAL_RANK), as the trainer's Accelerator does."""
    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda, but torch sees no CUDA device (use auto or cpu)")
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A short digest of a model's weights (sums and sums of squares per tensor, in float64):
    a retrained model at the same path is told apart from the old one."""
    import hashlib
    import json

    with torch.no_grad():
        moments = [
            # On the CPU, so that the same weights on another device give the same digest.
            (round(float(w.sum()), 6), round(float(w.square().sum()), 6))
            for w in (p.detach().cpu().double() for p in model.parameters())
        ]
    return hashlib.sha256(json.dumps(moments).encode()).hexdigest()[:16]


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be loaded from where the config points."""


def load_model(spec: ModelConfig) -> tuple[PreTrainedModel, Any]:
    """Return `(model, tokenizer)` for `spec`, in eval mode, in `spec.dtype`."""
    dtype = DTYPES[spec.dtype]
    if spec.path == TINY:
        tiny_tokenizer = build_tiny_tokenizer()
        tiny = build_tiny_llama(
            len(tiny_tokenizer), spec.tiny_layers, spec.tiny_hidden, spec.tiny_seed
        )
        tiny.to(dtype=dtype)  # type: ignore[call-arg]  # transformers' wrapped `to` confuses mypy
        return tiny.eval(), tiny_tokenizer
    source, gguf_file = _resolve_source(spec)
    kwargs: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tokenizer: Any = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except OSError as error:  # transformers' "can't load ... / couldn't connect", many lines
        first = " ".join(str(error).split())[:300]
        hub = "" if Path(source).exists() else " (a Hub id: is the network reachable?)"
        raise ModelLoadError(f"cannot load the model {spec.path!r}{hub}: {first}") from None
    if gguf_file:
        plain_model(model)
    if tokenizer.pad_token is None:
        # Padding positions are masked out by the attention mask and the loss mask, so any
        # id works; eos is what most causal LMs use.
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def plain_model(model: PreTrainedModel) -> None:
    """Forget that `model` was read from a GGUF file. transformers dequantizes the file into
    plain weights but keeps a GGUF quantizer on the model and `quantization_config` (naming
    the file) in its config: every model made from it (a student, a copy) would then save a
    config that reloads as "quantized", cannot be saved again, and that peft, the HF Trainer
    and lm-eval treat as quantized."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # transformers' own way out: quantizer, config and flag
        quantizer.remove_quantization_config(model)
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            if getattr(module.config, "_is_quantized", False):
                module.config._is_quantized = False
            if hasattr(module.config, "quantization_config"):
                del module.config.quantization_config


def _resolve_source(spec: ModelConfig) -> tuple[str, str | None]:
    if spec.path in ALIASES:
        gguf = resolve_alias(spec.path)
        return str(gguf.parent), gguf.name
    path = Path(spec.path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return str(path.parent), path.name
    if spec.gguf_file:
        return str(path), spec.gguf_file
    if not path.exists() and _looks_local(spec.path):
        raise FileNotFoundError(
            f"model directory not found: {path} (not a Hub id either: those are NAME or "
            "ORG/NAME); was the run that writes it done?"
        )
    # A local directory, or a Hub id for users with a network.
    return str(path) if path.exists() else spec.path, None


def check_model_path(spec: ModelConfig, field: str) -> None:
    """Before any work: a local model path that does not exist is an error naming the field
    (an alias is fetched when loaded; a Hub id is for users with a network)."""
    if spec.path == TINY or spec.path in ALIASES:
        return
    path = Path(spec.path).expanduser()
    if path.suffix == ".gguf" and not path.is_file():
        raise FileNotFoundError(f"{field}: GGUF file not found: {path}")
    if not path.exists() and _looks_local(spec.path):
        raise FileNotFoundError(
            f"{field}: model directory not found: {path} (not a Hub id either: those are NAME "
            "or ORG/NAME); was the run that writes it done?"
        )


def _looks_local(name: str) -> bool:
    """A path that cannot be a Hub id (those are NAME or ORG/NAME)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1
