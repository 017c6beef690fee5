"""The text checks every reader and every writer share (sanitize.py): lone surrogates and secrets, at each
exit point that writes a file: the store, the JSON and text reports, last_fault.txt, and error lines."""

from __future__ import annotations

import json
import sqlite3
from types import SimpleNamespace

import pytest

from pytest_sftsafety.config import normalise_base_url
from pytest_sftsafety.errors import ConfigError, InternalFault, SftSafetyError, printable
from pytest_sftsafety.report import write_json, write_text
from pytest_sftsafety.sanitize import (
    REDACTED,
    encodable,
    first_unencodable,
    outgoing,
    redact,
    register_secret,
)
from pytest_sftsafety.session import RunSession
from pytest_sftsafety.store import Store

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


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/v1?api_key=SECRETvalue1", "http://h/v1?SECRETvalue1",
                                 "http://h/v1#SECRETvalue1", "http://h/v1?a=1&b=SECRETvalue1",
                                 "http://u:SECRETvalue1@h/v1", "ftp://h/v1?key=SECRETvalue1",
                                 "http://h/v 1?token=SECRETvalue1"])
def test_a_url_with_a_credential_is_refused_without_echoing_it(url):
    """Even a value under a name that does not look like a credential: the query of a refused URL is shown
    by its parameter names only."""
    with pytest.raises(ConfigError) as caught:
        normalise_base_url(url, "--endpoint")
    assert "SECRETvalue1" not in str(caught.value) and str(caught.value).startswith("--endpoint")


def test_the_store_keeps_no_surrogate_and_no_key(tmp_path):
    path = tmp_path / "store.sqlite"
    store = Store(path)
    store.put_generations({"a": (f"half \ud800 and key {KEY}", 3)})
    store.close()
    assert Store(path).get_generations(["a"]) == {"a": (f"half \ufffd and key {REDACTED}", 3)}
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA wal_checkpoint(FULL)")
    assert KEY.encode() not in b"".join(p.read_bytes() for p in tmp_path.iterdir())


def test_reports_are_written_as_valid_utf8_without_a_key(tmp_path):
    document = {"entries": [], "note": f"\ud800 {KEY} http://h/v1?key=abc"}
    raw = write_json(tmp_path / "r.json", document).read_bytes()
    text = raw.decode("utf-8")  # strict: raises on anything that is not UTF-8
    assert KEY not in text and "abc" not in text and "\\ud800" not in text
    assert json.loads(text)["note"] == f"\ufffd {REDACTED} http://h/v1?key={REDACTED}"
    markdown = write_text(tmp_path / "r.md", f"| \udfff | {KEY} |", "Markdown summary").read_bytes()
    assert markdown.decode("utf-8") == f"| \ufffd | {REDACTED} |"


def test_last_fault_traceback_is_redacted(tmp_path):
    holder = SimpleNamespace(store_path=lambda: tmp_path / "store.sqlite")
    try:
        raise RuntimeError(f"server said {KEY} at http://h/v1?token=abc \ud800")
    except RuntimeError:
        kept = RunSession._keep_traceback(holder)
    text = (tmp_path / "last_fault.txt").read_text(encoding="utf-8")
    assert kept == str(tmp_path / "last_fault.txt")
    assert "RuntimeError: server said [redacted] at http://h/v1?token=[redacted] \\ud800" in text
    assert KEY not in text


def test_a_saved_report_is_cleaned_when_read_back(tmp_path):
    """A report written elsewhere (an older version, another tool) is outside text as well."""
    from pytest_sftsafety.report import READABLE_VERSIONS, REPORT_SCHEMA, load_report

    document = {key: {} for key in ("created", "suite", "data", "models", "judge", "settings", "summary")}
    document.update(schema=REPORT_SCHEMA, version=READABLE_VERSIONS[-1], entries=[], aggregates=[],
                    provenance={"device": f"server http://h/{KEY}/v1?sig=abc \ud800"})
    path = tmp_path / "old.json"
    path.write_text(json.dumps(document), encoding="ascii")  # \ud800 spelled as JSON's escape
    loaded = load_report(path)
    assert loaded["provenance"]["device"] == f"server http://h/{REDACTED}/v1?sig={REDACTED} \ufffd"
