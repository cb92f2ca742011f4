"""Many teachers on the reasoning lab: can a student detect and resolve contradictions?

    make lab-multi
    # = python benchmarks/multi_teacher_lab.py --out outputs/lab/multi --seeds 3

Three teachers score the same worked solutions (the lab's own, for 1,000 training questions):
the lab teacher (configs/lab/teacher.yaml), a second one (another seed, 2 layers instead of 4,
400 steps instead of 700),
and a **contradicting teacher**: the lab teacher fine-tuned on solutions whose last step is
confidently wrong (its result, and so the final answer, one more) for every question about a
seeded set of items, a share r of the 8 items. `make lab-multi` runs r = 0.25 (2 items, 28.5%
of the training questions: the issue's 0.3 as near as a rule on items goes; ~2 h on 2 cores);
`--rates 0.25 0.125 0.5` adds 1 and 4 items (the sets nested; ~1.5 h more each). The
injected training questions are those about a corrupted item.

1. The teachers: the second one trained, each contradicting teacher fine-tuned (two rounds
   of 200 steps at lr 2e-3 on 3,000 corrupted-rule solutions, the second from the first's
   weights); students are trained only if it is wrong on at least 80% of its injected
   questions.
2. Detection, per r (`lmdistill conflicts`): the per-example conflict score (mean token JSD
   among the three) against the injected questions: ROC AUC, and precision and recall at the
   threshold chosen on one half of the questions (the lowest with precision >= 0.9 there),
   measured on the other half. The maximum token JSD and "final answers differ" likewise.
3. Resolution: students as in E2 (3 layers, 128 wide, 5x smaller than the lab teacher), KD
   only (alpha 0, forward KL at T = 1) from the teachers' caches, 350 steps, `--seeds` seeds,
   seed by seed over every arm: the clean single lab teacher (once, with the first r) and
   each strategy at each r. Each student answers 100 held-out problems: exact match overall,
   on the problems about a contradicted item and on the others, and how often it answers a
   contradicted one with the contradiction (the reference + 1); and the share of the
   combined signal the strategy took from the contradicting teacher. `mean` is the survey's
   simple averaging.
4. Cost: seconds per optimizer step with one cached teacher, three cached, three live.

Finished runs are kept and not run again. Writes docs/results/multi-teacher.json (every run,
per r and strategy mean/std/n, detection, costs, commit, command, machine) and
docs/results/multi-teacher.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import re
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from lab_results import provenance

ROOT = Path(__file__).resolve().parent.parent
LMDISTILL = [sys.executable, "-m", "lmdistill"]
CONFIG = "configs/lab/multi-teacher.yaml"
KNOBS = "steps=3:min_steps=1:start_max=9:operand_max=5:value_max=30"
TRAIN = f"lab:train:1000:11:{KNOBS}"  # the experiment's training questions (config's data)
CORRUPT_SOURCE = f"lab:train:3000:7:{KNOBS}"  # what the contradicting teachers learn from
TEST = f"lab:test:100:0:{KNOBS}"
LAB_TEACHER = "outputs/lab/teacher/student"
# Shares a rule on one of 8 items allows: 1, 2, 4 items (the 0.1, 0.3, 0.5 as near as
# they go); r = 0.25 (the targets' 0.3) first.
RATES = (0.25,)  # `--rates 0.25 0.125 0.5` adds the others (nested item sets)
ROUNDS = 2  # fine-tuning rounds of the contradicting teacher
STRATEGIES = ("mean", "product", "confidence", "vote", "route")
NAMES = ("Ana", "Ben", "Cal", "Dia", "Eve", "Finn", "Gus", "Hana")
ITEMS = ("apples", "books", "coins", "eggs", "pens", "shells", "stamps", "cards")
# Per student: exact match on the 100 held-out questions, on those about a contradicted item
# and on the others, and how often it answers a contradicted one with the contradiction.
MEASURES = (
    "exact_match",
    "exact_match_contradicted",
    "exact_match_elsewhere",
    "copied_contradiction",
)
LAST_STEP = re.compile(r"^(.*=<<[^=]*=)(-?\d+)(>>)(-?\d+)(.*)$")


def run(command: str, config: str, out: Path, *overrides: str, extra: tuple[str, ...] = ()) -> None:
    command_line = [*LMDISTILL, command, config, f"output_dir={out}", *overrides, *extra]
    print("+", " ".join(command_line[2:]), flush=True)
    subprocess.run(command_line, cwd=ROOT, check=True)


def finished_run(config: str, out: Path, *overrides: str) -> dict[str, Any]:
    """`lmdistill run` into `out` unless it already finished there; its metrics.json."""
    metrics = out / "metrics.json"
    if not metrics.is_file():  # an interrupted run continues from its last checkpoint
        resume = ("--resume",) if (out / "checkpoints").is_dir() else ()
        run("run", config, out, *overrides, extra=resume)
    return dict(json.loads(metrics.read_text()))


def corrupted_pairs(rate: float) -> set[tuple[str, str]]:
    """The (name, item) pairs the contradicting teacher gets wrong: every pair of the first
    round(r * 8) items of one seeded order (so the sets for growing r are nested). A rule on
    the item alone: a first try keyed on (name, item) pairs, 100 steps at lr 1e-3, left the
    fine-tuned teacher wrong on 5.7% of its injected questions (8.3% elsewhere): it had not
    learnt the conjunction, and there was nothing to detect."""
    items = list(ITEMS)
    random.Random(2026).shuffle(items)
    wrong = items[: round(rate * len(items))]
    return {(n, i) for n in NAMES for i in wrong}


def pair_of(question: str) -> tuple[str, str]:
    match = re.match(r"^(\w+) has \d+ (\w+)\.", question)
    assert match, question
    return match.group(1), match.group(2)


def corrupt(solution: str) -> str:
    """The solution with its last step's result one more (both where it is written) and the
    final answer with it: wrong, consistent, confident."""
    lines = solution.split("\n")
    last = max(i for i, line in enumerate(lines) if LAST_STEP.match(line))
    head, result, mid, again, tail = LAST_STEP.match(lines[last]).groups()  # type: ignore[union-attr]
    assert result == again, lines[last]
    wrong = str(int(result) + 1)
    lines[last] = f"{head}{wrong}{mid}{wrong}{tail}"
    lines[-1] = f"#### {wrong}"
    return "\n".join(lines)


def contradicting_data(rate: float, path: Path) -> dict[str, Any]:
    from lmdistill.data import load_examples, write_examples

    examples = load_examples(CORRUPT_SOURCE)
    wrong = corrupted_pairs(rate)
    out, changed = [], 0
    for example in examples:
        if pair_of(example.messages[-1]["content"]) in wrong:
            example = dataclasses.replace(example, response=corrupt(example.response or ""))
            changed += 1
        out.append(example)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_examples(path, out)
    return {"examples": len(out), "corrupted": changed}


def teachers_override(second: Path, contra: Path, rate: float) -> str:
    """The three teachers, all read from their caches (written once, by their weights)."""
    return (
        f"teachers=[{{name: lab, kind: cache, path: {LAB_TEACHER}}}, "
        f"{{name: second, kind: cache, path: {second}}}, "
        f"{{name: contra-{rate}, kind: cache, path: {contra}}}]"
    )


def auc(scores: list[float], labels: list[bool]) -> float:
    """ROC AUC as the Mann-Whitney statistic (ties count half)."""
    positive = [s for s, y in zip(scores, labels, strict=True) if y]
    negative = [s for s, y in zip(scores, labels, strict=True) if not y]
    wins = sum((p > n) + 0.5 * (p == n) for p in positive for n in negative)
    return wins / max(1, len(positive) * len(negative))


def precision_recall(
    scores: list[float], labels: list[bool], threshold: float
) -> tuple[float, float]:
    flagged = [y for s, y in zip(scores, labels, strict=True) if s >= threshold]
    hits = sum(flagged)
    return hits / max(1, len(flagged)), hits / max(1, sum(labels))


def detection(rows: list[dict[str, Any]], injected: dict[str, bool]) -> dict[str, Any]:
    """For each score: AUC over all questions; the threshold chosen on the even-numbered half
    (the lowest with precision >= 0.9 there, else the one with the best F1) and precision and
    recall on the odd-numbered half."""
    out: dict[str, Any] = {"questions": len(rows), "injected": sum(injected[r["id"]] for r in rows)}
    for name in ("conflict", "max_jsd", "answers_differ"):
        scores = [float(r[name]) for r in rows]
        labels = [injected[r["id"]] for r in rows]
        index = [int(r["id"].rsplit("-", 1)[1]) for r in rows]
        choose = [(s, y) for s, y, i in zip(scores, labels, index, strict=True) if i % 2 == 0]
        check = [(s, y) for s, y, i in zip(scores, labels, index, strict=True) if i % 2 == 1]
        candidates = sorted({s for s, _ in choose})
        chosen, best = candidates[-1], (-1.0, -1.0)
        for threshold in candidates:
            p, r = precision_recall([s for s, _ in choose], [y for _, y in choose], threshold)
            key = (1.0 if p >= 0.9 else 0.0, r if p >= 0.9 else 2 * p * r / max(p + r, 1e-9))
            if key > best:
                best, chosen = key, threshold
        p, r = precision_recall([s for s, _ in check], [y for _, y in check], chosen)
        out[name] = {"auc": auc(scores, labels), "threshold": chosen, "precision": p, "recall": r}
    return out


def summary(values: list[float]) -> dict[str, float | int]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def exact_match(metrics: dict[str, Any]) -> float:
    return float(metrics["kd"]["after"]["tasks"][TEST]["exact_match"])


def test_answers(student: Path) -> list[dict[str, str | None]]:
    """The student's final answer to each held-out question, with the reference's and the
    question's item (greedy, as the run's own evaluation; kept in test_answers.json)."""
    kept = student.parent / "test_answers.json"
    if not kept.is_file():
        from lmdistill.config import ModelConfig
        from lmdistill.data import load_examples
        from lmdistill.data.gsm8k import final_answer
        from lmdistill.eval.task import greedy_answers
        from lmdistill.models.loading import load_model

        examples = load_examples(TEST)
        model, tokenizer = load_model(ModelConfig(path=str(student)))
        answers = greedy_answers(model, tokenizer, examples, max_new_tokens=120, batch_size=32)
        rows = [
            {
                "item": pair_of(e.messages[-1]["content"])[1],
                "answer": final_answer(a),
                "reference": final_answer(e.response or ""),
            }
            for e, a in zip(examples, answers, strict=True)
        ]
        kept.write_text(json.dumps(rows, indent=1) + "\n")
    return list(json.loads(kept.read_text()))


def plus_one(answer: str | None) -> str | None:
    return None if answer is None else str(int(answer) + 1)


def by_item(rows: list[dict[str, str | None]], rate: float) -> dict[str, float]:
    """Exact match on the held-out questions about a contradicted item and on the others, and
    how often an answer about a contradicted item is the contradiction (the reference + 1)."""
    wrong = {item for _, item in corrupted_pairs(rate)}
    hit = [r for r in rows if r["item"] in wrong]
    rest = [r for r in rows if r["item"] not in wrong]

    def share(selected: list[dict[str, str | None]], good: Any) -> float:
        return sum(bool(good(r)) for r in selected) / max(1, len(selected))

    return {
        "questions_contradicted": len(hit),
        "exact_match_contradicted": share(hit, lambda r: r["answer"] == r["reference"]),
        "exact_match_elsewhere": share(rest, lambda r: r["answer"] == r["reference"]),
        "copied_contradiction": share(hit, lambda r: r["answer"] == plus_one(r["reference"])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/lab/multi"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rates", type=float, nargs="*", default=list(RATES))
    parser.add_argument("--strategies", nargs="*", default=list(STRATEGIES))
    parser.add_argument("--result", type=Path, default=ROOT / "docs/results/multi-teacher.json")
    parser.add_argument(
        "--tables", action="store_true", help="print the docs' tables from --result and stop"
    )
    parser.add_argument(
        "--resummarise",
        action="store_true",
        help="recompute --result's per-arm summaries and plot from the runs it holds, and stop",
    )
    parser.add_argument(
        "--audit-only", action="store_true", help="build the teachers and audit them, no students"
    )
    args = parser.parse_args()
    args.out = args.out if args.out.is_absolute() else ROOT / args.out
    if args.tables:
        print(tables(json.loads(args.result.read_text())))
        return
    if args.resummarise:
        results = json.loads(args.result.read_text())
        summarise(results)
        results["resummarised"] = {
            **{k: v for k, v in provenance("multi-teacher").items() if k in ("code", "collected")},
            "command": "python benchmarks/multi_teacher_lab.py --resummarise",
        }
        args.result.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
        plot(results, args.result.with_suffix(".png"))
        print(tables(results))
        return
    out: Path = args.out
    from lmdistill.data import load_examples

    if not (ROOT / LAB_TEACHER / "config.json").is_file():
        sys.exit(f"{LAB_TEACHER} is missing: run `make {ROOT / LAB_TEACHER}/config.json` first")
    # 1. The teachers.
    second = out / "teacher-second"
    teacher_overrides = (f"eval.tasks=['{TEST}']", "eval.num_samples=0")
    teachers: dict[str, Any] = {
        "lab": {"path": LAB_TEACHER},
        "second": finished_run(
            "configs/lab/teacher.yaml",
            second,
            "train.seed=1",
            "student.num_layers=2",
            "train.max_steps=400",
            *teacher_overrides,
        )["kd"]["after"]["tasks"][TEST],
    }
    contras: dict[float, Path] = {}
    # Every run shares the caches (one per teacher) and the teachers' answers; a single
    # teacher's cache is cache.dir itself, so the clean runs point it at the lab teacher's.
    shared = (f"cache.dir={out / 'cache'}",)
    single = (
        f"teachers=[{{name: lab, kind: cache, path: {LAB_TEACHER}}}]",
        f"cache.dir={out / 'cache' / 'lab'}",
    )
    questions = {e.id: e.messages[-1]["content"] for e in load_examples(TRAIN)}
    results: dict[str, Any] = {"teachers": teachers, "rates": {}, "runs": []}
    planned = [(r, s) for r in args.rates for s in args.strategies]

    def record(done: bool) -> None:
        """The result file so far (rewritten after each cell: a stopped run leaves what it
        measured, marked incomplete, with what is missing)."""
        seeds = {
            (float(r), s): cell["exact_match"]["n"]
            for r in results["rates"]
            for s, cell in results["rates"][r]["strategies"].items()
        }
        results["complete"] = done
        results["missing"] = [
            f"r={r} {s}: {seeds.get((r, s), 0)} of {args.seeds} seeds"
            for r, s in planned
            if seeds.get((r, s), 0) < args.seeds
        ]
        clean = results.get("clean_single_teacher", {}).get("exact_match", {}).get("n", 0)
        if clean < args.seeds:
            results["missing"].append(f"clean single teacher: {clean} of {args.seeds} seeds")
        results.update(provenance("multi-teacher"))
        args.result.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
        if results["rates"] and "clean_single_teacher" in results:
            plot(results, args.result.with_suffix(".png"))
        print(f"wrote {args.result} ({'complete' if done else 'so far'})", flush=True)

    for position, rate in enumerate(args.rates):
        contras[rate] = contradicting_teacher(out, rate, teachers, teacher_overrides)
        entry = audit(out, rate, second, contras[rate], questions, shared)
        results["rates"][str(rate)] = entry
        behaves = entry["contradicting_teacher"]
        print(f"r={rate}: {json.dumps(behaves)}; detection {json.dumps(entry['detection'])}")
        if args.audit_only:
            continue
        if behaves["wrong_on_injected"] < 0.8:  # nothing was injected: students would say nothing
            sys.exit(
                f"r={rate}: the contradicting teacher is wrong on only "
                f"{behaves['wrong_on_injected']:.1%} of its injected questions; fine-tune it more"
            )
        ensemble = teachers_override(second / "student", contras[rate], rate)
        answers = f"ensemble.answers_dir={out / 'answers'}"
        # Seed by seed, every arm (the clean reference with the first r): a stopped run has
        # every arm at the seeds it reached.
        arms = (["clean single teacher"] if position == 0 else []) + list(args.strategies)
        for seed in range(args.seeds):
            for arm in arms:
                if arm == "clean single teacher":
                    where, arm_overrides = out / "clean" / f"s{seed}", single
                else:
                    where = out / f"r{rate}" / f"{arm}-s{seed}"
                    arm_overrides = (ensemble, answers, f"ensemble.strategy={arm}", *shared)
                metrics = finished_run(CONFIG, where, *arm_overrides, f"train.seed={seed}")
                run_entry: dict[str, Any] = {
                    "rate": 0.0 if arm == "clean single teacher" else rate,
                    "strategy": arm,
                    "seed": seed,
                    "exact_match": exact_match(metrics),
                    **by_item(test_answers(where / "student"), rate),
                    "train_seconds": metrics["kd"]["train_seconds"],
                }
                if arm != "clean single teacher":
                    run_entry["trust"] = metrics["ensemble"]["conflicts"]["trust"]
                results["runs"].append(run_entry)
                summarise(results)
                record(False)
    if args.audit_only:
        return
    results["costs"] = costs(out, second, contras, shared)
    record(True)
    print(tables(results))


def summarise(results: dict[str, Any]) -> None:
    """Each arm's cell (mean, std, n of every measure over its seeds, and the contradicting
    teacher's share of the signal) from the runs the result holds."""
    for run_entry in results["runs"]:
        arm, rate = run_entry["strategy"], run_entry["rate"]
        mine = [r for r in results["runs"] if r["strategy"] == arm and r["rate"] == rate]
        cell = {key: summary([r[key] for r in mine]) for key in MEASURES}
        if arm == "clean single teacher":  # its split: over the first r's items
            split = results.get("clean_single_teacher", {}).get("split_rate")
            first = min(results["rates"], key=float)
            results["clean_single_teacher"] = {**cell, "split_rate": split or float(first)}
        else:  # its share of the combined signal
            cell["signal_from_contradicting"] = summary(
                [r["trust"][f"contra-{rate}"] for r in mine]
            )
            results["rates"][str(rate)]["strategies"][arm] = cell


