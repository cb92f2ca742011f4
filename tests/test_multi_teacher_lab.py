"""The many-teacher lab experiment's own arithmetic (benchmarks/multi_teacher_lab.py): how the
contradictions are injected and how their detection is scored."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import multi_teacher_lab as lab  # noqa: E402


def test_corrupt_moves_the_last_step_and_the_answer_by_one() -> None:
    solution = (
        "Ana has 3.\nShe buys 4: 3+4=<<3+4=7>>7 apples.\n"
        "She gives 2: 7-2=<<7-2=5>>5 apples.\n#### 5"
    )
    wrong = lab.corrupt(solution)
    assert wrong.splitlines()[:2] == solution.splitlines()[:2]  # earlier steps untouched
    assert wrong.splitlines()[2] == "She gives 2: 7-2=<<7-2=6>>6 apples."
    assert wrong.splitlines()[-1] == "#### 6"


def test_corrupted_sets_are_nested_and_sized_by_rate() -> None:
    sets = {r: {item for _, item in lab.corrupted_pairs(r)} for r in (0.125, 0.25, 0.5)}
    assert [len(s) for s in sets.values()] == [1, 2, 4]
    assert sets[0.125] < sets[0.25] < sets[0.5]
    assert all(len(lab.corrupted_pairs(r)) == len(sets[r]) * len(lab.NAMES) for r in sets)


def test_auc_equals_the_share_of_ordered_pairs() -> None:
    rng = random.Random(0)
    scores = [rng.choice([0.0, 0.5, 1.0, rng.random()]) for _ in range(60)]
    labels = [rng.random() < 0.3 for _ in range(60)]
    pairs = [
        (p, n)
        for p, yp in zip(scores, labels, strict=True)
        if yp
        for n, yn in zip(scores, labels, strict=True)
        if not yn
    ]
    naive = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)
    assert lab.auc(scores, labels) == pytest.approx(naive)
    assert lab.auc([1, 2, 3, 4], [False, False, True, True]) == 1.0
    assert lab.auc([4, 3, 2, 1], [False, False, True, True]) == 0.0


def test_detection_chooses_on_even_questions_and_measures_on_odd() -> None:
    # Even ids: the injected score high. Odd ids: one clean question scores highest of all,
    # so the threshold chosen on the even half lets one false positive through on the odd.
    rows, injected = [], {}
    for i in range(40):
        bad = i % 4 < 2
        score = 0.9 if bad else 0.1
        if i == 3:
            score = 0.95
        rows.append({"id": f"q-{i}", "conflict": score, "max_jsd": score, "answers_differ": bad})
        injected[f"q-{i}"] = bad
    found = lab.detection(rows, injected)
    assert found["questions"] == 40 and found["injected"] == 20
    conflict = found["conflict"]
    assert conflict["threshold"] == 0.9  # the lowest with precision >= 0.9 on the even half
    assert conflict["recall"] == 1.0
    assert conflict["precision"] == pytest.approx(10 / 11)  # q-3, clean, is flagged
    assert found["answers_differ"]["auc"] == 1.0


def test_summarise_rebuilds_each_cell_from_the_runs() -> None:
    def run(strategy: str, rate: float, seed: int, em: float) -> dict[str, object]:
        entry: dict[str, object] = {"strategy": strategy, "rate": rate, "seed": seed}
        entry.update({key: em for key in lab.MEASURES})
        if strategy != "clean single teacher":
            entry["trust"] = {"contra-0.25": em / 2}
        return entry

    runs = [run("clean single teacher", 0.0, s, 0.5 + s / 10) for s in range(2)]
    runs += [run("vote", 0.25, s, 0.2 * (s + 1)) for s in range(3)]
    results = {"rates": {"0.25": {"strategies": {}}}, "runs": runs}
    lab.summarise(results)
    vote = results["rates"]["0.25"]["strategies"]["vote"]
    assert vote["exact_match"]["n"] == 3
    assert vote["exact_match"]["mean"] == pytest.approx(0.4)
    assert vote["exact_match"]["std"] == pytest.approx(0.2)
    assert vote["signal_from_contradicting"]["mean"] == pytest.approx(0.2)
    clean = results["clean_single_teacher"]
    assert clean["split_rate"] == 0.25 and clean["exact_match"]["mean"] == pytest.approx(0.55)
    assert "signal_from_contradicting" not in clean
