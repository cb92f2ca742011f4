"""GGUF export (`lmdistill export STUDENT --gguf OUT`): the file llama.cpp loads computes what
the Hugging Face student computes (tokens, logits, greedy text), and bad input gets one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmdistill.cli import main
from lmdistill.models.export import ExportError, export_gguf, rotary_rows
from lmdistill.models.tiny import build_tiny_llama, build_tiny_tokenizer

llama_cpp = pytest.importorskip("llama_cpp")

TEXT = "Tom has 3 apples and buys 12 more. How many? <|im_end|>"


def _tiny_student(path: Path, *, tied: bool = True) -> tuple[torch.nn.Module, object]:
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_llama(len(tokenizer), layers=2, hidden=64, seed=3)
    if not tied:  # an output matrix of its own (output.weight in the file)
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone() * 0.5)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model.eval(), tokenizer


def _cpp_logits(gguf: Path, ids: list[int]) -> np.ndarray:
    llm = llama_cpp.Llama(
        model_path=str(gguf), n_ctx=256, logits_all=True, verbose=False, n_threads=1
    )
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def _rotate_half_rope(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Hugging Face's rotary embedding of one head (d,) at each position: pairs (i, i + d/2)."""
    d = x.shape[-1]
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    angles = positions[:, None] * inv[None, :]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    rotated = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1)
    return x * cos + rotated * sin


