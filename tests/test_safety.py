"""What an outside drill found, each as a regression test: checkpoints that run no code, one
writer per directory, modes, one-line errors, nothing written before the inputs are checked."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ROOT, TINY_OVERRIDES, tiny_run_config, write_jsonl

from lmdistill.cli import build_parser, main, parse_args
from lmdistill.config import TrainConfig
from lmdistill.io import (
    DirectoryLockedError,
    atomic_dir,
    atomic_write_text,
    directory_lock,
    remove_left_behind,
)
from lmdistill.kd.checkpoint import (
    CheckpointError,
    TrainState,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from lmdistill.kd.optim import build_optimizer, build_scheduler

TINY = str(ROOT / "configs" / "tiny.yaml")


class Planted:
    """A pickle that makes a directory when it is loaded: what a hostile checkpoint holds."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (os.mkdir, (str(self.marker),))


def _trained(tiny_teacher: Any) -> tuple[Any, Any, Any]:
    train = TrainConfig(max_steps=4, warmup_steps=1)
    optimizer = build_optimizer(tiny_teacher, train)
    scheduler = build_scheduler(optimizer, train)
    tiny_teacher(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()
    scheduler.step()
    return tiny_teacher, optimizer, scheduler


def test_a_checkpoint_round_trips_with_every_generator(tmp_path: Path, tiny_teacher: Any) -> None:
    import numpy as np

    model, optimizer, scheduler = _trained(tiny_teacher)
    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    path = save_checkpoint(tmp_path, model, optimizer, scheduler, TrainState(step=1), keep=2)
    drawn = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    state = load_checkpoint(path, model, optimizer, scheduler)
    assert state.step == 1
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == drawn
    for name in ("optimizer.pt", "scheduler.pt", "rng.pt"):
        torch.load(path / name, weights_only=True)  # plain tensors and numbers only


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng.pt"])
def test_a_planted_pickle_is_refused_and_runs_nothing(
    tmp_path: Path, tiny_teacher: Any, name: str
) -> None:
    model, optimizer, scheduler = _trained(tiny_teacher)
    path = save_checkpoint(tmp_path, model, optimizer, scheduler, TrainState(step=1), keep=2)
    marker = tmp_path / "pwned"
    torch.save({"state": Planted(marker)}, path / name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=f"{name} holds something other than tensors"):
        load_checkpoint(path, model, optimizer, scheduler)
    assert not marker.exists()  # the old code ran it (torch.load(weights_only=False))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run with checkpoints, kept aside as it was: `_fresh` puts it back where
    it ran (output_dir is part of the config hash that --resume checks)."""
    root = tmp_path_factory.mktemp("finished")
    config = tiny_run_config(root)
    assert main(["run", TINY, *_overrides(config), "baseline=false"]) == 0
    shutil.copytree(config.output_dir, root / "pristine")
    return Path(config.output_dir)


def _without_progress_bars(err: str) -> str:
    """stderr without tqdm's bars (the resumed run sets up before it reads the checkpoint)."""
    return "\n".join(line for line in err.splitlines() if "%|" not in line).strip()


def _fresh(finished_run: Path) -> Path:
    shutil.rmtree(finished_run)
    shutil.copytree(finished_run.parent / "pristine", finished_run)
    return finished_run


def _overrides(config: Any) -> list[str]:
    return [f"output_dir={config.output_dir}", *TINY_OVERRIDES]


RUN_ARGS = [*TINY_OVERRIDES, "baseline=false"]


@pytest.mark.slow
def test_resuming_a_planted_checkpoint_is_one_line_and_runs_nothing(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _fresh(finished_run)
    last = list_checkpoints(out / "checkpoints")[-1]
    marker = tmp_path / "pwned"
    torch.save(Planted(marker), last / "rng.pt")
    code = main(["run", TINY, f"output_dir={out}", *RUN_ARGS, "--resume"])
    err = _without_progress_bars(capsys.readouterr().err)
    assert code == 2 and not marker.exists()
    assert err.startswith("lmdistill run: error:") and len(err.splitlines()) == 1
    assert "rng.pt holds something other than tensors" in err


@pytest.mark.slow
def test_temp_dirs_of_killed_writes_are_removed_when_the_run_starts_again(
    finished_run: Path, tmp_path: Path
) -> None:
    out = _fresh(finished_run)
    left = [
        out / "checkpoints" / ".step-000012.a1b2c3d4.tmp",
        out / ".student.x_yz1234.tmp",
        out / "teacher_cache" / ".shard-00000.k9k9k9k9.tmp",
    ]
    for path in left:
        path.mkdir(parents=True)
        (path / "model.safetensors").write_bytes(b"\0" * 1024)
    keep = out / ".my-notes.tmp.txt"  # not a name lmdistill writes
    keep.write_text("mine")
    assert main(["run", TINY, f"output_dir={out}", *RUN_ARGS, "--resume"]) == 0
    assert not any(path.exists() for path in left)
    assert keep.read_text() == "mine"


def test_only_what_atomic_writes_leave_is_removed(tmp_path: Path) -> None:
    for name in (".a.12345678.tmp", ".b.old", "c.tmp", ".d.tmp", "e"):
        (tmp_path / name).write_text("x")
    removed = {p.name for p in remove_left_behind(tmp_path)}
    assert removed == {".a.12345678.tmp", ".b.old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".d.tmp", "c.tmp", "e"]


def test_atomic_files_and_dirs_get_the_umask_modes(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "f").write_text("y")
        (tmp_path / "plain.txt").write_text("z")
        (tmp_path / "plain").mkdir()
    finally:
        os.umask(old)
    mode = lambda p: (tmp_path / p).stat().st_mode & 0o777  # noqa: E731
    assert mode("a.txt") == mode("plain.txt") == 0o644  # was 0o600
    assert mode("d") == mode("plain") == 0o755  # was 0o700


HOLD = """
import sys, time
from pathlib import Path
from lmdistill.io import directory_lock
with directory_lock(Path(sys.argv[1]), "writes a teacher cache"):
    print("held", flush=True)
    time.sleep(120)
"""


@contextlib.contextmanager
def _held_by_another_process(directory: Path) -> Iterator[subprocess.Popen[str]]:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(directory)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_a_held_directory_is_refused_naming_the_pid_and_freed_by_kill_9(tmp_path: Path) -> None:
    with _held_by_another_process(tmp_path) as holder:
        # The message says what the holder does, not what the one refused meant to do.
        with (
            pytest.raises(
                DirectoryLockedError, match=f"PID {holder.pid}\\) writes a teacher cache there"
            ),
            directory_lock(tmp_path, "runs"),
        ):
            pass
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        with directory_lock(tmp_path), directory_lock(tmp_path):  # free, and re-entrant
            pass


def test_a_symlinked_lock_file_is_never_written_through(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / ".lmdistill.lock").symlink_to(victim)
    with (
        pytest.raises(DirectoryLockedError, match="cannot be used as a lock file"),
        directory_lock(tmp_path / "d"),
    ):
        pass
    assert victim.read_text() == "keep me"


def test_cleaning_leaves_a_subdirectory_another_process_holds(tmp_path: Path) -> None:
    """A run's start-up cleaning walks its output_dir; a cache or sweep being written below
    it by another process keeps its temp files (the old walk removed them mid-write)."""
    busy, stale = tmp_path / "teacher_cache", tmp_path / "select"
    for sub in (busy, stale):
        sub.mkdir()
        (sub / ".shard-00001.abcd1234.tmp").mkdir()
    (stale / ".lmdistill.lock").write_text("999999 selects\n")  # its holder is gone
    with _held_by_another_process(busy), directory_lock(tmp_path):
        removed = remove_left_behind(tmp_path)
    assert removed == [stale / ".shard-00001.abcd1234.tmp"]
    assert (busy / ".shard-00001.abcd1234.tmp").is_dir()


@pytest.mark.parametrize(
    ("command", "held"),
    [
        ("cache", "generate"),  # the cache command generates its responses first
        ("eval", "generate"),
        ("select", "select/scores"),  # scores are shared across budgets
    ],
)
def test_every_command_holds_what_it_writes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, held: str
) -> None:
    out = tmp_path / "run"
    extra = ["--student", str(tmp_path)] if command == "eval" else []
    with _held_by_another_process(out / held) as holder:
        code = main([command, TINY, f"output_dir={out}", *RUN_ARGS, *extra])
    err = _without_progress_bars(capsys.readouterr().err)
    assert code == 2 and f"PID {holder.pid}" in err and "is in use" in err, err


def _lmdistill(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "lmdistill", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_lock(directory: Path, process: subprocess.Popen[str]) -> None:
    lock = directory / ".lmdistill.lock"
    deadline = time.monotonic() + 120
    while not (lock.is_file() and lock.read_text().split(" ")[0] == str(process.pid)):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the first run never took its lock"
        time.sleep(0.05)


@pytest.mark.slow
def test_two_runs_generates_or_caches_into_one_directory_one_stops_at_once(
    tmp_path: Path,
) -> None:
    out = tmp_path / "run"
    common = [f"output_dir={out}", *RUN_ARGS, "teacher.kind=cache"]
    # The tiny run ends in seconds, before a second python has imported torch: the first one
    # trains far longer than the test lasts and is killed at the end.
    first = _lmdistill("run", TINY, *common, "train.max_steps=1000000")
    try:
        _wait_for_lock(out, first)
        for second in (
            ["run", TINY, *common],
            ["generate", TINY, *common],
            ["cache", TINY, *common],
        ):
            result = subprocess.run(
                [sys.executable, "-m", "lmdistill", *second],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=120,
            )
            err = result.stderr.strip()
            assert result.returncode == 2, err
            assert len(err.splitlines()) == 1 and f"PID {first.pid}" in err, err
            assert "is in use" in err
        assert first.poll() is None  # the first run was never disturbed
    finally:
        first.kill()
        first.communicate(timeout=60)
    assert "train:\n" in (out / "config.yaml").read_text()
    assert "max_steps: 1000000" in (out / "config.yaml").read_text()  # the first run's


def _one_line_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_yaml_errors_are_one_line_naming_file_and_place(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss:\n  alpha: [0.5\ntrain:\n  lr: 1\n")
    err = _one_line_error(["run", str(bad)], capsys)
    assert f"{bad}: invalid YAML at line" in err
    err = _one_line_error(["run", TINY, "loss.alpha=[0.5"], capsys)
    assert "override 'loss.alpha=[0.5': invalid YAML" in err


def test_invalid_utf8_names_the_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "a", "response": "b"}])
    with data.open("ab") as handle:
        handle.write(b'{"prompt": "\xff", "response": "c"}\n')
    err = _one_line_error(["run", TINY, f"data.train={data}", f"output_dir={tmp_path}/o"], capsys)
    assert f"{data}:2: not valid UTF-8" in err
    config = tmp_path / "c.yaml"
    config.write_bytes(b"output_dir: x\n# caf\xe9\n")
    assert f"{config}:2: not valid UTF-8" in _one_line_error(["run", str(config)], capsys)


def test_an_output_dir_that_cannot_be_one_is_refused_before_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    afile = tmp_path / "afile"
    afile.write_text("mine")
    err = _one_line_error(["run", TINY, f"output_dir={afile}"], capsys)
    assert f"output_dir: {afile} cannot be a directory" in err
    err = _one_line_error(["run", TINY, f"output_dir={afile}/sub"], capsys)
    assert "cannot be a directory" in err
    assert afile.read_text() == "mine"


@pytest.mark.parametrize(
    "override",
    [
        "data.train=missing.jsonl",
        "student.init=path",  # with student.path below
        "teacher.path=./no/such/teacher",
        "eval.tasks=[missing-task.jsonl]",
    ],
)
def test_a_run_that_fails_its_checks_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], override: str
) -> None:
    out = tmp_path / "out"
    extra = ["student.path=./no/such/student"] if override.startswith("student") else []
    _one_line_error(["run", TINY, f"output_dir={out}", override, *extra], capsys)
    assert not out.exists()  # the old code wrote config.yaml (and generate/) first


