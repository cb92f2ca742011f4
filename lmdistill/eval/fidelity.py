"""How close is the student to the teacher, on held-out responses?

Per response token (teacher temperature 1): KL(teacher || student), top-1 agreement (both
models' most likely next token is the same), and the student's perplexity on the responses.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from lmdistill.config import LossConfig
from lmdistill.data import TokenizedExample, collate, to_device
from lmdistill.losses import LOSSES, SparseSignal, sparse_divergence
from lmdistill.metrics import FidelityMetrics
from lmdistill.models.forward import response_hidden
from lmdistill.teachers.base import Teacher


@torch.no_grad()
def fidelity(
    student: PreTrainedModel,
    teacher: Teacher,
    eval_set: list[TokenizedExample],
    *,
    vocab_size: int,
    pad_token_id: int,
    batch_size: int = 8,
    chunk_size: int = 512,
    indices: list[int] | None = None,
) -> FidelityMetrics:
    """KL, top-1 agreement, perplexities and calibration over `eval_set`. `student_ece` is
    the expected calibration error of the student's next-token predictions on the reference
    tokens (confidence = top probability, 10 bins), `teacher_ece` the teacher's on the same
    tokens: a student more over-confident than its teacher is a failure signature of
    distillation.

    With a sparse teacher (cache, server) KL is the top-k + tail-bucket KL, agreement compares
    with the teacher's top-1 id, rows without a signal are left out (`signal_tokens` says how
    many were scored) and `teacher_ppl` is None (the cache does not hold every target's
    log-prob).

    `indices` (positions in `eval_set`, as the teacher's signal is addressed) measures those
    examples only: one group of a grouped eval set.
    """
    order = list(range(len(eval_set))) if indices is None else indices
    return fidelity_tally(
        student, teacher, eval_set, order, vocab_size, pad_token_id, batch_size, chunk_size
    ).result()


def fidelity_by_group(
    student: PreTrainedModel,
    teacher: Teacher,
    eval_set: list[TokenizedExample],
    groups: dict[str, list[int]],
    *,
    vocab_size: int,
    pad_token_id: int,
    batch_size: int = 8,
    chunk_size: int = 512,
) -> tuple[FidelityMetrics, dict[str, FidelityMetrics]]:
    """`fidelity` over all of `eval_set` and over each group's rows (`groups`: positions by
    group name, covering every row), in one pass: the overall tally is the groups' summed."""
    tallies = {
        name: fidelity_tally(
            student, teacher, eval_set, members, vocab_size, pad_token_id, batch_size, chunk_size
        )
        for name, members in groups.items()
    }
    overall = FidelityTally.merged(list(tallies.values()))
    return overall.result(), {name: tally.result() for name, tally in tallies.items()}


@torch.no_grad()
def fidelity_tally(
    student: PreTrainedModel,
    teacher: Teacher,
    eval_set: list[TokenizedExample],
    order: list[int],
    vocab_size: int,
    pad_token_id: int,
    batch_size: int,
    chunk_size: int,
) -> FidelityTally:
    """The sums `fidelity` reports, over the rows of `eval_set` at positions `order`."""
    student.eval()
    s_weight = student.get_output_embeddings().weight[:vocab_size]
    kd_config = LossConfig()
    tally = FidelityTally()
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = collate([eval_set[i] for i in chunk], pad_token_id)
        batch = to_device(batch, student.device)
        s_states, targets = response_hidden(student, **batch)
        signal = teacher.score(batch, chunk, kd_config)
        for lo in range(0, targets.shape[0], chunk_size):
            rows = slice(lo, lo + chunk_size)
            s_logits = (s_states[rows] @ s_weight.T).float()  # (n, V)
            if signal.sparse is not None:
                tally.add_sparse(s_logits, targets[rows], signal.sparse.rows(rows))
            else:
                assert signal.states is not None and signal.weight is not None
                t_weight = signal.weight[:vocab_size]
                t_logits = (signal.states[rows] @ t_weight.T).float().to(s_logits.device)
                tally.add_dense(s_logits, targets[rows], t_logits)
    return tally


