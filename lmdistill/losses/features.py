"""Intermediate-representation ("feature") losses: match hidden states and attention maps.

Both losses work on what a Hugging Face model returns with ``output_hidden_states=True``
and ``output_attentions=True``, and on layer *pairs* ``(student_layer, teacher_layer)``
in ``hidden_states`` numbering: index 0 is the embedding output, index L the last layer
(for Llama-style models ``hidden_states[L]`` is ``last_hidden_state``, i.e. after the final
norm). ``attentions[k - 1]`` belongs to layer k, so a pair ``(i, j)`` compares
``attentions[i - 1]`` with ``attentions[j - 1]``; the embedding layer has no attention.

Like every loss in this package they return a ``(loss_sum, count)``: a sum over mapped
layer pairs and selected token positions, and the number of (pair, position) terms. The
caller divides once by the global count, so gradient accumulation and several processes
give the same gradient as one big batch.

    hidden "mse"    : sum_pairs sum_t  mean_h (P s_t - h_t)^2        (TinyBERT, Jiao et al. 2020)
    hidden "cosine" : sum_pairs sum_t  1 - cos(P s_t, h_t)
    attention_kl    : sum_pairs sum_t  mean_heads KL(A_teacher[t, :] || A_student[t, :])
                                                                      (MiniLM, Wang et al. 2020)

where s_t / h_t are the student's / teacher's states at position t and P a learned
projection (identity when the widths match and no projection is asked for).

Attention weights: Hugging Face models materialise them only with the eager attention
implementation. With the default ``"sdpa"`` (or flash) backend, transformers 5 logs
"`sdpa` attention does not support `output_attentions=True`" once and returns an *empty*
``attentions`` tuple. Load both models with ``attn_implementation="eager"``
(``from_pretrained(..., attn_implementation="eager")``, or on a config), or switch a loaded
model with ``model.set_attn_implementation("eager")``; ``attention_kl`` refuses an empty
tuple with an error saying so. Eager attention builds the (B, H, T, T) maps for every
layer, so only turn it on when this loss is on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, cast, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FeatureKind = Literal["mse", "cosine"]
"""How a student state is compared with its teacher state, per token."""

LayerPair = tuple[int, int]
"""(student hidden_states index, teacher hidden_states index)."""


def layer_map(
    student_layers: int, teacher_layers: int, spec: list[int] | None = None
) -> list[LayerPair]:
    """Which teacher layer each student layer learns from, as ``(i, j)`` pairs, i = 1..L_s.

    Default (TinyBERT's uniform map): student layer i <- teacher layer
    ``round(i * L_t / L_s)``, rounding halves up (not Python's round-half-to-even, which
    would make the map depend on parity), so the last student layer maps to the last
    teacher layer. A student deeper than its teacher never maps to the embeddings: j >= 1.

    ``spec`` (``loss.layer_map`` in the config) lists the teacher ``hidden_states`` index
    for each student layer 1..L_s, in order; 0 (the teacher's embeddings) is allowed.
    """
    if student_layers < 1 or teacher_layers < 1:
        raise ValueError(
            f"layer counts must be >= 1, got student_layers={student_layers}, "
            f"teacher_layers={teacher_layers}"
        )
    if spec is None:
        # round-half-up of i * L_t / L_s in integer arithmetic: exact, no float ties
        return [
            (i, max(1, (2 * i * teacher_layers + student_layers) // (2 * student_layers)))
            for i in range(1, student_layers + 1)
        ]
    if len(spec) != student_layers:
        raise ValueError(
            f"loss.layer_map must list one teacher layer per student layer "
            f"({student_layers} entries), got {len(spec)}: {spec}"
        )
    for k, j in enumerate(spec):
        if isinstance(j, bool) or not isinstance(j, int):
            raise ValueError(f"loss.layer_map[{k}] must be an int, got {j!r}")
        if not 0 <= j <= teacher_layers:
            raise ValueError(
                f"loss.layer_map[{k}] = {j} is out of range: teacher hidden_states indices "
                f"run 0..{teacher_layers} (0 = embeddings, {teacher_layers} = last layer)"
            )
    return [(i + 1, j) for i, j in enumerate(spec)]


def _upcast(x: Tensor) -> Tensor:
    """Cast to at least fp32 (fp64 stays fp64, so gradcheck can run on these losses)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check_mask(mask: Tensor) -> None:
    # A long 0/1 attention_mask used as an index would gather rows 0 and 1: silently wrong.
    if mask.dtype != torch.bool or mask.dim() != 2:
        raise ValueError(
            f"mask must be a (B, T) bool tensor, got {mask.dtype} {tuple(mask.shape)}; "
            "pass attention_mask.bool() or a loss mask"
        )


def _check_pairs(pairs: Sequence[LayerPair], n_student: int, n_teacher: int, what: str) -> None:
    """Indices must exist in tuples of n_student / n_teacher entries (hidden_states numbering)."""
    if not pairs:
        raise ValueError("pairs must name at least one (student_layer, teacher_layer) pair")
    low = 1 if what == "attentions" else 0
    for i, j in pairs:
        if not (low <= i <= n_student and low <= j <= n_teacher):
            raise ValueError(
                f"layer pair ({i}, {j}) is out of range for {what}: student indices run "
                f"{low}..{n_student}, teacher indices {low}..{n_teacher} (hidden_states "
                "numbering, 0 = embeddings)"
            )


def _check_states(states: Tensor, name: str, mask: Tensor, width: int | None = None) -> None:
    if states.dim() != 3 or states.shape[:2] != mask.shape:
        raise ValueError(
            f"{name} must be (B, T, H) with (B, T) = mask {tuple(mask.shape)}, "
            f"got {tuple(states.shape)}"
        )
    if width is not None and states.shape[-1] != width:
        raise ValueError(f"{name} has width {states.shape[-1]}, expected {width}")


class HiddenStateMatcher(nn.Module):
    """Hidden-state matching over layer pairs, with a learned projection per pair if needed.

    The projection ``nn.Linear(student_width, teacher_width, bias=False)`` (TinyBERT's W_h)
    is created per pair when the widths differ, or when ``project=True``. It starts as the
    identity when the widths match, else orthogonal: for a wider teacher it then preserves
    the norm of the student state, so the initial loss is about the states, not the init.
    Its parameters belong to the training objective: the optimizer and the checkpoint must
    include them; they are not part of the distilled student.
    """

    def __init__(
        self,
        student_width: int,
        teacher_width: int,
        pairs: Sequence[LayerPair],
        kind: FeatureKind = "mse",
        project: bool | None = None,
    ) -> None:
        super().__init__()
        if kind not in get_args(FeatureKind):
            raise ValueError(f"kind must be one of {list(get_args(FeatureKind))}, got {kind!r}")
        if project is False and student_width != teacher_width:
            raise ValueError(
                f"project=False needs equal widths, got student {student_width} and "
                f"teacher {teacher_width}"
            )
        if not pairs:
            raise ValueError("pairs must name at least one (student_layer, teacher_layer) pair")
        self.student_width = student_width
        self.teacher_width = teacher_width
        self.pairs = [(int(i), int(j)) for i, j in pairs]
        self.kind: FeatureKind = kind
        self.projections = nn.ModuleList()
        if project or student_width != teacher_width:
            for _ in self.pairs:
                linear = nn.Linear(student_width, teacher_width, bias=False)
                with torch.no_grad():
                    if student_width == teacher_width:
                        linear.weight.copy_(torch.eye(teacher_width))
                    else:
                        nn.init.orthogonal_(linear.weight)
                self.projections.append(linear)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, pairs={self.pairs}"

    def forward(
        self,
        student_hidden_states: Sequence[Tensor],
        teacher_hidden_states: Sequence[Tensor],
        mask: Tensor,
    ) -> tuple[Tensor, int]:
        """``(loss_sum, count)`` over mapped pairs and positions where ``mask`` is True.

        student_hidden_states: ``hidden_states`` tuple of (B, T, H_s); teacher: (B, T, H_t),
        same tokens. mask: (B, T) bool, True where a position counts (padding mask or a loss
        mask). count = pairs * mask.sum(). No gradient reaches the teacher states.
        """
        _check_mask(mask)
        _check_pairs(
            self.pairs, len(student_hidden_states) - 1, len(teacher_hidden_states) - 1, "states"
        )
        total = mask.new_zeros((), dtype=torch.float32)
        for k, (i, j) in enumerate(self.pairs):
            student, teacher = student_hidden_states[i], teacher_hidden_states[j]
            _check_states(student, f"student_hidden_states[{i}]", mask, self.student_width)
            _check_states(teacher, f"teacher_hidden_states[{j}]", mask, self.teacher_width)
            # Select the counted positions first: padding never enters the arithmetic, so
            # whatever it holds (even NaN) cannot leak into the loss or its gradient.
            s = _upcast(student[mask])  # (B, T, H_s) -> (N, H_s)
            t = _upcast(teacher.detach()[mask])  # (B, T, H_t) -> (N, H_t)
            dtype = torch.promote_types(s.dtype, t.dtype)
            s, t = s.to(dtype), t.to(dtype)
            if len(self.projections):
                weight = cast(nn.Linear, self.projections[k]).weight  # (H_t, H_s)
                s = F.linear(s, weight.to(dtype))  # (N, H_s) -> (N, H_t)
            if self.kind == "mse":
                per_token = (s - t).pow(2).mean(dim=-1)  # (N,)
            else:
                per_token = 1.0 - F.cosine_similarity(s, t, dim=-1)  # (N,)
            total = total + per_token.sum()
        return total, len(self.pairs) * int(mask.sum())


def _check_attentions(attentions: Sequence[Tensor | None], name: str, mask: Tensor) -> None:
    if len(attentions) == 0 or any(a is None for a in attentions):
        raise ValueError(
            f"{name} is empty or holds None: the model did not return attention weights. "
            "Load it with attn_implementation='eager' (or call "
            "model.set_attn_implementation('eager')) and pass output_attentions=True; "
            "sdpa and flash attention never materialise the weights"
        )
    b, t = mask.shape
    for k, a in enumerate(attentions):
        assert a is not None
        if a.dim() != 4 or a.shape[0] != b or a.shape[2:] != (t, t):
            raise ValueError(
                f"{name}[{k}] must be (B, H, T, T) with (B, T) = mask {(b, t)}, "
                f"got {tuple(a.shape)}"
            )


def _row_kl(p: Tensor, q: Tensor) -> Tensor:
    """KL(p || q) over the last dim, with 0 * log 0 = 0: (..., T), (..., T) -> (...).

    Masked keys (padding, the causal future) carry exactly 0 probability in the teacher's
    row, so they drop out. Where p = 0 the log is taken of 1, not of 0, so neither the value
    nor the gradient sees a -inf (torch.where alone would still give NaN gradients). A
    student probability that underflowed to 0 where the teacher's is not is clamped to the
    smallest normal fp32, which caps that term instead of returning inf.
    """
    support = p > 0
    log_p = torch.log(torch.where(support, p, torch.ones_like(p)))
    q_on_support = torch.where(support, q, torch.ones_like(q))
    log_q = torch.log(q_on_support.clamp_min(torch.finfo(torch.float32).tiny))
    return torch.where(support, p * (log_p - log_q), torch.zeros_like(p)).sum(dim=-1)


def attention_kl(
    student_attentions: Sequence[Tensor],
    teacher_attentions: Sequence[Tensor],
    pairs: Sequence[LayerPair],
    mask: Tensor,
) -> tuple[Tensor, int]:
    """MiniLM's attention transfer: ``KL(A_teacher[t, :] || A_student[t, :])`` per query row.

    ``attention_kl = sum_pairs sum_{t: mask[t]} mean_h KL(A^T_{j,h}[t, :] || A^S_{i,h}[t, :])``

    student_attentions / teacher_attentions: a model's ``attentions`` tuple, one
    (B, H, T, T) softmax map per layer, from eager attention (see the module docstring).
    pairs: ``(i, j)`` in ``hidden_states`` numbering (layer_map's output), so both >= 1;
    MiniLM itself transfers only the last layer, ``pairs=[(L_s, L_t)]``.
    mask: (B, T) bool selecting the query rows that count; padded rows hold garbage (a
    uniform row under Hugging Face's left padding) and must be False. Keys need no mask:
    both models received the same attention mask, so a padded key has probability 0 in both
    rows and adds nothing (0 * log 0 = 0).

    Different head counts (a narrower student): the head-averaged maps are compared,
    ``KL(mean_h A^T || mean_h A^S)``, since heads have no correspondence across models
    (per-head KL needs equal counts). Returns ``(loss_sum, pairs * mask.sum())``; no
    gradient reaches the teacher's maps.
    """
    _check_mask(mask)
    _check_attentions(student_attentions, "student_attentions", mask)
    _check_attentions(teacher_attentions, "teacher_attentions", mask)
    _check_pairs(pairs, len(student_attentions), len(teacher_attentions), "attentions")
    total = mask.new_zeros((), dtype=torch.float32)
    for i, j in pairs:
        # (B, H, T, T) -> (B, T, H, T) -> (N, H, T): the counted query rows, every head
        s = _upcast(student_attentions[i - 1].transpose(1, 2)[mask])
        t = _upcast(teacher_attentions[j - 1].detach().transpose(1, 2)[mask])
        dtype = torch.promote_types(s.dtype, t.dtype)
        s, t = s.to(dtype), t.to(dtype)
        if s.shape[1] != t.shape[1]:
            s, t = s.mean(dim=1, keepdim=True), t.mean(dim=1, keepdim=True)  # (N, 1, T)
        total = total + _row_kl(t, s).mean(dim=1).sum()  # (N, H) -> (N,) -> ()
    return total, len(pairs) * int(mask.sum())
