"""The built-in suites and the validation of SORRY-Bench question files (no torch needed)."""

from __future__ import annotations

import json
import re

import pytest

from pytest_sftsafety.data import load_prompts
from pytest_sftsafety.errors import DataError
from pytest_sftsafety.suite import builtin_suites, load_suite
from pytest_sftsafety.tools import toy


def test_both_releases_ship_with_their_category_counts():
    assert builtin_suites() == ["sorry_bench_202406", "sorry_bench_202503"]
    old, new = load_suite("sorry_bench_202406"), load_suite("sorry_bench_202503")
    assert (len(old.categories), old.expected_prompts) == (45, 450)
    assert (len(new.categories), new.expected_prompts) == (44, 440)


def test_202503_drops_impersonation_and_shifts_later_ids():
    old, new = load_suite("202406"), load_suite("2025-03")
    assert old.category(12).name == "Impersonation"
    assert "Impersonation" not in [c.name for c in new.categories]
    assert new.category(12).name == old.category(13).name == "System Intrusion"
    assert new.category(44).name == old.category(45).name == "Machinery Operation Advice"
    for cat in new.categories:
        twin = old.category(cat.id + (1 if cat.id >= 12 else 0))
        assert (cat.name, cat.description, cat.domain) == (twin.name, twin.description, twin.domain)


def test_domains_cover_the_documented_ranges():
    new = load_suite()
    by_domain = {}
    for cat in new.categories:
        by_domain.setdefault(cat.domain, []).append(cat.id)
    assert by_domain == {"hate_speech": list(range(1, 6)), "crimes_or_torts": list(range(6, 25)),
                         "inappropriate_topics": list(range(25, 40)), "unqualified_advice": list(range(40, 45))}
    assert new.domains["crimes_or_torts"] == "Assistance with Crimes or Torts"
    assert new.category(7).slug == "07_violent_crimes"
    assert all(re.fullmatch(r"\d\d_[a-z0-9_]+", c.slug) for c in new.categories)


def test_unknown_suite_names_the_choices():
    with pytest.raises(DataError, match="unknown suite 'sorry_bench_2099'; use one of sorry_bench_202406"):
        load_suite("sorry_bench_2099")


@pytest.fixture
def suite():
    return load_suite("sorry_bench_202503")


@pytest.fixture
def rows(suite):
    return toy.placeholder_questions(suite)


def write(tmp_path, rows, name="question.jsonl"):
    return toy.write_jsonl(tmp_path / name, rows)


def test_question_jsonl_loads_with_categories_from_question_id(tmp_path, suite, rows):
    prompts = load_prompts(suite, str(write(tmp_path, rows)))
    assert len(prompts.prompts) == 440
    assert [p.question_id for p in prompts.by_category[7]] == list(range(61, 71))
    assert len(prompts.sha256) == 64 and prompts.source.endswith("question.jsonl")


def test_category_given_by_name_is_accepted(tmp_path, suite, rows):
    for row in rows:
        row["category"] = suite.category(int(row["category"])).description
    assert len(load_prompts(suite, str(write(tmp_path, rows))).prompts) == 440


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("mutate, expected", [
    (lambda rows: rows[13].update(category="9"), r"question\.jsonl row 14: category '9' does not match question_id 14"),
    (lambda rows: rows[3].pop("turns"), r"row 4: missing field turns"),
    (lambda rows: rows[5].update(turns=["   "]), r"row 6: the prompt \(turns\[0\]\) is empty"),
    (lambda rows: rows[5].update(turns=["a", "b"]), r"row 6: turns must be a list with one prompt string"),
    (lambda rows: rows[8].update(question_id="abc"), r"row 9: question_id must be a positive whole number"),
    (lambda rows: rows[5].update(question_id=3), r"row 6: duplicate question_id 3 \(first at row 3\)"),
    (lambda rows: rows.__delitem__(slice(60, 61)), r"row 61: category 7 'Violent Crimes' has 9 prompts"),
    (lambda rows: rows.__delitem__(slice(60, 70)), r"category 7 'Violent Crimes' has no prompts"),
    (lambda rows: rows.append({"question_id": 441, "category": "45", "turns": ["x"]}),
     r"row 441: question_id 441 is past the 440 prompts of sorry_bench_202503"),
])
def test_bad_rows_are_one_line_errors_naming_file_and_row(tmp_path, suite, rows, mutate, expected):
    mutate(rows)
    with pytest.raises(DataError) as exc:
        load_prompts(suite, str(write(tmp_path, rows)))
    assert re.search(expected, one_line(exc)), one_line(exc)


def test_release_mismatch_is_explained(tmp_path, rows):
    with pytest.raises(DataError) as exc:
        load_prompts(load_suite("sorry_bench_202406"), str(write(tmp_path, rows)))
    assert "has no prompts" in one_line(exc) or "does not match" in one_line(exc)


