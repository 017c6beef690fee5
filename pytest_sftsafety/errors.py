"""The project's own error types: a user mistake ends the run with one line naming the fix."""


class SftSafetyError(Exception):
    """A problem the user can fix; its message is one line that says how."""


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
