"""The served-teacher client's mechanics against a scripted HTTP server on 127.0.0.1: retries
and backoff, errors that name the problem, token-string mapping and the text-only fallback.
(The real server, llama.cpp's, is exercised in test_served.py.)"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch

from lmdistill.config import GenerateConfig, TeacherConfig
from lmdistill.data import Example, tokenize_examples
from lmdistill.teachers.cache import CacheSpec, TeacherCache, tokenizer_identity, write_rows
from lmdistill.teachers.generate import read_finished
from lmdistill.teachers.served import (
    TokenMapper,
    UnmappableTokenError,
    rows_scorer,
    served_generate,
)
from lmdistill.teachers.served_client import (
    CrossOriginRedirectError,
    ServedClient,
    ServedTeacherError,
)


class Script:
    """What the fake server answers: a queue of (status, body) for chat requests."""

    def __init__(self) -> None:
        self.chat: list[tuple[int, Any]] = []
        self.default: tuple[int, Any] | None = None
        self.seen: list[dict[str, Any]] = []
        self.key = "sk-test-123"
        # vLLM's token-id scoring; None: such requests are refused with this status
        # (llama-cpp-python answers 500, a validation error)
        self.prompt_logprobs: Callable[[dict[str, Any]], Any] | None = None
        self.refusal = 400


def _handler(script: Script) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _authorised(self) -> bool:
            if self.headers.get("Authorization") != f"Bearer {script.key}":
                self._send(401, {"error": "bad key"})
                return False
            return True

        def do_GET(self) -> None:
            if self._authorised():
                self._send(200, {"data": [{"id": "fake-model"}]})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            script.seen.append({"headers": dict(self.headers), "body": body})
            if not self._authorised():
                return
            if "prompt_logprobs" in body:
                if script.prompt_logprobs is None:
                    self._send(script.refusal, {"error": "prompt should be a valid string"})
                else:
                    self._send(200, script.prompt_logprobs(body))
                return
            status, answer = script.chat.pop(0) if script.chat else script.default  # type: ignore[misc]
            self._send(status, answer, {"Retry-After": "0"} if status == 429 else None)

    return Handler


@pytest.fixture
def fake() -> Iterator[tuple[Script, str]]:
    script = Script()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(script))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield script, f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def spec(url: str, **changes: Any) -> TeacherConfig:
    values: dict[str, Any] = {
        "kind": "served",
        "base_url": url,
        "model": "fake-model",
        "api_key_env": "LMDISTILL_TEST_KEY",
        "max_retries": 3,
        "max_concurrency": 2,
        "top_logprobs": 3,
        **changes,
    }
    return TeacherConfig(**values)


def answer(tokenizer: Any, text: str, *, strings: list[str] | None = None) -> dict[str, Any]:
    """A chat completion whose logprobs spell `text` token by token (as llama.cpp renders)."""
    mapper = TokenMapper(tokenizer)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    strings = strings or [mapper.bytes[i].decode("utf-8", "ignore") for i in ids]
    content = []
    for index, token in zip(ids, strings, strict=True):
        alternatives = [token, *(t for t in ("a", "b", "c") if t != token)][:3]
        content.append(
            {
                "token": token,
                "logprob": -0.1,
                "top_logprobs": [
                    {"token": t, "logprob": -0.1 if t == token else -3.0} for t in alternatives
                ],
            }
        )
        del index
    return {
        "choices": [
            {
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
                "logprobs": {"content": content},
            }
        ],
        "usage": {"prompt_tokens": 7, "completion_tokens": len(ids)},
    }


def prompts(n: int) -> list[Example]:
    return [Example(f"p{i}", ({"role": "user", "content": f"q{i}"},), None) for i in range(n)]


def test_retries_on_429_and_5xx_then_succeeds_and_counts(
    fake: tuple[Script, str], tiny_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    script, url = fake
    monkeypatch.setenv("LMDISTILL_TEST_KEY", script.key)
    script.chat = [(429, {"error": "slow down"}), (503, {"error": "busy"})]
    script.default = (200, answer(tiny_tokenizer, "12 apples."))
    client = ServedClient(spec(url), backoff_s=0.01)
    choice = client.chat(
        [{"role": "user", "content": "q"}], GenerateConfig(), top_logprobs=3, seed=1
    )
    assert choice["message"]["content"] == "12 apples."
    assert client.stats.requests == 3 and client.stats.retries == 2
    assert client.stats.completion_tokens == len(tiny_tokenizer("12 apples.")["input_ids"])
    body = script.seen[-1]["body"]
    assert body["logprobs"] is True and body["top_logprobs"] == 3 and body["model"] == "fake-model"


def test_gives_up_after_max_retries_with_the_last_error(
    fake: tuple[Script, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    script, url = fake
    monkeypatch.setenv("LMDISTILL_TEST_KEY", script.key)
    script.default = (500, {"error": "boom"})
    client = ServedClient(spec(url, max_retries=2), backoff_s=0.01)
    with pytest.raises(ServedTeacherError, match=r"after 3 tries: HTTP 500"):
        client.chat([{"role": "user", "content": "q"}], GenerateConfig(), top_logprobs=3, seed=1)
    assert client.stats.requests == 3


def test_a_wrong_key_is_named_without_showing_it(
    fake: tuple[Script, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, url = fake
    monkeypatch.setenv("LMDISTILL_TEST_KEY", "sk-wrong-999")
    client = ServedClient(spec(url), backoff_s=0.01)
    with pytest.raises(ServedTeacherError, match=r"HTTP 401.*rejected the API key") as error:
        client.check_model()
    assert "sk-wrong-999" not in str(error.value) and "LMDISTILL_TEST_KEY" in str(error.value)
    assert client.stats.requests == 1  # a rejected key is not retried
    monkeypatch.delenv("LMDISTILL_TEST_KEY")
    with pytest.raises(ServedTeacherError, match=r"\$LMDISTILL_TEST_KEY, which is not set"):
        ServedClient(spec(url))


def test_an_unknown_model_and_an_unreachable_server_are_named(
    fake: tuple[Script, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    script, url = fake
    monkeypatch.setenv("LMDISTILL_TEST_KEY", script.key)
    with pytest.raises(ServedTeacherError, match=r"does not serve model 'gpt-9'.*fake-model"):
        ServedClient(spec(url, model="gpt-9")).check_model()
    closed = "http://127.0.0.1:9/v1"  # the discard port: nothing listens there
    client = ServedClient(spec(closed, max_retries=1), backoff_s=0.01)
    with pytest.raises(ServedTeacherError, match=r"cannot get an answer from .* after 2 tries"):
        client.check_model()


class Recorder:
    """A server that records every request it gets and, for paths under /moved, answers
    `status` with a Location under `to` instead (after the /moved prefix)."""

    def __init__(self, key: str, status: int = 302, to: str = "") -> None:
        self.key, self.status, self.to = key, status, to
        self.seen: list[dict[str, Any]] = []


def _recording_handler(recorder: Recorder) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length).decode("utf-8", "replace")
            recorder.seen.append(
                {"request": self.requestline, "headers": dict(self.headers), "body": body}
            )
            if self.path.startswith("/moved/"):
                status, headers = recorder.status, {"Location": recorder.to + self.path[6:]}
                data = b"{}"
            elif self.headers.get("Authorization") != f"Bearer {recorder.key}":
                status, headers, data = 401, {}, b"{}"
            else:
                status, headers = 200, {}
                data = json.dumps({"data": [{"id": "fake-model"}], "choices": [{}]}).encode()
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _answer

    return Handler


@contextlib.contextmanager
def recording_server(recorder: Recorder) -> Iterator[str]:
    """`recorder` served on 127.0.0.1 (a free port) in a thread; yields its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _recording_handler(recorder))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_to_another_origin_is_refused_and_never_gets_the_key(
    status: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = "sk-secret-redirect-42"
    monkeypatch.setenv("LMDISTILL_TEST_KEY", key)
    elsewhere, server = Recorder(key), Recorder(key, status)
    with recording_server(elsewhere) as elsewhere_url, recording_server(server) as url:
        server.to = elsewhere_url  # same host, another port: another origin
        client = ServedClient(spec(url + "/moved/v1", max_retries=3), backoff_s=0.01)
        with pytest.raises(CrossOriginRedirectError) as get_error:
            client.check_model()
        with pytest.raises(CrossOriginRedirectError) as post_error:
            client.chat(
                [{"role": "user", "content": "q"}], GenerateConfig(), top_logprobs=3, seed=1
            )
    assert elsewhere.seen == []  # not one request, so neither the key nor anything else
    assert len(server.seen) == 2 and client.stats.requests == 2  # refused, never retried
    assert all(s["headers"]["Authorization"] == f"Bearer {key}" for s in server.seen)
    for error in (get_error.value, post_error.value):
        message = str(error)
        assert key not in message and "\n" not in message
        assert f"origin {url}" in message and f"another origin, {elsewhere_url}" in message


def test_a_redirect_within_the_same_origin_is_followed_with_the_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = "sk-secret-redirect-42"
    monkeypatch.setenv("LMDISTILL_TEST_KEY", key)
    server = Recorder(key, 302)
    with recording_server(server) as url:
        server.to = url  # /moved/v1/models -> /v1/models on the same server
        client = ServedClient(spec(url + "/moved/v1"), backoff_s=0.01)
        assert client.check_model() == ["fake-model"]
    assert [s["request"].split()[1] for s in server.seen] == ["/moved/v1/models", "/v1/models"]
    assert server.seen[1]["headers"]["Authorization"] == f"Bearer {key}"


def test_generate_keeps_the_servers_token_ids_and_builds_a_masked_cache(
    fake: tuple[Script, str], tiny_tokenizer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script, url = fake
    monkeypatch.setenv("LMDISTILL_TEST_KEY", script.key)
    script.default = (200, answer(tiny_tokenizer, "It is 42."))
    client = ServedClient(spec(url), backoff_s=0.01)
    out = tmp_path / "gen" / "rows.jsonl"
    answered, report = served_generate(
        client, tiny_tokenizer, prompts(5), out, GenerateConfig(), spec(url), teacher_id="fake"
    )
    assert report.generated == 5 and len(read_finished(out)) == 5
    ids = tuple(tiny_tokenizer("It is 42.", add_special_tokens=False)["input_ids"])
    assert all(e.response == "It is 42." and e.response_ids == ids for e in answered)
    assert "sk-test-123" not in out.read_text()  # the key is never written

    # Every generated token gets the top-k; the template's closing tokens get no signal.
    tokenized, _ = tokenize_examples(answered, tiny_tokenizer, max_length=128)
    cache_spec = CacheSpec(
        teacher="fake",
        data_hash="d",
        k=3,
        temperature=1.0,
        vocab_size=len(tiny_tokenizer),
        shard_size=4,
        **tokenizer_identity(tiny_tokenizer),
    )
    write_rows(rows_scorer(read_finished(out), 3), tokenized, tmp_path / "c", cache_spec)
    signal = TeacherCache(tmp_path / "c", cache_spec).signal(0)
    closing = (
        len(tokenized[0].labels)
        - len(ids)
        - len(tokenized[0].input_ids)
        + len([y for y in tokenized[0].labels if y != -100])
    )
    assert signal.present is not None
    assert signal.present.tolist() == [True] * len(ids) + [False] * closing
    assert signal.token_ids[: len(ids), 0].tolist() == list(ids)  # chosen is the top-1 here
    top = signal.logprobs[: len(ids), 0]
    torch.testing.assert_close(top, torch.full_like(top, -0.1), atol=0.01, rtol=0)


def test_an_unmappable_token_stops_the_run_or_falls_back_to_text(
    fake: tuple[Script, str], tiny_tokenizer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script, url = fake
    monkeypatch.setenv("LMDISTILL_TEST_KEY", script.key)
    n = len(tiny_tokenizer("Hi", add_special_tokens=False)["input_ids"])
    script.default = (200, answer(tiny_tokenizer, "Hi", strings=["\u00bfH?"] + ["i"] * (n - 1)))
    with pytest.raises(UnmappableTokenError, match=r"prompt 'p0'.*on_unmappable=text_only"):
        served_generate(
            ServedClient(spec(url, max_concurrency=1), backoff_s=0.01),
            tiny_tokenizer,
            prompts(1),
            tmp_path / "a.jsonl",
            GenerateConfig(),
            spec(url),
            teacher_id="fake",
        )
    assert not read_finished(tmp_path / "a.jsonl")  # nothing half-written
    lenient = spec(url, on_unmappable="text_only")
    client = ServedClient(lenient, backoff_s=0.01)
    answered, _ = served_generate(
        client,
        tiny_tokenizer,
        prompts(2),
        tmp_path / "b.jsonl",
        GenerateConfig(),
        lenient,
        teacher_id="fake",
    )
    assert client.stats.text_only_rows == 2
    assert all(e.response == "Hi" and e.response_ids is None for e in answered)


# ---------------------------------------------------------------------------------------------
# Scoring text the server did not write (on-policy): the echo's alignment and its refusals


def echo_answer(
    tokenizer: Any, text: str, *, shift: int, drop_first: bool = False
) -> dict[str, Any]:
    """A `/completions` echo of `text`: token i's own log-prob -0.5 and, as its top-1, the
    string of token i + shift (shift 1: each entry holds the distribution after its token,
    as llama-cpp-python's server does for a prompt without BOS)."""
    mapper = TokenMapper(tokenizer)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][1 if drop_first else 0 :]
    strings = [mapper.bytes[i].decode("utf-8", "ignore") for i in ids]
    tops: list[dict[str, float] | None] = []
    for m in range(len(ids)):
        nxt = m + shift
        tops.append({strings[nxt]: -0.5, "zzq": -4.0} if nxt < len(ids) else {"zzq": -4.0})
    tops[0] = None
    return {
        "choices": [
            {
                "text": text,
                "logprobs": {
                    "tokens": strings,
                    "text_offset": list(range(len(ids))),
                    "token_logprobs": [None] + [-0.5] * (len(ids) - 1),
                    "top_logprobs": tops,
                },
            }
        ]
    }


def test_the_aligner_pairs_tokens_cut_alike_and_skips_the_rest(tiny_tokenizer: Any) -> None:
    from lmdistill.teachers.served_scoring import Aligner

    aligner = Aligner(tiny_tokenizer, TokenMapper(tiny_tokenizer))
    ids = tiny_tokenizer("The cat sat on the mat.", add_special_tokens=False)["input_ids"]
    ours = [aligner.render(i) for i in ids]  # one byte per token
    assert aligner.match(ids, ours) == {i: i for i in range(1, len(ids))}
    # The server writes "ca" as one token where the student wrote "c", "a": neither is paired,
    # nor the "t" after them (its context is cut differently); the rest pairs, one step back.
    at = ours.index("c")
    theirs = [*ours[:at], "ca", *ours[at + 2 :]]
    matched = aligner.match(ids, theirs)
    assert {at, at + 1, at + 2}.isdisjoint(matched)
    assert matched[at + 3] == at + 2 and matched[at - 1] == at - 1
    # A leading special token the server drops from its echo (llama.cpp drops a BOS) moves
    # every pair by one.
    bos = tiny_tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert aligner.match([bos, *ids], ours) == {i: i - 1 for i in range(2, len(ids) + 1)}


def test_a_server_that_echoes_no_logprobs_cannot_score_text(
    fake: tuple[Script, str], tiny_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lmdistill.teachers.served_scoring import probe_scoring

    script, url = fake
    monkeypatch.setenv("LMDISTILL_TEST_KEY", script.key)
    script.default = (200, {"choices": [{"text": " and so on", "logprobs": None}]})
    client = ServedClient(spec(url), backoff_s=0.01)
    with pytest.raises(ServedTeacherError, match="cannot score text it did not write"):
        probe_scoring(client, tiny_tokenizer, None, top_logprobs=3, tolerance=0.25,
                      prompts=["Once upon a time"])  # fmt: skip


@pytest.mark.parametrize("shift", [0, 1])
@pytest.mark.parametrize("refusal", [400, 500])
def test_the_probe_finds_the_echo_shift_and_the_scorer_corrects_it(
    fake: tuple[Script, str],
    tiny_tokenizer: Any,
    monkeypatch: pytest.MonkeyPatch,
    shift: int,
    refusal: int,
) -> None:
    """A server that refuses token-id prompts (400, or 500 as llama-cpp-python does: asked
    once, not retried) is scored through the echo."""
    from lmdistill.config import LossConfig
    from lmdistill.data import IGNORE_INDEX, TokenizedExample, collate
    from lmdistill.teachers.served_scoring import ServedScorer, probe_scoring

    script, url = fake
    monkeypatch.setenv("LMDISTILL_TEST_KEY", script.key)
    prompt, written = "Once upon a time", " there was a cat."
    script.chat = [(200, {"choices": [{"text": written}]}),
                   (200, echo_answer(tiny_tokenizer, prompt + written, shift=shift))]  # fmt: skip
    script.refusal = refusal
    client = ServedClient(spec(url), backoff_s=0.01)
    found = probe_scoring(client, tiny_tokenizer, None, top_logprobs=3, tolerance=0.25,
                          prompts=[prompt])  # fmt: skip
    assert found["method"] == "echo"
    assert found["shift"] == shift and found["greedy_top1"][str(shift)] == found["positions"]
    assert sum("prompt_logprobs" in r["body"] for r in script.seen) == 1  # one try

    # Scored under the probe's shift, each response token's log-prob is the one the server
    # reported for it (-0.5), never the neighbour's.
    text = "A cat sat on the mat."
    script.chat = []
    script.default = (200, echo_answer(tiny_tokenizer, text, shift=shift))
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    item = TokenizedExample("x", ids, [IGNORE_INDEX] * 2 + ids[2:], False)
    scorer = ServedScorer(client, tiny_tokenizer, 3, shift=shift)
    signal = scorer.score(collate([item], 0), [0], LossConfig()).sparse
    assert signal is not None and signal.present is not None
    rows = len(ids) - 2
    assert signal.token_ids.shape[0] == rows
    for row in range(rows):
        target = ids[2 + row]
        assert bool(signal.present[row])
        column = signal.token_ids[row].tolist().index(target)
        assert float(signal.logprobs[row, column]) == pytest.approx(-0.5)
    assert scorer.stats.unscored == 0 and scorer.stats.positions == rows


def vllm_scores(body: dict[str, Any], shift: int = 0) -> dict[str, Any]:
    """vLLM's answer to a token-id prompt with `prompt_logprobs`: entry i holds token i + shift
    at -0.5 (its top-1) and a distractor; shift 0 is vLLM's convention."""
    ids = body["prompt"]
    entries: list[dict[str, Any] | None] = [None]
    for i in range(1, len(ids)):
        top = ids[min(i + shift, len(ids) - 1)]
        entry = {str(top): {"logprob": -0.5, "rank": 1, "decoded_token": "x"}}
        entry.setdefault(str(ids[i]), {"logprob": -2.0, "rank": 2, "decoded_token": "y"})
        entry["7"] = {"logprob": -4.0, "rank": 3, "decoded_token": "z"}
        entries.append(entry)
    return {"choices": [{"text": "!", "prompt_logprobs": entries}],
            "usage": {"prompt_tokens": len(ids)}}  # fmt: skip


def test_the_probe_prefers_vllms_prompt_logprobs_and_refuses_them_misaligned(
    fake: tuple[Script, str], tiny_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lmdistill.teachers.served_scoring import probe_scoring

    script, url = fake
    monkeypatch.setenv("LMDISTILL_TEST_KEY", script.key)
    script.default = (200, {"choices": [{"text": " there was a cat."}]})
    script.prompt_logprobs = vllm_scores
    client = ServedClient(spec(url), backoff_s=0.01)
    found = probe_scoring(client, tiny_tokenizer, None, top_logprobs=3, tolerance=0.25,
                          prompts=["Once upon a time"])  # fmt: skip
    assert found["method"] == "prompt_logprobs" and found["shift"] == 0
    assert found["greedy_top1"]["0"] == found["positions"] > 0
    assert not any(r["body"].get("echo") for r in script.seen)  # echo never needed

    script.prompt_logprobs = lambda body: vllm_scores(body, shift=1)
    with pytest.raises(ServedTeacherError, match="do not rank its own greedy tokens first"):
        probe_scoring(client, tiny_tokenizer, None, top_logprobs=3, tolerance=0.25,
                      prompts=["Once upon a time"])  # fmt: skip


def test_prompt_logprobs_scoring_equals_the_teachers_own_distribution(
    fake: tuple[Script, str],
    tiny_tokenizer: Any,
    tiny_teacher: torch.nn.Module,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A fake vLLM backed by the tiny teacher: each response token's row holds the teacher's
    own top-k (entry i predicts token i, from the logits at i - 1) and the token itself."""
    from lmdistill.config import LossConfig
    from lmdistill.data import IGNORE_INDEX, TokenizedExample, collate
    from lmdistill.teachers.served_scoring import ServedScorer

    script, url = fake
    monkeypatch.setenv("LMDISTILL_TEST_KEY", script.key)
    k = 3

    def teacher_scores(body: dict[str, Any]) -> dict[str, Any]:
        ids = body["prompt"]
        with torch.no_grad():
            log_p = torch.log_softmax(tiny_teacher(input_ids=torch.tensor([ids])).logits[0], -1)
        entries: list[dict[str, float] | None] = [None]
        for i in range(1, len(ids)):
            top = log_p[i - 1].topk(body["prompt_logprobs"]).indices.tolist()
            entries.append({str(t): float(log_p[i - 1, t]) for t in {*top, ids[i]}})
        return {"choices": [{"text": "", "prompt_logprobs": entries}]}

    script.prompt_logprobs = teacher_scores
    ids = tiny_tokenizer("A cat sat on the mat.", add_special_tokens=False)["input_ids"]
    item = TokenizedExample("x", ids, [IGNORE_INDEX] * 3 + ids[3:], False)
    client = ServedClient(spec(url), backoff_s=0.01)
    scorer = ServedScorer(client, tiny_tokenizer, k, shift=0, method="prompt_logprobs")
    signal = scorer.score(collate([item], 0), [0], LossConfig()).sparse
    assert signal is not None and signal.present is not None and bool(signal.present.all())
    with torch.no_grad():
        log_p = torch.log_softmax(tiny_teacher(input_ids=torch.tensor([ids])).logits[0], -1)
    for row, position in enumerate(range(3, len(ids))):
        got = dict(zip(signal.token_ids[row].tolist(), signal.logprobs[row].tolist(), strict=True))
        expected = {*log_p[position - 1].topk(k).indices.tolist(), ids[position]}
        for token in expected:
            assert got[token] == pytest.approx(float(log_p[position - 1, token]), abs=1e-5)
    assert scorer.stats.unscored == 0 and scorer.stats.positions == len(ids) - 3


def test_positions_the_server_cannot_score_are_masked_out_of_the_loss(
    fake: tuple[Script, str], tiny_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lmdistill.config import LossConfig
    from lmdistill.data import IGNORE_INDEX, TokenizedExample, collate
    from lmdistill.teachers.served_scoring import ServedScorer

    script, url = fake
    monkeypatch.setenv("LMDISTILL_TEST_KEY", script.key)
    text = "A cat sat on the mat."
    echoed = echo_answer(tiny_tokenizer, text, shift=0)
    logprobs = echoed["choices"][0]["logprobs"]
    cut = logprobs["tokens"].index("c")
    # The server writes "ca" as one token.
    for key, merged in (("tokens", ["ca"]), ("token_logprobs", [-0.5]),
                        ("top_logprobs", [{"zzq": -4.0}])):  # fmt: skip
        logprobs[key][cut : cut + 2] = merged
    script.default = (200, echoed)
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    item = TokenizedExample("x", ids, [IGNORE_INDEX, *ids[1:]], False)
    scorer = ServedScorer(ServedClient(spec(url), backoff_s=0.01), tiny_tokenizer, 3, shift=0)
    (masked,) = scorer.mask_unscored([item])
    unscored = [p for p in range(1, len(ids)) if masked.labels[p] == IGNORE_INDEX]
    assert unscored == [cut, cut + 1, cut + 2]  # "c", "a" and the "t" after them
    assert scorer.stats.unscored == 3 and scorer.stats.positions == len(ids) - 1
    # The masked sequence is scored from what was already fetched: no second request.
    requests = len(script.seen)
    signal = scorer.score(collate([masked], 0), [0], LossConfig()).sparse
    assert len(script.seen) == requests and signal is not None and signal.present is not None
    assert signal.token_ids.shape[0] == len(ids) - 1 - 3 and bool(signal.present.all())
    assert not scorer._memo  # nothing kept once scored (a long run would grow without bound)


# ---------------------------------------------------------------------------------------------
# A black-box teacher: text only (a closed API without log-probs)

TEXT_ONLY = (
    "teacher.kind=text",
    "teacher.model=fake-model",
    "teacher.api_key_env=LMDISTILL_TEST_KEY",
    "student.init=path",
    "student.path=tiny-llama",
    "loss.alpha=1.0",
    "eval.fidelity=false",
    "eval.task_teacher=false",
    "baseline=false",
)


def test_a_text_only_teacher_trains_the_student_on_its_text(
    fake: tuple[Script, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from conftest import tiny_run_config

    from lmdistill.pipeline import run

    script, url = fake
    monkeypatch.setenv("LMDISTILL_TEST_KEY", script.key)
    # What a closed API answers: text, no log-probs.
    script.default = (200, {"choices": [{"message": {"role": "assistant",
                                                     "content": "It is 42. #### 42"},
                                         "finish_reason": "stop"}]})  # fmt: skip
    config = tiny_run_config(tmp_path, *TEXT_ONLY, f"teacher.base_url={url}")
    metrics = run(config)
    asked = [seen["body"] for seen in script.seen]
    assert asked and all("logprobs" not in body and "top_logprobs" not in body for body in asked)
    assert metrics.models["teacher_signal"] == "text only"
    assert metrics.models["teacher_parameters"] is None
    rows = [json.loads(line) for line in (tmp_path / "run" / "generate" /
                                          "teacher_responses.jsonl").open()]  # fmt: skip
    assert rows and all(r["signal"] is None and r["response"] == "It is 42. #### 42" for r in rows)
    history = metrics.kd.history
    assert metrics.kd.steps == config.train.max_steps and history[-1]["loss"] < history[0]["loss"]
    assert (tmp_path / "run" / "student" / "config.json").is_file()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("loss.alpha=0.5", r"loss\.alpha: .*text only|loss\.alpha: .*no log-probs"),
        ("on_policy.fraction=0.5", r"on_policy\.fraction: .*text teacher cannot score new text"),
        ("eval.fidelity=true", r"eval\.fidelity"),
        ("student.init=layers_from_teacher", r"student\.init: .*no teacher weights"),
        ("baseline=true", r"baseline"),
        ("loss.hidden_weight=0.5", r"hidden_weight"),
    ],
)
def test_what_a_text_only_teacher_cannot_do_is_refused_when_the_config_loads(
    tmp_path: Path, override: str, message: str
) -> None:
    from conftest import tiny_run_config

    from lmdistill.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        tiny_run_config(tmp_path, *TEXT_ONLY, "teacher.base_url=http://127.0.0.1:9/v1", override)


def test_cache_and_eval_refuse_a_text_only_teacher(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from conftest import TINY_OVERRIDES

    from lmdistill.cli import main

    args = [str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"),
            f"output_dir={tmp_path / 'run'}", *TINY_OVERRIDES, *TEXT_ONLY,
            "teacher.base_url=http://127.0.0.1:9/v1"]  # fmt: skip
    for command in (["cache", *args], ["eval", *args, "--student", "tiny-llama"]):
        assert main(command) != 0
        err = capsys.readouterr().err
        assert "gives text only" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
