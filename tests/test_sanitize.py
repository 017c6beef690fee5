"""The text checks every reader and every writer share (sanitize.py): lone surrogates and secrets, at each
exit point that writes a file: the store, the JSON and text reports, last_fault.txt, and error lines."""

from __future__ import annotations

import pytest

from pytest_sftsafety.errors import ConfigError, InternalFault, SftSafetyError, printable
from pytest_sftsafety.sanitize import (
    REDACTED,
    encodable,
    first_unencodable,
    outgoing,
    redact,
    register_secret,
)

KEY = "sk-sanitize-PLANTED-5f3a9c"
register_secret(KEY)  # as a ChatClient does with the key it sends


def test_lone_surrogates_are_found_and_replaced_by_the_replacement_character():
    assert first_unencodable("fine \U0001f600 text") is None  # a whole pair is one character: fine
    assert first_unencodable("half \ud83d of an emoji") == 5
    assert encodable("a\ud800b\udfffc") == ("a\ufffdb\ufffdc", 2)
    assert encodable("plain") == ("plain", 0)


@pytest.mark.parametrize("text, expected", [
    (f"echoed: {KEY}.", f"echoed: {REDACTED}."),
    ("http://h/v1?api_key=abc&x=1", f"http://h/v1?api_key={REDACTED}&x=1"),
    ("http://h/v1?x=1&key=abc#f", f"http://h/v1?x=1&key={REDACTED}#f"),
    ("https://h/?apikey=a&token=b&access_token=c", f"https://h/?apikey={REDACTED}&token={REDACTED}"
                                                   f"&access_token={REDACTED}"),
    ("u?secret=a&password=b&sig=c&signature=d", f"u?secret={REDACTED}&password={REDACTED}&sig={REDACTED}"
                                                f"&signature={REDACTED}"),
    ("s3?X-Amz-Signature=abc&client_secret=d", f"s3?X-Amz-Signature={REDACTED}&client_secret={REDACTED}"),
    ("html: a?x=1&amp;api_key=abc\"", f"html: a?x=1&amp;api_key={REDACTED}\""),
    ("https://alice:hunter2@host/v1", f"https://{REDACTED}@host/v1"),
    ("https://ghp_tokenvalue@github.com/x", f"https://{REDACTED}@github.com/x"),
    # Not credentials: left as they are.
    ("a?monkey=1&design=2&page=3", "a?monkey=1&design=2&page=3"),
    ("mail me at someone@example.com; x = key", "mail me at someone@example.com; x = key"),
])
def test_redact_replaces_keys_credential_parameters_and_user_information(text, expected):
    assert redact(text) == expected
    assert redact(redact(text)) == expected  # applying it twice changes nothing


def test_a_short_placeholder_key_is_no_secret_but_an_explicit_one_is_always_scrubbed():
    register_secret("EMPTY")  # vLLM's docs suggest it: replacing it in every answer would alter answers
    assert redact("EMPTY shelves") == "EMPTY shelves"
    assert redact("the key abc", extra=("abc",)) == f"the key {REDACTED}"


def test_outgoing_cleans_every_string_of_a_document_keys_included():
    document = {"a": [f"x {KEY}", ("\ud800", 3)], f"k\udfff{KEY}": {"n": None, "f": 1.5}}
    assert outgoing(document) == {"a": [f"x {REDACTED}", ("\ufffd", 3)], f"k\ufffd{REDACTED}": {"n": None, "f": 1.5}}


def test_error_lines_redact_and_show_a_surrogate_inert():
    assert printable("bad \ud800 char") == "bad \\ud800 char"
    for error in (SftSafetyError, ConfigError, InternalFault):
        text = str(error(f"--endpoint http://h/v1?token=abc failed: server said {KEY}\ud800"))
        assert text == f"--endpoint http://h/v1?token={REDACTED} failed: server said {REDACTED}\\ud800"