class FidelityTally:
    """Sums over chunks of response tokens: KL and agreement over the tokens with a teacher
    signal, cross-entropies and calibration over all of them."""

    def __init__(self) -> None:
        self.totals = torch.zeros(4, dtype=torch.float64)  # kl, agree, student ce, teacher ce
        self.tokens = self.scored = 0
        self.sparse_seen = False
        self.calibration, self.teacher_calibration = Calibration(), Calibration()
        self.teacher_calibrated = True

    @classmethod
    def merged(cls, tallies: list[FidelityTally]) -> FidelityTally:
        """One tally holding the sums of `tallies` (disjoint rows)."""
        out = cls()
        for tally in tallies:
            out.totals += tally.totals
            out.tokens += tally.tokens
            out.scored += tally.scored
            out.sparse_seen |= tally.sparse_seen
            out.teacher_calibrated &= tally.teacher_calibrated
            for mine, theirs in (
                (out.calibration, tally.calibration),
                (out.teacher_calibration, tally.teacher_calibration),
            ):
                mine.count += theirs.count
                mine.confidence += theirs.confidence
                mine.correct += theirs.correct
        return out

    def add_sparse(self, s_logits: torch.Tensor, y: torch.Tensor, part: SparseSignal) -> None:
        """A chunk against a top-k signal: KL over its ids plus the tail bucket, agreement
        with its top-1 id, rows without a signal left out."""
        self.sparse_seen = True
        part = part.to(s_logits.device)
        keep = (
            part.present
            if part.present is not None
            else torch.ones(len(y), dtype=torch.bool, device=y.device)
        )
        kl = sparse_divergence(s_logits, part, "forward_kl", temperature=1.0)
        if part.temperature == 1.0:  # the teacher's own confidence: its top-1 prob
            self.teacher_calibration.add_predictions(
                part.logprobs[keep, 0].exp(), part.token_ids[keep, 0], y[keep]
            )
        else:
            self.teacher_calibrated = False
        agree = s_logits.argmax(-1) == part.token_ids[:, 0]
        self._add(s_logits, y, [kl[keep].sum(), agree[keep].sum()], torch.zeros(()))
        self.scored += int(keep.sum())

    def add_dense(self, s_logits: torch.Tensor, y: torch.Tensor, t_logits: torch.Tensor) -> None:
        """A chunk against the teacher's full logits."""
        self.teacher_calibration.add(t_logits, y)
        kl = LOSSES["forward_kl"](s_logits, t_logits).sum()
        agree = (s_logits.argmax(-1) == t_logits.argmax(-1)).sum()
        self._add(s_logits, y, [kl, agree], F.cross_entropy(t_logits, y, reduction="sum"))
        self.scored += len(y)

    def _add(
        self,
        s_logits: torch.Tensor,
        y: torch.Tensor,
        scored: list[torch.Tensor],
        t_ce: torch.Tensor,
    ) -> None:
        self.calibration.add(s_logits, y)
        s_ce = F.cross_entropy(s_logits, y, reduction="sum")
        self.totals += torch.stack([v.double().cpu() for v in (*scored, s_ce, t_ce)])
        self.tokens += len(y)

    def result(self) -> FidelityMetrics:
        if self.tokens == 0 or self.scored == 0:
            raise ValueError("the eval set has no response tokens with a teacher signal")
        kl, agree = (self.totals[:2] / self.scored).tolist()
        s_ce, t_ce = (self.totals[2:] / self.tokens).tolist()
        return FidelityMetrics(
            kl=kl,
            top1_agreement=agree,
            student_ppl=math.exp(s_ce),
            teacher_ppl=None if self.sparse_seen else math.exp(t_ce),
            student_ece=self.calibration.ece(),
            teacher_ece=self.teacher_calibration.ece() if self.teacher_calibrated else None,
            tokens=self.tokens,
            signal_tokens=self.scored,
        )


class Calibration:
    """Expected calibration error, accumulated chunk by chunk: sum over confidence bins of
    (bin share) * |accuracy - mean confidence| (Guo et al. 2017)."""

    def __init__(self, bins: int = 10) -> None:
        self.bins = bins
        self.count = torch.zeros(bins, dtype=torch.float64)
        self.confidence = torch.zeros(bins, dtype=torch.float64)
        self.correct = torch.zeros(bins, dtype=torch.float64)

    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        confidence, predicted = torch.softmax(logits.float(), dim=-1).max(dim=-1)  # (n,)
        self.add_predictions(confidence, predicted, targets)

    def add_predictions(
        self, confidence: torch.Tensor, predicted: torch.Tensor, targets: torch.Tensor
    ) -> None:
        """Tokens by their top probability `confidence` and top-1 id `predicted`."""
        which = (confidence * self.bins).long().clamp(max=self.bins - 1).cpu()
        ones = torch.ones_like(which, dtype=torch.float64)
        self.count.index_add_(0, which, ones)
        self.confidence.index_add_(0, which, confidence.double().cpu())
        self.correct.index_add_(0, which, (predicted == targets).double().cpu())

    def ece(self) -> float:
        total = float(self.count.sum())
        if total == 0:
            return float("nan")
        gaps = (self.correct - self.confidence).abs()  # per bin: count * |acc - conf|
        return float(gaps.sum() / total)
