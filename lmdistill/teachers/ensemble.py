"""Several teachers scoring the same response tokens: their signals combined per token by a
registered strategy (`ensemble.strategy`), and where they contradict each other measured.

Every member's signal is first put in one form: its top-k log-probabilities at the loss
temperature (a local teacher's logits cut to `ensemble.k`; a cache or a server gives its own
top-k), the rest of its mass (its tail) spread evenly over the ids outside its top-k. On that
(N, V) form every strategy is exact, and with k = V it is the dense combination itself. The
combined distribution reaches the loss as a SparseSignal over its `sum(k)` most likely ids
(the union of the members' ids, and ids outside it at their exact value) with a tail bucket.

Strategies (adding one is one registered function from the members' log-probs and the
`Evidence` to the combined log-probs and the trust each teacher got per token):

- `mean`: the weighted mixture of the teachers' probabilities;
- `product`: the normalised weighted geometric mean (the log-probabilities averaged);
- `confidence`: a mixture with per-token weights `weight * exp(-entropy / tau)`;
- `vote`: per example, the teachers whose final answer differs from the reference answer
  (when the data has one) or from the weighted majority are left out (all kept when none
  agrees);
- `route`: per example, one teacher: the one with the lowest loss on the response among
  those whose answer agrees (all teachers when answers are unknown).

Conflict, per token: the generalized Jensen-Shannon divergence among the present teachers
(the configured weights), `H(sum w p) - sum w H(p)`, in nats (at most log K), and whether
their top-1 ids differ; per example: their mean and maximum, and whether the teachers'
final answers differ.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lmdistill.config import LossConfig
from lmdistill.data import IGNORE_INDEX, TokenizedExample
from lmdistill.losses import SparseSignal
from lmdistill.losses.sparse import _log1mexp, topk_signal
from lmdistill.registry import Registry
from lmdistill.teachers.base import Teacher, TeacherSignal

ROWS_PER_CHUNK = 256  # rows combined at once: K x 256 x V floats


@dataclass
class Evidence:
    """What a strategy may use beyond the teachers' distributions, for one chunk of rows."""

    weights: Tensor  # (K,) the configured weights, summing to 1
    present: Tensor  # (K, N) bool: the teacher scored this row
    example: Tensor  # (N,) long: the example of the batch each row belongs to (0..B-1)
    targets: Tensor  # (N,) long: the response token of each row
    keep: Tensor | None  # (K, B) bool: the teacher's final answer agrees; None: unknown
    route: Tensor | None  # (B,) long: the teacher `route` chose for each example
    confidence_temperature: float = 1.0


Strategy = Callable[[Tensor, Evidence], tuple[Tensor, Tensor]]
STRATEGIES: Registry[Strategy] = Registry("ensemble strategy", "ensemble.strategy")


def _normalised(trust: Tensor, fallback: Tensor) -> Tensor:
    """(K, N) non-negative weights scaled to sum to 1 per row; a row with none takes
    `fallback`'s (the configured weights of the present teachers)."""
    total = trust.sum(0, keepdim=True)
    trust = torch.where(total > 0, trust, fallback)
    return trust / trust.sum(0, keepdim=True).clamp_min(1e-30)


def mixture(logp: Tensor, trust: Tensor) -> Tensor:
    """log sum_j trust_j p_j: (K, N, V) log-probs and (K, N) weights -> (N, V)."""
    log_trust = torch.where(trust > 0, trust.clamp_min(1e-30).log(), -math.inf)
    return torch.logsumexp(log_trust[..., None] + logp, dim=0)


def entropy(logp: Tensor) -> Tensor:
    """-sum p log p over the last axis (0 * log 0 = 0)."""
    p = logp.exp()
    return -torch.where(p > 0, p * logp, torch.zeros_like(logp)).sum(-1)


def _base(evidence: Evidence) -> Tensor:
    """The configured weights of the teachers present on each row: (K, N)."""
    return evidence.weights[:, None] * evidence.present


@STRATEGIES.register("mean")
def mean_strategy(logp: Tensor, evidence: Evidence) -> tuple[Tensor, Tensor]:
    trust = _normalised(_base(evidence), _base(evidence))
    return mixture(logp, trust), trust


