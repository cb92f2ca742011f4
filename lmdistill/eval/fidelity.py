"""How close is the student to the teacher, on held-out responses?

Per response token (teacher temperature 1): KL(teacher || student), top-1 agreement (both
models' most likely next token is the same), and the student's perplexity on the responses.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from lmdistill.data import TokenizedExample, collate
from lmdistill.kd.objective import response_hidden
from lmdistill.losses import LOSSES


@torch.no_grad()
def fidelity(
    student: PreTrainedModel,
    teacher: PreTrainedModel,
    eval_set: list[TokenizedExample],
    *,
    vocab_size: int,
    pad_token_id: int,
    batch_size: int = 8,
    chunk_size: int = 512,
) -> dict[str, float]:
    """`{"kl", "top1_agreement", "student_ppl", "teacher_ppl", "tokens"}` over `eval_set`."""
    student.eval()
    teacher.eval()
    totals = torch.zeros(4, dtype=torch.float64)  # kl, agree, student ce, teacher ce
    tokens = 0
    s_weight = student.get_output_embeddings().weight[:vocab_size]
    t_weight = teacher.get_output_embeddings().weight[:vocab_size]
    for start in range(0, len(eval_set), batch_size):
        batch = collate(eval_set[start : start + batch_size], pad_token_id)
        batch = {k: v.to(student.device) for k, v in batch.items()}
        s_states, targets = response_hidden(student, **batch)
        t_states, _ = response_hidden(teacher, **_to(batch, teacher.device))
        for lo in range(0, targets.shape[0], chunk_size):
            s_logits = (s_states[lo : lo + chunk_size] @ s_weight.T).float()  # (n, V)
            t_logits = (t_states[lo : lo + chunk_size] @ t_weight.T).float().to(s_logits.device)
            y = targets[lo : lo + chunk_size]
            totals += (
                torch.stack(
                    [
                        LOSSES["forward_kl"](s_logits, t_logits).sum(),
                        (s_logits.argmax(-1) == t_logits.argmax(-1)).sum(),
                        F.cross_entropy(s_logits, y, reduction="sum"),
                        F.cross_entropy(t_logits, y, reduction="sum"),
                    ]
                )
                .double()
                .cpu()
            )
        tokens += int(targets.shape[0])
    if tokens == 0:
        raise ValueError("the eval set has no response tokens")
    kl, agree, s_ce, t_ce = (totals / tokens).tolist()
    return {
        "kl": kl,
        "top1_agreement": agree,
        "student_ppl": math.exp(s_ce),
        "teacher_ppl": math.exp(t_ce),
        "tokens": tokens,
    }


def _to(batch: dict[str, torch.Tensor], device: Any) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}