def test_a_hub_id_while_offline_is_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "lmdistill", "run", TINY, "teacher.path=nobody/no-such-model",
         f"output_dir={tmp_path / 'o'}"],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    err = result.stderr.strip()
    assert result.returncode == 2 and "Traceback" not in err, err
    assert err.splitlines()[-1].startswith("lmdistill run: error: cannot load the model")
    assert "'nobody/no-such-model'" in err.splitlines()[-1]


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="invalid YAML"):
        main(["run", TINY, "loss.alpha=[0.5", "--debug"])


def test_resume_into_a_directory_without_a_run_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "empty", tmp_path / "typo"):
        err = _one_line_error(["run", TINY, f"output_dir={out}", "--resume"], capsys)
        assert f"nothing to resume in {out}" in err
    assert not (tmp_path / "typo").exists()


def test_flags_and_overrides_in_any_order() -> None:
    parser = build_parser()
    args = parse_args(parser, ["run", TINY, "--resume", "a.b=1", "c=2"])
    assert args.resume and args.overrides == ["a.b=1", "c=2"]
    args = parse_args(parser, ["run", "--resume", TINY, "a.b=1"])
    assert args.resume and args.config == TINY and args.overrides == ["a.b=1"]
    with pytest.raises(SystemExit):
        parse_args(parser, ["run", TINY, "--resume", "--nope"])
