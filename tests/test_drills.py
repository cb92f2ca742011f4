"""Outside drills: `lmdistill run` killed with SIGKILL at seeded moments and resumed must end
with the uninterrupted run's student, bit for bit; a teacher cache damaged in any one way must
be refused by name, in one line, without a byte of the cache being rewritten.

Slow (about 3 minutes on 2 CPU cores); `pytest -s` prints the kill log and the damage table.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file

from lmdistill.cli import main

TINY = str(ROOT / "configs" / "tiny.yaml")
SMALL = [
    "data.max_train_examples=32",
    "data.eval_size=8",
    "generate.max_new_tokens=24",
]
RUN_SMALL = [
    *SMALL,
    "train.max_steps=8",
    "train.batch_size=4",
    "train.checkpoint_every=2",
    "eval.num_samples=1",
    "eval.sample_max_new_tokens=8",
    "baseline=false",
]
MAX_STEPS = 8
POLL_S = 0.0005  # a 1 MB checkpoint is written in a few milliseconds


def left_behind(directory: Path) -> list[Path]:
    """What a killed atomic write leaves: `.NAME.XXXXXXXX.tmp` files or directories, and
    `.NAME.old` (a directory being replaced)."""
    return sorted(
        Path(root) / name
        for root, dirs, files in os.walk(directory)
        for name in [*dirs, *files]
        if name.startswith(".") and name.endswith((".tmp", ".old"))
    )


def student_tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "student" / "model.safetensors"))


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    differ = [name for name in want if not torch.equal(got[name], want[name])]
    assert not differ, f"{len(differ)} of {len(want)} student tensors differ, e.g. {differ[:3]}"


# -- 1. kill -9 at seeded moments, resume until done ------------------------------------------


def start_run(out: Path, log: Path, *flags: str) -> subprocess.Popen[bytes]:
    """`lmdistill run` as a real process in its own session (its whole group can be killed)."""
    env = {k: v for k, v in os.environ.items() if k != "LMDISTILL_DEBUG"}
    command = [sys.executable, "-m", "lmdistill", "run", TINY, f"output_dir={out}", *RUN_SMALL]
    with log.open("ab") as sink:
        return subprocess.Popen(
            [*command, *flags],
            cwd=ROOT,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def finish(out: Path, log: Path) -> tuple[int, list[str]]:
    """Run to the end: `--resume` where a run was started (it wrote config.yaml), else fresh."""
    flags = ["--resume"] if (out / "config.yaml").is_file() else []
    process = start_run(out, log, *flags)
    return process.wait(timeout=300), flags


# A trigger looks at the output directory (and the seconds since the start) and says "kill now".
Trigger = Callable[[Path, float], bool]


def after_seconds(seconds: float) -> Trigger:
    return lambda out, elapsed: elapsed >= seconds


def checkpoint_being_written(min_step: int, *, or_just_written: bool = True) -> Trigger:
    """A checkpoint's temp directory, `.step-NNNNNN.XXXXXXXX.tmp`, for a step >= `min_step`;
    or (`or_just_written`), when the poll missed it, that checkpoint just after its rename."""

    def fire(out: Path, elapsed: float) -> bool:
        try:
            names = os.listdir(out / "checkpoints")
        except FileNotFoundError:
            return False
        for name in names:
            if name.startswith(".step-") and name.endswith(".tmp"):
                if int(name[6:12]) >= min_step:
                    return True
            elif or_just_written and name.startswith("step-") and int(name[5:11]) >= min_step:
                return True
        return False

    return fire


def after_appears(relative: str, delay: float = 0.0) -> Trigger:
    """`delay` seconds after `out/relative` is first seen."""
    seen: list[float] = []

    def fire(out: Path, elapsed: float) -> bool:
        if not seen and (out / relative).exists():
            seen.append(elapsed)
        return bool(seen) and elapsed >= seen[0] + delay

    return fire


def kill_when(out: Path, log: Path, trigger: Trigger, flags: list[str]) -> dict[str, Any]:
    """Start a run, SIGKILL its process group the moment `trigger` fires; describe the kill."""
    process = start_run(out, log, *flags)
    started = time.perf_counter()
    try:
        while process.poll() is None:
            elapsed = time.perf_counter() - started
            if trigger(out, elapsed):
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=60)
                return {
                    "killed": True,
                    "at_s": round(elapsed, 3),
                    "left": [str(p.relative_to(out)) for p in left_behind(out)],
                    "config": (out / "config.yaml").is_file(),
                    "checkpoints": sorted(
                        p.name for p in (out / "checkpoints").glob("step-*") if p.is_dir()
                    ),
                }
            time.sleep(POLL_S)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return {"killed": False, "exit": process.returncode}


@dataclass(frozen=True)
class Reference:
    seconds: float
    student: dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """One uninterrupted run: how long it takes, and the student it ends with."""
    out = tmp_path_factory.mktemp("reference") / "run"
    log = out.parent / "run.log"
    started = time.perf_counter()
    process = start_run(out, log)
    code = process.wait(timeout=300)
    seconds = time.perf_counter() - started
    assert code == 0, log.read_text()[-3000:]
    assert not left_behind(out)
    print(f"\nuninterrupted run: {seconds:.1f} s")
    return Reference(seconds, student_tensors(out))


# Each drill: one seed, and the kills in order (each given the uninterrupted run's duration and
# that seed's generator). After each kill the run is finished (--resume when it wrote
# config.yaml); a drill with two kills kills the resumed run again.
KILL_DRILLS: dict[str, tuple[int, list[Callable[[float, random.Random], Trigger]]]] = {
    # Before or during start-up: imports, the teacher, config.yaml, generation.
    "set-up": (11, [lambda total, rng: after_seconds(rng.uniform(0.1, 0.6) * total)]),
    # Anywhere in the whole run.
    "anytime": (12, [lambda total, rng: after_seconds(rng.uniform(0.0, 1.0) * total)]),
    # After config.yaml is written: the teacher loads, writes its responses, is measured.
    "generation": (16, [lambda total, rng: after_appears("config.yaml", rng.uniform(0.0, 1.0))]),
    # Between the first checkpoint and the end of training.
    "mid-training": (
        13,
        [lambda total, rng: after_appears("checkpoints/step-000002", rng.uniform(0.0, 0.15))],
    ),
    # While a checkpoint's temp directory is being written; then again in the resumed run.
    "checkpoint-write": (
        14,
        [
            lambda total, rng: checkpoint_being_written(min_step=4),
            lambda total, rng: checkpoint_being_written(min_step=6),
        ],
    ),
    # Training done (its last checkpoint is there): the student being evaluated; then, in the
    # resumed run, once the student is saved (the report and metrics.json being written).
    "evaluation": (
        15,
        [
            lambda total, rng: after_appears(f"checkpoints/step-{MAX_STEPS:06d}"),
            lambda total, rng: after_appears("student", rng.uniform(0.0, 0.1)),
        ],
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("drill", list(KILL_DRILLS))
def test_kill_9_then_resume_ends_with_the_uninterrupted_student(
    drill: str, reference: Reference, tmp_path: Path
) -> None:
    seed, kills = KILL_DRILLS[drill]
    rng = random.Random(seed)
    out, log = tmp_path / "run", tmp_path / "run.log"
    flags: list[str] = []
    for make_trigger in kills:
        kill = kill_when(out, log, make_trigger(reference.seconds, rng), flags)
        print(f"\n[{drill}] flags {flags or '-'}: {kill}")
        assert kill["killed"], f"{drill}: the run ended before the kill moment: {kill}"
        flags = ["--resume"] if kill["config"] else []
    code, flags = finish(out, log)
    print(f"[{drill}] finished with {flags or 'a fresh start'}: exit {code}")
    assert code == 0, log.read_text()[-3000:]
    assert_same_tensors(student_tensors(out), reference.student)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["kd"]["steps"] == MAX_STEPS
    assert not left_behind(out), f"left by killed writes: {left_behind(out)}"


@pytest.mark.slow
def test_a_kill_inside_a_checkpoint_write_leaves_a_temp_dir_that_the_resume_removes(
    reference: Reference, tmp_path: Path
) -> None:
    """The drill above must really exercise the clean-up: killed with `.step-*.tmp` on disk
    (retried on the next checkpoint when the poll sees the rename first)."""
    out, log = tmp_path / "run", tmp_path / "run.log"
    flags: list[str] = []
    for step in range(2, MAX_STEPS + 1, 2):
        trigger = checkpoint_being_written(min_step=step, or_just_written=False)
        kill = kill_when(out, log, trigger, flags)
        print(f"\n[temp-dir] step >= {step}: {kill}")
        assert kill["killed"], kill
        if any(".tmp" in left for left in kill["left"]):
            break
        flags = ["--resume"]
    else:
        pytest.fail("no kill landed while a checkpoint's temp directory existed")
    assert any(left.startswith("checkpoints/.step-") for left in kill["left"]), kill
    code, _ = finish(out, log)
    assert code == 0, log.read_text()[-3000:]
    assert "(left by a killed write)" in log.read_text()
    assert not left_behind(out)
    assert_same_tensors(student_tensors(out), reference.student)


# -- 2. the teacher cache damaged one way at a time ------------------------------------------

SHARD = "shard-00001"  # of 4 train shards (32 examples, 8 per shard)
SHARD_FILES = ("ids.npy", "top.npy", "gaps.npy", "tail.npy", "present.npy", "offsets.npy")
CACHE_ARGS = [*SMALL, "cache.shard_size=8"]
CACHE_RUN_ARGS = [*CACHE_ARGS, "teacher.kind=cache", "train.max_steps=2", "baseline=false"]
LOCK = ".lmdistill.lock"
PROGRESS = re.compile(r"^[\w ]+: +\d+%\|")  # a tqdm bar: "cache: 100%|####| 32/32 [...]"


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if offset is None else offset % len(data)
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - max(1, len(data) // 3)])


def edit_manifest(change: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def damage(split_dir: Path) -> None:
        path = split_dir / "manifest.json"
        manifest = json.loads(path.read_text())
        change(manifest)
        path.write_text(json.dumps(manifest, indent=2) + "\n")

    return damage


def set_field(field: str, value: Callable[[Any], Any]) -> Callable[[dict[str, Any]], None]:
    def change(manifest: dict[str, Any]) -> None:
        old = manifest[field]
        manifest[field] = value(old)
        assert manifest[field] != old

    return change


def set_shard_field(field: str, value: Callable[[Any], Any]) -> Callable[[dict[str, Any]], None]:
    def change(manifest: dict[str, Any]) -> None:
        entry = next(s for s in manifest["shards"] if s["name"] == SHARD)
        old = entry[field]
        entry[field] = value(old)
        assert entry[field] != old

    return change


def other_hex(value: str) -> str:
    return ("1" if value[0] != "1" else "2") + value[1:]


def edited(value: Any) -> Any:
    """Any other value of the same kind (fields whose meaning the drill need not know)."""
    if isinstance(value, dict):
        return {**value, "edited": True}
    if isinstance(value, str):
        return value + "-edited"
    return "edited" if value is None else value + 1


@dataclass(frozen=True)
class Damage:
    apply: Callable[[Path], None]  # given the train split's directory
    named: tuple[str, ...]  # what the one-line error must name


def _damage_classes() -> dict[str, Damage]:
    classes: dict[str, Damage] = {}
    for file in SHARD_FILES:
        # The last byte is array data, past the .npy header.
        classes[f"flip-byte:{file}"] = Damage(
            lambda d, f=file: flip_byte(d / SHARD / f, offset=-1), (f"train/{SHARD}",)
        )
        classes[f"truncate:{file}"] = Damage(
            lambda d, f=file: truncate(d / SHARD / f), (f"train/{SHARD}",)
        )
    classes["delete-shard-dir"] = Damage(lambda d: shutil.rmtree(d / SHARD), (f"train/{SHARD}",))
    fields: dict[str, Callable[[Any], Any]] = {
        "k": lambda v: v // 2,
        "teacher": lambda v: v + "-other",
        "shard_size": lambda v: v * 2,
        "data_hash": other_hex,
        "temperature": lambda v: v * 2,
        "tokenizer_hash": other_hex,
        "max_length": lambda v: v // 2,
        "vocab_size": lambda v: v + 1,
        "prompts_hash": other_hex,
        "chat_template_hash": edited,
        "writer": edited,
        "teacher_weights": edited,
        "generate": edited,
    }
    for field, value in fields.items():
        classes[f"manifest:{field}"] = Damage(
            edit_manifest(set_field(field, value)), (f"field {field} ",)
        )
    shard_fields: dict[str, Callable[[Any], Any]] = {
        "tokens": lambda v: v - 1,
        "examples": lambda v: v - 1,
        "sha256": other_hex,
        "name": lambda v: "shard-00009",
    }
    index = int(SHARD.rsplit("-", 1)[1])
    for field, value in shard_fields.items():
        classes[f"manifest:shards[].{field}"] = Damage(
            edit_manifest(set_shard_field(field, value)), (f"shards[{index}].{field}",)
        )
    classes["delete-manifest"] = Damage(
        lambda d: (d / "manifest.json").unlink(), ("teacher_cache/train holds", "no manifest.json")
    )
    classes["flip-byte:examples.jsonl"] = Damage(
        lambda d: flip_byte(d / "examples.jsonl"), ("train/examples.jsonl",)
    )
    classes["truncate:examples.jsonl"] = Damage(
        lambda d: truncate(d / "examples.jsonl"), ("train/examples.jsonl",)
    )
    return classes


DAMAGE = _damage_classes()


def snapshot(directory: Path) -> dict[str, str]:
    """Every file's sha256 and every directory, by relative path (the lock file aside)."""
    found: dict[str, str] = {}
    for path in sorted(directory.rglob("*")):
        if path.name == LOCK:
            continue
        key = str(path.relative_to(directory))
        found[key] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return found


