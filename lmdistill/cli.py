"""The `lmdistill` command. Thin: parse, load the config, call a stage."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from lmdistill.config import ConfigError, RunConfig
from lmdistill.io import directory_lock
from lmdistill.metrics import RunMetrics, TaskMetrics

DESCRIPTION = """\
Distil a large causal language model (the teacher) into a small one (the student).

Stages read one YAML config (see configs/ for examples); any field can be overridden on the
command line as key.path=value, e.g. `train.max_steps=200 loss.divergence=reverse_kl`.
"""

EPILOG = """examples:
  lmdistill demo                                   # SmolLM2-135M -> 8 layers, on CPU
  lmdistill run configs/tiny.yaml output_dir=out   # tiny random models, < 1 min
  lmdistill run configs/demo.yaml --resume         # continue a killed run
  lmdistill eval configs/demo.yaml --student lmdistill-demo/student
  lmdistill sweep configs/tiny.yaml loss.temperature=1,2 --seeds 2   # a grid, one table
  lmdistill conflicts configs/tiny-ensemble.yaml    # where several teachers disagree
  torchrun --nproc_per_node 2 -m lmdistill run configs/tiny.yaml   # 2 processes

`lmdistill COMMAND --help` explains each command.
"""


# Errors that mean "the input, the config, the disk or a server is not as it must be": each
# is printed as one line (file/field and what is allowed), exit status 2. ValueError covers
# ConfigError, DataError, CacheError, CheckpointError and invalid UTF-8; OSError covers missing
# files, permissions, a file where a directory must be, a full disk; RuntimeError a locked
# directory, a model that cannot be loaded, a failing server.
USER_ERRORS = (ValueError, OSError, RuntimeError, yaml.YAMLError)
DEBUG_ENV = "LMDISTILL_DEBUG"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    try:
        return int(args.handler(args) or 0)
    except USER_ERRORS as error:
        if args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        print(f"lmdistill {args.command}: error: {one_line(error)}", file=sys.stderr)
        return 2
    finally:
        _close_process_group()


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Flags and key=value overrides in any order (`run CONFIG --resume a.b=1` too): argparse
    stops filling a positional list at the first flag, so what is left over and looks like an
    override joins the overrides."""
    args, extra = parser.parse_known_args(argv)
    overrides = [item for item in extra if "=" in item and not item.startswith("-")]
    unknown = [item for item in extra if item not in overrides]
    if unknown or (overrides and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    return args


def one_line(error: BaseException) -> str:
    """An error's message on one line (some libraries' span several)."""
    text = " ".join(str(error).split())
    if isinstance(error, OSError) and error.filename and str(error.filename) not in text:
        text = f"{error.filename}: {text}"
    if not text or (isinstance(error, OSError) and type(error).__module__ == "builtins"):
        text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text


def _close_process_group() -> None:
    """Under torchrun, tear the process group down before exit: left to interpreter shutdown,
    a gloo worker can abort in a C++ destructor after the work is done."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmdistill",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_distillation_commands(commands)
    _add_experiment_commands(commands)
    _add_data_commands(commands)
    return parser


def _add_distillation_commands(commands: Any) -> None:
    """demo, plan, export, run, generate, cache, eval."""
    demo = commands.add_parser(
        "demo",
        help="distil SmolLM2-135M-Instruct into an 8-layer student and write a report",
        description="The whole pipeline on a real model, sized for a laptop CPU: "
        "SmolLM2-135M-Instruct writes answers to GSM8K questions and caches its top-32 "
        "log-probs on them, an 8-of-30-layer student is distilled from the cache with KD, a "
        "CE-only student is trained on the same data for the same steps, and both are "
        "compared on held-out prompts.",
    )
    demo.add_argument("--out", default="lmdistill-demo", help="output directory")
    _common(demo, config=False)
    demo.set_defaults(handler=cmd_demo)

    plan = commands.add_parser(
        "plan",
        help="predict a run's time, memory and disk from a short probe, without training it",
        description="Runs the config on a slice in a temporary directory (the teacher answers "
        "and caches a few examples, the student trains --probe-steps + 1 steps, nothing is "
        "evaluated or kept) and scales each stage to the full run: time per step and in "
        "all, peak memory with its parts, teacher cache and checkpoint bytes, and whether "
        "they fit this machine. docs/plan.md.",
    )
    _common(plan, resume=False)
    plan.add_argument("--probe-steps", type=int, default=3, help="timed steps (default 3)")
    plan.add_argument("--json", metavar="FILE", help="also write the prediction as JSON")
    plan.set_defaults(handler=cmd_plan)

    export = commands.add_parser(
        "export",
        help="write a saved student as a GGUF file for llama.cpp (f16 or q8_0)",
        description="Reads a Hugging Face model directory (a run's student/) and writes a "
        "GGUF file llama.cpp and llama-cpp-python load: Llama-architecture models with a "
        "byte-level BPE tokenizer (SmolLM2 and its students). An existing file is not "
        "overwritten. docs/export.md.",
    )
    export.add_argument("student", help="the model directory (config.json, safetensors)")
    export.add_argument("--gguf", required=True, metavar="OUT.gguf", help="the file to write")
    export.add_argument("--type", default="f16", choices=["f16", "q8_0"], help="weights type")
    export.add_argument("--debug", action="store_true", help="show the traceback of an error")
    export.set_defaults(handler=cmd_export)

    run = commands.add_parser(
        "run",
        help="run the pipeline a config describes (generate, distil, evaluate, report)",
        description="Writes to the config's output_dir: config.yaml, metrics.json, report.md "
        "with plots, student/ (Hugging Face format) and checkpoints/.",
    )
    _common(run)
    run.set_defaults(handler=cmd_run)

    generate = commands.add_parser(
        "generate",
        help="have the teacher write responses for the config's prompts (JSONL)",
        description="Sequence-level KD data for the run's training and held-out prompts. "
        "Batched (local) or concurrent (served), resumable: an interrupted run keeps its "
        "finished rows and generates only the rest when started again. A served teacher also "
        "stores its top-k log-probs per token; a cache teacher returns what it stored.",
    )
    _common(generate, resume=False)
    generate.add_argument(
        "--out", help="output JSONL (default: OUTPUT_DIR/generate/teacher_responses.jsonl)"
    )
    generate.set_defaults(handler=cmd_generate)

    cache = commands.add_parser(
        "cache",
        help="store the teacher's top-k log-probs on the training data, on disk",
        description="Runs the teacher once over the training responses (teacher-written ones "
        "when generate.enabled) and writes cache.k log-probs per token into sharded, "
        "checksummed files (100 bytes/token at k=32). Resumable: finished shards are kept.",
    )
    _common(cache, resume=False)
    cache.set_defaults(handler=cmd_cache)

    evaluate = commands.add_parser(
        "eval",
        help="measure a saved student's fidelity to the teacher on held-out data",
        description="KL(teacher || student) per token, top-1 agreement and perplexity on the "
        "held-out split of the config's data; with eval.lm_eval_tasks, lm-evaluation-harness "
        "scores of the student and the teacher. Prints JSON.",
    )
    _common(evaluate, resume=False)
    evaluate.add_argument("--student", required=True, help="student directory (HF format)")
    evaluate.set_defaults(handler=cmd_eval)

    conflicts = commands.add_parser(
        "conflicts",
        help="audit several teachers: where they contradict each other, without training",
        description="Every teacher of the config's `teachers:` list scores the training "
        "responses as a run would; per token the generalized JSD among them and whether their "
        "top-1 tokens differ, per example the mean and maximum and (with ensemble.answers) "
        "whether their final answers differ, and whom the strategy would trust. Writes "
        "OUT/conflicts.md (with a histogram), conflicts.json and conflicts.jsonl (one row "
        "per example).",
    )
    _common(conflicts, resume=False)
    conflicts.add_argument("--out", help="output directory (default: OUTPUT_DIR/conflicts)")
    conflicts.set_defaults(handler=cmd_conflicts)


def _add_experiment_commands(commands: Any) -> None:
    """sweep, protocol."""
    sweep = commands.add_parser(
        "sweep",
        help="run a grid of configs over several seeds; one table and plot of the results",
        description="Overrides with comma-separated values are the grid's axes "
        "(loss.temperature=1,2,4); the others apply to every run. Each run keeps its "
        "artifacts under OUT/<cell>/seed-<s>/; a finished run is read back, not redone. "
        "Writes OUT/sweep.md, sweep.json and sweep.png (mean +- std across seeds).",
    )
    _common(sweep, resume=False)
    sweep.add_argument("--seeds", type=int, default=1, help="seeds per cell (train.seed)")
    sweep.add_argument("--out", help="sweep directory (default: OUTPUT_DIR/sweep)")
    sweep.add_argument(
        "--reference",
        nargs="+",
        metavar="KEY=VALUE",
        help="one more cell outside the grid, e.g. loss.alpha=1.0 (CE only at the same steps); "
        "the table shows each cell's difference from it",
    )
    sweep.add_argument(
        "--report-only",
        action="store_true",
        help="write the table from the runs already on disk; run nothing",
    )
    sweep.set_defaults(handler=cmd_sweep)

    protocol = commands.add_parser(
        "protocol",
        help="the data-efficiency protocol: budgets x selection methods x KD, against random",
        description="For each protocol.budgets fraction: random subsets over protocol.seeds, "
        "each protocol.methods selection, the same with the protocol.kd settings, and "
        "condensed synthetic sets at the small budgets; plus the full data. Every student "
        "trains with the config's train settings and is scored on eval.tasks[0]. Finished "
        "arms are read back (a killed protocol resumes). Writes OUT/protocol.md, "
        "protocol.json and protocol.png.",
    )
    _common(protocol, resume=False)
    protocol.add_argument("--out", help="protocol directory (default: OUTPUT_DIR/protocol)")
    protocol.add_argument(
        "--report-only", action="store_true", help="write the table from finished arms only"
    )
    protocol.set_defaults(handler=cmd_protocol)


def _add_data_commands(commands: Any) -> None:
    """select, synthesise."""
    choose = commands.add_parser(
        "select",
        help="score the training data, select a subset within a budget, write it (JSONL)",
        description="Dataset distillation by selection (config section `select`): scores per "
        "example (length, perplexity, IFD, teacher-student divergence, LESS gradients) and "
        "features (sentence embeddings, hidden states, projected LoRA gradients) are computed "
        "once and saved with a manifest; a selector (random, top, bottom, kcenter, herding, "
        "deita, cluster) picks within select.budget; the subset keeps the original ids. "
        "Writes SELECT_OUT/subset.jsonl, selection.json and select.md.",
    )
    _common(choose, resume=False)
    choose.set_defaults(handler=cmd_select)

    synth = commands.add_parser(
        "synthesise",
        help="have the teacher write new examples from a few seeds, filtered (JSONL)",
        description="Self-instruct synthesis (config section `synthesise`): each request shows "
        "the teacher a few seed examples and asks for a new problem and its solution; every "
        "attempt is kept on disk (resumable), then filtered by format, a '#### answer' line, "
        "exact verification (verify: lab), right calculations and near-duplicate removal, each "
        "drop counted. Writes SYNTH_OUT/synthetic.jsonl, synthesis.json and synthesise.md.",
    )
    _common(synth, resume=False)
    synth.set_defaults(handler=cmd_synthesise)


def load_config(path: Any, overrides: list[str]) -> RunConfig:
    """The validated config. Imported here, not at the top: validation knows every registry
    (torch, transformers), and `lmdistill --help` should not wait for them."""
    from lmdistill.validate import load_config as load

    return load(path, overrides)


def _common(parser: argparse.ArgumentParser, config: bool = True, resume: bool = True) -> None:
    parser.add_argument(
        "--debug",
        action="store_true",
        help=f"show the traceback of an error (or set {DEBUG_ENV}=1)",
    )
    if config:
        parser.add_argument("config", help="YAML config file")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key.path=value",
        help="config overrides, e.g. train.max_steps=50",
    )
    if resume:
        parser.add_argument(
            "--resume",
            action="store_true",
            help="continue from the latest checkpoint in output_dir",
        )


def cmd_run(args: argparse.Namespace) -> int:
    from lmdistill.pipeline import run

    config = load_config(args.config, args.overrides)
    check_resumable(config, args.resume)
    metrics = run(config, resume=args.resume)
    print_summary(config, metrics)
    return 0


def check_resumable(config: RunConfig, resume: bool) -> None:
    """`--resume` into a directory no run was started in (empty, mistyped) is an error, not a
    silent fresh start."""
    out = Path(config.output_dir)
    if resume and not (out / "config.yaml").is_file():
        raise ConfigError(
            f"--resume: nothing to resume in {out} (no run was started there: it has no "
            "config.yaml); check output_dir, or drop --resume to start a new run"
        )


def cmd_plan(args: argparse.Namespace) -> int:
    from lmdistill.io import atomic_write_json
    from lmdistill.plan import make_plan

    config = load_config(args.config, args.overrides)
    if args.json and Path(args.json).exists():
        raise ConfigError(f"--json: {args.json} exists; choose another file (nothing written)")
    plan = make_plan(config, args.probe_steps)
    print("\n".join(["", f"plan for {args.config}:", *("  " + line for line in plan.lines())]))
    if args.json:
        atomic_write_json(Path(args.json), plan.as_dict())
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from lmdistill.models.export import export_gguf

    summary = export_gguf(Path(args.student), Path(args.gguf), args.type)
    print(
        f"wrote {summary['gguf']} ({summary['type']}, {summary['tensors']} tensors, "
        f"{summary['bytes'] / 2**20:.1f} MiB, pre-tokenizer {summary['pre_tokenizer']})"
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from lmdistill.pipeline import run

    demo = resources.files("lmdistill") / "configs" / "demo.yaml"
    with resources.as_file(demo) as path:
        config = load_config(path, [*args.overrides, f"output_dir={args.out}"])
    check_resumable(config, args.resume)
    metrics = run(config, resume=args.resume)
    print_summary(config, metrics)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from lmdistill.teachers.consistency import filtering
    from lmdistill.teachers.setup import TEACHERS, generating_teacher, load_splits

    config = load_config(args.config, args.overrides)
    if config.teachers:  # several teachers: each writes, answers kept by agreement
        return _generate_by_agreement(args, config)
    out = Path(args.out or Path(config.output_dir) / "generate" / "teacher_responses.jsonl")
    if not TEACHERS[config.teacher.kind].writes_text and (
        filtering(config.generate) or config.generate.rationale_prompt
    ):
        raise ConfigError(
            f"teacher.kind: {config.teacher.kind!r} holds the responses it was written with; "
            "sampling, filtering or a rationale prompt need a teacher that writes, such as "
            "'local' or 'served'"
        )
    from lmdistill.models import check_model_path

    check_model_path(config.teacher, "teacher.path")  # before anything is written
    train, held_out = load_splits(config)
    with directory_lock(out.parent, "generates"):
        teacher, report = generating_teacher(config)
        return _generate_into(out, config, teacher, report, train, held_out)


def _generate_by_agreement(args: argparse.Namespace, config: RunConfig) -> int:
    from lmdistill.models import check_model_path
    from lmdistill.teachers.ensemble_setup import generate_by_agreement
    from lmdistill.teachers.setup import load_splits

    out = Path(args.out or Path(config.output_dir) / "generate" / "agreed.jsonl")
    for i, teacher in enumerate(config.teachers):
        if teacher.kind != "served":
            check_model_path(teacher, f"teachers[{i}].path")  # before anything is written
    train, held_out = load_splits(config)
    with directory_lock(out.parent, "generates"):
        report = generate_by_agreement(config, out, train, held_out)
    print(json.dumps(report, indent=2))
    return 0


def _generate_into(
    out: Path,
    config: RunConfig,
    teacher: Any,
    report: dict[str, Any],
    train: list[Any],
    held_out: list[Any],
) -> int:
    from lmdistill.data import write_examples
    from lmdistill.teachers.base import ServedTeacher
    from lmdistill.teachers.consistency import filtering
    from lmdistill.teachers.setup import write_responses

    written, produced = write_responses(config, teacher, train, held_out, out)
    report.update(produced)
    if filtering(config.generate):
        kept_path = out.with_name(out.stem + ".kept.jsonl")
        write_examples(kept_path, written["train"])
        report["kept_output"] = str(kept_path)
    if isinstance(teacher, ServedTeacher):
        report["served"] = teacher.client.stats.as_dict()
    print(json.dumps({"output": str(out), "teacher": teacher.identity, **report}, indent=2))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from lmdistill.sweep import run_sweep

    if args.seeds < 1:
        raise ConfigError(f"--seeds: {args.seeds} is not allowed; expected an integer >= 1")
    from lmdistill.sweep import split_overrides

    fixed, _ = split_overrides(args.overrides)
    out = Path(args.out or Path(load_config(args.config, fixed).output_dir) / "sweep")
    with directory_lock(out, "runs a sweep"):
        summary = run_sweep(
            args.config,
            args.overrides,
            seeds=args.seeds,
            out=out,
            reference=args.reference,
            report_only=args.report_only,
        )
    print(f"\nwrote the sweep table for {len(summary['runs'])} runs")
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    from lmdistill.dd.stage import run_select, scores_dir, select_dir

    config = load_config(args.config, args.overrides)
    with (
        directory_lock(select_dir(config), "selects"),
        directory_lock(scores_dir(config), "selects"),  # shared across budgets
    ):
        summary = run_select(config)
    shown = {k: v for k, v in summary.items() if k != "ids"}
    print(json.dumps(shown, indent=2))
    return 0


def cmd_synthesise(args: argparse.Namespace) -> int:
    from lmdistill.dd.synth import synth_dir, synthesise

    config = load_config(args.config, args.overrides)
    with directory_lock(synth_dir(config), "synthesises"):
        summary = synthesise(config)
    print(json.dumps({k: v for k, v in summary.items() if k != "examples"}, indent=2))
    return 0


def cmd_protocol(args: argparse.Namespace) -> int:
    from lmdistill.protocol import run_protocol

    out = Path(args.out or Path(load_config(args.config, args.overrides).output_dir) / "protocol")
    with directory_lock(out, "runs a protocol"):
        run_protocol(args.config, args.overrides, out=out, report_only=args.report_only)
    return 0


def refuse_text_only(config: RunConfig, what: str) -> None:
    """A teacher with no scores at all (teacher.kind=text) cannot serve `what`."""
    from lmdistill.teachers.backends import TEACHERS

    backend = TEACHERS[config.teacher.kind]
    if not (backend.scores_text or backend.caches_signal):
        raise ConfigError(
            f"teacher.kind: {config.teacher.kind!r} gives text only and cannot be used by "
            f"{what}; use teacher.kind=local, served or cache"
        )


def cmd_cache(args: argparse.Namespace) -> int:
    from lmdistill.models import check_model_path
    from lmdistill.pipeline import teacher_directories
    from lmdistill.teachers.ensemble_setup import open_teachers
    from lmdistill.teachers.setup import load_splits
    from lmdistill.teachers.signal_caches import cache_dir

    config = load_config(args.config, args.overrides)
    refuse_text_only(config, "`lmdistill cache`, which stores the teacher's scores")
    check_model_path(config.teacher, "teacher.path")  # before anything is written
    load_splits(config)
    with contextlib.ExitStack() as held:
        for directory in dict.fromkeys([cache_dir(config), *teacher_directories(config)]):
            held.enter_context(directory_lock(directory, "writes a teacher cache"))
        setup = open_teachers(config, write_local_cache=True)
    print(json.dumps({"cache": str(cache_dir(config)), **setup.report}, indent=2))
    return 0


def cmd_conflicts(args: argparse.Namespace) -> int:
    from lmdistill.conflicts import audit_teachers

    config = load_config(args.config, args.overrides)
    out = Path(args.out or Path(config.output_dir) / "conflicts")
    command = " ".join(["lmdistill conflicts", args.config, *args.overrides])
    summary = audit_teachers(config, out, command)["conflicts"]
    print(json.dumps({k: v for k, v in summary.items() if k != "most_conflicting"}, indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from lmdistill.config import ModelConfig
    from lmdistill.data import tokenize_examples
    from lmdistill.eval import fidelity
    from lmdistill.models import (
        check_model_path,
        check_tokenizers,
        load_model,
        shared_vocab_size,
    )
    from lmdistill.pipeline import teacher_directories
    from lmdistill.teachers.ensemble_setup import open_teachers

    config = load_config(args.config, args.overrides)
    refuse_text_only(config, "`lmdistill eval`, which measures a student against its scores")
    check_model_path(config.teacher, "teacher.path")
    check_model_path(ModelConfig(path=args.student), "student")
    with contextlib.ExitStack() as held:  # the teacher may write its responses or its cache
        for directory in teacher_directories(config):
            held.enter_context(directory_lock(directory, "evaluates"))
        setup = open_teachers(config)
    student, student_tokenizer = load_model(ModelConfig(path=args.student))
    check_tokenizers(setup.tokenizer, student_tokenizer)
    assert setup.model is not None  # every kind loads teacher.path (tokenizer and weights)
    vocab_size = shared_vocab_size(setup.model, student, setup.tokenizer)
    eval_set, _ = tokenize_examples(
        setup.examples["eval"],
        setup.tokenizer,
        config.data.max_length,
        config.data.on_truncation,
        on_empty=config.data.on_empty,
    )
    result = fidelity(
        student,
        setup.signal["eval"],
        eval_set,
        vocab_size=vocab_size,
        pad_token_id=setup.tokenizer.pad_token_id,
        batch_size=config.eval.batch_size,
    )
    found = result.as_dict()
    if config.eval.lm_eval_tasks:  # lm-evaluation-harness on both (lmdistill/eval/harness.py)
        from lmdistill.eval.harness import lm_eval_scores

        found["lm_eval"] = {
            "student": lm_eval_scores(student, student_tokenizer, config.eval),
            "teacher": lm_eval_scores(setup.model, setup.tokenizer, config.eval),
        }
    print(json.dumps(found, indent=2))
    return 0


def print_summary(config: RunConfig, metrics: RunMetrics) -> None:
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return
    out = Path(config.output_dir)
    print(f"\nwrote {out / 'report.md'}, {out / 'metrics.json'}, {out / 'student'}/")
    for name, values in metrics.arms():
        if values is None:
            continue
        if values.fidelity is not None:
            f = values.fidelity
            print(
                f"  {name:8s} KL(teacher||student) {f.kl:.4f}   "
                f"top-1 agreement {f.top1_agreement:.3f}   ppl {f.student_ppl:.2f}"
            )
        for source, task in values.tasks.items():
            if isinstance(task, TaskMetrics):
                print(f"  {name:8s} {source}: exact match {task.exact_match:.3f}")
            else:
                print(f"  {name:8s} {source}: accuracy {task.accuracy:.3f}")
        for task_name, found in values.lm_eval.items():
            shown = ", ".join(f"{k} {v:.3f}" for k, v in found.items() if k != "documents")
            print(f"  {name:8s} lm-eval {task_name}: {shown}")
    print(f"  wall time {metrics.wall_seconds / 60:.1f} min, peak RSS {metrics.peak_rss_mb:.0f} MB")


if __name__ == "__main__":
    sys.exit(main())
