"""Several teachers: each strategy against a naive reference on dense logits and on top-k
signals (k = V equals dense), conflict scores, and the ensemble teacher on batches."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from lmdistill.config import LossConfig
from lmdistill.data import IGNORE_INDEX, TokenizedExample, collate
from lmdistill.losses import SparseSignal
from lmdistill.losses.sparse import topk_signal
from lmdistill.teachers.base import Teacher, TeacherSignal
from lmdistill.teachers.ensemble import (
    STRATEGIES,
    Answers,
    EnsembleTeacher,
    Evidence,
    combine,
    conflict_report,
)

V = 11


def evidence(k: int, n: int, weights: list[float], **more: object) -> Evidence:
    total = sum(weights)
    values: dict[str, object] = {
        "weights": torch.tensor([w / total for w in weights]),
        "present": torch.ones(k, n, dtype=torch.bool),
        "example": torch.zeros(n, dtype=torch.long),
        "targets": torch.zeros(n, dtype=torch.long),
        "keep": None,
        "route": None,
        "confidence_temperature": 0.7,
    }
    values.update(more)
    return Evidence(**values)  # type: ignore[arg-type]


def naive(strategy: str, p: list[list[list[float]]], ev: Evidence) -> list[list[float]]:
    """One row at a time, in plain Python: the strategy's combined distribution."""
    k, n = len(p), len(p[0])
    out = []
    for row in range(n):
        w = [float(ev.weights[j]) * bool(ev.present[j, row]) for j in range(k)]
        dists = [p[j][row] for j in range(k)]
        if strategy == "confidence":
            h = [-sum(x * math.log(x) for x in d if x > 0) for d in dists]
            w = [w[j] * math.exp(-h[j] / ev.confidence_temperature) for j in range(k)]
        if strategy == "vote" and ev.keep is not None:
            kept = [w[j] * bool(ev.keep[j, int(ev.example[row])]) for j in range(k)]
            w = kept if sum(kept) > 0 else w
        if strategy == "route" and ev.route is not None:
            w = [float(j == int(ev.route[int(ev.example[row])])) for j in range(k)]
        w = [x / sum(w) for x in w]
        if strategy == "product":
            logs = [sum(w[j] * math.log(dists[j][v]) for j in range(k)) for v in range(V)]
            z = sum(math.exp(x) for x in logs)
            out.append([math.exp(x) / z for x in logs])
        else:
            out.append([sum(w[j] * dists[j][v] for j in range(k)) for v in range(V)])
    return out


def spread_naive(signal: SparseSignal) -> list[list[float]]:
    """A top-k signal's tail spread evenly over the ids outside it, element by element."""
    rows = []
    for ids, lps in zip(signal.token_ids.tolist(), signal.logprobs.tolist(), strict=True):
        tail = 1.0 - sum(math.exp(x) for x in lps)
        rest = V - len(ids)
        row = [tail / rest if rest else 0.0] * V
        for i, lp in zip(ids, lps, strict=True):
            row[i] = math.exp(lp)
        rows.append(row)
    return rows


def dense(signal: SparseSignal) -> torch.Tensor:
    out = torch.full((signal.num_rows, V), -math.inf)
    return out.scatter(1, signal.token_ids, signal.logprobs)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@pytest.mark.parametrize("k", [V, 4, 2])
