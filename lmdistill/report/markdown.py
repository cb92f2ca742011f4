"""`report.md`: what was distilled, how close the student got, at what cost."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmdistill.io import atomic_write_text
from lmdistill.metrics import EvalMetrics, RunMetrics, TaskMetrics
from lmdistill.report.ensemble import conflict_histogram, conflict_lines
from lmdistill.report.groups import group_lines, has_groups
from lmdistill.report.plots import fidelity_bars, loss_curves


def write_report(out: Path, metrics: RunMetrics, config: dict[str, Any]) -> Path:
    loss_curves(metrics, out / "loss.png")
    has_eval = metrics.kd.after is not None and metrics.kd.after.fidelity is not None
    if has_eval:
        fidelity_bars(metrics, out / "fidelity.png")
    conflicts = metrics.setup.get("ensemble", {}).get("conflicts")
    if conflicts:
        conflict_histogram(conflicts, out / "conflict.png")
    path = out / "report.md"
    atomic_write_text(path, render(metrics, config, has_eval))
    return path


def render(metrics: RunMetrics, config: dict[str, Any], has_eval: bool) -> str:
    lines = [
        "# lmdistill report",
        "",
        *setup_lines(metrics, config),
        *teacher_lines(metrics),
    ]
    conflicts = metrics.setup.get("ensemble", {}).get("conflicts")
    if conflicts:
        lines += ["", "## Several teachers: where they contradict each other", ""]
        lines += conflict_lines(conflicts, "conflict.png")
    if has_eval:
        lines += [
            "",
            "## Fidelity to the teacher (held-out responses)",
            "",
            *fidelity_table(metrics),
        ]
        lines += ["", "![fidelity](fidelity.png)"]
    if metrics.kd.after is not None and metrics.kd.after.answers is not None:
        lines += ["", "## The models' own greedy answers", "", *answers_table(metrics)]
    if metrics.kd.after is not None and metrics.kd.after.tasks:
        lines += ["", "## Task accuracy (greedy answers)", "", *task_table(metrics)]
    if metrics.kd.after is not None and metrics.kd.after.lm_eval:
        lines += ["", "## lm-evaluation-harness", "", *lm_eval_table(metrics, config)]
    lines += lineage_lines(metrics.setup.get("lineage"), metrics.setup.get("memory"))
    if has_groups(metrics):
        lines += ["", "## By group (the data's `group` field)", "", *group_lines(metrics, NAMES)]
    lines += ["", "## Training", "", "![loss](loss.png)", ""]
    gpu = metrics.peak_gpu_mb
    lines += [
        f"Wall time {metrics.wall_seconds / 60:.1f} min, peak memory "
        f"{metrics.peak_rss_mb:.0f} MB (RSS)"
        + (f", {gpu:.0f} MB on the GPU." if gpu is not None else ".")
    ]
    lines += sample_lines(metrics)
    return "\n".join(lines) + "\n"


def setup_lines(metrics: RunMetrics, config: dict[str, Any]) -> list[str]:
    """Who was distilled into what, with which objective, on which data."""
    models, data, kd = metrics.models, metrics.data, metrics.kd
    loss = config["loss"]
    size = (
        f"{models['teacher_parameters'] / 1e6:.1f} M parameters, {models['teacher_layers']} layers"
        if models.get("teacher_parameters") is not None
        else "text only: no log-probs, no weights here"
    )
    lora = config["student"].get("lora") or {}
    trained = models.get("student_trainable_parameters")
    adapters = (
        f"; LoRA r={lora['r']} on {', '.join(lora['target_modules'])}: "
        f"{trained / 1e6:.2f} M parameters trained, merged into student/"
        if lora.get("r") and trained is not None
        else ""
    )
    kept = models.get("student_layer_map")
    scores = models.get("layer_scores")
    layers = []
    if kept is not None:
        layers = ["", f"Teacher layers kept: {kept}."]
        if scores:
            scored = ", ".join(f"{i}: {v:.3f}" for i, v in enumerate(scores))
            layers[1] += f" Block influence per teacher layer (1 - cos(input, output)): {scored}."
    return [
        f"Teacher `{models['teacher']}` ({size}) -> student "
        f"({models['student_parameters'] / 1e6:.1f} M parameters, {models['student_layers']} "
        f"layers, init `{config['student']['init']}`{adapters}).",
        "",
        f"Objective: `{loss['alpha']} * CE + (1 - {loss['alpha']}) * {loss['temperature']}^2 * "
        f"{loss['divergence']}(teacher || student)`, {kd.steps} steps, "
        f"{kd.tokens:,} response tokens, {kd.tokens_per_s:.0f} tokens/s."
        + _sampling(config, kd.on_policy),
        "",
        f"Data: `{data['source']}`: {data['train_examples']} training and "
        f"{data['eval_examples']} held-out examples; truncated "
        f"{data['train_truncation']['truncated']} / dropped "
        f"{data['train_truncation']['dropped']} training examples at max_length "
        f"{config['data']['max_length']}.",
        *layers,
    ]


def _sampling(config: dict[str, Any], sampling: dict[str, Any] | None) -> str:
    """On-policy runs: how many steps the student wrote its own responses, and the cost."""
    if sampling is None:
        return ""
    spec = config["on_policy"]
    line = (
        f" On-policy (fraction {spec['fraction']}, `{spec['divergence']}`): "
        f"{sampling['on_policy_steps']:.0f} steps trained on the student's own samples; "
        f"student sampling {sampling['sampled_tokens']:,.0f} tokens at "
        f"{sampling['sample_tokens_per_s']:.0f} tokens/s ({sampling['sample_seconds']:.1f} s)."
    )
    served = sampling.get("scored_by_server")
    if served:
        line += (
            f" The server scored {served['sequences']:,} samples in {served['seconds']:.1f} s; "
            f"{served['unscored']:,} of their {served['positions']:,} tokens it cut differently "
            "or gave no log-prob for, and they were left out of the loss."
        )
    return line


def teacher_lines(metrics: RunMetrics) -> list[str]:
    """What the teacher side did: generation, the server, the probe, the caches (each as
    the backend reported it)."""
    lines: list[str] = []
    setup = metrics.setup
    if setup.get("generate"):
        gen = setup["generate"]
        lines += [
            "",
            f"Sequence-level KD: the teacher wrote {gen['prompts']} responses "
            f"({gen['new_tokens']:,} tokens generated in this call at "
            f"{gen['new_tokens_per_s']:.0f} tokens/s; {gen['hit_length_limit']} hit "
            + (
                "max_new_tokens: the training ones among them are dropped, held-out ones "
                "kept without an end-of-turn token)."
                if "truncated" in gen.get("rationales", {}).get("dropped", {})
                else "max_new_tokens and are kept without an end-of-turn token)."
            ),
        ]
        if gen.get("rationales"):
            kept = gen["rationales"]
            reasons = ", ".join(f"{n} {why}" for why, n in kept["dropped"].items()) or "none"
            lines[-1] += (
                f" Training responses kept: {kept['kept']} of "
                f"{kept['prompts'] * kept['samples_per_prompt']} (dropped: {reasons})."
            )
    if setup.get("served"):
        served = setup["served"]
        lines += [
            "",
            f"Served teacher `{metrics.models['teacher_signal']}`: {served['requests']} "
            f"requests ({served['retries']} retries), {served['prompt_tokens']:,} prompt and "
            f"{served['completion_tokens']:,} completion tokens; "
            f"{served['dropped_alternatives']} top-k alternatives did not map to one token id "
            f"(their mass is in the tail bucket); {served['text_only_rows']} rows text-only.",
        ]
    if setup.get("probe"):
        probe = setup["probe"]
        diff = probe["mean_abs_diff"]
        lines += [
            "",
            f"Conformance probe: {probe['positions']} greedy tokens, {probe['misaligned']} not "
            "their row's top-1; "
            + (
                f"mean |log p| difference from the local teacher {diff:.3f} nats "
                f"(max {probe['max_abs_diff']:.3f}, tolerance {probe['tolerance']})."
                if diff is not None
                else "no local copy to compare with."
            ),
        ]
    if setup.get("cache"):
        for split, cache in setup["cache"].items():
            lines.append("")
            size = (
                f", {cache['bytes_per_token']} bytes/token ({cache['bytes'] / 2**20:.1f} MiB)"
                if "bytes_per_token" in cache
                else ""
            )
            writer = f", written by `{cache['teacher']}`" if "teacher" in cache else ""
            lines.append(
                f"Teacher-signal cache ({split}): {cache['examples']} examples, "
                f"{cache['tokens']:,} tokens, k = {cache['k']}{size}{writer}."
            )
    return lines


def sample_lines(metrics: RunMetrics) -> list[str]:
    """Each held-out prompt with every model's greedy answer."""
    if not metrics.samples:
        return []
    lines = ["", "## Side by side (greedy, held-out prompts)", ""]
    for i, row in enumerate(metrics.samples, start=1):
        lines += [f"### Prompt {i}", "", quote(row["prompt"]), ""]
        for name, text in row.items():
            if name != "prompt":
                lines += [f"**{name}:**", "", quote(text), ""]
    return lines


