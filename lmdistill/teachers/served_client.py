"""The HTTP side of a served teacher: a minimal OpenAI-compatible client (stdlib only) with
retries, exponential backoff on 429, 5xx and lost connections, timeouts and request counts.

The API key is read from the environment variable named in the config and only ever sent in
the Authorization header, and only to teacher.base_url's origin (a redirect elsewhere is
refused): never logged, saved or raised.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from http.client import HTTPMessage
from typing import IO, Any

from lmdistill.config import GenerateConfig, TeacherConfig

RETRYABLE = {408, 409, 425, 429, 500, 502, 503, 504}


class ServedTeacherError(RuntimeError):
    """The server cannot be used: unreachable, key rejected, unknown model, bad answer."""


class RequestRefusedError(ServedTeacherError):
    """The server answered a well-formed request with a 4xx it will not retry (400, 422...):
    it does not support what was asked (an unknown field, a token-id prompt)."""


class CrossOriginRedirectError(ServedTeacherError):
    """The server redirected to another origin; following would hand that origin the API key."""


@dataclass
class ServedStats:
    """Per-run request and token counts, for the report."""

    requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    dropped_alternatives: int = 0  # top-k strings that did not map to one id (now in the tail)
    text_only_rows: int = 0  # rows kept without a token-level signal (on_unmappable=text_only)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self.lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)

    def as_dict(self) -> dict[str, int]:
        return {k: v for k, v in self.__dict__.items() if k != "lock"}


class ServedClient:
    """Minimal OpenAI-compatible client (stdlib only): retries, backoff, timeouts, counts."""

    def __init__(self, spec: TeacherConfig, *, backoff_s: float = 0.5) -> None:
        if not spec.base_url or not spec.model:
            raise ServedTeacherError("teacher.base_url and teacher.model must be set")
        self.base_url = spec.base_url.rstrip("/")
        self.model = spec.model
        self.timeout_s = spec.timeout_s
        self.max_retries = spec.max_retries
        self.backoff_s = backoff_s
        self.key_env = spec.api_key_env
        self._key: str | None = None
        if spec.api_key_env:
            self._key = os.environ.get(spec.api_key_env)
            if not self._key:
                raise ServedTeacherError(
                    f"teacher.api_key_env names ${spec.api_key_env}, which is not set"
                )
        self.extra_body = dict(spec.extra_body or {})
        self.stats = ServedStats()
        self._opener = urllib.request.build_opener(_SameOriginRedirects(_origin(self.base_url)))

    def check_model(self) -> list[str]:
        """Fail early, and clearly, on an unreachable server, a bad key or an unknown model."""
        served = [m.get("id") for m in self._request("GET", "/models").get("data", [])]
        if self.model not in served:
            raise ServedTeacherError(
                f"{self.base_url} does not serve model {self.model!r}; it serves {served}"
            )
        return served

    def chat(
        self,
        messages: list[dict[str, str]],
        config: GenerateConfig,
        *,
        top_logprobs: int | None,
        seed: int,
    ) -> dict[str, Any]:
        """One chat completion; with `top_logprobs` None no log-probs are asked for (a
        text-only teacher)."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": config.max_new_tokens,
            "temperature": config.temperature if config.do_sample else 0.0,
            "top_p": config.top_p if config.do_sample else 1.0,
            "seed": seed,
            **({"logprobs": True, "top_logprobs": top_logprobs} if top_logprobs else {}),
            **self.extra_body,
        }
        answer = self._request("POST", "/chat/completions", body)
        usage = answer.get("usage") or {}
        self.stats.add(
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
        )
        try:
            return dict(answer["choices"][0])
        except (KeyError, IndexError, TypeError) as error:
            detail = json.dumps(answer)[:300]
            raise ServedTeacherError(f"{self.base_url}: malformed answer {detail}") from error

    def echo(self, prompt: str, *, top_logprobs: int) -> dict[str, Any]:
        """The server's log-probs of `prompt` itself (OpenAI-style `/completions` with
        `echo: true`, `logprobs`, one greedy token generated): the choice's `logprobs`
        (`tokens`, `text_offset`, `token_logprobs`, `top_logprobs`)."""
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": prompt,
            "echo": True,
            "logprobs": top_logprobs,
            "max_tokens": 1,
            "temperature": 0.0,
            **self.extra_body,
        }
        answer = self._request("POST", "/completions", body)
        usage = answer.get("usage") or {}
        self.stats.add(prompt_tokens=int(usage.get("prompt_tokens", 0)))
        try:
            logprobs = answer["choices"][0]["logprobs"]
        except (KeyError, IndexError, TypeError) as error:
            detail = json.dumps(answer)[:300]
            raise ServedTeacherError(f"{self.base_url}: malformed answer {detail}") from error
        if not isinstance(logprobs, dict) or not logprobs.get("tokens"):
            raise ServedTeacherError(
                f"{self.base_url}/completions returned no log-probs for the echoed prompt "
                "(`echo: true` with `logprobs`): this server cannot score text it did not "
                "write, so it cannot be an on-policy teacher"
            )
        return logprobs

    def prompt_logprobs(
        self, ids: list[int], *, top_logprobs: int, probing: bool = False
    ) -> list[dict[int, float] | None] | None:
        """vLLM's scoring of a token-id prompt (`prompt_logprobs` on `/completions`): per
        position, {token id: log-prob} of the distribution that predicts it (its own token
        always included, the first position None); None when the server does not support it
        (refuses the request, or answers without the field). `probing`: one try, and any
        error means "not supported" (llama-cpp-python answers a token-id prompt with HTTP
        500, a validation error); the echo is then used, which every server here supports."""
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": ids,
            "max_tokens": 1,
            "temperature": 0.0,
            "prompt_logprobs": top_logprobs,
            **self.extra_body,
        }
        try:
            answer = self._request("POST", "/completions", body, retries=0 if probing else None)
        except ServedTeacherError as error:
            if probing or isinstance(error, RequestRefusedError):
                return None
            raise
        try:
            entries = answer["choices"][0].get("prompt_logprobs")
        except (KeyError, IndexError, TypeError, AttributeError):
            return None
        if not isinstance(entries, list) or len(entries) != len(ids):
            return None
        usage = answer.get("usage") or {}
        self.stats.add(prompt_tokens=int(usage.get("prompt_tokens", 0)))
        try:
            return [None if e is None else _id_logprobs(e) for e in entries]
        except (TypeError, ValueError, AttributeError) as error:
            detail = json.dumps(entries[:3])[:300]
            raise ServedTeacherError(
                f"{self.base_url}: malformed prompt_logprobs {detail}"
            ) from error

    def complete(self, prompt: str, *, max_tokens: int) -> str:
        """A greedy continuation of `prompt` through `/completions` (the probe's text)."""
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            **self.extra_body,
        }
        answer = self._request("POST", "/completions", body)
        try:
            return str(answer["choices"][0]["text"])
        except (KeyError, IndexError, TypeError) as error:
            detail = json.dumps(answer)[:300]
            raise ServedTeacherError(f"{self.base_url}: malformed answer {detail}") from error

    def _request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        retries: int | None = None,
    ) -> Any:
        url = self.base_url + path
        max_retries = self.max_retries if retries is None else retries
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        data = None if body is None else json.dumps(body).encode()
        last = ""
        for attempt in range(max_retries + 1):
            if attempt:
                self.stats.add(retries=1)
            self.stats.add(requests=1)
            request = urllib.request.Request(url, data=data, headers=headers, method=method)
            retry_after = None
            try:
                with self._opener.open(request, timeout=self.timeout_s) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as error:
                detail = _error_text(error)
                if error.code in (401, 403):
                    where = f" from ${self.key_env}" if self.key_env else " (none was sent)"
                    raise ServedTeacherError(
                        f"{url}: HTTP {error.code}, the server rejected the API key{where}"
                    ) from None
                if error.code == 404:
                    raise ServedTeacherError(
                        f"{url}: HTTP 404 ({detail}); check teacher.base_url (usually ends in "
                        f"/v1) and teacher.model={self.model!r}"
                    ) from None
                if error.code not in RETRYABLE:
                    refused = RequestRefusedError if error.code < 500 else ServedTeacherError
                    raise refused(f"{url}: HTTP {error.code}: {detail}") from None
                last = f"HTTP {error.code}: {detail}"
                retry_after = _retry_after(error)
            # A refused redirect (CrossOriginRedirectError) is no OSError: it is raised at once,
            # never retried as if it were a lost connection.
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as error:
                reason = getattr(error, "reason", error)
                last = f"{type(reason).__name__}: {reason}"
            if attempt < max_retries:
                delay = min(self.backoff_s * 2**attempt, 30.0) * (0.5 + random.random() / 2)
                time.sleep(retry_after if retry_after is not None else delay)
        raise ServedTeacherError(
            f"cannot get an answer from {url} after {max_retries + 1} tries: {last}"
        )


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects only within teacher.base_url's origin (scheme, host, port).

    urllib's default handler copies every request header, Authorization included, onto a
    redirect to any host or port, so a 302 from the server (or from whoever answers at its
    address) would hand the API key to another origin."""

    def __init__(self, origin: str) -> None:
        super().__init__()
        self.origin = origin

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        target = _origin(newurl)
        if target != self.origin:
            fp.close()
            raise CrossOriginRedirectError(
                f"teacher.base_url's origin {self.origin} answered HTTP {code}, a redirect to "
                f"another origin, {target}; not followed, so the API key is not sent there "
                "(set teacher.base_url to the server that answers)"
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _origin(url: str) -> str:
    """`scheme://host:port` of `url`, the default port made explicit (http://h == http://h:80)."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port or {"http": 80, "https": 443}.get(scheme)
    except ValueError:  # a malformed port: equal to no real origin
        port = None
    return f"{scheme}://{(parts.hostname or '').lower()}:{port}"


def _id_logprobs(entry: dict[str, Any]) -> dict[int, float]:
    """vLLM writes {"id": {"logprob": x, "rank": r, "decoded_token": s}}; accept {"id": x}."""
    return {
        int(index): float(value["logprob"] if isinstance(value, dict) else value)
        for index, value in entry.items()
    }


def _error_text(error: urllib.error.HTTPError) -> str:
    try:
        return error.read().decode("utf-8", "replace")[:300]
    except OSError:
        return str(error.reason)


def _retry_after(error: urllib.error.HTTPError) -> float | None:
    value = error.headers.get("Retry-After") if error.headers else None
    try:
        return min(float(value), 60.0) if value is not None else None
    except ValueError:
        return None
