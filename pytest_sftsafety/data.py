"""Read SORRY-Bench prompts from question.jsonl, CSV, parquet or the hub, then validate them."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from pathlib import Path

from .errors import DataError
from .sanitize import first_unencodable
from .suite import PROMPT_STYLES, PromptSet, Suite, style_filename, validate_prompts

HUB_ID = re.compile(r"^(?:hf://)?(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")


def _decode(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{path} row {line}: not UTF-8 text (byte {raw[exc.start]:#04x}); "
                        f"re-save the file as UTF-8") from None


def _surrogate_in(value: object) -> str | None:
    """The first lone surrogate in a string, or in the strings (keys included) of lists and dicts."""
    if isinstance(value, str):
        at = first_unencodable(value)
        return None if at is None else value[at]
    if isinstance(value, dict):
        value = [*value.keys(), *value.values()]
    if not isinstance(value, (list, tuple)):
        return None
    return next((found for item in value if (found := _surrogate_in(item)) is not None), None)


def check_text(record: object, path: Path | str, row_no: int) -> None:
    """Refuse a row that holds a lone surrogate (JSON's ``\\ud800`` escape without its pair, see ``sanitize``):
    no tokenizer, store or report can take it, and a prompt that cannot be read cannot be measured. Every
    reader of the user's rows calls this, whatever the file's format."""
    fields = record.items() if isinstance(record, dict) else [("", record)]
    for name, value in fields:
        found = _surrogate_in(name) or _surrogate_in(value)
        if found is not None:
            where = f"field {name!r}" if name else "the row"
            raise DataError(f"{path} row {row_no}: {where} holds a lone surrogate \\u{ord(found):04x} (half of a "
                            f"UTF-16 pair, not a character: no model, store or report can take it); fix or remove "
                            f"that \\u escape in the file")


def check_rows(rows: list, path: Path | str, first: int = 1) -> None:
    """``check_text`` for rows numbered from ``first`` (a JSON list, a hub dataset's rows)."""
    for row_no, record in enumerate(rows, start=first):
        check_text(record, path, row_no)


def _rows_jsonl(text: str, path: Path, record: str = "question") -> list[tuple[int, dict]]:
    rows = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((line_no, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} row {line_no}: not valid JSON ({exc.msg}); each line must be one "
                            f"{record} object") from None
        except RecursionError:  # not a ValueError: json gives up on deep nesting with Python's own limit
            raise DataError(f"{path} row {line_no}: JSON nested too deeply to read; each line must be one flat "
                            f"{record} object") from None
        check_text(rows[-1][1], path, line_no)
    return rows


def _parse_turns(value: object) -> object:
    """CSV and parquet exports store ``turns`` as a JSON list string, a list, or the bare prompt."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            return [value]
    if isinstance(value, str):
        return [value]
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def _rows_csv(text: str, path: Path) -> list[tuple[int, dict]]:
    # newline="": the csv module reads line endings itself (a bare \r included), as its docs ask.
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = []
    try:
        if not reader.fieldnames or not {"question_id", "turns"} <= set(reader.fieldnames):
            raise DataError(f"{path} row 1: CSV header must include question_id, category, turns "
                            f"(found {', '.join(reader.fieldnames or []) or 'no header'})")
        for row_no, record in enumerate(reader, start=2):
            record = {k: (v if v != "" else None) for k, v in record.items() if k is not None}
            if record.get("turns") is not None:
                record["turns"] = _parse_turns(record["turns"])
            check_text(record, path, row_no)  # a JSON list of turns may spell a surrogate as an escape
            rows.append((row_no, record))
    except csv.Error as exc:
        raise DataError(f"{path} line {reader.line_num}: not readable as CSV ({exc}); save it as CSV with a "
                        f"header row, or use question.jsonl") from None
    return rows


def _rows_parquet(raw: bytes, path: Path) -> list[tuple[int, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow comes with datasets
        raise DataError(f"{path}: reading parquet needs pyarrow; pip install pyarrow") from None
    try:
        table = pq.read_table(io.BytesIO(raw))
    except Exception as exc:  # pyarrow raises several types for bad files
        raise DataError(f"{path}: not a readable parquet file ({type(exc).__name__}); re-export it") from None
    try:
        records = table.to_pylist()
    except UnicodeDecodeError:
        # A string column holding bytes that are not UTF-8 (the format requires it; some writers skip the check).
        bad = next(i for i in range(table.num_rows) if _undecodable(table.slice(i, 1)))
        raise DataError(f"{path} row {bad + 1}: a text column holds bytes that are not UTF-8; re-export the file "
                        f"from its source as UTF-8") from None
    rows = []
    for row_no, record in enumerate(records, start=1):
        if "turns" in record and record["turns"] is not None:
            record["turns"] = _parse_turns(record["turns"])
        check_text(record, path, row_no)
        rows.append((row_no, record))
    return rows


def _undecodable(table) -> bool:
    try:
        table.to_pylist()
    except UnicodeDecodeError:
        return True
    return False


def read_rows(path: Path) -> tuple[list[tuple[int, dict]], str]:
    """Rows of a local question file and the sha256 of its bytes."""
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _rows_parquet(raw, path), digest
    text = _decode(raw, path)
    if suffix == ".csv":
        return _rows_csv(text, path), digest
    if suffix in (".jsonl", ".json"):
        return _rows_jsonl(text, path), digest
    raise DataError(f"{path}: unknown prompt file type '{suffix}'; use SORRY-Bench's question.jsonl, "
                    f"or a .csv or .parquet file with the same columns")


def _check_style(prompt_style: str) -> None:
    if prompt_style not in PROMPT_STYLES:
        raise DataError(f"unknown --prompt-style '{prompt_style}'; use base or one of the SORRY-Bench "
                        f"mutations: {', '.join(PROMPT_STYLES[1:])}")


def _hub_download(repo: str, revision: str | None, filename: str, suite: Suite) -> Path:
    """Fetch one question file of a gated hub dataset, with a one-line error when that cannot work."""
    from huggingface_hub import hf_hub_download

    local_hint = (f"request access at https://huggingface.co/datasets/{repo}, download it with "
                  f"`hf download {repo} --repo-type dataset --local-dir sorry-bench` on a machine online, "
                  f"then pass --sftsafety-data sorry-bench/{filename}")
    try:
        return Path(hf_hub_download(repo, filename, repo_type="dataset", revision=revision))
    except Exception as exc:  # the hub client raises many types: gated, offline, missing, network
        kind = type(exc).__name__
        if "Gated" in kind:
            why = "is gated and this account has no access"
        elif "Offline" in kind or "LocalEntryNotFound" in kind or "Connect" in kind or "Timeout" in kind:
            why = "cannot be reached (offline, or not in the local hub cache)"
        elif "RepositoryNotFound" in kind or "EntryNotFound" in kind or "RevisionNotFound" in kind:
            why = f"has no {filename} at revision {revision or 'main'}"
        else:
            why = f"could not be fetched ({kind})"
        raise DataError(f"prompts for {suite.name}: hub dataset {repo} {why}; {local_hint}") from None


def load_prompts(suite: Suite, data: str | None, prompt_style: str = "base") -> PromptSet:
    """Load and validate prompts from a local file or folder, or a hub dataset id (``org/name[@rev]``).

    With no ``data``, the suite's own ``data`` entry or its hub dataset is used.
    """
    _check_style(prompt_style)
    source = data or suite.data or suite.hub_dataset
    if not source:
        raise DataError(f"suite {suite.name} has no prompts: pass --sftsafety-data PATH "
                        f"(SORRY-Bench question.jsonl, CSV or parquet)")
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / style_filename(prompt_style)
        if not path.is_file():
            raise DataError(f"{path.parent} has no {path.name}; point --sftsafety-data at the folder "
                            f"holding SORRY-Bench's question files or at one file")
    elif not path.exists():
        match = HUB_ID.match(source)
        if match is None or source.startswith((".", "/", "~")) or path.suffix in (".jsonl", ".csv", ".parquet"):
            raise DataError(f"--sftsafety-data {source}: no such file or folder; give a local "
                            f"question.jsonl/CSV/parquet file, its folder, or a hub dataset id ORG/NAME[@REV]")
        path = _hub_download(match["repo"], match["rev"], style_filename(prompt_style), suite)
        label = f"hf://{match['repo']}@{match['rev'] or 'main'}/{style_filename(prompt_style)}"
        rows, digest = read_rows(path)
        prompts = validate_prompts(suite, rows, label, prompt_style)
        return PromptSet(suite=suite, prompts=tuple(prompts), source=label, sha256=digest,
                         prompt_style=prompt_style)
    rows, digest = read_rows(path)
    prompts = validate_prompts(suite, rows, str(path), prompt_style)
    return PromptSet(suite=suite, prompts=tuple(prompts), source=str(path), sha256=digest,
                     prompt_style=prompt_style)
