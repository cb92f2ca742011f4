"""Export a saved student (a Hugging Face directory) as a GGUF file llama.cpp loads.

    lmdistill export STUDENT_DIR --gguf OUT.gguf [--type f16|q8_0]

Llama-architecture students (SmolLM2 and its students, tiny-llama) with a byte-level BPE
tokenizer. The weights are written with the `gguf` package's writer: norms in f32, matrices
in f16 or q8_0 (q8_0 needs rows whose length is a multiple of 32; other matrices stay f16).
Two layout changes make the file mean what the Hugging Face model means:

- rotary embeddings: Hugging Face rotates the pairs (i, i + d/2) of each head, llama.cpp the
  pairs (2i, 2i + 1), so the rows of q_proj and k_proj are reordered within each head;
- the tokenizer: its tokens in id order (added tokens typed control or user-defined, padding
  rows of the embedding typed unused), its merges, its special ids, its chat template, and
  the pre-tokenizer llama.cpp must split text with (named from the tokenizer's own).

A file that exists is not overwritten; the file appears only when it is complete.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

EXPORT_TYPES = ("f16", "q8_0")
ARCHITECTURE = "LlamaForCausalLM"
# Hugging Face per-layer names -> llama.cpp's, for a Llama block.
LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
# llama.cpp's token types (llama_token_type).
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


class ExportError(ValueError):
    """The student cannot be written as GGUF (one line: what and what is supported)."""


def export_gguf(student: Path, out: Path, kind: str = "f16") -> dict[str, Any]:
    """Write `student` (a saved Hugging Face directory) to `out` as GGUF of type `kind`; a
    summary (tensors, bytes, the pre-tokenizer chosen)."""
    import gguf
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from lmdistill.io import atomic_path

    if kind not in EXPORT_TYPES:
        raise ExportError(f"export --type {kind!r}: allowed are {', '.join(EXPORT_TYPES)}")
    if out.exists():
        raise ExportError(f"export: {out} exists; choose another path (it is not overwritten)")
    if not (student / "config.json").is_file():
        raise ExportError(f"export: {student} is no saved model (it has no config.json)")
    config = AutoConfig.from_pretrained(student)
    check_architecture(config, student)
    tokenizer = AutoTokenizer.from_pretrained(student)
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    weights = {name: t.detach().float().numpy() for name, t in model.state_dict().items()}
    vocab = tokenizer_fields(tokenizer, config.vocab_size, student)
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(tmp, "llama")
        write_metadata(writer, config, kind, student.name)
        write_tokenizer(writer, vocab)
        count = 0
        for name, array, qtype in gguf_tensors(weights, config, kind):
            if qtype is None:
                writer.add_tensor(name, array)
            else:
                writer.add_tensor(name, gguf.quantize(array, qtype), raw_dtype=qtype)
            count += 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return {
        "student": str(student),
        "gguf": str(out),
        "type": kind,
        "tensors": count,
        "bytes": out.stat().st_size,
        "pre_tokenizer": vocab["pre"],
        "vocab_size": len(vocab["tokens"]),
    }


def check_architecture(config: Any, student: Path) -> None:
    """Only what llama.cpp's `llama` graph computes the way Hugging Face does."""
    architectures = getattr(config, "architectures", None) or []
    if architectures != [ARCHITECTURE] or config.model_type != "llama":
        raise ExportError(
            f"export --gguf: {student} is {architectures or config.model_type}; only "
            f"{ARCHITECTURE} students (SmolLM2 and its students, tiny-llama) are supported"
        )
    unsupported = []
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        unsupported.append("biases in attention or MLP")
    if getattr(config, "hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act {config.hidden_act}")
    rope = rope_parameters(config)
    if rope.get("rope_type", "default") != "default":
        unsupported.append(f"rope_type {rope['rope_type']}")
    if unsupported:
        raise ExportError(
            f"export --gguf: {student} has {', '.join(unsupported)}; the exporter writes plain "
            "Llama blocks (no biases, SiLU, default rotary embeddings)"
        )


def rope_parameters(config: Any) -> dict[str, Any]:
    """transformers 5 keeps rope_theta in `rope_parameters`; older configs at the top."""
    found = dict(getattr(config, "rope_parameters", None) or {})
    if "rope_theta" not in found:
        found["rope_theta"] = getattr(config, "rope_theta", 10000.0)
    return found


def head_dim(config: Any) -> int:
    return int(
        getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    )