def contradicting_teacher(
    out: Path, rate: float, teachers: dict[str, Any], overrides: tuple[str, ...]
) -> Path:
    """The lab teacher fine-tuned on the corrupted-rule solutions for this r, in rounds of 200
    steps at lr 2e-3, each from the last one's weights (one round left it wrong on 57% of its
    injected questions at r = 0.25, short of the gate)."""
    directory = out / f"contra-{rate}"
    data = contradicting_data(rate, directory / "data.jsonl")
    start = LAB_TEACHER
    for round_ in range(ROUNDS):
        where = directory / ("teacher" if round_ == 0 else f"teacher-{round_ + 1}")
        metrics = finished_run(
            "configs/lab/teacher.yaml",
            where,
            "student.init=path",
            f"student.path={start}",
            f"data.train={directory / 'data.jsonl'}",
            "train.max_steps=200",
            "train.lr=2.0e-3",
            "train.warmup_steps=10",
            "train.checkpoint_every=50",
            f"train.seed={round_}",
            *overrides,
        )
        start = str(where / "student")
    teachers[f"contra-{rate}"] = {
        "data": data,
        "rounds": ROUNDS,
        **metrics["kd"]["after"]["tasks"][TEST],
    }
    return Path(start)


def audit(
    out: Path,
    rate: float,
    second: Path,
    contra: Path,
    questions: dict[str, str],
    shared: tuple[str, ...],
) -> dict[str, Any]:
    """`lmdistill conflicts` over the three teachers; detection of the injected questions and
    how the contradicting teacher behaves (its own answers against the reference)."""
    wrong = corrupted_pairs(rate)
    injected = {i: pair_of(q) in wrong for i, q in questions.items()}
    where = out / f"conflicts-{rate}"
    if not (where / "conflicts.jsonl").is_file():
        run(
            "conflicts",
            CONFIG,
            out / f"r{rate}",
            teachers_override(second / "student", contra, rate),
            f"ensemble.answers_dir={out / 'answers'}",
            "ensemble.answers=true",
            *shared,
            extra=("--out", str(where)),
        )
    rows = [json.loads(line) for line in (where / "conflicts.jsonl").read_text().splitlines()]
    name = f"contra-{rate}"
    return {
        "injected_share": statistics.fmean(injected.values()),
        "contradicting_teacher": {
            "wrong_on_injected": statistics.fmean(
                r["answers"][name] != r["reference"] for r in rows if injected[r["id"]]
            ),
            "right_elsewhere": statistics.fmean(
                r["answers"][name] == r["reference"] for r in rows if not injected[r["id"]]
            ),
        },
        "detection": detection(rows, injected),
        "strategies": {},
    }