@STRATEGIES.register("product")
def product_strategy(logp: Tensor, evidence: Evidence) -> tuple[Tensor, Tensor]:
    trust = _normalised(_base(evidence), _base(evidence))
    weighted = torch.where(trust[..., None] > 0, trust[..., None] * logp, torch.zeros_like(logp))
    combined = torch.log_softmax(weighted.sum(0), dim=-1)
    # A row where the teachers leave no id in common (each gives 0 to the others' ids: an
    # empty tail) has no geometric mean: it takes the mixture instead.
    empty = ~torch.isfinite(combined).any(-1, keepdim=True)
    return torch.where(empty, mixture(logp, trust), combined), trust


@STRATEGIES.register("confidence")
def confidence_strategy(logp: Tensor, evidence: Evidence) -> tuple[Tensor, Tensor]:
    sharp = torch.exp(-entropy(logp) / evidence.confidence_temperature)  # (K, N)
    trust = _normalised(_base(evidence) * sharp, _base(evidence))
    return mixture(logp, trust), trust


@STRATEGIES.register("vote")
def vote_strategy(logp: Tensor, evidence: Evidence) -> tuple[Tensor, Tensor]:
    base = _base(evidence)
    kept = base if evidence.keep is None else base * evidence.keep[:, evidence.example]
    trust = _normalised(kept, base)
    return mixture(logp, trust), trust


@STRATEGIES.register("route")
def route_strategy(logp: Tensor, evidence: Evidence) -> tuple[Tensor, Tensor]:
    base = _base(evidence)
    if evidence.route is None:
        raise ValueError("route needs the teacher chosen per example (Evidence.route)")
    chosen = evidence.route[evidence.example]  # (N,)
    one_hot = torch.zeros_like(base).scatter(0, chosen[None], 1.0) * evidence.present
    trust = _normalised(one_hot, base)
    return mixture(logp, trust), trust


def spread(signal: SparseSignal, vocab: int) -> Tensor:
    """A top-k signal as (N, V) log-probs: its k ids as given, its tail mass spread evenly over
    the other V - k ids (a renormalised signal has no tail). Exact when k = V."""
    ids, lp = signal.token_ids, signal.logprobs.float()
    if signal.tail == "renormalize":
        lp = torch.log_softmax(lp, dim=-1)
    # Ids given -inf (a server's padding) are outside the top-k too: they share the tail.
    rest = vocab - torch.isfinite(lp).sum(-1)  # (N,)
    tail = _log1mexp(torch.logsumexp(lp, dim=-1))
    fill = torch.where(rest > 0, tail - rest.clamp_min(1).float().log(), -math.inf)
    out = fill[:, None].expand(lp.shape[0], vocab).clone()
    return out.scatter_(1, ids, torch.where(torch.isfinite(lp), lp, fill[:, None]))


def conflict(logp: Tensor, evidence: Evidence) -> tuple[Tensor, Tensor]:
    """Per row: the generalized JSD among the present teachers (configured weights) and
    whether their top-1 ids differ: (N,) each."""
    base = _normalised(_base(evidence), _base(evidence))
    jsd = entropy(mixture(logp, base)) - (base * entropy(logp)).sum(0)
    top1 = logp.argmax(-1)  # (K, N)
    first = torch.where(evidence.present, top1, -1).max(0).values  # any present teacher's
    differ = (evidence.present & (top1 != first)).any(0)
    return jsd.clamp_min(0.0), differ