def test_each_strategy_equals_a_naive_reference(strategy: str, k: int) -> None:
    torch.manual_seed(0)
    teachers, n = 3, 6
    logits = torch.randn(teachers, n, V) * 2
    signals = [topk_signal(logits[j], k, tail="bucket", temperature=1.0) for j in range(teachers)]
    more: dict[str, object] = {"example": torch.tensor([0, 0, 0, 1, 1, 1])}
    if strategy == "vote":
        more["keep"] = torch.tensor([[True, False], [False, False], [True, False]])
    if strategy == "route":
        more["route"] = torch.tensor([2, 0])
    ev = evidence(teachers, n, [1.0, 2.0, 5.0], **more)  # weights summing to 8: normalised
    signal, trust, _, _ = combine(signals, ev, strategy, V)
    got = dense(signal).exp()
    reference = torch.tensor(naive(strategy, [spread_naive(s) for s in signals], ev))
    if k == V:  # exact dense: the reference straight from the softmax of the logits
        exact = naive(strategy, torch.softmax(logits, -1).tolist(), ev)
        assert torch.allclose(reference, torch.tensor(exact), atol=1e-6)
    # The signal holds the union of the teachers' ids; what it leaves out is its tail bucket.
    held = torch.isfinite(dense(signal))
    assert torch.allclose(got[held], reference[held].float(), atol=1e-5)
    tail = 1 - got.where(held, 0).sum(-1)
    assert torch.allclose(tail, (reference * ~held).sum(-1).float(), atol=1e-5)
    assert torch.allclose(trust.sum(0), torch.ones(n))


def test_one_teacher_is_its_own_signal_and_weights_are_normalised() -> None:
    torch.manual_seed(1)
    logits = torch.randn(5, V)
    signal = topk_signal(logits, 4, tail="bucket", temperature=2.0)
    for strategy in STRATEGIES:
        ev = evidence(1, 5, [7.0], route=torch.zeros(1, dtype=torch.long))
        out, _, jsd, differ = combine([signal], ev, strategy, V)
        assert out.temperature == 2.0
        assert torch.allclose(dense(out)[:, :].gather(1, signal.token_ids), signal.logprobs)
        assert float(jsd.abs().max()) < 1e-6 and not bool(differ.any())
    twice = combine([signal, signal], evidence(2, 5, [3.0, 3.0]), "mean", V)[0]
    once = combine([signal, signal], evidence(2, 5, [0.5, 0.5]), "mean", V)[0]
    assert torch.allclose(dense(twice).exp(), dense(once).exp())


def test_conflict_is_zero_for_identical_teachers_and_ranks_a_contradiction_first() -> None:
    torch.manual_seed(2)
    n = 12
    logits = torch.randn(n, V)
    wrong = logits.clone()
    contradicted = [3, 7]
    for row in contradicted:  # confidently another token on these rows
        wrong[row] = -5.0
        wrong[row, (int(logits[row].argmax()) + 1) % V] = 8.0
    same = [topk_signal(logits, V, tail="bucket", temperature=1.0)] * 2
    _, _, jsd, differ = combine(same, evidence(2, n, [1, 1]), "mean", V)
    assert float(jsd.abs().max()) < 1e-5 and not bool(differ.any())
    three = [*same, topk_signal(wrong, V, tail="bucket", temperature=1.0)]
    _, _, jsd, differ = combine(three, evidence(3, n, [1, 1, 1]), "mean", V)
    assert sorted(jsd.topk(2).indices.tolist()) == contradicted
    assert differ.nonzero().flatten().tolist() == contradicted
    assert float(jsd.max()) <= math.log(3) + 1e-6


def test_absent_rows_leave_the_teacher_out() -> None:
    torch.manual_seed(3)
    logits = torch.randn(2, 4, V)
    signals = [topk_signal(logits[j], V, tail="bucket", temperature=1.0) for j in range(2)]
    present = torch.tensor([[True, True, False, True], [True, True, True, True]])
    out, trust, _, _ = combine(signals, evidence(2, 4, [1, 1], present=present), "mean", V)
    assert torch.allclose(dense(out)[2].exp(), torch.softmax(logits[1, 2], -1), atol=1e-6)
    assert trust[:, 2].tolist() == [0.0, 1.0]


class Fixed(Teacher):
    """A teacher whose logits are given per dataset example (the indices) and position."""

    def __init__(self, logits: torch.Tensor, name: str) -> None:
        self.logits = logits  # (B, T, V)
        self.identity = name

    def score(
        self, batch: dict[str, torch.Tensor], indices: list[int], loss: LossConfig
    ) -> TeacherSignal:
        mask = batch["labels"][:, 1:] != IGNORE_INDEX
        rows = self.logits[indices][:, : mask.shape[1]][mask]
        return TeacherSignal(sparse=topk_signal(rows, 3, tail="bucket", temperature=1.0))