def write_metadata(writer: Any, config: Any, kind: str, name: str) -> None:
    import gguf

    heads, kv_heads, size = config.num_attention_heads, config.num_key_value_heads, head_dim(config)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(rope_parameters(config)["rope_theta"]))
    writer.add_rope_dimension_count(size)
    if size * heads != config.hidden_size:
        writer.add_key_length(size)
        writer.add_value_length(size)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(
        gguf.LlamaFileType.MOSTLY_F16 if kind == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0
    )
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def rotary_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Reorder q_proj's or k_proj's rows (heads x d of them) from Hugging Face's rotary
    layout, which pairs row i with i + d/2 within a head, to llama.cpp's, which pairs 2i with
    2i + 1: within each head, the rows (0, d/2, 1, d/2 + 1, ...)."""
    rows, columns = weight.shape
    size = rows // heads
    return weight.reshape(heads, 2, size // 2, columns).swapaxes(1, 2).reshape(rows, columns).copy()


def gguf_tensors(
    weights: dict[str, np.ndarray], config: Any, kind: str
) -> list[tuple[str, np.ndarray, Any]]:
    """(llama.cpp name, array, quantization type or None) for every tensor the file holds."""
    import gguf

    def matrix(name: str, array: np.ndarray) -> tuple[str, np.ndarray, Any]:
        if kind == "q8_0" and array.shape[-1] % 32 == 0:
            return (
                name,
                np.ascontiguousarray(array, dtype=np.float32),
                gguf.GGMLQuantizationType.Q8_0,
            )
        return name, array.astype(np.float16), None

    found = [matrix("token_embd.weight", weights["model.embed_tokens.weight"])]
    for layer in range(config.num_hidden_layers):
        for hf_name, cpp_name in LAYER_TENSORS.items():
            array = weights[f"model.layers.{layer}.{hf_name}"]
            if hf_name.startswith("self_attn.q_proj"):
                array = rotary_rows(array, config.num_attention_heads)
            elif hf_name.startswith("self_attn.k_proj"):
                array = rotary_rows(array, config.num_key_value_heads)
            name = f"blk.{layer}.{cpp_name}"
            found.append(
                (name, array.astype(np.float32), None) if array.ndim == 1 else matrix(name, array)
            )
    found.append(("output_norm.weight", weights["model.norm.weight"].astype(np.float32), None))
    if not getattr(config, "tie_word_embeddings", False):
        found.append(matrix("output.weight", weights["lm_head.weight"]))
    return found


def pre_tokenizer(spec: dict[str, Any] | None, student: Path) -> str:
    """llama.cpp's name for how the tokenizer splits text before BPE: byte-level with the
    GPT-2 pattern ("gpt-2"), or single digits first, then that ("smollm")."""
    if spec is None:
        raise ExportError(f"export --gguf: {student}'s tokenizer has no pre-tokenizer")

    def byte_level(p: dict[str, Any]) -> bool:
        return p.get("type") == "ByteLevel" and p.get("use_regex", True)

    if byte_level(spec):
        return "gpt-2"
    parts = spec.get("pretokenizers") or []
    if (
        spec.get("type") == "Sequence"
        and len(parts) == 2
        and parts[0].get("type") == "Digits"
        and parts[0].get("individual_digits")
        and byte_level(parts[1])
    ):
        return "smollm"
    raise ExportError(
        f"export --gguf: {student}'s pre-tokenizer {json.dumps(spec)[:120]} has no llama.cpp "
        "equivalent the exporter knows (byte-level BPE with the GPT-2 pattern, optionally "
        "after single digits)"
    )


def tokenizer_fields(tokenizer: Any, vocab_size: int, student: Path) -> dict[str, Any]:
    """The tokenizer as llama.cpp's `gpt2` (byte-level BPE) vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(f"export --gguf: {student} has no fast (tokenizer.json) tokenizer")
    spec = json.loads(backend.to_str())
    if spec["model"]["type"] != "BPE":
        raise ExportError(
            f"export --gguf: {student}'s tokenizer is {spec['model']['type']}; only byte-level "
            "BPE tokenizers are supported"
        )
    by_id = {i: token for token, i in spec["model"]["vocab"].items()}
    types = dict.fromkeys(by_id, NORMAL)
    for added in spec.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    if max(by_id) >= vocab_size:
        raise ExportError(
            f"export --gguf: {student}'s tokenizer has ids up to {max(by_id)}, its model only "
            f"{vocab_size} embedding rows"
        )
    tokens, token_types = [], []
    for i in range(vocab_size):  # embedding rows no token uses: llama.cpp's padding tokens
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        token_types.append(types.get(i, UNUSED))
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    control = [tokens[i] for i, kind in enumerate(token_types) if kind == CONTROL]
    if not merges and len(control) >= 2:
        # A byte-only vocabulary (tiny-llama's) has no merges, but llama.cpp requires the key
        # and GGUF has no empty array: one merge of two control tokens, which are split off
        # before BPE runs, so it never applies.
        merges = [f"{control[0]} {control[1]}"]
    if not merges:
        raise ExportError(f"export --gguf: {student}'s BPE tokenizer has no merges")
    probe = tokenizer("a")["input_ids"]
    special = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "unk": tokenizer.unk_token_id,
        "pad": tokenizer.pad_token_id,
    }
    return {
        "tokens": tokens,
        "types": token_types,
        "merges": merges,
        "pre": pre_tokenizer(spec.get("pre_tokenizer"), student),
        "special": {k: v for k, v in special.items() if v is not None},
        "add_bos": bool(probe) and probe[0] == tokenizer.bos_token_id,
        "add_eos": bool(probe) and probe[-1] == tokenizer.eos_token_id,
        "chat_template": tokenizer.chat_template
        if isinstance(tokenizer.chat_template, str)
        else None,
    }


def write_tokenizer(writer: Any, vocab: dict[str, Any]) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_merges(vocab["merges"])
    adders = {
        "bos": writer.add_bos_token_id,
        "eos": writer.add_eos_token_id,
        "unk": writer.add_unk_token_id,
        "pad": writer.add_pad_token_id,
    }
    for key, token_id in vocab["special"].items():
        adders[key](token_id)
    writer.add_add_bos_token(vocab["add_bos"])
    writer.add_add_eos_token(vocab["add_eos"])
    if vocab["chat_template"]:
        writer.add_chat_template(vocab["chat_template"])