def combine(
    signals: list[SparseSignal], evidence: Evidence, strategy: str, vocab: int
) -> tuple[SparseSignal, Tensor, Tensor, Tensor]:
    """The strategy's combined signal over the rows, the trust (K, N) it gave, the per-row
    JSD and top-1 disagreement. Rows are combined `ROWS_PER_CHUNK` at a time."""
    fn = STRATEGIES.lookup(strategy)
    n = signals[0].num_rows
    k_out = min(vocab, sum(s.token_ids.shape[1] for s in signals))
    ids, values, trusts, jsds, differs = [], [], [], [], []
    for start in range(0, n, ROWS_PER_CHUNK):
        rows = slice(start, min(n, start + ROWS_PER_CHUNK))
        logp = torch.stack([spread(s.rows(rows), vocab) for s in signals])  # (K, n, V)
        part = Evidence(
            evidence.weights,
            evidence.present[:, rows],
            evidence.example[rows],
            evidence.targets[rows],
            evidence.keep,
            evidence.route,
            evidence.confidence_temperature,
        )
        combined, trust = fn(logp, part)
        top = combined.topk(k_out, dim=-1)
        jsd, differ = conflict(logp, part)
        ids.append(top.indices)
        values.append(top.values)
        trusts.append(trust)
        jsds.append(jsd)
        differs.append(differ)
    temperature = signals[0].temperature
    signal = SparseSignal(
        torch.cat(ids) if ids else torch.zeros(0, k_out, dtype=torch.long),
        torch.cat(values) if values else torch.zeros(0, k_out),
        tail="bucket",
        temperature=temperature,
        present=evidence.present.any(0),
    )
    empty = torch.zeros(0)
    return (
        signal,
        torch.cat(trusts, dim=1) if trusts else torch.zeros(len(signals), 0),
        torch.cat(jsds) if jsds else empty,
        torch.cat(differs) if differs else empty.bool(),
    )


def route_choice(
    signals: list[SparseSignal], evidence: Evidence, batch_size: int, vocab: int
) -> Tensor:
    """Per example, the teacher with the lowest mean NLL of the response tokens (its spread
    distribution's, rows it scored) among those whose final answer agrees (all, when answers
    are unknown or none agrees): (B,) long."""
    k = len(signals)
    nll = torch.zeros(k, batch_size)
    count = torch.zeros(k, batch_size)
    for j, signal in enumerate(signals):
        present = evidence.present[j]
        own = spread(signal, vocab).gather(1, evidence.targets[:, None]).squeeze(1)  # (N,)
        own = torch.where(present, own, torch.zeros(()))
        nll[j].index_add_(0, evidence.example, -own)
        count[j].index_add_(0, evidence.example, present.float())
    mean_nll = torch.where(count > 0, nll / count.clamp_min(1), math.inf)
    mean_nll = torch.nan_to_num(mean_nll, nan=math.inf)
    if evidence.keep is not None:  # among the agreeing teachers, where any agrees
        allowed = evidence.keep | ~evidence.keep.any(0, keepdim=True)
        mean_nll = torch.where(allowed, mean_nll, math.inf)
    return mean_nll.argmin(0)


# ---------------------------------------------------------------------------------------------
# Final answers: which teachers agree on each example (vote, route, the conflict report)


@dataclass
class Answers:
    """Each teacher's final answer per example id (None: none found), and the reference
    answer of each example when its response is the data's own (None otherwise)."""

    by_teacher: list[dict[str, str | None]]
    reference: dict[str, str | None]
    weights: list[float]

    def keep(self, ids: list[str]) -> Tensor:
        """(K, B) bool: the teacher's answer is the reference (when known) or the weighted
        majority of the teachers' answers."""
        keep = torch.zeros(len(self.by_teacher), len(ids), dtype=torch.bool)
        for b, example in enumerate(ids):
            target = self.reference.get(example) or self.majority(example)
            for j, answers in enumerate(self.by_teacher):
                keep[j, b] = target is not None and answers.get(example) == target
        return keep

    def majority(self, example: str) -> str | None:
        votes: dict[str, float] = {}
        for answers, weight in zip(self.by_teacher, self.weights, strict=True):
            answer = answers.get(example)
            if answer is not None:
                votes[answer] = votes.get(answer, 0.0) + weight
        if not votes:
            return None
        best = max(votes.values())
        winners = [a for a, v in votes.items() if math.isclose(v, best, rel_tol=1e-9)]
        return winners[0] if len(winners) == 1 else None  # a tie: no majority

    def differ(self, example: str) -> bool:
        """The teachers give different final answers (one without an answer counts)."""
        return len({answers.get(example) for answers in self.by_teacher}) > 1


