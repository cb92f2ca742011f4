"""Selectors' guarantees, budgets, determinism, the `select` stage and its errors."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lmdistill.config import ConfigError
from lmdistill.data import load_examples
from lmdistill.dd import select as S
from lmdistill.dd.scores import ManifestError
from lmdistill.dd.stage import run_select
from lmdistill.validate import load_config

ROOT = Path(__file__).resolve().parents[1]


def data(n: int = 300, d: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=4, size=(5, d))
    features = centres[rng.integers(5, size=n)] + rng.normal(size=(n, d))
    costs = rng.integers(20, 200, size=n)
    scores = rng.normal(size=n)
    return features, costs, scores


def test_kcenter_covering_radius_never_grows() -> None:
    features, _, _ = data()
    radii: list[float] = []
    order = list(S.kcenter_order(features, seed=0, radii=radii))
    assert sorted(order) == list(range(len(features)))  # a permutation
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(radii))
    assert radii[-1] == 0.0
    for k in (1, 5, 40):  # the running radius is the real covering radius of the prefix
        assert S.covering_radius(features, order[:k]) == pytest.approx(radii[k - 1])
    # Farthest-first covers better than a random subset of the same size.
    random_pick = list(np.random.default_rng(1).permutation(len(features))[:20])
    assert radii[19] < S.covering_radius(features, random_pick)


def test_herding_tracks_the_mean_better_than_random() -> None:
    features, _, _ = data()
    order = list(S.herding_order(features))
    assert sorted(order) == list(range(len(features)))
    mean = features.mean(0)
    herded = np.linalg.norm(features[order[:15]].mean(0) - mean)
    rng = np.random.default_rng(0)
    randoms = [
        np.linalg.norm(features[rng.permutation(300)[:15]].mean(0) - mean) for _ in range(50)
    ]
    assert herded < np.percentile(randoms, 5)


@pytest.mark.parametrize("selector", S.SELECTORS)
@pytest.mark.parametrize(
    ("unit", "budget"), [("fraction", 0.1), ("examples", 37), ("tokens", 4000)]
)
def test_budgets_are_respected_and_selection_is_deterministic(
    selector: str, unit: str, budget: float
) -> None:
    features, costs, scores = data()
    kwargs: dict[str, Any] = dict(
        costs=costs, budget=budget, unit=unit, scores=scores, features=features, clusters=4
    )
    first = S.select(selector, seed=3, **kwargs)
    again = S.select(selector, seed=3, **kwargs)
    assert first.indices == again.indices  # a pure function of its inputs
    assert len(set(first.indices)) == len(first.indices)
    if unit == "tokens":
        assert first.tokens <= budget
        assert budget - first.tokens < costs.max()  # filled up to what still fits
    else:
        expected = round(budget * len(costs)) if unit == "fraction" else budget
        assert len(first.indices) == expected
    assert first.tokens == int(costs[first.indices].sum())


def test_seeds_change_random_picks_and_strata_stay_in_proportion() -> None:
    _, costs, _ = data()
    a = S.select("random", costs=costs, budget=60, unit="examples", seed=0)
    b = S.select("random", costs=costs, budget=60, unit="examples", seed=1)
    assert a.indices != b.indices
    strata = np.array([0] * 200 + [1] * 100)
    picked = S.select("random", costs=costs, budget=60, unit="examples", seed=0, strata=strata)
    counts = np.bincount(strata[picked.indices])
    assert abs(counts[0] - 40) <= 1 and abs(counts[1] - 20) <= 1


def test_top_bottom_deita_and_clusters() -> None:
    features, costs, scores = data()
    top = S.select("top", costs=costs, budget=10, unit="examples", scores=scores)
    assert sorted(top.indices) == sorted(np.argsort(-scores)[:10].tolist())
    bottom = S.select("bottom", costs=costs, budget=10, unit="examples", scores=scores)
    assert sorted(bottom.indices) == sorted(np.argsort(scores)[:10].tolist())
    deita = S.select(
        "deita",
        costs=costs,
        budget=5,
        unit="examples",
        scores=scores,
        features=features,
        threshold=0.5,
    )
    unit = S.unit_rows(features[deita.indices])
    similarity = unit @ unit.T - 2 * np.eye(5)
    assert similarity.max() <= 0.5  # no near-duplicates among the picks
    labels = S.kmeans(features, 5, seed=0)
    balanced = S.select(
        "cluster", costs=costs, budget=25, unit="examples", features=features, clusters=5
    )
    per_cluster = np.bincount(labels[balanced.indices], minlength=5)
    assert per_cluster.max() - per_cluster.min() <= 1


def test_bad_budgets_are_clear_errors() -> None:
    _, costs, _ = data(n=50)
    with pytest.raises(S.BudgetError, match="the data has 50 examples"):
        S.select("random", costs=costs, budget=51, unit="examples")
    with pytest.raises(S.BudgetError, match="more than the data holds"):
        S.select("random", costs=costs, budget=float(costs.sum() + 1), unit="tokens")
    with pytest.raises(S.BudgetError, match="fraction larger than 1"):
        S.select("random", costs=costs, budget=1.5, unit="fraction")
    with pytest.raises(ValueError, match=r"needs select\.features"):
        S.select("kcenter", costs=costs, budget=5, unit="examples")


def test_config_names_unknown_scorer_and_missing_needs() -> None:
    with pytest.raises(ConfigError, match=r"select\.scorer: 'quality'"):
        load_config(None, ["select.scorer=quality"])
    with pytest.raises(ConfigError, match=r"select\.selector: 'best'"):
        load_config(None, ["select.selector=best"])
    with pytest.raises(ConfigError, match=r"select\.features"):
        load_config(None, ["select.selector=kcenter"])
    with pytest.raises(ConfigError, match=r"select\.target"):
        load_config(None, ["select.scorer=gradient"])
    with pytest.raises(ConfigError, match=r"select\.budget"):
        load_config(None, ["select.budget=2.0"])


# ---------------------------------------------------------------------------------------------
# The stage, on a tiny model


def stage_config(tmp_path: Path, *overrides: str) -> Any:
    return load_config(
        ROOT / "configs" / "dd" / "tiny-protocol.yaml",
        [f"output_dir={tmp_path / 'run'}", "data.train=lab:train:40:0:steps=2", *overrides],
    )


def test_select_writes_the_subset_with_original_ids(tmp_path: Path) -> None:
    config = stage_config(
        tmp_path,
        "select.scorer=perplexity",
        "select.model=teacher",
        "select.selector=top",
        "select.budget=10",
        "select.budget_unit=examples",
    )
    summary = run_select(config)
    out = tmp_path / "run" / "select"
    subset = load_examples(str(out / "subset.jsonl"))
    pool = {e.id: e for e in load_examples("lab:train:40:0:steps=2")}
    assert len(subset) == 10
    assert all(pool[e.id].response == e.response for e in subset)
    saved = json.loads((out / "selection.json").read_text())
    assert saved["ids"] == [e.id for e in subset] and saved["selected"] == 10
    values = np.load(out / "scores" / "score-perplexity-teacher" / "values.npy")
    top_ids = [list(pool)[int(i)] for i in np.argsort(-values)[:10]]
    assert sorted(top_ids) == sorted(saved["ids"])
    assert summary["selected_tokens"] > 0 and (out / "select.md").is_file()


def test_reused_scores_must_belong_to_this_model_and_data(tmp_path: Path) -> None:
    shared = f"select.scores_dir={tmp_path / 'scores'}"
    common = ["select.scorer=perplexity", "select.model=teacher", "select.selector=top", shared]
    run_select(stage_config(tmp_path, *common))
    with pytest.raises(ManifestError, match="dataset"):
        run_select(stage_config(tmp_path, *common, "data.train=lab:train:40:1:steps=2"))
    with pytest.raises(ManifestError, match="model"):
        run_select(stage_config(tmp_path, *common, "teacher.tiny_seed=5"))


def test_gradient_scorer_needs_a_nonempty_target(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    config = stage_config(
        tmp_path,
        "select.scorer=gradient",
        f"select.target={empty}",
        "select.selector=top",
        "select.model=teacher",
        "select.grad_dim=16",
    )
    with pytest.raises(ValueError, match="empty"):
        run_select(config)


def test_less_selection_runs_end_to_end(tmp_path: Path) -> None:
    config = stage_config(
        tmp_path,
        "select.scorer=gradient",
        "select.target=lab:test:6:0:steps=2",
        "select.selector=top",
        "select.model=teacher",
        "select.grad_dim=32",
        "select.features=gradient",
        "select.budget=0.25",
    )
    summary = run_select(config)
    features = np.load(
        tmp_path / "run" / "select" / "scores" / "features-gradient-teacher" / "features.npy"
    )
    assert features.shape == (40, 32) and np.abs(features).sum() > 0
    assert summary["selected"] == 10


def test_duplicate_ids_and_self_divergence_are_refused(tmp_path: Path) -> None:
    rows = tmp_path / "dup.jsonl"
    row = '{{"id": "a", "prompt": "q{0}", "response": "r{0}"}}\n'
    rows.write_text(row.format(1) + row.format(2))
    with pytest.raises(ValueError, match="'a' appears more than once"):
        run_select(stage_config(tmp_path, f"data.train={rows}", "data.eval=null"))
    with pytest.raises(ConfigError, match=r"select\.model"):
        load_config(None, ["select.scorer=divergence", "select.model=teacher"])


def test_ifd_at_least_one_is_ranked_last(tmp_path: Path, monkeypatch: Any) -> None:
    from lmdistill.dd import stage

    values = np.array([0.5, 1.2, 0.9, 3.0, 0.1] + [0.2] * 35)
    monkeypatch.setattr(stage, "compute_scores", lambda config, pool, models: values)
    config = stage_config(
        tmp_path,
        "select.scorer=ifd",
        "select.selector=top",
        "select.budget=4",
        "select.budget_unit=examples",
    )
    summary = run_select(config)
    pool = [e.id for e in load_examples("lab:train:40:0:steps=2")]
    assert summary["ids"] == [pool[2], pool[0], pool[5], pool[6]]  # 0.9, 0.5, then 0.2s
    assert summary["info"]["ifd_at_least_1_ranked_last"] == 2
