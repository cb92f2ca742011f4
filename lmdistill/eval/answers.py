"""How a model's own greedy answers read, and how plausible the teacher finds them.

Teacher-forced measures (KL on the teacher's text) miss what a user sees first: a student
that loops ("To solve the apples. / To solve the apples. / ...") or never stops. On the
first `eval.answers` held-out prompts the model answers greedily (up to
`eval.answer_max_new_tokens`), and per answer token:

- `repetition`: the share of the answers' token 4-grams that repeat an earlier 4-gram of the
  same answer (pooled over answers; 0 for text without loops);
- `ended`: the share of answers that stop by themselves (an end-of-turn token before the
  limit);
- `teacher_nll`: the teacher's mean negative log-likelihood per token of the answers (the end
  token included when written): how plausible the teacher finds the text;
- `reverse_kl`: KL(model || teacher) per token on the model's own text, what on-policy
  distillation optimises.

The teacher measures need its full distribution: a teacher in this process, or, when
training reads a cache (`teacher.kind: cache`), the teacher's weights the run loaded; with a
served or text-only teacher they are None.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedModel

from lmdistill.config import LossConfig
from lmdistill.data import IGNORE_INDEX, TokenizedExample, collate, collate_prompts, to_device
from lmdistill.metrics import AnswerMetrics
from lmdistill.models.forward import response_hidden
from lmdistill.models.generate import stop_token_ids
from lmdistill.teachers.base import Teacher


def repeated_ngrams(ids: list[int], n: int = 4) -> tuple[int, int]:
    """(repeated, total) n-grams of one answer: a repeat is an n-gram seen earlier in it."""
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return len(grams) - len(set(grams)), len(grams)


@torch.no_grad()
def greedy_ids(
    model: PreTrainedModel,
    prompts: list[list[int]],
    stops: list[int],
    *,
    max_new_tokens: int,
    pad_token_id: int,
    batch_size: int,
) -> list[tuple[list[int], bool]]:
    """Each prompt's greedy answer as ids (the end token kept when written) and whether it
    ended by itself."""
    answers = []
    for start in range(0, len(prompts), batch_size):
        batch = collate_prompts(prompts[start : start + batch_size], pad_token_id)
        batch = to_device(batch, model.device)
        # Plain greedy decoding: a repetition penalty in the model's own generation config
        # would hide the very loops this measures.
        plain = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=pad_token_id,
        )
        output = model.generate(**batch, generation_config=plain)  # type: ignore[operator]
        for ids in output[:, batch["input_ids"].shape[1] :].tolist():
            end = next((i for i, t in enumerate(ids) if t in stops), None)
            answers.append((ids if end is None else ids[: end + 1], end is not None))
    return answers


@torch.no_grad()
def answer_quality(
    model: PreTrainedModel,
    tokenizer: Any,
    prompts: list[list[int]],
    teacher: Teacher | None,
    *,
    max_new_tokens: int,
    vocab_size: int,
    batch_size: int = 8,
) -> AnswerMetrics:
    """The measures of the module docstring on `prompts` (token ids of chat prompts)."""
    was_training = model.training
    model.eval()
    stops = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id
    answers = greedy_ids(
        model, prompts, stops, max_new_tokens=max_new_tokens, pad_token_id=pad,
        batch_size=batch_size,
    )  # fmt: skip
    repeated = total = 0
    for ids, ended in answers:
        r, t = repeated_ngrams(ids[:-1] if ended else ids)
        repeated, total = repeated + r, total + t
    tokens = sum(len(ids) for ids, _ in answers)
    nll = reverse = None
    dense = teacher is not None and _dense(teacher)
    if dense and tokens:
        assert teacher is not None
        nll_sum = kl_sum = 0.0
        rows = [
            TokenizedExample(f"a{i}", p + ids, [IGNORE_INDEX] * len(p) + ids, False)
            for i, (p, (ids, _)) in enumerate(zip(prompts, answers, strict=True))
            if ids
        ]
        for start in range(0, len(rows), batch_size):
            batch = to_device(collate(rows[start : start + batch_size], pad), model.device)
            states, targets = response_hidden(model, **batch)
            weight = model.get_output_embeddings().weight[:vocab_size]
            log_q = torch.log_softmax((states @ weight.T).float(), dim=-1)
            signal = teacher.score(batch, list(range(len(rows))), LossConfig())
            assert signal.states is not None and signal.weight is not None
            t_logits = signal.states @ signal.weight[:vocab_size].T
            log_p = torch.log_softmax(t_logits.float().to(log_q.device), dim=-1)
            nll_sum -= float(log_p.gather(1, targets[:, None]).sum())
            kl_sum += float((log_q.exp() * (log_q - log_p)).sum())
        nll, reverse = nll_sum / tokens, kl_sum / tokens
    model.train(was_training)
    return AnswerMetrics(
        answers=len(answers),
        tokens=tokens,
        mean_tokens=tokens / max(len(answers), 1),
        repetition=repeated / total if total else 0.0,
        ended=sum(ended for _, ended in answers) / max(len(answers), 1),
        teacher_nll=nll,
        reverse_kl=reverse,
    )


def _dense(teacher: Teacher) -> bool:
    """Whether `teacher` gives its full distribution (a model in this process)."""
    from lmdistill.teachers.base import LocalTeacher

    return isinstance(teacher, LocalTeacher)