# ---------------------------------------------------------------------------------------------
# The teacher a run trains with


@dataclass
class ExampleAudit:
    """What the teachers said on one example, the last time it was scored."""

    tokens: int = 0
    jsd_sum: float = 0.0
    jsd_max: float = 0.0
    top1_differ: int = 0
    trust: list[float] = field(default_factory=list)  # summed over its tokens, per teacher


class EnsembleTeacher(Teacher):
    """Several teachers as one: each scores the batch, the strategy combines them per token,
    and what they disagreed on is kept per example for the report."""

    def __init__(
        self,
        members: list[Teacher],
        names: list[str],
        weights: list[float],
        *,
        strategy: str,
        k: int,
        vocab: int,
        confidence_temperature: float = 1.0,
        answers: Answers | None = None,
    ) -> None:
        if not members or len(members) != len(names) or len(names) != len(weights):
            raise ValueError("an ensemble needs one name and one weight per teacher")
        if any(not (w > 0 and math.isfinite(w)) for w in weights):
            raise ValueError(f"teacher weights must be finite numbers > 0, got {weights}")
        STRATEGIES.lookup(strategy)
        self.members = members
        self.names = names
        total = sum(weights)
        self.weights = [w / total for w in weights]
        self.strategy = strategy
        self.k = k
        self.vocab = vocab
        self.confidence_temperature = confidence_temperature
        self.answers = answers
        self.example_ids: list[str] | None = None
        self.audit: dict[int, ExampleAudit] = {}
        self.identity = f"ensemble[{strategy}]({', '.join(m.identity for m in members)})"
        self.model_config = None

    def prepare(self, device: Any, loss: LossConfig) -> None:
        for member in self.members:
            member.prepare(device, loss)

    def bind(self, items: list[TokenizedExample]) -> None:
        """The examples that batch indices refer to (their ids name the answers)."""
        self.example_ids = [item.id for item in items]

    def member_signals(
        self, batch: dict[str, Tensor], indices: list[int], loss: LossConfig
    ) -> list[SparseSignal]:
        """Each teacher's top-k signal at the loss temperature, on the CPU."""
        out = []
        for member in self.members:
            signal = member.score(batch, indices, loss)
            if signal.sparse is not None:
                sparse = signal.sparse.to("cpu")
                if sparse.tail == "bucket" and sparse.temperature != loss.temperature:
                    raise ValueError(
                        f"teacher {member.identity} gives log-probs at temperature "
                        f"{sparse.temperature}, the loss is at {loss.temperature}"
                    )
            else:
                assert signal.states is not None and signal.weight is not None
                with torch.no_grad():
                    logits = signal.states.float() @ signal.weight[: self.vocab].float().T
                k = min(self.k, self.vocab)
                sparse = topk_signal(logits.cpu(), k, tail="bucket", temperature=loss.temperature)
            out.append(sparse)
        return out

    def score(
        self, batch: dict[str, Tensor], indices: list[int], loss: LossConfig
    ) -> TeacherSignal:
        signals = self.member_signals(batch, indices, loss)
        evidence = self.evidence(batch, indices, signals)
        combined, trust, jsd, differ = combine(signals, evidence, self.strategy, self.vocab)
        self._record(indices, evidence.example, trust, jsd, differ)
        return TeacherSignal(sparse=combined)

    def evidence(
        self, batch: dict[str, Tensor], indices: list[int], signals: list[SparseSignal]
    ) -> Evidence:
        labels = batch["labels"].cpu()
        mask = labels[:, 1:] != IGNORE_INDEX  # (B, T-1): rows in this order
        example = torch.arange(labels.shape[0])[:, None].expand_as(mask)[mask]
        targets = labels[:, 1:][mask]
        n = int(mask.sum())
        for member, signal in zip(self.members, signals, strict=True):
            if signal.num_rows != n:
                raise ValueError(
                    f"teacher {member.identity} scored {signal.num_rows} rows, the batch has {n}"
                )
        present = torch.stack(
            [
                s.present.cpu() if s.present is not None else torch.ones(n, dtype=torch.bool)
                for s in signals
            ]
        )
        keep = None
        if self.answers is not None and self.example_ids is not None:
            keep = self.answers.keep([self.example_ids[i] for i in indices])
        evidence = Evidence(
            torch.tensor(self.weights),
            present,
            example,
            targets,
            keep,
            None,
            self.confidence_temperature,
        )
        if self.strategy == "route":
            evidence.route = route_choice(signals, evidence, labels.shape[0], self.vocab)
        return evidence

    def _record(
        self, indices: list[int], example: Tensor, trust: Tensor, jsd: Tensor, differ: Tensor
    ) -> None:
        for b, index in enumerate(indices):
            rows = example == b
            self.audit[index] = ExampleAudit(
                tokens=int(rows.sum()),
                jsd_sum=float(jsd[rows].sum()),
                jsd_max=float(jsd[rows].max()) if bool(rows.any()) else 0.0,
                top1_differ=int(differ[rows].sum()),
                trust=trust[:, rows].sum(1).tolist(),
            )

    def report(self, shown: int = 5) -> dict[str, Any]:
        """The conflict section of metrics.json (see `conflict_report`)."""
        return conflict_report(self, shown)