@pytest.fixture(scope="module")
def pristine_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """`lmdistill cache` once; yields its output directory. Prints the refusal table after the
    module's damage tests have filled `REFUSALS`."""
    out = tmp_path_factory.mktemp("pristine") / "run"
    assert main(["cache", TINY, f"output_dir={out}", *CACHE_ARGS]) == 0
    manifest = json.loads((out / "teacher_cache" / "train" / "manifest.json").read_text())
    assert [s["name"] for s in manifest["shards"]][1] == SHARD
    yield out
    if REFUSALS:
        refused = sum(ok for ok, _ in REFUSALS.values())
        print(f"\n\nteacher cache damage: {refused}/{len(REFUSALS)} refused correctly")
        width = max(len(name) for name in REFUSALS)
        for name, (ok, detail) in REFUSALS.items():
            print(f"  {name:{width}s}  {'refused' if ok else 'NOT REFUSED'}  {detail}")


REFUSALS: dict[str, tuple[bool, str]] = {}


@pytest.mark.slow
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_cache_is_refused_by_name_and_left_as_it_is(
    damage: str,
    pristine_cache: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("LMDISTILL_DEBUG", raising=False)
    out = tmp_path / "run"
    shutil.copytree(pristine_cache, out, ignore=shutil.ignore_patterns(LOCK))
    cache = out / "teacher_cache"
    DAMAGE[damage].apply(cache / "train")
    before = snapshot(cache)
    capsys.readouterr()

    code = main(["run", TINY, f"output_dir={out}", *CACHE_RUN_ARGS])
    err = capsys.readouterr().err
    after = snapshot(cache)
    # Progress bars of the work done before the damage is found (re-reading the finished
    # generation, opening the cache writer) are not messages; every other line counts.
    lines = [line for line in err.splitlines() if line.strip() and not PROGRESS.match(line)]

    named = DAMAGE[damage].named
    problems = []
    if code != 2:
        problems.append(f"exit {code}")
    if len(lines) != 1 or not lines[0].startswith("lmdistill run: error:"):
        problems.append(f"{len(lines)} lines, not one error line")
    if "Traceback" in err:
        problems.append("traceback")
    if missing := [text for text in named if text not in err]:
        problems.append(f"does not name {missing}")
    if damage == "delete-manifest" and (cache / "train" / "manifest.json").exists():
        problems.append("manifest.json written again")
    if after != before:
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        problems.append(f"cache rewritten: {changed}")
    shown = lines[-1].removeprefix("lmdistill run: error: ") if lines else ""
    REFUSALS[damage] = (not problems, "; ".join(problems) or shown.replace(str(cache), "CACHE"))
    assert not problems, f"{damage}: {'; '.join(problems)}\nstderr:\n{err[-2000:]}"