NAMES = {
    "before": "student before training",
    "KD": "KD student",
    "CE-only": "CE-only student",
}


def lineage_lines(found: dict[str, Any] | None, memory: dict[str, Any] | None) -> list[str]:
    """Which student this run continued and with what (incremental distillation), and the
    memory it leaves for runs that continue its own student."""
    lines: list[str] = []
    if found:
        lines += [
            "",
            "## Lineage (a continued student)",
            "",
            f"Continued `{found['continued']}` (weights {found['continued_sha256']}) on "
            f"`{found['new_data']}` ({found['new_examples']} new examples); retention weight "
            f"{found['retention_weight']}, anchor {found['anchor']}"
            + (f" (weight {found['anchor_weight']})" if found["anchor"] != "none" else "")
            + ".",
        ]
        kept = found.get("memory")
        if kept:
            lines.append(
                f"Replay memory `{kept['directory']}`: {kept['replayed_examples']} of the "
                f"{kept['old_examples']} old training examples ({kept['share_of_old']:.2%}, "
                f"chosen by {kept['selector']}) from `{kept['old_source']}`; no other old "
                "example was read."
            )
    if memory:
        fisher = memory.get("fisher")
        lines += [
            "",
            "## Memory left for continuing runs",
            "",
            f"`memory/`: {memory['examples']} of {memory['old_examples']} training examples "
            f"({memory['fraction']:.2%}, {memory['selector'] or 'none'} over "
            f"{memory['features'] or 'no features'})"
            + (f", the Fisher estimate over {fisher['examples']} examples" if fisher else "")
            + f"; for the student with weights {memory['student_sha256']}.",
        ]
    return lines