def test_non_utf8_and_broken_json(tmp_path, suite):
    bad = tmp_path / "question.jsonl"
    bad.write_bytes(b'{"question_id": 1, "category": "1", "turns": ["caf\xe9"]}\n')
    with pytest.raises(DataError, match=r"row 1: not UTF-8 text \(byte 0xe9\); re-save the file as UTF-8"):
        load_prompts(suite, str(bad))
    bad.write_text('{"question_id": 1,\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"row 1: not valid JSON"):
        load_prompts(suite, str(bad))


def test_csv_and_parquet_with_the_same_columns(tmp_path, suite, rows):
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "question.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["question_id", "category", "turns", "prompt_style"])
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "turns": json.dumps(row["turns"])})
    from_csv = load_prompts(suite, str(path))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "question.parquet")
    from_parquet = load_prompts(suite, str(tmp_path / "question.parquet"))
    assert from_csv.prompts == from_parquet.prompts == load_prompts(suite, str(write(tmp_path, rows))).prompts
    (tmp_path / "wrong.csv").write_text("id,text\n1,hello\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"wrong\.csv row 1: CSV header must include question_id, category, turns"):
        load_prompts(suite, str(tmp_path / "wrong.csv"))


SURROGATE_LINE = (r"row 5: field 'turns' holds a lone surrogate \\ud800 \(half of a UTF-16 pair, not a character: "
                  r"no model, store or report can take it\); fix or remove that \\u escape in the file")


def test_a_lone_surrogate_in_a_prompt_is_a_data_error_naming_file_and_row(tmp_path, suite, rows):
    """JSON may spell half of a UTF-16 pair as the escape \\ud800: valid JSON, but no text. Every format the
    loader reads refuses it with the row, before a tokenizer or the store could fail on it."""
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows[4]["turns"] = ["Explain \ud800 this"]
    jsonl = write(tmp_path, rows)
    assert '"Explain \\ud800 this"' in jsonl.read_text(encoding="utf-8")  # the file holds the JSON escape
    with pytest.raises(DataError) as exc:
        load_prompts(suite, str(jsonl))
    assert re.fullmatch(rf"{re.escape(str(jsonl))} {SURROGATE_LINE}", one_line(exc)), one_line(exc)
    path = tmp_path / "question.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:  # turns as SORRY-Bench's CSV exports hold it
        writer = csv.DictWriter(handle, fieldnames=["question_id", "category", "turns", "prompt_style"])
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "turns": json.dumps(row["turns"])})
    with pytest.raises(DataError, match=r"question\.csv row 6: field 'turns' holds a lone surrogate \\ud800"):
        load_prompts(suite, str(path))  # row 6: the header is row 1
    table = pa.Table.from_pylist([{**row, "turns": json.dumps(row["turns"])} for row in rows])
    pq.write_table(table, tmp_path / "question.parquet")
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'question.parquet'} ") + SURROGATE_LINE):
        load_prompts(suite, str(tmp_path / "question.parquet"))
    rows[4]["turns"] = ["fine"]
    rows[7]["\udc80note"] = "an odd field name"
    with pytest.raises(DataError, match=r"row 8: field '\\udc80note' holds a lone surrogate \\udc80"):
        load_prompts(suite, str(write(tmp_path, rows)))


def test_parquet_text_that_is_not_utf8_names_the_row(tmp_path, suite, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    turns = [json.dumps(row["turns"]).encode() for row in rows]
    turns[2] = b'["caf\xe9"]'  # Latin-1, which a writer that skips the check can store in a string column
    raw = pa.array(turns, type=pa.binary())
    table = pa.table({"question_id": [r["question_id"] for r in rows], "category": [r["category"] for r in rows],
                      "turns": pa.Array.from_buffers(pa.string(), len(raw), raw.buffers())})
    pq.write_table(table, tmp_path / "question.parquet")
    with pytest.raises(DataError, match=r"question\.parquet row 3: a text column holds bytes that are not UTF-8; "
                                        r"re-export the file from its source as UTF-8"):
        load_prompts(suite, str(tmp_path / "question.parquet"))


def test_prompt_styles_from_a_folder(tmp_path, suite, rows):
    write(tmp_path, rows)
    slang = [{**r, "prompt_style": "slang", "turns": [r["turns"][0] + " yo"]} for r in rows]
    write(tmp_path, slang, "question_slang.jsonl")
    prompts = load_prompts(suite, str(tmp_path), "slang")
    assert prompts.prompt_style == "slang" and prompts.prompts[0].text.endswith(" yo")
    assert prompts.prompts[0].key == "slang:1"
    with pytest.raises(DataError, match=r"has no question_role_play\.jsonl"):
        load_prompts(suite, str(tmp_path), "role_play")
    with pytest.raises(DataError, match=r"has no prompts of style 'morse' \(styles found: base\)"):
        load_prompts(suite, str(tmp_path / "question.jsonl"), "morse")
    # A style's own file without --prompt-style: the base file's real name, and the style that is there.
    with pytest.raises(DataError, match=r"has no prompts of style 'base' \(styles found: slang\); point "
                                        r"--sftsafety-data at question\.jsonl or the folder holding it, or pass "
                                        r"--prompt-style slang$"):
        load_prompts(suite, str(tmp_path / "question_slang.jsonl"), "base")
    with pytest.raises(DataError, match=r"unknown --prompt-style 'shouting'; use base or one of"):
        load_prompts(suite, str(tmp_path), "shouting")


def test_missing_file_and_offline_hub(tmp_path, suite, monkeypatch):
    with pytest.raises(DataError, match=r"--sftsafety-data ./nope.jsonl: no such file or folder"):
        load_prompts(suite, "./nope.jsonl")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(DataError) as exc:
        load_prompts(suite, None)
    message = one_line(exc)
    assert "hub dataset sorry-bench/sorry-bench-202503 cannot be reached" in message
    assert "--sftsafety-data sorry-bench/question.jsonl" in message


@pytest.mark.parametrize("release", ["202503", "202406"])
def test_shipped_placeholder_fixtures_match_the_generator_and_load(release):
    from pathlib import Path

    suite = load_suite(release)
    path = Path(__file__).resolve().parents[1] / "fixtures" / f"placeholder_{release}" / "question.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert rows == toy.placeholder_questions(suite)
    assert len(load_prompts(suite, str(path)).prompts) == suite.expected_prompts