def costs(
    out: Path, second: Path, contras: dict[float, Path], shared: tuple[str, ...]
) -> dict[str, Any]:
    """Seconds per optimizer step (20 steps, evaluation off) with one cached teacher, three
    cached, three live: run one after another on the same machine."""
    rate = 0.3 if 0.3 in contras else next(iter(contras))
    three = teachers_override(second / "student", contras[rate], rate)
    arms = {
        "one teacher, cached": (
            f"teachers=[{{name: lab, kind: cache, path: {LAB_TEACHER}}}]",
            f"cache.dir={out / 'cache' / 'lab'}",
        ),
        "three teachers, cached": (three,),
        "three teachers, live": (three.replace("kind: cache", "kind: local"),),
    }
    found: dict[str, Any] = {}
    for arm, overrides in arms.items():
        metrics = finished_run(
            CONFIG,
            out / "cost" / arm.replace(" ", "-").replace(",", ""),
            *overrides,
            "train.max_steps=20",
            "eval.enabled=false",
            "ensemble.strategy=mean",
            *(() if arm.startswith("one") else shared),
        )
        kd = metrics["kd"]
        found[arm] = {
            "seconds_per_step": kd["train_seconds"] / kd["steps"],
            "tokens_per_s": kd["tokens_per_s"],
        }
    base = found["one teacher, cached"]["seconds_per_step"]
    for arm in found:
        found[arm]["relative_to_one_cached"] = found[arm]["seconds_per_step"] / base
    return found


