"""lm-evaluation-harness on a model lmdistill holds: the scores a user would report.

`eval.lm_eval_tasks` names lm-eval tasks (`hellaswag`, `arc_easy`, ...) or task YAML files
(a path ending in .yaml: a local task, e.g. a multiple-choice set over a JSONL file). Each
model of the run (the teacher, the student before and after, the CE-only baseline) is
handed to lm-eval's `hf` model as the loaded object it is, and its metrics per task come
back by lm-eval's names (`acc`, `acc_norm`, `exact_match`, ...; a filter other than lm-eval's
`none` is kept in the name: `exact_match,strict-match`). lm-eval is an optional extra:
`pip install 'lmdistill[eval]'`.

How a task's requests relate to lmdistill's own `mc:` evaluation: lm-eval scores
`doc_to_text` + `target_delimiter` + choice as plain text unless `eval.lm_eval_chat_template`
is on; with it, the question is the chat template's user turn and the choice follows the
generation prompt with no delimiter, which is what `mc:` scores, with one difference:
lm-eval moves the prompt's trailing whitespace (the newline after the generation prompt)
into every continuation, so each choice's sum carries the same extra term, the log-prob of
that newline. `acc` is the same as `mc:`'s `accuracy` (a constant moves no argmax);
`acc_norm` divides that constant by each choice's length and can differ where choices are
close (tests/test_lm_eval.py).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from lmdistill.config import EvalConfig


def is_task_file(task: str) -> bool:
    return task.endswith((".yaml", ".yml"))


def lm_eval_scores(
    model: PreTrainedModel, tokenizer: Any, settings: EvalConfig
) -> dict[str, dict[str, float]]:
    """lm-eval's metrics per task for `model` (in eval mode; its mode is restored)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    names = [t for t in settings.lm_eval_tasks if not is_task_file(t)]
    files = [str(Path(t).resolve()) for t in settings.lm_eval_tasks if is_task_file(t)]
    was_training = model.training
    model.eval()
    # lm-eval warns at length that it was handed a loaded model; the run's own log is enough.
    quiet = logging.getLogger("lm_eval")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), _one_line_errors():
            harness = HFLM(
                pretrained=model,
                tokenizer=tokenizer,
                batch_size=settings.batch_size,
                max_length=getattr(model.config, "max_position_embeddings", None),
            )
            found = lm_eval.simple_evaluate(
                model=harness,
                tasks=[*names, *files],
                num_fewshot=settings.lm_eval_num_fewshot,
                limit=settings.lm_eval_limit,
                apply_chat_template=settings.lm_eval_chat_template,
                # Only the task names the harness indexes by default when one is asked for.
                task_manager=TaskManager(include_defaults=bool(names)),
                bootstrap_iters=0,
                log_samples=False,
                # lm-eval reseeds the global generators by default: leave them as they are.
                random_seed=None,
                numpy_random_seed=None,
                torch_random_seed=None,
                fewshot_random_seed=1234,  # lm-eval's default: the same few-shot examples
            )
    finally:
        quiet.setLevel(level)
        model.train(was_training)
    assert found is not None  # a single process is lm-eval's rank 0
    return {task: _metrics(values) for task, values in found["results"].items()}


@contextlib.contextmanager
def _one_line_errors() -> Iterator[None]:
    """lm-eval's KeyError for a task it cannot find, as the one-line error of a bad input."""
    try:
        yield
    except KeyError as error:
        raise ValueError(f"eval.lm_eval_tasks: lm-eval could not load a task ({error})") from None


def _metrics(values: dict[str, Any]) -> dict[str, float]:
    """lm-eval's result row as {metric: value}: numbers only, no stderr (bootstrap is off),
    the filter dropped from the name where it is lm-eval's `none`."""
    out = {}
    for key, value in values.items():
        if "_stderr" in key or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if key in ("sample_len", "sample_count"):
            out["documents"] = float(value)
            continue
        name = key.removesuffix(",none")
        if isinstance(value, float) and math.isnan(value):
            continue
        out[name] = float(value)
    return out