def test_the_ensemble_teacher_votes_by_answer_and_reports_its_conflicts() -> None:
    torch.manual_seed(4)
    items = [
        TokenizedExample(f"q{i}", [1, 2, 3, 4, 5], [IGNORE_INDEX, IGNORE_INDEX, 3, 4, 5], False)
        for i in range(4)
    ]
    good = torch.randn(4, 5, V) * 3
    bad = good.clone()
    bad[2] = -good[2]  # teacher "bad" contradicts on example q2
    agreed = {f"q{i}": "1" for i in range(4)}
    answers = Answers(
        by_teacher=[agreed, agreed, {**agreed, "q2": "9"}],
        reference={},
        weights=[1.0, 1.0, 1.0],
    )
    members = [Fixed(good, "a"), Fixed(good, "b"), Fixed(bad, "c")]
    ensemble = EnsembleTeacher(members, ["a", "b", "c"], [1, 1, 1], strategy="vote", k=3,
                               vocab=V, answers=answers)  # fmt: skip
    ensemble.bind(items)
    batch = collate(items, 0)
    signal = ensemble.score(batch, [0, 1, 2, 3], LossConfig()).sparse
    assert signal is not None and signal.num_rows == 4 * 3
    report = conflict_report(ensemble, shown=2)
    assert report["examples"] == 4 and report["most_conflicting"][0]["id"] == "q2"
    q2 = report["most_conflicting"][0]
    assert q2["answers"] == {"a": "1", "b": "1", "c": "9"} and q2["answers_differ"]
    assert q2["trust"]["c"] == 0.0 and q2["trust"]["a"] == pytest.approx(0.5)
    assert report["answers_differ"] == 0.25
    assert sum(report["histogram"]["counts"]) == 4


# ---------------------------------------------------------------------------------------------
# Runs: the tiny ensemble config end to end, the audit command, caches against live teachers

ROOT = Path(__file__).resolve().parents[1]