def example_rows(ensemble: EnsembleTeacher) -> list[dict[str, Any]]:
    """One row per scored example: its conflict scores, the teachers' answers, the trust."""
    rows = []
    answers = ensemble.answers
    for index in sorted(ensemble.audit):
        audit = ensemble.audit[index]
        example = ensemble.example_ids[index] if ensemble.example_ids else str(index)
        tokens = max(1, audit.tokens)
        row: dict[str, Any] = {
            "id": example,
            "tokens": audit.tokens,
            "conflict": audit.jsd_sum / tokens,
            "max_jsd": audit.jsd_max,
            "top1_disagreement": audit.top1_differ / tokens,
            "trust": dict(zip(ensemble.names, [t / tokens for t in audit.trust], strict=True)),
        }
        if answers is not None:
            said = zip(ensemble.names, answers.by_teacher, strict=True)
            row["answers"] = {name: by_id.get(example) for name, by_id in said}
            row["answers_differ"] = answers.differ(example)
            row["reference"] = answers.reference.get(example)
        rows.append(row)
    return rows


HISTOGRAM_BINS = 10


def conflict_report(ensemble: EnsembleTeacher, shown: int = 5) -> dict[str, Any]:
    """How much the teachers contradicted each other over the examples scored: token and
    example rates, a histogram of per-example conflict (mean token JSD over [0, log K]), the
    `shown` most conflicting examples, and how much each teacher was trusted."""
    rows = example_rows(ensemble)
    tokens = sum(r["tokens"] for r in rows)
    k = len(ensemble.members)
    top = math.log(k) if k > 1 else 1.0
    counts = [0] * HISTOGRAM_BINS
    for r in rows:
        counts[min(HISTOGRAM_BINS - 1, int(r["conflict"] / top * HISTOGRAM_BINS))] += 1
    edges = [top * (i + 1) / HISTOGRAM_BINS for i in range(HISTOGRAM_BINS)]
    trust = {
        name: sum(r["trust"][name] * r["tokens"] for r in rows) / max(1, tokens)
        for name in ensemble.names
    }
    out: dict[str, Any] = {
        "teachers": ensemble.names,
        "weights": dict(zip(ensemble.names, ensemble.weights, strict=True)),
        "strategy": ensemble.strategy,
        "examples": len(rows),
        "tokens": tokens,
        "mean_token_jsd": sum(r["conflict"] * r["tokens"] for r in rows) / max(1, tokens),
        "top1_disagreement": sum(r["top1_disagreement"] * r["tokens"] for r in rows)
        / max(1, tokens),
        "examples_with_top1_disagreement": sum(r["top1_disagreement"] > 0 for r in rows)
        / max(1, len(rows)),
        "histogram": {"upper_edges": edges, "counts": counts},
        "trust": trust,
        "most_conflicting": sorted(rows, key=lambda r: -r["conflict"])[:shown],
    }
    if ensemble.answers is not None:
        out["answers_differ"] = sum(r["answers_differ"] for r in rows) / max(1, len(rows))
    return out
