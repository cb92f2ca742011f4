"""Selectors: pure functions of scores, features, a budget and a seed.

Each selector yields examples in its order of preference; `fill` takes them while they fit the
budget (in examples, or in tokens: an example that does not fit is skipped, the next may).

- `random`: a seeded permutation; stratified by a label (each prefix holds every stratum in
  proportion to its size).
- `top` / `bottom`: by score (ties by position).
- `kcenter`: greedy farthest-first traversal (Sener & Savarese 2018): each pick is the example
  furthest from everything picked, so the covering radius never grows.
- `herding`: kernel herding with a linear kernel (Welling 2009; iCaRL): each pick brings the
  picked set's mean closest to the whole set's mean.
- `deita`: score first, diversity second (Liu et al. 2024): by score, skipping an example whose
  cosine similarity to one already picked exceeds a threshold (the skipped come last).
- `cluster`: k-means clusters, then one example per cluster in turn (by score within a cluster
  when there is one, else at random): every region of the data gets an equal share.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lmdistill.registry import Registry


class BudgetError(ValueError):
    """The budget cannot be met by this data."""


@dataclass
class Selection:
    indices: list[int]  # in the order they were picked
    tokens: int
    info: dict[str, Any] = field(default_factory=dict)


def budget_limit(budget: float, unit: str, costs: np.ndarray) -> tuple[str, float]:
    """('examples' | 'tokens', limit) for a budget given as a fraction, examples or tokens."""
    n, total = len(costs), float(costs.sum())
    if budget <= 0:
        raise BudgetError(f"select.budget: {budget!r} is not allowed; expected a number > 0")
    if unit == "fraction":
        if budget > 1:
            raise BudgetError(
                f"select.budget: {budget} is a fraction larger than 1 (the data has {n} "
                "examples); use a fraction in (0, 1] or budget_unit examples / tokens"
            )
        return "examples", max(1, round(budget * n))
    if unit == "examples":
        if budget > n or budget != int(budget):
            raise BudgetError(
                f"select.budget: {budget} examples is not allowed; the data has {n} examples "
                "(expected a whole number between 1 and that)"
            )
        return "examples", int(budget)
    if unit == "tokens":
        if budget > total:
            raise BudgetError(
                f"select.budget: {budget:.0f} tokens is more than the data holds ({total:.0f} "
                f"tokens in {n} examples)"
            )
        if budget < costs.min():
            raise BudgetError(
                f"select.budget: {budget:.0f} tokens is less than the shortest example "
                f"({int(costs.min())} tokens)"
            )
        return "tokens", float(budget)
    raise BudgetError(f"select.budget_unit: {unit!r}; choose fraction, examples or tokens")


def fill(order: Iterator[int], costs: np.ndarray, unit: str, limit: float) -> list[int]:
    """Take examples in `order` while the budget holds; never exceed it."""
    picked: list[int] = []
    spent = 0.0
    smallest = float(costs.min())
    for index in order:
        cost = 1.0 if unit == "examples" else float(costs[index])
        if spent + cost <= limit:
            picked.append(index)
            spent += cost
        if limit - spent < (1.0 if unit == "examples" else smallest):
            break
    return picked


# ---------------------------------------------------------------------------------------------
# Orders


def random_order(n: int, seed: int, strata: np.ndarray | None = None) -> Iterator[int]:
    rng = np.random.default_rng(seed)
    if strata is None:
        yield from (int(i) for i in rng.permutation(n))
        return
    # Stratified: member j of a stratum of size m gets key (j + u) / m; sorted by key, every
    # prefix holds each stratum in proportion (up to one example).
    keys = np.zeros(n)
    for label in np.unique(strata):
        members = np.flatnonzero(strata == label)
        members = members[rng.permutation(len(members))]
        keys[members] = (np.arange(len(members)) + rng.random(len(members))) / len(members)
    yield from (int(i) for i in np.argsort(keys, kind="stable"))


def score_order(scores: np.ndarray, descending: bool) -> Iterator[int]:
    keyed = -scores if descending else scores
    yield from (int(i) for i in np.argsort(keyed, kind="stable"))


def kcenter_order(
    features: np.ndarray, seed: int, radii: list[float] | None = None
) -> Iterator[int]:
    """Farthest-first traversal from a seeded start; `radii` receives the covering radius
    (largest distance from any example to its nearest pick) as each pick is made."""
    x = np.asarray(features, dtype=np.float64)
    n = len(x)
    picked = np.zeros(n, dtype=bool)
    nearest = np.full(n, np.inf)
    pick = int(np.random.default_rng(seed).integers(n))
    while True:
        picked[pick] = True
        nearest = np.minimum(nearest, np.linalg.norm(x - x[pick], axis=1))
        if radii is not None:
            radii.append(float(nearest.max()))
        yield pick
        if picked.all():
            return
        pick = int(np.argmax(np.where(picked, -1.0, nearest)))


def covering_radius(features: np.ndarray, indices: list[int]) -> float:
    """max over examples of the distance to the nearest selected example."""
    x = np.asarray(features, dtype=np.float64)
    centres = x[indices]
    worst = 0.0
    for start in range(0, len(x), 2048):
        rows = x[start : start + 2048]
        d2 = (rows**2).sum(1, keepdims=True) - 2 * rows @ centres.T + (centres**2).sum(1)
        worst = max(worst, float(np.sqrt(np.maximum(d2.min(1), 0)).max()))
    return worst


def herding_order(features: np.ndarray) -> Iterator[int]:
    """Each pick minimises || mean(all) - mean(picked + candidate) ||."""
    x = np.asarray(features, dtype=np.float64)
    n = len(x)
    target = x.mean(0)
    total = np.zeros(x.shape[1])
    available = np.ones(n, dtype=bool)
    for k in range(1, n + 1):
        gap = target - (total + x) / k  # (n, d)
        distance = np.einsum("nd,nd->n", gap, gap)
        distance[~available] = np.inf
        pick = int(np.argmin(distance))
        available[pick] = False
        total += x[pick]
        yield pick


def unit_rows(features: np.ndarray) -> np.ndarray:
    x = np.asarray(features, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def deita_order(
    scores: np.ndarray, features: np.ndarray, threshold: float, skipped: list[int] | None = None
) -> Iterator[int]:
    """By score, skipping near-duplicates (cosine > threshold) of what was picked."""
    x = unit_rows(features)
    picked: list[int] = []
    held: list[int] = []
    for index in score_order(scores, descending=True):
        if picked and float((x[picked] @ x[index]).max()) > threshold:
            held.append(index)
            continue
        picked.append(index)
        yield index
    if skipped is not None:
        skipped.extend(held)
    yield from held


def kmeans(features: np.ndarray, k: int, seed: int, iterations: int = 25) -> np.ndarray:
    """Lloyd's k-means with k-means++ seeding; returns each example's cluster (0..k-1)."""
    x = np.asarray(features, dtype=np.float64)
    rng = np.random.default_rng(seed)
    k = min(k, len(x))
    centres = [x[int(rng.integers(len(x)))]]
    nearest = np.linalg.norm(x - centres[0], axis=1) ** 2
    for _ in range(1, k):
        probabilities = nearest / nearest.sum() if nearest.sum() > 0 else None
        centres.append(x[int(rng.choice(len(x), p=probabilities))])
        nearest = np.minimum(nearest, np.linalg.norm(x - centres[-1], axis=1) ** 2)
    c = np.stack(centres)
    labels = np.zeros(len(x), dtype=int)
    for _ in range(iterations):
        distances = (x**2).sum(1, keepdims=True) - 2 * x @ c.T + (c**2).sum(1)
        new = distances.argmin(1)
        if np.array_equal(new, labels) and _ > 0:
            break
        labels = new
        for j in range(k):
            members = x[labels == j]
            if len(members):
                c[j] = members.mean(0)
    return labels


def cluster_order(labels: np.ndarray, scores: np.ndarray | None, seed: int) -> Iterator[int]:
    """Round-robin over clusters; within one, by score (descending) or at random."""
    rng = np.random.default_rng(seed)
    queues = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if scores is not None:
            members = members[np.argsort(-scores[members], kind="stable")]
        else:
            members = members[rng.permutation(len(members))]
        queues.append(list(members))
    depth = 0
    while any(depth < len(q) for q in queues):
        for queue in queues:
            if depth < len(queue):
                yield int(queue[depth])
        depth += 1


@dataclass(frozen=True)
class SelectorInputs:
    """What a selector may look at; `scores`/`features` are set when it says it needs them."""

    costs: np.ndarray  # tokens per example
    seed: int
    scores: np.ndarray | None
    features: np.ndarray | None
    strata: np.ndarray | None
    threshold: float
    clusters: int


# A selector's order of preference, and what it reports about the picked indices.
Picked = tuple[Iterator[int], Callable[[list[int]], dict[str, Any]]]


@dataclass(frozen=True)
class Selector:
    pick: Callable[[SelectorInputs], Picked]
    needs_scores: bool
    needs_features: bool
    high_first: bool  # prefers high scores: a scorer's unhelpful values are ranked last


SELECTORS: Registry[Selector] = Registry("selector", "select.selector")


def register_selector(
    name: str, *, scores: bool = False, features: bool = False, high_first: bool = False
) -> Callable[[Callable[[SelectorInputs], Picked]], Callable[[SelectorInputs], Picked]]:
    """Register a selector; `scores`/`features`: it needs select.scorer / select.features;
    `high_first`: it prefers high scores."""
    return SELECTORS.register_as(name, lambda fn: Selector(fn, scores, features, high_first))


def _nothing(indices: list[int]) -> dict[str, Any]:
    return {}


@register_selector("random")
def _random(x: SelectorInputs) -> Picked:
    return random_order(len(x.costs), x.seed, x.strata), _nothing


@register_selector("top", scores=True, high_first=True)
def _top(x: SelectorInputs) -> Picked:
    assert x.scores is not None
    return score_order(x.scores, descending=True), _nothing


@register_selector("bottom", scores=True)
def _bottom(x: SelectorInputs) -> Picked:
    assert x.scores is not None
    return score_order(x.scores, descending=False), _nothing


@register_selector("kcenter", features=True)
def _kcenter(x: SelectorInputs) -> Picked:
    features = x.features
    assert features is not None
    return kcenter_order(features, x.seed), lambda indices: {
        "covering_radius": covering_radius(features, indices)
    }


@register_selector("herding", features=True)
def _herding(x: SelectorInputs) -> Picked:
    assert x.features is not None
    return herding_order(x.features), _nothing


@register_selector("deita", scores=True, features=True, high_first=True)
def _deita(x: SelectorInputs) -> Picked:
    assert x.scores is not None and x.features is not None
    skipped: list[int] = []  # filled while the order is consumed
    order = deita_order(x.scores, x.features, x.threshold, skipped)
    return order, lambda indices: {"near_duplicates_skipped": len(skipped)}


@register_selector("cluster", features=True)
def _cluster(x: SelectorInputs) -> Picked:
    assert x.features is not None
    labels = kmeans(x.features, x.clusters, x.seed)
    sizes = np.bincount(labels).tolist()
    return cluster_order(labels, x.scores, x.seed), lambda indices: {"cluster_sizes": sizes}


def select(
    selector: str,
    *,
    costs: np.ndarray,
    budget: float,
    unit: str,
    seed: int = 0,
    scores: np.ndarray | None = None,
    features: np.ndarray | None = None,
    strata: np.ndarray | None = None,
    threshold: float = 0.9,
    clusters: int = 10,
) -> Selection:
    """The subset `selector` picks within the budget. `costs` are tokens per example."""
    chosen = SELECTORS.lookup(selector)
    if chosen.needs_scores and scores is None:
        raise ValueError(f"select.selector: {selector!r} needs select.scorer to be set")
    if chosen.needs_features and features is None:
        raise ValueError(f"select.selector: {selector!r} needs select.features to be set")
    kind, limit = budget_limit(budget, unit, costs)
    inputs = SelectorInputs(costs, seed, scores, features, strata, threshold, clusters)
    order, report = chosen.pick(inputs)
    indices = fill(order, costs, kind, limit)
    info: dict[str, Any] = {"budget_kind": kind, "budget_limit": limit, **report(indices)}
    return Selection(indices, int(costs[indices].sum()), info)