def _interleaved_rope(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """llama.cpp's (normal) rotary embedding: pairs (2i, 2i + 1), element by element."""
    d = x.shape[-1]
    out = x.clone()
    for p, position in enumerate(positions.tolist()):
        for i in range(d // 2):
            angle = position / (10000 ** (2 * i / d))
            a, b = x[p, 2 * i].item(), x[p, 2 * i + 1].item()
            out[p, 2 * i] = a * np.cos(angle) - b * np.sin(angle)
            out[p, 2 * i + 1] = a * np.sin(angle) + b * np.cos(angle)
    return out


def test_reordered_projection_rotated_interleaved_equals_hugging_face_rotation() -> None:
    torch.manual_seed(0)
    heads, d, columns = 2, 8, 5
    weight = torch.randn(heads * d, columns, dtype=torch.float64)
    inputs = torch.randn(3, columns, dtype=torch.float64)
    positions = torch.tensor([0.0, 1.0, 7.0], dtype=torch.float64)
    moved = torch.from_numpy(rotary_rows(weight.numpy(), heads))
    for h in range(heads):
        rows = slice(h * d, (h + 1) * d)
        hf = _rotate_half_rope(inputs @ weight[rows].T, positions)
        cpp = _interleaved_rope(inputs @ moved[rows].T, positions)
        # The same query/key values, in the other order: attention scores (dot products
        # within a head) are unchanged.
        torch.testing.assert_close(cpp @ cpp.T, hf @ hf.T)
        order = [j for i in range(d // 2) for j in (i, i + d // 2)]
        torch.testing.assert_close(cpp, hf[:, order])


@pytest.mark.parametrize("tied", [True, False])
def test_f16_file_tokenizes_and_computes_what_the_student_does(tmp_path: Path, tied: bool) -> None:
    model, tokenizer = _tiny_student(tmp_path / "student", tied=tied)
    out = tmp_path / "student.gguf"
    summary = export_gguf(tmp_path / "student", out, "f16")
    assert summary["pre_tokenizer"] == "gpt-2" and summary["tensors"] == 20 + (not tied)
    ids = tokenizer(TEXT)["input_ids"]
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=256, verbose=False, n_threads=1)
    assert llm.tokenize(TEXT.encode(), add_bos=False, special=True) == ids
    assert llm.token_eos() == tokenizer.eos_token_id
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    cpp = _cpp_logits(out, ids)
    np.testing.assert_allclose(cpp, expected, atol=0.02)
    assert (cpp.argmax(-1) == expected.argmax(-1)).all()


def test_q8_0_file_is_smaller_and_close(tmp_path: Path) -> None:
    model, tokenizer = _tiny_student(tmp_path / "student")
    f16 = export_gguf(tmp_path / "student", tmp_path / "f16.gguf", "f16")
    q8 = export_gguf(tmp_path / "student", tmp_path / "q8.gguf", "q8_0")
    assert q8["bytes"] < 0.7 * f16["bytes"]
    ids = tokenizer(TEXT)["input_ids"]
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    cpp = _cpp_logits(tmp_path / "q8.gguf", ids)
    assert np.abs(cpp - expected).max() < 0.25  # 8-bit weights and activations


def test_bad_input_gets_one_line_and_nothing_is_overwritten(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _tiny_student(tmp_path / "student")
    mine = tmp_path / "mine.gguf"
    mine.write_text("the user's file")
    assert main(["export", str(tmp_path / "student"), "--gguf", str(mine)]) == 2
    assert "exists" in capsys.readouterr().err and mine.read_text() == "the user's file"
    assert main(["export", str(tmp_path / "nowhere"), "--gguf", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err
    assert "no saved model" in err and len(err.strip().splitlines()) == 1
    config = json.loads((tmp_path / "student" / "config.json").read_text())
    config.update(architectures=["GPT2LMHeadModel"])
    (tmp_path / "student" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match="only LlamaForCausalLM"):
        export_gguf(tmp_path / "student", tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists() and not list(tmp_path.glob(".x.gguf*"))


def test_cli_writes_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _tiny_student(tmp_path / "student")
    out = tmp_path / "student-q8.gguf"
    assert main(["export", str(tmp_path / "student"), "--gguf", str(out), "--type", "q8_0"]) == 0
    assert f"wrote {out} (q8_0, 20 tensors" in capsys.readouterr().out and out.is_file()


@pytest.mark.slow
def test_smollm2_exports_with_its_logits_and_greedy_text(tmp_path: Path) -> None:
    """The demo's path: a model read from SmolLM2's GGUF, saved as a plain Hugging Face model
    (as every student is), then exported: llama.cpp tokenizes the chat prompt the same way,
    f16 logits match, greedy text matches up to the end of the answer; q8_0 picks the same
    token wherever the student's choice is clear (top-1 ahead by more than 1 logit)."""
    from lmdistill.config import ModelConfig
    from lmdistill.models import load_model

    model, tokenizer = load_model(ModelConfig(path="smollm2-135m-instruct"))
    model.save_pretrained(tmp_path / "student")
    tokenizer.save_pretrained(tmp_path / "student")
    prompts = ["What is 12 plus 7? Answer briefly.", "Name a colour of the sky."]
    for kind in ("f16", "q8_0"):
        out = tmp_path / f"smollm2-{kind}.gguf"
        export_gguf(tmp_path / "student", out, kind)
        llm = llama_cpp.Llama(
            model_path=str(out), n_ctx=512, logits_all=True, verbose=False, n_threads=2
        )
        for question in prompts:
            prompt = tokenizer.apply_chat_template(
                [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
            )
            ids = tokenizer(prompt)["input_ids"]
            assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids
            with torch.no_grad():
                greedy = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[
                    0
                ].tolist()
                expected = model(torch.tensor([greedy])).logits[0].numpy()
            llm.reset()
            llm.eval(greedy)
            cpp = np.array(llm.scores[: len(greedy)])
            if kind == "f16":
                assert np.abs(cpp - expected).max() < 0.5  # logits of scale ~40
                llm.reset()
                text = []
                for token in llm.generate(ids, temp=0.0, top_k=1):
                    text.append(token)
                    if token == llm.token_eos() or len(text) == len(greedy) - len(ids):
                        break
                assert text == greedy[len(ids) :]
            else:
                top2 = np.sort(expected, axis=-1)[:, -2:]
                clear = top2[:, 1] - top2[:, 0] > 1.0
                assert clear.sum() >= len(greedy) // 2
                assert (cpp.argmax(-1) == expected.argmax(-1))[clear].all()