def tables(results: dict[str, Any]) -> str:
    """The docs' tables (docs/reasoning.md), every figure as the result file holds it."""
    rates = sorted(results["rates"], key=float)
    lines = [
        "| r | injected share | contradicting teacher wrong on injected | right elsewhere "
        "| AUC: conflict | precision / recall: conflict | AUC: max JSD "
        "| precision / recall: max JSD | AUC: answers differ |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rates:
        entry = results["rates"][r]
        d, c = entry["detection"], entry["contradicting_teacher"]
        lines.append(
            f"| {r} | {entry['injected_share']:.3f} | {c['wrong_on_injected']:.3f} "
            f"| {c['right_elsewhere']:.3f} | {d['conflict']['auc']:.3f} "
            f"| {d['conflict']['precision']:.3f} / {d['conflict']['recall']:.3f} "
            f"| {d['max_jsd']['auc']:.3f} "
            f"| {d['max_jsd']['precision']:.3f} / {d['max_jsd']['recall']:.3f} "
            f"| {d['answers_differ']['auc']:.3f} |"
        )
    clean = results.get("clean_single_teacher")
    for r in rates:
        lines += [
            "",
            f"r = {r}:",
            "",
            "| student taught by | exact match ↑ | on contradicted items ↑ | elsewhere ↑ "
            "| repeats the contradiction ↓ | signal from the contradicting teacher |",
            "|---|---|---|---|---|---|",
        ]
        rows = [("clean single teacher", clean)] if clean else []
        for name, cell in [*rows, *results["rates"][r]["strategies"].items()]:
            # The clean runs' split is over the items of the r they ran with.
            split = name != "clean single teacher" or float(cell["split_rate"]) == float(r)
            trust = cell.get("signal_from_contradicting")
            cells = [cell_text(cell["exact_match"])]
            cells += [cell_text(cell[key]) if split else "" for key in MEASURES[1:]]
            cells.append(f"{trust['mean']:.3f}" if trust else "0")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if "costs" in results:
        lines += [
            "",
            "| teachers | seconds per step | tokens per s | relative to one cached |",
            "|---|---|---|---|",
        ]
        for arm, cost in results["costs"].items():
            lines.append(
                f"| {arm} | {cost['seconds_per_step']:.3f} | {cost['tokens_per_s']:,.0f} "
                f"| {cost['relative_to_one_cached']:.2f} |"
            )
    return "\n".join(lines)


def cell_text(found: dict[str, Any]) -> str:
    return f"{found['mean']:.3f} ± {found['std']:.3f}"


def plot(results: dict[str, Any], path: Path) -> None:
    """Per r, each student's exact match (all, on contradicted items) and how often it repeats
    the contradiction; then the detection AUCs per r."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = sorted(results["rates"], key=float)
    fig, axes = plt.subplots(
        1, len(rates) + 1, figsize=(5.5 * len(rates) + 3.5, 3.8), squeeze=False
    )
    bars = (
        ("exact_match", "exact match"),
        ("exact_match_contradicted", "exact match, contradicted items"),
        ("copied_contradiction", "repeats the contradiction"),
    )
    clean = results.get("clean_single_teacher")
    for ax, r in zip(axes[0], rates, strict=False):
        cells = dict(results["rates"][r]["strategies"])
        if clean and float(clean["split_rate"]) == float(r):
            cells = {"clean single": clean, **cells}
        names = list(cells)
        for j, (key, label) in enumerate(bars):
            ax.bar(
                [x + (j - 1) * 0.27 for x in range(len(names))],
                [cells[n][key]["mean"] for n in names],
                width=0.27,
                yerr=[cells[n][key]["std"] for n in names],
                capsize=2,
                label=label,
            )
        ax.set_xticks(range(len(names)), [n.replace(" ", "\n") for n in names], fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(f"Students, r = {r} (mean ± std over seeds, 100 held out)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    right = axes[0][-1]
    scores = ("conflict", "max_jsd", "answers_differ")
    for j, name in enumerate(scores):
        right.bar(
            [x + (j - 1) * 0.27 for x in range(len(rates))],
            [results["rates"][r]["detection"][name]["auc"] for r in rates],
            width=0.27,
            label=name,
        )
    right.set_xticks(range(len(rates)), [f"r = {r}" for r in rates])
    right.set_ylim(0.5, 1.0)
    right.set_title("Detection: ROC AUC of the injected questions", fontsize=9)
    right.grid(axis="y", alpha=0.3)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