def fidelity_table(metrics: RunMetrics) -> list[str]:
    rows = [
        "| model | KL(teacher‖student) ↓ | top-1 agreement ↑ | perplexity on teacher text ↓ "
        "| calibration error (ECE) ↓ |",
        "|---|---|---|---|---|",
    ]
    for arm, values in metrics.arms():
        if values is not None and values.fidelity is not None:
            f = values.fidelity
            name = NAMES[arm] + (" (same data, same steps)" if arm == "CE-only" else "")
            rows.append(
                f"| {name} | {f.kl:.4f} | {f.top1_agreement:.3f} | "
                f"{f.student_ppl:.2f} | {_fraction(f.student_ece)} |"
            )
    assert metrics.kd.after is not None and metrics.kd.after.fidelity is not None
    after = metrics.kd.after.fidelity
    shown = "n/a (top-k signal)" if after.teacher_ppl is None else f"{after.teacher_ppl:.2f}"
    rows.append(f"| teacher (reference) | 0 | 1 | {shown} | {_fraction(after.teacher_ece)} |")
    if after.signal_tokens != after.tokens:
        rows += [
            "",
            f"KL and agreement over the {after.signal_tokens:,} of {after.tokens:,} "
            "held-out tokens that carry a teacher signal (a served teacher reports none for "
            "the end-of-turn tokens); KL is over the teacher's top-k ids plus one tail bucket.",
        ]
    return rows


