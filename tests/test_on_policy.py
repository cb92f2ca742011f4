"""On-policy distillation: the sampler against a naive one, the loss on student samples
against a naive per-token reference, and the training invariances (accumulation, two
processes, resume) on samples of different lengths."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from lmdistill.config import ConfigError, LossConfig, OnPolicyConfig, StudentConfig
from lmdistill.data import IGNORE_INDEX, load_examples, tokenize_examples
from lmdistill.kd.objective import KDObjective
from lmdistill.kd.on_policy import (
    OnPolicy,
    SamplingStats,
    draw,
    is_on_policy,
    on_policy_batches,
    prompt_ids,
    sample,
)
from lmdistill.losses import LOSSES
from lmdistill.models import build_student
from lmdistill.models.tiny import build_tiny_llama, build_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from dist_train import ON_POLICY, train_tiny, two_processes  # noqa: E402


def models() -> tuple[Any, Any, Any]:
    tokenizer = build_tiny_tokenizer()
    teacher = build_tiny_llama(len(tokenizer), layers=4, hidden=64, seed=0).eval()
    student, _ = build_student(StudentConfig(num_layers=2), teacher, tokenizer)
    return tokenizer, teacher, student


def train_set(tokenizer: Any, n: int = 8) -> list[Any]:
    items, _ = tokenize_examples(load_examples("builtin:gsm8k-demo")[:n], tokenizer, 640)
    return items


def test_a_step_is_on_policy_with_probability_fraction_and_the_same_after_a_resume() -> None:
    draws = [is_on_policy(3, step, 0.3) for step in range(2000)]
    assert 0.26 < sum(draws) / len(draws) < 0.34
    assert draws == [is_on_policy(3, step, 0.3) for step in range(2000)]
    assert not any(is_on_policy(3, s, 0.0) for s in range(50))
    assert all(is_on_policy(3, s, 1.0) for s in range(50))
    state = torch.get_rng_state()
    is_on_policy(3, 7, 0.5)
    assert torch.equal(state, torch.get_rng_state())  # the training's random state untouched


def test_draw_keeps_the_nucleus_and_samples_in_proportion() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gens = [torch.Generator().manual_seed(0)]
    assert {draw(logits, 1.0, 0.4, gens)[0] for _ in range(50)} == {0}  # top-1 alone
    assert {draw(logits, 1.0, 0.75, gens)[0] for _ in range(200)} == {0, 1}
    counts = torch.zeros(4)
    for _ in range(4000):
        counts[draw(logits, 1.0, 1.0, gens)[0]] += 1
    torch.testing.assert_close(
        counts / 4000, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.025, rtol=0
    )
    cold = {draw(logits, 0.05, 1.0, gens)[0] for _ in range(50)}
    assert cold == {0}


def naive_sample(model: Any, prompt: list[int], key: int, on_policy: OnPolicy) -> list[int]:
    """One row, no cache, no padding: the full sequence through the model at every step."""
    generator = torch.Generator().manual_seed(key)
    written: list[int] = []
    with torch.no_grad():
        for _ in range(on_policy.spec.max_new_tokens):
            logits = model(input_ids=torch.tensor([prompt + written])).logits[:, -1]
            token = draw(
                logits[:, : on_policy.vocab_size],
                on_policy.spec.temperature,
                on_policy.spec.top_p,
                [generator],
            )[0]
            written.append(token)
            if token in on_policy.stop_ids:
                break
    return written


def sampled_batch(
    student: Any, items: list[Any], on_policy: OnPolicy, step: int, stats: SamplingStats
) -> dict[str, torch.Tensor]:
    """The micro-batch of four examples at an on-policy step (seed 0)."""
    pad = build_tiny_tokenizer().pad_token_id
    (batch,) = on_policy_batches(
        student, items, [[0, 1, 2, 3]], on_policy, seed=0, step=step, pad_token_id=pad, stats=stats
    )
    return batch


def ragged(tokenizer: Any, **spec: Any) -> OnPolicy:
    """Stop tokens common enough that a random student's samples end at different lengths."""
    settings = {"max_new_tokens": 16, "temperature": 1.0, "top_p": 0.95, **spec}
    return OnPolicy(
        OnPolicyConfig(fraction=1.0, **settings),
        (tokenizer.eos_token_id, 5, 17, 40, 71),
        len(tokenizer),
    )