def test_the_tiny_ensemble_runs_end_to_end_and_reports_its_conflicts(tmp_path: Any) -> None:
    import json

    from lmdistill.cli import main

    out = tmp_path / "run"
    assert main(["run", str(ROOT / "configs/tiny-ensemble.yaml"), f"output_dir={out}"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    ensemble = metrics["ensemble"]
    assert set(ensemble["teachers"]) == {"first", "second"}
    assert ensemble["answers"]["first"]["prompts"] == metrics["data"]["train_examples"]
    conflicts = ensemble["conflicts"]
    assert conflicts["strategy"] == "vote" and conflicts["examples"] == 48
    assert sum(conflicts["histogram"]["counts"]) == 48
    assert 0 < conflicts["mean_token_jsd"] <= math.log(2)
    assert sum(conflicts["trust"].values()) == pytest.approx(1.0)
    rows = (out / "ensemble" / "conflicts.jsonl").read_text().splitlines()
    assert len(rows) == 48 and set(json.loads(rows[0])) >= {"conflict", "answers", "trust"}
    report = (out / "report.md").read_text()
    assert "## Several teachers: where they contradict each other" in report
    assert (out / "conflict.png").is_file()

    # The audit without training: the same teachers, the same scores (the caches and the
    # answers already on disk are reused).
    audit = tmp_path / "audit"
    args = ["conflicts", str(ROOT / "configs/tiny-ensemble.yaml"), f"output_dir={out}"]
    assert main([*args, "--out", str(audit)]) == 0
    audited = json.loads((audit / "conflicts.json").read_text())["conflicts"]
    assert audited["mean_token_jsd"] == pytest.approx(conflicts["mean_token_jsd"], rel=1e-4)
    assert audited["answers_differ"] == conflicts["answers_differ"]
    assert (audit / "conflicts.md").is_file() and (audit / "conflict.png").is_file()


def _two_teachers(tmp_path: Any, kinds: tuple[str, str], name: str) -> Any:
    from lmdistill.validate import load_config

    config = load_config(
        ROOT / "configs/tiny-ensemble.yaml",
        [
            f"output_dir={tmp_path / name}",
            "train.max_steps=4",
            "ensemble.strategy=product",
            "eval.num_samples=0",
            "eval.enabled=false",
        ],
    )
    teachers = [
        dataclasses.replace(t, kind=kind) for t, kind in zip(config.teachers, kinds, strict=True)
    ]
    return dataclasses.replace(config, teachers=teachers, teacher=teachers[0])


def test_two_teachers_from_their_caches_train_as_the_same_teachers_live(tmp_path: Any) -> None:
    """Within what the cache's storage keeps (top-1 in float16, the other log-probs as 8-bit
    gaps): a live teacher's top-k is what its cache holds, decoded."""
    from lmdistill.config import ModelConfig
    from lmdistill.models import load_model
    from lmdistill.pipeline import run

    live = run(_two_teachers(tmp_path, ("local", "local"), "live"))
    cached = run(_two_teachers(tmp_path, ("cache", "cache"), "cached"))
    for a, b in zip(live.kd.history, cached.kd.history, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3)
    one, _ = load_model(ModelConfig(path=str(tmp_path / "live" / "student")))
    two, _ = load_model(ModelConfig(path=str(tmp_path / "cached" / "student")))
    for (name, p), q in zip(one.state_dict().items(), two.state_dict().values(), strict=True):
        # Adam moves a weight with a near-zero gradient by ~lr either way, so compare tensors.
        assert float((p - q).norm() / p.norm()) < 1e-2, name


def test_what_an_ensemble_cannot_be_is_refused_when_the_config_loads(tmp_path: Any) -> None:
    from lmdistill.config import ConfigError
    from lmdistill.validate import load_config

    base = [f"output_dir={tmp_path}"]
    path = ROOT / "configs/tiny-ensemble.yaml"
    cases = {
        "teacher.path=other": "set either teacher or teachers",
        "loss.hidden_weight=1": "0 with several teachers",
        "ensemble.strategy=loudest": "ensemble.strategy: 'loudest' is not allowed",
        "on_policy.fraction=1": "every teacher of an on-policy run must score",
    }
    for override, message in cases.items():
        with pytest.raises((ConfigError, ValueError), match=message):
            load_config(path, [*base, override])
    duplicate = "teachers=[{name: a, path: tiny-llama}, {name: a, path: tiny-llama}]"
    with pytest.raises(ConfigError, match="distinct names"):
        load_config(path, [*base, duplicate])
    text = ("teachers=[{path: tiny-llama}, {kind: text, path: tiny-llama, "
            "base_url: 'http://127.0.0.1:1/v1', model: m}]")  # fmt: skip
    with pytest.raises(ConfigError, match="a text-only teacher has nothing to combine"):
        load_config(path, [*base, text])
    weight = "teachers=[{path: tiny-llama}, {path: tiny-llama, weight: 0}]"
    with pytest.raises(ConfigError, match=r"teachers\[1\]\.weight"):
        load_config(path, [*base, weight])


def test_a_list_of_one_teacher_is_todays_single_teacher() -> None:
    from lmdistill.validate import load_config

    one = "teachers=[{path: tiny-llama, tiny_layers: 4, tiny_hidden: 64}]"
    listed = load_config(ROOT / "configs/tiny.yaml", [one])
    single = load_config(ROOT / "configs/tiny.yaml")
    assert listed == single


def test_generate_keeps_the_majority_answer_of_several_teachers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each teacher writes; per prompt the majority final answer wins and the first teacher
    that gives it supplies the response; ties and prompts without answers are dropped."""
    from lmdistill.data import Example, load_examples
    from lmdistill.teachers import ensemble_setup, setup
    from lmdistill.teachers.base import ResponseWriter
    from lmdistill.teachers.generate import GenerationReport
    from lmdistill.validate import load_config

    said = {  # per teacher, per prompt: its final answer (None: it gives none)
        "first": ["5", "3", "1", None],
        "second": ["5", "4", "2", None],
        "third": ["7", "4", "3", None],
    }

    class Scripted(ResponseWriter):
        def __init__(self, name: str) -> None:
            self.identity = name

        def generate(self, prompts: list[Example], out_path: Path, config: Any) -> Any:
            rows = [
                dataclasses.replace(p, response=f"{self.identity} says\n#### {a}" if a else "?")
                for p, a in zip(prompts, said[self.identity] + [None] * len(prompts), strict=False)
            ]
            return rows, GenerationReport(len(prompts), len(prompts), 0, 0, 0.0)

    monkeypatch.setattr(setup, "generating_teacher", lambda c: (Scripted(c.teacher.name), {}))
    three = "teachers=[" + ", ".join(f"{{name: {n}, path: tiny-llama}}" for n in said) + "]"
    config = load_config(ROOT / "configs/tiny-ensemble.yaml", [f"output_dir={tmp_path}", three])
    prompts = [Example(f"p{i}", ({"role": "user", "content": f"q{i}"},), None) for i in range(4)]
    out = tmp_path / "agreed.jsonl"
    report = ensemble_setup.generate_by_agreement(config, out, prompts, [])
    kept = load_examples(str(out))
    assert [e.id for e in kept] == ["p0", "p1"]
    assert kept[0].response == "first says\n#### 5" and kept[1].response == "second says\n#### 4"
    assert report["dropped"] == {"tie": 1, "no_answer": 1}
    assert report["agreed_with_majority"] == {"first": 1, "second": 2, "third": 1}
    assert report["written_by"] == {"first": 1, "second": 1, "third": 0}


def test_route_picks_the_teacher_that_explains_the_response_among_those_that_agree() -> None:
    from lmdistill.teachers.ensemble import route_choice, spread

    torch.manual_seed(5)
    n, k = 6, 3
    targets = torch.tensor([1, 2, 3, 4, 5, 6])
    example = torch.tensor([0, 0, 0, 1, 1, 1])
    sure = torch.full((n, V), -6.0).scatter(1, targets[:, None], 6.0)  # predicts every target
    unsure = torch.randn(n, V)
    signals = [topk_signal(unsure, k, tail="bucket", temperature=1.0),
               topk_signal(sure, k, tail="bucket", temperature=1.0)]  # fmt: skip
    ev = evidence(2, n, [1, 1], example=example, targets=targets)
    assert route_choice(signals, ev, 2, V).tolist() == [1, 1]
    # Teacher 1 gives a wrong final answer on example 1: it is routed to teacher 0 there.
    ev.keep = torch.tensor([[True, True], [True, False]])
    assert route_choice(signals, ev, 2, V).tolist() == [1, 0]
    # A teacher absent on some rows (a server that could not score them) is judged on the
    # rows it scored, and padding it with -inf ids breaks nothing.
    holes = signals[1].logprobs.clone().index_fill_(1, torch.tensor([2]), -math.inf)
    padded = SparseSignal(signals[1].token_ids, holes, tail="bucket", temperature=1.0)
    ev.keep = None
    ev.present = torch.tensor([[True] * n, [True, False, True, True, True, False]])
    assert route_choice([signals[0], padded], ev, 2, V).tolist() == [1, 1]
    assert torch.allclose(spread(padded, V).exp().sum(-1), torch.ones(n), atol=1e-5)


def test_the_ensemble_keeps_its_audit_by_dataset_index_not_batch_row() -> None:
    torch.manual_seed(6)
    items = [TokenizedExample(f"q{i}", [1, 2, 3, 4], [IGNORE_INDEX, 2, 3, 4], False)
             for i in range(5)]  # fmt: skip
    good = torch.randn(5, 4, V) * 3
    bad = good.clone()
    bad[3] = -good[3]  # contradicts on dataset example 3 only

    ensemble = EnsembleTeacher([Fixed(good, "a"), Fixed(bad, "b")], ["a", "b"], [1, 1],
                               strategy="mean", k=3, vocab=V)  # fmt: skip
    ensemble.bind(items)
    ensemble.score(collate([items[3], items[1]], 0), [3, 1], LossConfig())
    report = conflict_report(ensemble)
    assert report["examples"] == 2 and report["most_conflicting"][0]["id"] == "q3"
    assert report["most_conflicting"][1]["conflict"] < 1e-6
