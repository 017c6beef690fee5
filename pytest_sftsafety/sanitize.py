"""Text from outside and text that leaves: the checks every reader and every writer share.

Core module: stdlib only. Two hazards, one home each:

- **Lone surrogates.** JSON may spell a code point of U+D800-U+DFFF as an escape (``"\\ud800"``: half of a
  UTF-16 pair without its other half, often a cut emoji). Python then holds a string that no UTF-8 file,
  SQLite database or tokenizer can take. ``first_unencodable`` finds one: the readers of the user's files
  refuse it, naming the row. ``encodable`` replaces each with U+FFFD, Unicode's replacement character: for
  text the run measures but the user did not write (a model's answers).
- **Secrets.** ``redact`` replaces every key this process holds (``register_secret``), the values of URL
  query parameters named like credentials (``?api_key=...``, ``&token=...``, ``&sig=...``) and the user
  information of URLs (``user:password@``) with ``REDACTED``. ``outgoing`` is what every exit point applies
  (error lines, the terminal, the store, the reports, ``last_fault.txt``): encodable and redacted.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable
from typing import Any

SURROGATE = re.compile("[\ud800-\udfff]")
REPLACEMENT = "\ufffd"
REDACTED = "[redacted]"
# A shorter key (a placeholder such as EMPTY, which vLLM's docs suggest) is no secret, and replacing so short
# a string in every answer would change what is measured.
MIN_SECRET_CHARS = 8

# Parameter names that carry credentials: the word alone (key, token, sig, ...) or as the last part of a
# longer name (api_key, access_token, X-Amz-Signature, client_secret); "monkey" or "design" are not.
_CREDENTIAL = r"(?:[\w.-]*[_.-])?(?:key|apikey|token|secret|password|passwd|pwd|sig|signature|auth|credentials?)"
# ``;`` also opens a parameter: HTML writes ``&`` as ``&amp;``. The value ends where a URL or its quoting ends.
_QUERY_CREDENTIAL = re.compile(rf"([?&;]{_CREDENTIAL}=)[^&#;\s'\"<>\\]+", re.IGNORECASE)
_USERINFO = re.compile(r"\b([a-z][a-z0-9+.-]*://)[^/?#\s@'\"<>\\]+@", re.IGNORECASE)

_secrets: tuple[str, ...] = ()  # replaced whole under the lock, so readers on other threads need none
_lock = threading.Lock()


def first_unencodable(text: str) -> int | None:
    """The index of the first lone surrogate in ``text`` (a string no UTF-8 output can hold), or None."""
    match = SURROGATE.search(text)
    return match.start() if match else None


def encodable(text: str) -> tuple[str, int]:
    """``text`` with each lone surrogate replaced by U+FFFD, and how many were replaced."""
    return SURROGATE.subn(REPLACEMENT, text)


def register_secret(value: str | None) -> None:
    """Redact ``value`` (an API key this process read) from every text that leaves it from now on."""
    global _secrets
    if value and len(value) >= MIN_SECRET_CHARS and value not in _secrets:
        with _lock:
            # Longest first: a key that contains another is replaced whole.
            _secrets = tuple(sorted({*_secrets, value}, key=len, reverse=True))


def redact(text: str, extra: Iterable[str | None] = ()) -> str:
    """``text`` with every registered key and every one of ``extra`` (any length), credential-named URL
    query values and URL user information replaced by ``REDACTED``. Applying it twice changes nothing."""
    for secret in (*_secrets, *sorted((s for s in extra if s), key=len, reverse=True)):
        if secret in text:
            text = text.replace(secret, REDACTED)
    if "=" in text:
        text = _QUERY_CREDENTIAL.sub(lambda m: m.group(1) + REDACTED, text)
    if "@" in text:
        text = _USERINFO.sub(lambda m: m.group(1) + REDACTED + "@", text)
    return text


def outgoing(value: Any) -> Any:
    """What may leave the process: every string in ``value`` (a string, or dicts, lists and tuples of them,
    keys included) encodable and redacted; other values as they are."""
    if isinstance(value, str):
        return redact(encodable(value)[0])
    if isinstance(value, dict):
        return {outgoing(k): outgoing(v) for k, v in value.items()}
    if isinstance(value, list):
        return [outgoing(v) for v in value]
    if isinstance(value, tuple):
        return tuple(outgoing(v) for v in value)
    return value
