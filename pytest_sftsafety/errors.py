"""The project's own error types: a user mistake ends the run with one line naming the fix."""

import re

from .sanitize import redact

# Characters a terminal acts on instead of showing (escape sequences begin with one) and bidirectional
# overrides that reorder what is shown, and lone surrogates (undecodable bytes of a file name), which no
# output could encode; a newline is kept for multi-line text such as the summary table.
_UNSHOWN = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def printable(text: str) -> str:
    """``text`` safe to print: control characters, bidi overrides and lone surrogates shown as ``\\xNN`` or
    ``\\uNNNN``, so a model path, a suite name or a server's message cannot move the cursor, recolour or hide
    output, and keys and credentials in URLs redacted (``sanitize.redact``)."""
    return _UNSHOWN.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else
                        f"\\u{ord(m.group()):04x}", redact(text))


def one_line(value: object) -> str:
    """``value`` as text on one line, runs of white space made one space: a newline in a name must not start
    a line of its own (in a table, a message or a one-line error)."""
    return " ".join(str(value).split())


class SftSafetyError(Exception):
    """A problem the user can fix; its message is one line that says how (printable: it quotes user input;
    redacted: it may quote a URL or a server's message)."""

    def __init__(self, message: object = "", *args: object) -> None:
        # One line, whatever a quoted value holds: a newline in it is shown, not followed.
        super().__init__(printable(str(message)).replace("\n", "\\n"), *args)


class InternalFault(Exception):
    """A fault of the run itself, neither a user mistake nor a verdict on the model: the run ends with exit
    status 3 (the measurement failed), never 1 (a regression). Its message is one line."""

    def __init__(self, message: object = "") -> None:
        super().__init__(printable(str(message)).replace("\n", "\\n"))


class ConfigError(SftSafetyError):
    """A bad option or ini value."""


class DataError(SftSafetyError):
    """A prompt file or dataset that cannot be used as it is."""


class ModelLoadError(SftSafetyError):
    """A model, adapter or tokenizer that cannot be found or loaded."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type when empty), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__
