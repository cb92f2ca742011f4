"""Scorers and gradient features against direct computations on tiny models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmdistill.data import IGNORE_INDEX, Example, tokenize_examples
from lmdistill.dd import gradients, scores
from lmdistill.models.tiny import build_tiny_llama


def examples(n: int = 10) -> list[Example]:
    return [
        Example(
            f"ex-{i}",
            ({"role": "user", "content": f"What is {i} plus {i + 3}? " + "Think. " * (i % 3)},),
            f"{i} + {i + 3} = {2 * i + 3}. " + "So " * (i % 4) + f"#### {2 * i + 3}",
        )
        for i in range(n)
    ]


@pytest.fixture
def items(tiny_tokenizer: Any) -> list:
    tokenized, _ = tokenize_examples(examples(), tiny_tokenizer, 256)
    return tokenized


def one_nll(model: Any, item: Any) -> float:
    """Mean NLL of one example's response tokens, unbatched."""
    ids = torch.tensor([item.input_ids])
    logits = model(input_ids=ids).logits[0, :-1]
    targets = torch.tensor(item.labels[1:])
    keep = targets != IGNORE_INDEX
    return float(F.cross_entropy(logits[keep], targets[keep]))


def test_length_counts_response_tokens(items: list) -> None:
    direct = [sum(1 for y in item.labels if y != -100) for item in items]
    assert scores.response_tokens(items).tolist() == direct
    assert scores.total_tokens(items).tolist() == [len(i.input_ids) for i in items]


def test_perplexity_matches_unbatched(tiny_teacher: Any, tiny_tokenizer: Any, items: list) -> None:
    batched = scores.response_nll(tiny_teacher, items, tiny_tokenizer.pad_token_id, batch_size=4)
    direct = [one_nll(tiny_teacher, item) for item in items]
    np.testing.assert_allclose(batched, direct, rtol=1e-4, atol=1e-5)


def test_ifd_is_the_ratio_of_perplexities(tiny_teacher: Any, tiny_tokenizer: Any) -> None:
    data = examples(6)
    ifd = scores.ifd_scores(tiny_teacher, data, tiny_tokenizer, 256, batch_size=4)
    for example, value in zip(data, ifd, strict=True):
        (with_prompt,), _ = tokenize_examples([example], tiny_tokenizer, 256)
        (bare,), _ = tokenize_examples(scores.without_instruction([example]), tiny_tokenizer, 256)
        # Same response tokens in both.
        assert [y for y in with_prompt.labels if y != -100] == [y for y in bare.labels if y != -100]
        expected = np.exp(one_nll(tiny_teacher, with_prompt) - one_nll(tiny_teacher, bare))
        assert value == pytest.approx(expected, rel=1e-4)


def test_divergence_matches_unbatched(tiny_tokenizer: Any, items: list) -> None:
    teacher = build_tiny_llama(len(tiny_tokenizer), layers=2, hidden=32, seed=1).eval()
    student = build_tiny_llama(len(tiny_tokenizer), layers=1, hidden=32, seed=2).eval()
    vocab = len(tiny_tokenizer)
    batched = scores.divergence_scores(
        teacher, student, items, tiny_tokenizer.pad_token_id, vocab, 3
    )
    for item, value in zip(items, batched, strict=True):
        ids = torch.tensor([item.input_ids])
        t = teacher(input_ids=ids).logits[0, :-1, :vocab].log_softmax(-1)
        s = student(input_ids=ids).logits[0, :-1, :vocab].log_softmax(-1)
        keep = torch.tensor(item.labels[1:]) != IGNORE_INDEX
        kl = (t.exp() * (t - s)).sum(-1)[keep].mean()
        assert value == pytest.approx(float(kl), rel=1e-4)
    assert (batched > 0).all()


