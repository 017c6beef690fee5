"""A small client for OpenAI-compatible chat-completions endpoints (stdlib only).

Used by the API judge, and meant for an OpenAI-compatible generation backend. Requests run on a bounded
thread pool; 429, 5xx, 408, connection errors and timeouts are retried with exponential back-off and
jitter (honouring ``Retry-After``); other 4xx answers fail at once. Every failure is one line that names
the endpoint and the fix. The API key travels only in the ``Authorization`` header and is scrubbed from
every message, repr and id, server error bodies included.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import os
import queue
import random
import re
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from ..config import DEFAULT_KEY_ENV, normalise_base_url
from ..errors import ConfigError, SftSafetyError, one_line
from ..sanitize import redact, register_secret

DEFAULT_BASE_URL = "https://api.openai.com/v1"
USER_AGENT = "pytest-sftsafety"
MESSAGE_CHARS = 200  # how much of a server's error message a one-line error keeps
MAX_BACKOFF_S = 30.0
MAX_RETRY_AFTER_S = 120.0  # a longer Retry-After is capped: waiting an hour would stall the whole run
_RETRYABLE_STATUS = {408, 429}  # plus every 5xx

# A private generator: jitter must not advance the global `random` state that seeded code may rely on.
_jitter = random.Random()


class EndpointError(SftSafetyError):
    """An HTTP endpoint that cannot be reached or that rejects the requests; ``status`` is the HTTP status of
    a rejection, and ``detail`` the server's message, when there was one."""

    def __init__(self, message: str, status: int | None = None, detail: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail


class ContentFiltered(EndpointError):
    """The endpoint's content filter refused this one request (HTTP 400 naming a content policy): the
    request cannot be answered, but the others can."""


# How hosted endpoints (Azure OpenAI and others) say that their content filter stopped a request.
_CONTENT_FILTER_MARKS = ("content_filter", "content management policy", "responsibleaipolicyviolation",
                         "content_policy_violation")


@dataclass(frozen=True)
class Endpoint:
    """A resolved base URL and API key; the key never shows in the repr."""

    base_url: str
    api_key: str | None = field(default=None, repr=False)
    key_env: str = DEFAULT_KEY_ENV


@dataclass(frozen=True)
class ChatReply:
    """One chat completion: the first choice's text and what the server said about it."""

    text: str
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    model: str | None  # the model the server says answered
    system_fingerprint: str | None  # OpenAI's backend configuration id, when given
    echoed_seed: int | None  # the seed, when the server echoes one back (most do not)

    @property
    def seed_echoed(self) -> bool:
        return self.echoed_seed is not None


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def resolve_endpoint(base_url: str | None, key_env: str | None, *, option: str = "base URL",
                     key_option: str = "API key variable", default_key_env: str | None = DEFAULT_KEY_ENV) -> Endpoint:
    """The base URL from the argument, else ``$OPENAI_BASE_URL``, else OpenAI's; the key from the environment
    variable ``key_env``, else ``default_key_env`` (None: no key, except for OpenAI's own host). No key is
    fine for local servers (no Authorization header). ``option`` and ``key_option`` name the settings in
    errors (e.g. "--judge-endpoint")."""
    from_env = not base_url and bool(os.environ.get("OPENAI_BASE_URL"))
    url = normalise_base_url(base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL,
                             "$OPENAI_BASE_URL" if from_env else option)
    parts = urlsplit(url)
    openai_host = parts.hostname == "api.openai.com"
    if key_env is not None:
        env_name = key_env.strip()
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", env_name):
            raise ConfigError(f"{key_option} {env_name!r}: not an environment variable name; give one like "
                              f"{DEFAULT_KEY_ENV}")
    else:
        env_name = default_key_env or (DEFAULT_KEY_ENV if openai_host else "")
    key = (os.environ.get(env_name, "").strip() or None) if env_name else None
    if key is None and openai_host:
        # OpenAI answers 401 without a key; say which variable to set before any request.
        raise ConfigError(f"{url} needs an API key and ${env_name} is not set; export {env_name}=... or pass "
                          f"{option} with the URL of a local server")
    if key is not None and parts.scheme == "http" and parts.hostname not in LOOPBACK_HOSTS \
            and not parts.hostname.startswith("127."):
        warnings.warn(f"{option} {url}: the API key in ${env_name} goes to that host over unencrypted http",
                      stacklevel=2)
    return Endpoint(url, key, env_name)


def _one_line(text: str, limit: int = MESSAGE_CHARS) -> str:
    """A server's text on one line, cut to ``limit`` characters with a mark."""
    text = one_line(text)
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _server_message(body: bytes) -> str:
    """The error message in an HTTP error body: OpenAI's ``{"error": {"message": ...}}``, Google's
    ``{"error": {"message": ...}}``, a ``detail`` field, or the body's text."""
    text = body.decode("utf-8", "replace")
    try:
        document = json.loads(text)
    except (ValueError, RecursionError):
        return text
    if isinstance(document, dict):
        error = document.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
        for key in ("message", "detail"):
            if document.get(key):
                return str(document[key])
    return text


def _retry_after(headers) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date), if given."""
    if headers is None:
        return None
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is answered as the HTTP error it is: following it would carry the Authorization header
    (the API key) to whatever host the server names."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D102 - urllib's hook
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


def run_on_daemon_threads(work: Callable, items: Sequence, workers: int,
                          abort: threading.Event) -> queue.SimpleQueue:
    """Call ``work(item, abort)`` for every item on ``workers`` daemon threads and return the queue that
    receives ``(index, result, error)`` as each call ends. Daemon threads, so that an interrupt or a failure
    never waits for requests still in flight (each ends within its own timeout, unseen); after ``abort``
    is set, no new item starts."""
    jobs: queue.SimpleQueue = queue.SimpleQueue()
    results: queue.SimpleQueue = queue.SimpleQueue()
    for job in enumerate(items):
        jobs.put(job)
    count = max(1, min(workers, len(items)))
    for _ in range(count):
        jobs.put(None)

    def loop() -> None:
        while not abort.is_set():
            job = jobs.get()
            if job is None:
                return
            index, item = job
            try:
                results.put((index, work(item, abort), None))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, who raises it
                results.put((index, None, exc))

    for _ in range(count):
        threading.Thread(target=loop, daemon=True, name="sftsafety-http").start()
    return results


def next_result(results: queue.SimpleQueue, timeout_s: float | None = None):
    """The next ``(index, result, error)``, or None after ``timeout_s``; waits in short steps, so Ctrl-C
    lands at once."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        step = 0.2 if deadline is None else min(0.2, max(0.0, deadline - time.monotonic()))
        try:
            return results.get(timeout=step)
        except queue.Empty:
            if deadline is not None and time.monotonic() >= deadline:
                return None