def test_the_batched_cached_sampler_draws_what_a_naive_one_draws() -> None:
    tokenizer, _, student = models()
    student.eval()
    items = train_set(tokenizer, 6)
    prompts = [prompt_ids(item) for item in items]
    assert len({len(p) for p in prompts}) > 1  # left padding is exercised
    on_policy = ragged(tokenizer)
    keys = [11, 12, 13, 14, 15, 16]
    batched = sample(student, prompts, keys, on_policy, tokenizer.pad_token_id)
    naive = [naive_sample(student, p, k, on_policy) for p, k in zip(prompts, keys, strict=True)]
    assert batched == naive
    assert len({len(w) for w in batched}) > 1  # ragged
    # Split over two batches, each row draws the same: its stream is its own.
    halves = sample(student, prompts[:3], keys[:3], on_policy, tokenizer.pad_token_id) + sample(
        student, prompts[3:], keys[3:], on_policy, tokenizer.pad_token_id
    )
    assert halves == batched


def test_an_on_policy_batch_trains_on_the_samples_alone() -> None:
    tokenizer, _, student = models()
    items = train_set(tokenizer, 4)
    on_policy = ragged(tokenizer)
    stats = SamplingStats()
    student.train()
    batch = sampled_batch(student, items, on_policy, 3, stats)
    assert student.training  # put back as it was
    labelled = (batch["labels"] != IGNORE_INDEX).sum(-1)
    prompt_lengths = [len(prompt_ids(i)) for i in items]
    for row, item in enumerate(items):
        length = int(batch["attention_mask"][row].sum())
        assert batch["input_ids"][row, : prompt_lengths[row]].tolist() == prompt_ids(item)
        assert int(labelled[row]) == length - prompt_lengths[row]
    assert stats.tokens == int(labelled.sum()) and stats.steps == 1


@pytest.mark.parametrize("divergence", ["generalized_jsd", "reverse_kl", "forward_kl"])
def test_the_on_policy_loss_equals_a_naive_per_token_reference(divergence: str) -> None:
    tokenizer, teacher, student = models()
    items = train_set(tokenizer, 4)
    on_policy = ragged(tokenizer, divergence=divergence, beta=0.3)
    batch = sampled_batch(student, items, on_policy, 0, SamplingStats())
    loss = on_policy.loss(
        LossConfig(divergence="forward_kl", alpha=0.5, temperature=2.0, chunk_size=7)
    )
    objective = KDObjective(student, loss, len(tokenizer))
    from lmdistill.teachers.base import LocalTeacher

    signal = LocalTeacher(teacher, tokenizer, "t").score(batch, [0, 1, 2, 3], loss)
    total, parts = objective(**batch, teacher_states=signal.states, teacher_weight=signal.weight)
    # Naive: full logits of both, every labelled position, the divergence at T = 2, times T^2.
    with torch.no_grad():
        t_logits = teacher(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
    s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    keep = batch["labels"][:, 1:] != IGNORE_INDEX
    s_rows = s_logits[:, :-1][keep][:, : len(tokenizer)]
    t_rows = t_logits[:, :-1][keep][:, : len(tokenizer)]
    params = {"beta": 0.3} if divergence == "generalized_jsd" else {}
    expected = 4.0 * LOSSES[divergence](s_rows, t_rows, temperature=2.0, **params).sum()
    torch.testing.assert_close(total, expected, rtol=1e-4, atol=1e-5)
    assert float(parts["ce"]) == pytest.approx(
        F.cross_entropy(s_rows, batch["labels"][:, 1:][keep], reduction="sum").item(), rel=1e-4
    )
    (g,) = torch.autograd.grad(total, [student.get_output_embeddings().weight])
    (h,) = torch.autograd.grad(expected, [student.get_output_embeddings().weight])
    torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-6)