def lm_eval_table(metrics: RunMetrics, config: dict[str, Any]) -> list[str]:
    """lm-eval's metrics per task and model, by lm-eval's names (eval.lm_eval_tasks)."""
    arms: list[tuple[str, EvalMetrics | None]] = [("teacher", metrics.teacher)]
    arms += [(NAMES[arm], values) for arm, values in metrics.arms()]
    rows = ["| task | metric | " + " | ".join(n for n, _ in arms) + " |"]
    rows.append("|---|---|" + "---|" * len(arms))
    after = metrics.kd.after
    assert after is not None
    for task, measured in after.lm_eval.items():
        for metric in measured:
            cells = []
            for _, values in arms:
                value = (values.lm_eval.get(task, {}) if values is not None else {}).get(metric)
                cells.append("" if value is None else f"{value:.4g}")
            rows.append(f"| `{task}` | {metric} | " + " | ".join(cells) + " |")
    return [
        "Scored by lm-evaluation-harness's `hf` model on each loaded model"
        + (" (chat template on)." if config.get("eval", {}).get("lm_eval_chat_template") else "."),
        "",
        *rows,
    ]


def answers_table(metrics: RunMetrics) -> list[str]:
    """How each model's greedy answers to held-out prompts read, and how plausible the
    teacher finds them (lmdistill/eval/answers.py)."""
    arms: list[tuple[str, EvalMetrics | None]] = [("teacher (reference)", metrics.teacher)]
    arms += [(NAMES[arm], values) for arm, values in metrics.arms()]
    rows = [
        "| model | repeated 4-grams ↓ | end by themselves ↑ | tokens per answer "
        "| teacher NLL per token ↓ | KL(model‖teacher) on its answers ↓ |",
        "|---|---|---|---|---|---|",
    ]
    shown = 0
    for name, values in arms:
        a = values.answers if values is not None else None
        if a is None:
            continue
        shown = a.answers
        nll = "n/a" if a.teacher_nll is None else f"{a.teacher_nll:.3f}"
        kl = "n/a" if a.reverse_kl is None else f"{a.reverse_kl:.3f}"
        rows.append(
            f"| {name} | {a.repetition:.3f} | {a.ended:.3f} | {a.mean_tokens:.1f} | {nll} | {kl} |"
        )
    return [f"Greedy answers to the first {shown} held-out prompts.", "", *rows]


def task_table(metrics: RunMetrics) -> list[str]:
    """Exact match and rationale checks per task set and model; with the teacher's answers,
    the share of its accuracy each student keeps and how often they agree with it."""
    arms: list[tuple[str, EvalMetrics | None]] = [("teacher", metrics.teacher)]
    arms += [(NAMES[arm], values) for arm, values in metrics.arms()]
    teacher = metrics.teacher.tasks if metrics.teacher is not None else {}
    rows = [
        "| task set | model | exact match ↑ | of teacher's | annotations right ↑ "
        "| answer = last step ↑ | agrees with teacher (answer / steps) | sampled answers agree "
        "(majority exact match) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, values in arms:
        for source, task in (values.tasks if values is not None else {}).items():
            if not isinstance(task, TaskMetrics):  # multiple choice by log-likelihood
                norm = "-" if task.accuracy_norm is None else f"{task.accuracy_norm:.3f}"
                rows.append(
                    f"| `{source}` | {name} | acc {task.accuracy:.3f}, acc_norm {norm} (per "
                    f"character), per token {task.accuracy_per_token:.3f} | | | | | |"
                )
                continue
            reference = teacher.get(source)
            kept = ""
            if isinstance(reference, TaskMetrics) and reference.exact_match and name != "teacher":
                kept = f"{task.exact_match / reference.exact_match:.0%}"
            agrees = ""
            if task.teacher is not None:
                agrees = (
                    f"{task.teacher.teacher_answer_agreement:.3f} / "
                    f"{_fraction(task.teacher.teacher_step_agreement)}"
                )
            sampled = ""
            if task.consistency is not None:
                c = task.consistency
                sampled = f"{c.sample_agreement:.3f} ({c.majority_exact_match:.3f})"
            rows.append(
                f"| `{source}` | {name} | {task.exact_match:.3f} | {kept} | "
                f"{_annotations(task)} | "
                f"{_fraction(task.answer_follows_last_step)} | {agrees} | {sampled} |"
            )
    return rows


def _annotations(task: TaskMetrics) -> str:
    """The share of annotations right, of all written; the readable share beside it when the
    checker could not read some (they count as wrong)."""
    shown = _fraction(task.annotation_accuracy)
    readable = task.annotations_readable
    return shown if readable is None or readable == 1 else f"{shown} ({readable:.0%} readable)"


def _fraction(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def quote(text: str) -> str:
    return "\n".join("> " + line for line in (text.strip() or "(empty)").splitlines())