def test_hidden_features_average_every_token(
    tiny_teacher: Any, tiny_tokenizer: Any, items: list
) -> None:
    batched = scores.hidden_features(tiny_teacher, items, tiny_tokenizer.pad_token_id, 4)
    for item, row in zip(items, batched, strict=True):
        states = tiny_teacher.get_decoder()(
            input_ids=torch.tensor([item.input_ids])
        ).last_hidden_state
        np.testing.assert_allclose(row, states[0].mean(0).detach().numpy(), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Gradient features (LESS)


def test_per_example_lora_grads_match_one_backward_each(
    tiny_teacher: Any, tiny_tokenizer: Any, items: list
) -> None:
    from lmdistill.data import collate

    model, adapters = gradients.add_lora(
        tiny_teacher, ["q_proj", "v_proj"], rank=4, alpha=8.0, seed=0
    )
    batched = gradients.per_example_grads(
        model, adapters, collate(items[:5], tiny_tokenizer.pad_token_id)
    )
    for row, item in zip(batched, items[:5], strict=True):
        for adapter in adapters:
            adapter.lora_b.grad = None
        loss = torch.zeros(())
        ids = torch.tensor([item.input_ids])
        logits = model(input_ids=ids).logits[0, :-1]
        targets = torch.tensor(item.labels[1:])
        keep = targets != IGNORE_INDEX
        loss = F.cross_entropy(logits[keep], targets[keep])
        loss.backward()
        direct = torch.cat([a.lora_b.grad.flatten() for a in adapters])
        torch.testing.assert_close(row, direct, rtol=1e-4, atol=1e-6)
    assert batched.abs().sum() > 0
    # The model the features came from is a copy: the original is untouched.
    assert not any(isinstance(m, gradients.LoRALinear) for m in tiny_teacher.modules())


def test_projection_is_a_fixed_gaussian_map() -> None:
    rows, dim = 9000, 16  # spans three generator blocks
    projection = gradients.Projection(rows, dim, seed=3, cache_bytes=0)
    x = torch.randn(4, rows)
    matrix = torch.cat([projection.block(i) for i in range(3)])
    torch.testing.assert_close(projection(x), x @ matrix, rtol=1e-4, atol=1e-4)
    again = gradients.Projection(rows, dim, seed=3)
    torch.testing.assert_close(again(x), projection(x))
    assert matrix.std().item() == pytest.approx(1 / np.sqrt(dim), rel=0.05)
    # Inner products are preserved in expectation (Johnson-Lindenstrauss).
    wide = gradients.Projection(512, 4096, seed=0)
    a, b = torch.randn(1, 512), torch.randn(1, 512)
    cos = F.cosine_similarity(a, a + 0.5 * b)
    cos_projected = F.cosine_similarity(wide(a), wide(a + 0.5 * b))
    assert float(cos_projected) == pytest.approx(float(cos), abs=0.05)


def feature_run(model: Any, items: list, pad: int, directory: Path, **kwargs: Any) -> Any:
    return gradients.gradient_features(
        model,
        items,
        pad,
        directory=directory,
        identity={"test": 1},
        modules=["q_proj", "v_proj"],
        rank=4,
        dim=64,
        batch_size=3,
        **kwargs,
    )


def test_gradient_features_resume_equals_uninterrupted(
    tiny_teacher: Any, tiny_tokenizer: Any, items: list, tmp_path: Path
) -> None:
    pad = tiny_tokenizer.pad_token_id
    whole = np.array(feature_run(tiny_teacher, items, pad, tmp_path / "whole"))
    assert feature_run(tiny_teacher, items, pad, tmp_path / "killed", stop_after=2) is None
    progress = json.loads((tmp_path / "killed" / "progress.json").read_text())
    assert progress["rows"] == 6
    resumed = np.array(feature_run(tiny_teacher, items, pad, tmp_path / "killed"))
    np.testing.assert_allclose(resumed, whole, rtol=1e-5, atol=1e-6)
    assert not (tmp_path / "killed" / "features.partial.npy").exists()
    # Each row is the projection of that example's gradient, whatever batch it was in.
    alone = np.array(feature_run(tiny_teacher, items[4:5], pad, tmp_path / "alone"))
    np.testing.assert_allclose(alone[0], whole[4], rtol=1e-4, atol=1e-5)


def test_less_score_is_mean_cosine_to_targets() -> None:
    rng = np.random.default_rng(0)
    features, target = rng.normal(size=(7, 5)), rng.normal(size=(3, 5))
    direct = [
        np.mean([f @ t / np.linalg.norm(f) / np.linalg.norm(t) for t in target]) for f in features
    ]
    np.testing.assert_allclose(gradients.less_scores(features, target), direct, rtol=1e-10)
    with pytest.raises(ValueError, match="target set is empty"):
        gradients.less_scores(features, np.zeros((0, 5)))


def test_unknown_lora_module_is_named(tiny_teacher: Any) -> None:
    with pytest.raises(ValueError, match="match no linear layer"):
        gradients.add_lora(tiny_teacher, ["c_attn"], rank=2, alpha=4.0, seed=0)


# ---------------------------------------------------------------------------------------------
# Manifests


def test_manifest_rejects_another_model_or_dataset(tmp_path: Path) -> None:
    identity = scores.Identity("score:ifd", "teacher weights=aa", "data-1", 3, {"max_length": 8})
    calls = []

    def compute() -> np.ndarray:
        calls.append(1)
        return np.array([1.0, 2.0, 3.0])

    first = scores.saved_array(tmp_path, identity, compute)
    again = scores.saved_array(tmp_path, identity, compute)
    np.testing.assert_array_equal(first, again)
    assert len(calls) == 1  # read back, not recomputed
    other_model = scores.Identity("score:ifd", "teacher weights=bb", "data-1", 3, {"max_length": 8})
    with pytest.raises(scores.ManifestError, match="model: saved"):
        scores.saved_array(tmp_path, other_model, compute)
    other_data = scores.Identity("score:ifd", "teacher weights=aa", "data-2", 3, {"max_length": 8})
    with pytest.raises(scores.ManifestError, match="dataset: saved"):
        scores.saved_array(tmp_path, other_data, compute)


def test_sentence_embeddings_mean_pool_and_normalise(tiny_tokenizer: Any, tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=tiny_tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    data = examples(5)
    batched = scores.sentence_embeddings(tmp_path, data, batch_size=2, max_length=64)
    model = BertModel.from_pretrained(tmp_path).eval()
    for example, row in zip(data, batched, strict=True):
        encoded = tiny_tokenizer(
            scores.example_text(example), truncation=True, max_length=64, return_tensors="pt"
        )
        with torch.no_grad():
            states = model(**encoded).last_hidden_state[0]
        pooled = states.mean(0)
        np.testing.assert_allclose(row, (pooled / pooled.norm()).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, rtol=1e-5)


@pytest.mark.slow
def test_minilm_embeds_paraphrases_closer_than_unrelated_text() -> None:
    """The packaged all-MiniLM-L6-v2 (fetched from PyPI once) is the real model."""
    from lmdistill.dd.stage import embedding_dir

    def ask(text: str) -> Example:
        return Example(text, ({"role": "user", "content": text},), "")

    rows = scores.sentence_embeddings(
        embedding_dir("all-minilm-l6-v2"),
        [
            ask("Ana has 7 apples and buys 3 more. How many apples does she have?"),
            ask("Ana owns seven apples, then gets three extra. How many apples now?"),
            ask("The stock market closed lower on Tuesday after the bank's report."),
        ],
    )
    assert rows[0] @ rows[1] > 0.7 > rows[0] @ rows[2] + 0.4