def test_accumulation_equals_one_big_batch_on_ragged_samples(tmp_path: Path) -> None:
    big, big_history = train_tiny(8, 1, steps=2, checkpoint_dir=tmp_path / "a", on_policy=ON_POLICY)
    acc, acc_history = train_tiny(2, 4, steps=2, checkpoint_dir=tmp_path / "b", on_policy=ON_POLICY)
    assert big_history[0]["tokens"] < 8 * ON_POLICY.spec.max_new_tokens  # some ended early
    for a, b in zip(big_history, acc_history, strict=True):
        assert a["tokens"] == b["tokens"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    for name, value in big.items():
        torch.testing.assert_close(value, acc[name], rtol=1e-4, atol=1e-5)


def test_resume_draws_the_same_samples_and_ends_with_the_same_weights(tmp_path: Path) -> None:
    straight, history = train_tiny(
        4, 1, steps=6, checkpoint_dir=tmp_path / "a", on_policy=ON_POLICY
    )
    train_tiny(4, 1, steps=6, checkpoint_dir=tmp_path / "b", stop_after=5, on_policy=ON_POLICY)
    resumed, again = train_tiny(
        4, 1, steps=6, checkpoint_dir=tmp_path / "b", resume=True, on_policy=ON_POLICY
    )
    for name, value in straight.items():
        assert torch.equal(value, resumed[name]), name
    drop = ("tokens_per_s", "sample_tokens_per_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in again] == [
        {k: v for k, v in r.items() if k not in drop} for r in history
    ]


def test_two_processes_equal_one_on_ragged_samples(tmp_path: Path) -> None:
    two, weights = two_processes(tmp_path / "two", 29523, "--on-policy")
    assert two["processes"] == 2
    one, history = train_tiny(8, 1, steps=2, checkpoint_dir=tmp_path / "one", on_policy=ON_POLICY)
    for a, b in zip(history, two["history"], strict=True):
        assert a["tokens"] == b["tokens"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    for name, value in one.items():
        torch.testing.assert_close(value, weights[name], rtol=1e-4, atol=1e-5)


def test_on_policy_steps_still_distil_when_off_policy_steps_train_on_ce_alone(
    tmp_path: Path,
) -> None:
    """loss.alpha = 1 needs no teacher off-policy; the on-policy steps still do."""
    _, history = train_tiny(
        4,
        1,
        steps=2,
        checkpoint_dir=tmp_path / "a",
        loss=LossConfig(alpha=1.0),
        on_policy=ON_POLICY,
    )
    assert [r["on_policy"] for r in history] == [1.0, 1.0]
    assert all(r["kd"] > 0 for r in history)


def test_fraction_zero_is_todays_off_policy_run(tmp_path: Path) -> None:
    off, off_history = train_tiny(4, 1, steps=3, checkpoint_dir=tmp_path / "a")
    zero = OnPolicy(OnPolicyConfig(fraction=0.0), ON_POLICY.stop_ids, ON_POLICY.vocab_size)
    same, same_history = train_tiny(4, 1, steps=3, checkpoint_dir=tmp_path / "b", on_policy=zero)
    for name, value in off.items():
        assert torch.equal(value, same[name]), name
    assert [r["loss"] for r in off_history] == [r["loss"] for r in same_history]


def test_a_tiny_on_policy_run_ends_to_end_and_reports_its_sampling(tmp_path: Path) -> None:
    from conftest import tiny_run_config

    from lmdistill.pipeline import run

    config = tiny_run_config(
        tmp_path,
        "on_policy.fraction=0.5",
        "on_policy.max_new_tokens=12",
        "baseline=false",
        "train.seed=1",
    )
    metrics = run(config)
    sampling = metrics.kd.on_policy
    drawn = [is_on_policy(1, step, 0.5) for step in range(config.train.max_steps)]
    assert sampling is not None and sampling["on_policy_steps"] == sum(drawn) > 0
    assert [r["on_policy"] for r in metrics.kd.history] == [float(d) for d in drawn]
    assert sampling["sampled_tokens"] > 0 and sampling["sample_tokens_per_s"] > 0
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["kd"]["on_policy"]["on_policy_steps"] == sampling["on_policy_steps"]
    assert "student sampling" in (tmp_path / "run" / "report.md").read_text()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["teacher.kind=cache"], r"on_policy\.fraction: .*cache.*cannot score"),
        (["loss.hidden_weight=0.5"], r"on_policy\.fraction: .*feature losses"),
        (["on_policy.divergence=nope"], r"on_policy\.divergence"),
        (["on_policy.top_p=0"], r"on_policy\.top_p"),
        (["on_policy.fraction=1.5"], r"on_policy\.fraction"),
    ],
)
def test_what_on_policy_cannot_do_is_refused_when_the_config_loads(
    tmp_path: Path, overrides: list[str], message: str
) -> None:
    from conftest import tiny_run_config

    with pytest.raises(ConfigError, match=message):
        tiny_run_config(tmp_path, "on_policy.fraction=0.5", *overrides)