def _backoff(attempt: int, backoff_s: float) -> float:
    """Exponential back-off with jitter: uniform in [1/2, 1] of ``backoff_s * 2**attempt``, capped."""
    return min(MAX_BACKOFF_S, backoff_s * 2 ** attempt) * _jitter.uniform(0.5, 1.0)


def _reason(exc: BaseException, secrets: Sequence[str | None]) -> str:
    """A short description of a connection failure, secrets scrubbed before it is cut short."""
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, TimeoutError):
        return "timed out"
    if isinstance(reason, http.client.RemoteDisconnected):
        return "the server closed the connection"
    if isinstance(reason, ConnectionResetError):
        return "connection reset"
    strerror = getattr(reason, "strerror", None)
    return _one_line(redact(str(strerror or reason or type(reason).__name__), secrets), 80)


@dataclass
class _Failure:
    kind: str  # "unreachable", "timeout", "status"
    detail: str
    status: int | None = None


def post_json(url: str, payload: dict | None, *, headers: dict[str, str], timeout_s: float, max_retries: int,
              backoff_s: float, describe: str, hint: str, secrets: Sequence[str | None] = (),
              abort: threading.Event | None = None, slot: threading.Semaphore | None = None,
              before_attempt: Callable[[], None] | None = None) -> dict:
    """POST ``payload`` as JSON (GET when it is None) and return the JSON answer, retrying transient failures.

    ``describe`` names the endpoint in errors ("judge endpoint http://..."); ``hint`` is the fix for an
    unreachable one; ``secrets`` are scrubbed from every message. ``slot`` bounds requests in flight (held
    only during the HTTP exchange, not while backing off); ``before_attempt`` runs before each attempt
    (a rate limiter); ``abort`` stops the retries when a sibling request has failed.
    """
    body = None if payload is None else json.dumps(payload).encode("utf-8")
    tries = max_retries + 1
    failure = _Failure("unreachable", "no attempt")
    for attempt in range(tries):
        if abort is not None and abort.is_set():
            raise EndpointError(f"{describe}: cancelled after another request failed")
        if before_attempt is not None:
            before_attempt()
        request = urllib.request.Request(url, data=body, method="GET" if body is None else "POST",
                                         headers={"Content-Type": "application/json", "Accept": "application/json",
                                                  "User-Agent": USER_AGENT, **headers})
        wait_s: float | None = None
        fatal: str | None = None
        if slot is not None:
            slot.acquire()
        try:
            with _OPENER.open(request, timeout=timeout_s) as response:
                raw = response.read()
            try:
                document = json.loads(raw.decode("utf-8"))
            except (ValueError, RecursionError):
                document = None
            if not isinstance(document, dict):
                shown = _one_line(redact(raw.decode("utf-8", "replace"), secrets), 80)
                raise EndpointError(f"{describe} answered with something that is not a JSON object: {shown!r}; "
                                    f"check that the URL points at the API")
            return document
        except urllib.error.HTTPError as exc:
            status = exc.code
            try:
                message = _server_message(exc.read())
            except Exception:  # noqa: BLE001 - the status alone still says what happened
                message = exc.reason or ""
            message = _one_line(redact(str(message), secrets))
            if not (status in _RETRYABLE_STATUS or status >= 500):
                # Raised below, outside this handler, so that no chained context carries the request's URL.
                fatal = f"{describe} rejected the request with HTTP {status}: {message}; {_status_hint(status)}"
            failure = _Failure("status", message, status)
            wait_s = _retry_after(exc.headers)
        except (TimeoutError, urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            timed_out = isinstance(exc, TimeoutError) or isinstance(getattr(exc, "reason", None), TimeoutError)
            failure = _Failure("timeout" if timed_out else "unreachable", _reason(exc, secrets))
        finally:
            if slot is not None:
                slot.release()
        if fatal is not None:
            detail = redact(failure.detail, secrets)
            if failure.status == 400 and any(mark in failure.detail.lower() for mark in _CONTENT_FILTER_MARKS):
                raise ContentFiltered(redact(fatal, secrets), failure.status, detail)
            raise EndpointError(redact(fatal, secrets), failure.status, detail)
        if attempt + 1 < tries:
            delay = _backoff(attempt, backoff_s) if wait_s is None else min(wait_s, MAX_RETRY_AFTER_S)
            if abort is not None:
                abort.wait(delay)
            else:
                time.sleep(delay)
    raise EndpointError(redact(_final_message(failure, describe, hint, tries, timeout_s), secrets), failure.status,
                        redact(failure.detail, secrets))


def _status_hint(status: int) -> str:
    if status in (401, 403):
        return "check the API key and its permissions"
    if status == 404:
        return "check the base URL (it usually ends in /v1) and the model name"
    if status == 413:
        return "the request is too large; shorten the inputs"
    if 300 <= status < 400:
        return "the URL redirects elsewhere; give the URL it redirects to"
    return "check the model name and the request parameters"


def _final_message(failure: _Failure, describe: str, hint: str, tries: int, timeout_s: float) -> str:
    attempts = f"{tries} {'try' if tries == 1 else 'tries'}"
    if failure.kind == "timeout":
        return (f"{describe} did not answer within {timeout_s:g} s, {attempts}; check that the server is up and "
                f"not overloaded, or allow a longer timeout")
    if failure.kind == "status" and failure.status == 429:
        return (f"{describe} is rate-limiting (HTTP 429) after {attempts}: {failure.detail}; lower the concurrency "
                f"or check the account's limits")
    if failure.kind == "status":
        return (f"{describe} failed with HTTP {failure.status} after {attempts}: {failure.detail}; the server is "
                f"failing, check its logs or try again later")
    return f"{describe} unreachable ({failure.detail}) after {attempts}; {hint}"


def _reply(document: dict, describe: str) -> ChatReply:
    choices = document.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise EndpointError(f"{describe} answered without choices; check that the URL points at a "
                            f"chat-completions API")
    choice = choices[0]
    message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
    # OpenAI puts a model's own refusal in `refusal` with no content; it is still the model's answer.
    text = message.get("content") or message.get("refusal") or ""
    if isinstance(text, list):  # content parts
        text = "".join(part["text"] for part in text if isinstance(part, dict) and isinstance(part.get("text"), str))
    elif not isinstance(text, str):
        # Judged as its repr, a JSON object would read as an answer the model never gave.
        raise EndpointError(f"{describe} answered with content that is a JSON {type(text).__name__}, not text; "
                            f"check that the URL points at a chat-completions API")
    usage = document.get("usage") if isinstance(document.get("usage"), dict) else {}

    def count(key: str) -> int | None:
        value = usage.get(key)
        return value if isinstance(value, int) else None

    seed = document.get("seed")
    return ChatReply(text=str(text), finish_reason=choice.get("finish_reason"), prompt_tokens=count("prompt_tokens"),
                     completion_tokens=count("completion_tokens"), total_tokens=count("total_tokens"),
                     model=document.get("model"), system_fingerprint=document.get("system_fingerprint"),
                     echoed_seed=seed if isinstance(seed, int) and not isinstance(seed, bool) else None)


class ChatClient:
    """``POST {base_url}/chat/completions`` with at most ``concurrency`` requests in flight.

    ``max_retries`` retries follow the first try. ``name`` and ``hint`` make the one-line errors speak of
    the caller's option (e.g. "judge endpoint", "start the server or pass --judge-endpoint URL").
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None, concurrency: int = 8,
                 timeout_s: float = 60.0, max_retries: int = 5, backoff_s: float = 1.0, *,
                 name: str = "chat endpoint", hint: str = "start the server or give the right base URL") -> None:
        if concurrency < 1:
            raise ConfigError(f"{name} concurrency {concurrency}: give at least 1")
        if not timeout_s > 0:
            raise ConfigError(f"{name} timeout {timeout_s}: give a positive number of seconds")
        if max_retries < 0:
            raise ConfigError(f"{name} retries {max_retries}: give 0 or more")
        self.base_url = normalise_base_url(base_url, name)
        self.model = model
        self._api_key = api_key or None
        register_secret(self._api_key)  # whatever a server or an error echoes of it is redacted on the way out
        self.concurrency = int(concurrency)
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self.backoff_s = float(backoff_s)
        self.name = name
        self.hint = hint
        # Shared by every call on this client, so concurrent complete_many calls keep the bound too.
        self._slots = threading.BoundedSemaphore(self.concurrency)

    @property
    def url(self) -> str:
        return f"{self.base_url}/chat/completions"

    @property
    def host_path(self) -> str:
        """``host[:port]/path`` of the base URL, for ids."""
        parts = urlsplit(self.base_url)
        return f"{parts.netloc}{parts.path}"

    def __repr__(self) -> str:
        key = "set" if self._api_key else "none"
        return (f"ChatClient(base_url={self.base_url!r}, model={self.model!r}, api_key={key}, "
                f"concurrency={self.concurrency}, timeout_s={self.timeout_s:g}, max_retries={self.max_retries})")

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}

    def complete(self, request: dict, abort: threading.Event | None = None) -> ChatReply:
        """One chat completion; ``request`` holds ``messages`` and parameters (temperature, max_tokens, seed,
        ...), and may name another ``model``."""
        if not isinstance(request, dict) or not request.get("messages"):
            raise ValueError("a chat request needs a non-empty 'messages' list")
        payload = {"model": self.model, **request}
        describe = f"{self.name} {self.base_url}"
        try:
            document = post_json(self.url, payload, headers=self._headers(), timeout_s=self.timeout_s,
                                 max_retries=self.max_retries, backoff_s=self.backoff_s, describe=describe,
                                 hint=self.hint, secrets=(self._api_key,), abort=abort, slot=self._slots)
        except ContentFiltered:
            # Harmful prompts are this project's input: one filtered request is an empty answer, not a failure.
            return ChatReply(text="", finish_reason="content_filter", prompt_tokens=None, completion_tokens=None,
                             total_tokens=None, model=None, system_fingerprint=None, echoed_seed=None)
        try:
            return _reply(document, describe)
        except (AttributeError, TypeError) as exc:
            raise EndpointError(f"{describe} answered with a malformed chat completion "
                                f"({type(exc).__name__}); check that the URL points at a chat-completions "
                                f"API") from None

    def models(self, max_retries: int | None = None) -> list[dict] | None:
        """The server's model list (``GET {base_url}/models``: each entry's ``id`` and, from vLLM, ``root``
        and ``parent``), or None when the server has no such route."""
        describe = f"{self.name} {self.base_url}"
        try:
            document = post_json(f"{self.base_url}/models", None, headers=self._headers(), timeout_s=self.timeout_s,
                                 max_retries=self.max_retries if max_retries is None else max_retries,
                                 backoff_s=self.backoff_s, describe=describe, hint=self.hint,
                                 secrets=(self._api_key,), slot=self._slots)
        except EndpointError as exc:
            if exc.status in (404, 405, 501):
                return None
            raise
        entries = document.get("data")
        if not isinstance(entries, list):
            return None
        return [e for e in entries if isinstance(e, dict) and isinstance(e.get("id"), str)]

    def complete_many(self, requests: list[dict]) -> list[ChatReply]:
        """Replies in the order of ``requests``. The first failure stops the others' retries and is raised."""
        if not requests:
            return []
        if len(requests) == 1:
            return [self.complete(requests[0])]
        abort = threading.Event()
        results = run_on_daemon_threads(self.complete, requests, self.concurrency, abort)
        replies: list[ChatReply | None] = [None] * len(requests)
        try:
            for _ in range(len(requests)):
                index, reply, error = next_result(results)
                if error is not None:
                    raise error  # the first to fail; the others stop retrying
                replies[index] = reply
        finally:
            abort.set()
        return replies  # type: ignore[return-value]
