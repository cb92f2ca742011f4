"""Groups (the data's `group` field): read and kept; every measure per group with the worst
group, the best and the gap; the trivial way to shrink a gap named; and the group objectives
(`reweight`, `dro`) equal to their naive definitions, plain KD with one group, exact under
gradient accumulation, several processes and a resume."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ROOT, write_jsonl
from dist_train import train_tiny, two_processes

from lmdistill.config import ConfigError, LossConfig, StudentConfig, TrainConfig
from lmdistill.data import DataError, load_examples, tokenize_examples, write_examples
from lmdistill.data.tokenize import collate
from lmdistill.eval.evaluator import eval_groups
from lmdistill.eval.fidelity import fidelity, fidelity_by_group
from lmdistill.eval.task import task_accuracy
from lmdistill.kd.groups import GroupBalance
from lmdistill.kd.objective import KDObjective
from lmdistill.losses import LOSSES, fused_kd_loss
from lmdistill.metrics import EvalMetrics, FidelityMetrics, TaskMetrics
from lmdistill.models import build_student
from lmdistill.models.tiny import build_tiny_llama, build_tiny_tokenizer
from lmdistill.report.groups import trivial_fairness
from lmdistill.report.sweep import levelled_down
from lmdistill.teachers.base import LocalTeacher
from lmdistill.validate import load_config


def test_the_group_field_is_read_kept_and_checked(tmp_path: Path) -> None:
    rows = [
        {"id": "a", "prompt": "1+1?", "response": "2", "group": "north"},
        {"id": "b", "messages": [{"role": "user", "content": "2+2?"}], "group": "south"},
        {"id": "c", "question": "3+3?", "answer": "#### 6"},
    ]
    examples = load_examples(str(write_jsonl(tmp_path / "d.jsonl", rows)))
    assert [e.group for e in examples] == ["north", "south", None]
    write_examples(tmp_path / "again.jsonl", examples)
    assert [e.group for e in load_examples(str(tmp_path / "again.jsonl"))] == [
        "north",
        "south",
        None,
    ]
    for bad in (3, "", ["x"]):
        path = write_jsonl(tmp_path / "bad.jsonl", [rows[0], {**rows[2], "group": bad}])
        with pytest.raises(DataError, match=r"bad.jsonl:2: `group` must be a non-empty string"):
            load_examples(str(path))


def _fidelity(kl: float, agree: float, ece: float) -> FidelityMetrics:
    return FidelityMetrics(kl, agree, 2.0, None, ece, None, 10, 10)


def test_group_gaps_by_hand() -> None:
    task = TaskMetrics(
        examples=5,
        exact_match=0.6,
        annotations_per_answer=0.0,
        annotation_accuracy=None,
        annotations_readable=None,
        answer_follows_last_step=None,
        groups={
            "a": {"examples": 3, "exact_match": 2 / 3},
            "b": {"examples": 2, "exact_match": 0.5},
        },
    )
    values = EvalMetrics(
        fidelity=_fidelity(1.0, 0.5, 0.1),
        tasks={"lab": task},
        groups={"a": _fidelity(0.8, 0.6, 0.05), "b": _fidelity(1.4, 0.3, 0.2)},
    )
    gaps = values.group_gaps()
    assert gaps["kl"] == {
        "worst_group": "b",
        "worst": 1.4,
        "best_group": "a",
        "best": 0.8,
        "gap": pytest.approx(0.6),
        "groups": 2,
    }
    assert (gaps["top1_agreement"]["worst_group"], gaps["top1_agreement"]["gap"]) == (
        "b",
        pytest.approx(0.3),
    )
    assert gaps["student_ece"]["worst_group"] == "b"
    em = gaps["exact_match lab"]
    assert (em["worst_group"], em["best_group"], em["gap"]) == ("b", "a", pytest.approx(1 / 6))
    # Written to metrics.json and read back as it was.
    written = values.as_dict()
    assert EvalMetrics.from_dict(written).as_dict() == written
    assert written["group_gaps"]["kl"]["worst_group"] == "b"


def test_data_without_groups_is_measured_as_before() -> None:
    task = TaskMetrics(5, 0.6, 0.0, None, None, None)
    values = EvalMetrics(fidelity=_fidelity(1.0, 0.5, 0.1), tasks={"lab": task})
    written = values.as_dict()
    assert "groups" not in written and "group_gaps" not in written
    assert "groups" not in written["tasks"]["lab"]


def test_exact_match_per_group_by_hand() -> None:
    examples = [
        dataclasses.replace(e, group=g)
        for e, g in zip(load_examples("lab:test:6:0"), ["x", "x", "y", "x", "y", "y"], strict=True)
    ]
    gold = [e.response or "" for e in examples]
    answers = [gold[0], "#### -1", gold[2], gold[3], "#### -1", "#### -1"]
    found = task_accuracy(None, None, examples, max_new_tokens=1, answers=answers)  # type: ignore[arg-type]
    assert found.exact_match == pytest.approx(3 / 6)
    assert found.groups == {
        "x": {"examples": 3, "exact_match": pytest.approx(2 / 3)},
        "y": {"examples": 3, "exact_match": pytest.approx(1 / 3)},
    }


def test_trivial_solution_is_named() -> None:
    def arm(a: float, b: float) -> EvalMetrics:
        return EvalMetrics(groups={"a": _fidelity(1.0, a, 0.1), "b": _fidelity(1.0, b, 0.1)})

    plain = arm(0.8, 0.4)
    levelled = arm(0.5, 0.4)  # gap 0.1 < 0.4, but the best group fell from 0.8 to 0.5
    lifted = arm(0.79, 0.6)  # gap smaller because the worst group rose
    lines = trivial_fairness("dro", levelled, "plain KD", plain)
    assert len(lines) == 1 and "best group got worse" in lines[0] and "top1_agreement" in lines[0]
    assert trivial_fairness("dro", lifted, "plain KD", plain) == []
    # The sweep's table: best = worst + gap (higher is better) from the means over seeds.
    ref = {
        "cell": "reference",
        "KD worst group exact match t": {"mean": 0.4},
        "KD group gap exact match t": {"mean": 0.4},
    }
    cell = {
        "cell": "dro",
        "KD worst group exact match t": {"mean": 0.4},
        "KD group gap exact match t": {"mean": 0.1},
    }
    assert "best group got worse (0.5 against 0.8)" in levelled_down(cell, ref)[0]


@pytest.fixture(scope="module")
def tiny() -> tuple[object, torch.nn.Module]:
    tokenizer = build_tiny_tokenizer()
    teacher = build_tiny_llama(len(tokenizer), layers=2, hidden=32, seed=0).eval()
    return tokenizer, teacher


def grouped_set(tokenizer: object, groups: list[str]) -> list:
    examples = load_examples("builtin:gsm8k-demo")[: len(groups)]
    examples = [dataclasses.replace(e, group=g) for e, g in zip(examples, groups, strict=True)]
    return tokenize_examples(examples, tokenizer, max_length=640)[0]


def test_fidelity_per_group_is_fidelity_of_the_group_alone(tiny: tuple) -> None:
    tokenizer, teacher = tiny
    student, _ = build_student(StudentConfig(num_layers=1), teacher, tokenizer)
    eval_set = grouped_set(tokenizer, ["a", "b", "a", "b", "b"])
    signal = LocalTeacher(teacher, tokenizer, "tiny")
    members = eval_groups(eval_set)
    assert members == {"a": [0, 2], "b": [1, 3, 4]}
    kwargs = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id}
    for name, indices in members.items():
        grouped = fidelity(student, signal, eval_set, batch_size=2, indices=indices, **kwargs)
        alone = fidelity(student, signal, [eval_set[i] for i in indices], batch_size=2, **kwargs)
        assert grouped.kl == pytest.approx(alone.kl, rel=1e-6), name
        assert grouped.tokens == alone.tokens
    overall, by_group = fidelity_by_group(
        student, signal, eval_set, members, batch_size=2, **kwargs
    )
    whole = fidelity(student, signal, eval_set, batch_size=2, **kwargs)
    assert overall.kl == pytest.approx(whole.kl, rel=1e-6)
    assert overall.top1_agreement == whole.top1_agreement and overall.tokens == whole.tokens
    assert overall.student_ece == pytest.approx(whole.student_ece, rel=1e-6)
    assert by_group["b"].kl == pytest.approx(
        fidelity(student, signal, eval_set, batch_size=2, indices=[1, 3, 4], **kwargs).kl
    )
    mixed = grouped_set(tokenizer, ["a", "b"])
    mixed[1] = dataclasses.replace(mixed[1], group=None)
    assert list(eval_groups(mixed)) == ["(no group)", "a"]
    assert eval_groups([dataclasses.replace(x, group=None) for x in mixed]) == {}


def test_row_losses_are_each_tokens_own_loss() -> None:
    torch.manual_seed(0)
    hidden, weight = torch.randn(9, 8), torch.randn(20, 8)
    targets = torch.randint(0, 20, (9,))
    t_hidden, t_weight = torch.randn(9, 8), torch.randn(20, 8)
    kwargs = {"vocab_size": 20, "alpha": 0.3, "temperature": 2.0, "divergence": "forward_kl"}
    rows = torch.empty(9)
    total, _ = fused_kd_loss(
        hidden, weight, targets, teacher_hidden=t_hidden, teacher_weight=t_weight,
        chunk_size=4, row_losses=rows, token_weights=torch.full((9,), 0.5), **kwargs,
    )  # fmt: skip
    for i in range(9):
        alone, _ = fused_kd_loss(
            hidden[i : i + 1], weight, targets[i : i + 1],
            teacher_hidden=t_hidden[i : i + 1], teacher_weight=t_weight, **kwargs,
        )  # fmt: skip
        assert rows[i] == pytest.approx(float(alone), rel=1e-5)
    assert float(total) == pytest.approx(0.5 * float(rows.sum()), rel=1e-5)


@pytest.mark.parametrize("objective", ["reweight", "dro"])
def test_group_objectives_equal_their_naive_definitions(tiny: tuple, objective: str) -> None:
    tokenizer, teacher = tiny
    student, _ = build_student(StudentConfig(num_layers=1), teacher, tokenizer)
    groups = ["a", "a", "b", "a", "c", "a"]
    train_set = grouped_set(tokenizer, groups)
    balance = GroupBalance(train_set, TrainConfig(group_objective=objective))  # type: ignore[arg-type]
    q = {"a": 0.2, "b": 0.5, "c": 0.3}
    chunk = [0, 1, 2, 3]  # group c is absent from this step
    batch = collate([train_set[i] for i in chunk], tokenizer.pad_token_id)
    group_tokens = balance.tokens([batch], [chunk], trained=False)
    scales = balance.scales(group_tokens, q)
    loss = LossConfig(divergence="forward_kl", alpha=0.3, temperature=2.0, chunk_size=7)
    model = KDObjective(student, loss, len(tokenizer))
    signal = LocalTeacher(teacher, tokenizer, "tiny").score(batch, chunk, loss)
    loss_sum, parts = model(
        **batch, teacher_states=signal.states, teacher_weight=signal.weight,
        groups=balance.rows(chunk), group_scales=scales,
    )  # fmt: skip
    n = float(group_tokens.sum())
    got = loss_sum / n
    got_grad = torch.autograd.grad(got, student.get_output_embeddings().weight)[0]

    # Naive: every token's loss from the full logits, then the definition.
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    with torch.no_grad():
        t_logits = teacher(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
    mask = batch["labels"][:, 1:] != -100
    s, t = logits[:, :-1][mask], t_logits[:, :-1][mask]
    y = batch["labels"][:, 1:][mask]
    per_token = 0.3 * torch.nn.functional.cross_entropy(
        s, y, reduction="none"
    ) + 0.7 * 4.0 * LOSSES["forward_kl"](s / 2.0, t / 2.0)
    row = mask.nonzero(as_tuple=True)[0]
    token_group = torch.tensor([ord(groups[chunk[r]]) - ord("a") for r in row.tolist()])
    if objective == "reweight":  # every group the same total weight over the training set
        counts = [sum(1 for y in x.labels[1:] if y != -100) for x in train_set]
        all_tokens = torch.tensor(
            [sum(c for c, g in zip(counts, groups, strict=True) if g == name) for name in "abc"],
            dtype=torch.float64,
        )
        w = (all_tokens.sum() / (3 * all_tokens))[token_group]
        naive = (w.float() * per_token).sum() / n
    else:  # q renormalised over the groups present (a, b), each group's mean loss
        present = {"a": 0.2 / 0.7, "b": 0.5 / 0.7}
        naive = sum(
            present[name] * per_token[token_group == "ab".index(name)].mean() for name in "ab"
        )
    naive_grad = torch.autograd.grad(naive, student.get_output_embeddings().weight)[0]
    assert float(got.detach()) == pytest.approx(float(naive.detach()), rel=1e-4)
    torch.testing.assert_close(got_grad, naive_grad, rtol=1e-3, atol=1e-6)
    own = torch.stack([per_token[token_group == g].sum() for g in range(3)]).double()
    torch.testing.assert_close(parts["groups"], own.detach(), rtol=1e-4, atol=1e-6)


def test_dro_moves_weight_to_the_group_with_the_higher_loss() -> None:
    balance = GroupBalance.__new__(GroupBalance)
    balance.objective, balance.step_size, balance.names = "dro", 0.5, ["a", "b"]
    q = balance.update({"a": 0.5, "b": 0.5}, torch.tensor([10.0, 60.0]), torch.tensor([10.0, 20.0]))
    expected_a = math.exp(0.5 * 1.0) / (math.exp(0.5 * 1.0) + math.exp(0.5 * 3.0))
    assert q["a"] == pytest.approx(expected_a) and q["b"] == pytest.approx(1 - expected_a)
    # An absent group keeps its weight before normalising.
    q = balance.update({"a": 0.25, "b": 0.75}, torch.tensor([10.0, 0.0]), torch.tensor([10.0, 0.0]))
    assert q["a"] == pytest.approx(0.25 * math.exp(0.5) / (0.25 * math.exp(0.5) + 0.75))


@pytest.mark.parametrize("objective", ["reweight", "dro"])
def test_one_group_is_plain_kd_exactly(tmp_path: Path, objective: str) -> None:
    plain, plain_history = train_tiny(4, 1, steps=3, checkpoint_dir=tmp_path / "a")
    one, one_history = train_tiny(
        4, 1, steps=3, checkpoint_dir=tmp_path / "b", group_objective=objective, groups=1
    )
    for name, value in plain.items():
        assert torch.equal(value, one[name]), name
    assert [r["loss"] for r in plain_history] == [r["loss"] for r in one_history]
    assert all(r["loss[g0]"] == pytest.approx(r["loss"], rel=1e-5) for r in one_history)


@pytest.mark.parametrize("objective", ["reweight", "dro"])
def test_group_objectives_with_accumulation_equal_one_big_batch(
    tmp_path: Path, objective: str
) -> None:
    big, big_history = train_tiny(
        8, 1, steps=3, checkpoint_dir=tmp_path / "a", group_objective=objective, groups=3
    )
    acc, acc_history = train_tiny(
        2, 4, steps=3, checkpoint_dir=tmp_path / "b", group_objective=objective, groups=3
    )
    for a, b in zip(big_history, acc_history, strict=True):
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        for key in a:
            if key.startswith(("q[", "loss[")):
                assert a[key] == pytest.approx(b[key], rel=1e-5), key
    if objective == "dro":
        assert big_history[-1]["q[g2]"] != pytest.approx(1 / 3)  # the weights moved
    for name, value in big.items():
        torch.testing.assert_close(value, acc[name], rtol=1e-4, atol=1e-5)


def test_dro_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    kwargs = {"group_objective": "dro", "groups": 2}
    straight, history = train_tiny(4, 1, steps=6, checkpoint_dir=tmp_path / "a", **kwargs)
    train_tiny(4, 1, steps=6, checkpoint_dir=tmp_path / "b", stop_after=5, **kwargs)
    resumed, resumed_history = train_tiny(
        4, 1, steps=6, checkpoint_dir=tmp_path / "b", resume=True, **kwargs
    )
    for name, value in straight.items():
        assert torch.equal(value, resumed[name]), name
    assert resumed_history[-1]["q[g1]"] == history[-1]["q[g1]"]


def test_dro_two_processes_equal_one_process(tmp_path: Path) -> None:
    flags = ("--group-objective", "dro", "--groups", "2")
    two, weights = two_processes(tmp_path / "two", 29533, *flags)
    one, history = train_tiny(
        8, 1, steps=2, checkpoint_dir=tmp_path / "one", group_objective="dro", groups=2
    )
    for a, b in zip(history, two["history"], strict=True):
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["q[g1]"] == pytest.approx(b["q[g1]"], rel=1e-5)
    for name, value in one.items():
        torch.testing.assert_close(value, weights[name], rtol=1e-4, atol=1e-5)


def test_group_objectives_are_refused_where_they_cannot_work(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.group_objective"):
        load_config(
            ROOT / "configs" / "tiny.yaml",
            ["train.group_objective=dro", "loss.hidden_weight=1.0"],
        )
    with pytest.raises(ValueError, match=r"needs groups: give the training rows a `group`"):
        train_tiny(4, 1, steps=1, checkpoint_dir=tmp_path / "a", group_objective="reweight")


def test_tiny_groups_config_end_to_end(tmp_path: Path) -> None:
    from lmdistill.cli import main

    out = tmp_path / "run"
    assert main(["run", str(ROOT / "configs" / "tiny-groups.yaml"), f"output_dir={out}"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for arm in (metrics["before"], metrics["kd"]["after"], metrics["baseline"]["after"]):
        assert set(arm["groups"]) == {"g0", "g1"}
        gaps = arm["group_gaps"]
        assert {"kl", "top1_agreement", "student_ece"} <= set(gaps)
        task = gaps["exact_match lab:test:16:0:groups=2"]
        assert task["worst_group"] != task["best_group"]
    last = metrics["kd"]["history"][-1]
    assert last["q[g0]"] + last["q[g1]"] == pytest.approx(1.0)
    assert "## By group" in (out / "report.md").read_text()


def test_lab_groups_differ_in_surface_form_only() -> None:
    from lmdistill.data.lab import ITEMS, NAMES, solve_question

    examples = load_examples("lab:train:2000:0:groups=2:minority=10")
    minority = [e for e in examples if e.group == "g1"]
    assert 0.08 < len(minority) / len(examples) < 0.12
    for example in examples[:300]:
        question = example.messages[0]["content"]
        names, items = (NAMES[:4], ITEMS[:4]) if example.group == "g0" else (NAMES[4:], ITEMS[4:])
        assert question.split()[0] in names and question.split()[3].rstrip(".") in items
        assert f"#### {solve_question(question)}" in (example.response or "")
    # Without the knob, the lab is what it always was.
    plain = load_examples("lab:train:20:0")
    assert all(e.group is None for e in plain)
    assert [e.messages for e in plain] == [
        e.messages for e in load_examples("lab:train:20:0:groups=0")
    ]


def test_lab_shortcut_is_a_majority_feature_and_counter_problems_defeat_it() -> None:
    import re

    from lmdistill.data.lab import solve_question

    def copies(source: str, group: str) -> float:
        rows = [e for e in load_examples(source) if e.group == group]
        hits = 0
        for e in rows:
            question = e.messages[0]["content"]
            subject = question.split()[0]
            distractor = next(  # "Other has N things.": the only sentence about another person
                int(n)
                for who, n in re.findall(r"(\w+) has (\d+) \w+\.", question)
                if who != subject
            )
            answer = solve_question(question)
            assert f"#### {answer}" in (e.response or "")
            hits += distractor == answer
        return hits / len(rows)

    spiked = "lab:train:600:0:groups=2:minority=20:distractors=1:shortcut=100"
    assert copies(spiked, "g0") == 1.0  # the shortcut works on every majority problem
    assert copies(spiked, "g1") < 0.1  # and on (almost) no minority problem
    counter = "lab:test:300:0:groups=2:distractors=1:counter=1"
    assert copies(counter, "g0") == 0.0 and copies(counter, "g1") == 0.0
    with pytest.raises(DataError, match="need distractors >= 1"):
        load_examples("lab:train:5:0:groups=2:shortcut=100")


def _fair_lab() -> Any:
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import fairness_lab

    return fairness_lab


def test_the_fairness_experiment_scores_its_targets_against_plain_kd() -> None:
    lab = _fair_lab()

    def entry(arm: str, g0: float, g1: float) -> dict[str, Any]:
        groups = {"g0": g0, "g1": g1}
        worst, best = min(g0, g1), max(g0, g1)
        return {
            "arm": arm, "groups": groups, "average": (g0 + g1) / 2, "worst": worst,
            "best": best, "gap": best - worst, "counter_shortcut": 0.3,
        }  # fmt: skip

    arms = lab.summarise(
        [entry(lab.PLAIN, 0.70, 0.30), entry("dro", 0.69, 0.42), entry("reweight", 0.40, 0.30)]
    )
    dro = arms["dro"]
    assert dro["against_plain_kd"]["worst_group_gain"] == pytest.approx(0.12)
    assert dro["targets"]["worst +10 points or gap halved"]
    assert not dro["targets"]["average within 2 points"]  # 0.555 against 0.5
    assert dro["targets"]["best group not worse by > 2 points"] and not dro["levelled_down"]
    # The gap shrank only because the best group fell: the gap target alone is met, the
    # best-group one is not, and the result says it levelled down.
    reweight = arms["reweight"]
    assert reweight["levelled_down"]
    assert reweight["targets"]["worst +10 points or gap halved"]
    assert not reweight["targets"]["best group not worse by > 2 points"]
    assert "| dro | 0.690 ± 0.000 | 0.420 ± 0.000 |" in lab.tables({"arms": arms})


@pytest.mark.slow
def test_the_fairness_experiment_runs_end_to_end_on_tiny_models(tmp_path: Path) -> None:
    import subprocess
    import sys

    result = tmp_path / "fairness.json"
    command = [
        sys.executable, str(ROOT / "benchmarks/fairness_lab.py"), "--out", str(tmp_path),
        "--seeds", "1", "--result", str(result), "teacher.path=tiny-llama",
        "teacher.tiny_layers=2", "train.max_steps=3", "eval.task_max_new_tokens=8",
        "train.checkpoint_every=0",
    ]  # fmt: skip
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=900)
    found = json.loads(result.read_text())
    assert set(found["arms"]) == set(_fair_lab().ARMS)
    assert set(found["arms"]["dro"]["groups"]) == {"g0", "g1"}
    assert found["teacher"] is not None and "counter_shortcut" in found["teacher"]
    assert result.with_suffix(".png").is_file()
