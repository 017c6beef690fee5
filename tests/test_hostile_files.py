"""Files a careless or hostile user hands the tool, read by every loader of JSON: one line, never a traceback."""

import json

import pytest

from pytest_sftsafety.baseline import load as load_baseline
from pytest_sftsafety.config import parse_judge_error
from pytest_sftsafety.data import load_prompts
from pytest_sftsafety.errors import SftSafetyError
from pytest_sftsafety.report import load_report
from pytest_sftsafety.suite import load_suite
from pytest_sftsafety.tools import toy

DEEP = "[" * 100_000 + "]" * 100_000  # past Python's recursion limit, which json's decoder uses


def test_json_nested_past_the_recursion_limit_is_one_line_in_every_loader(tmp_path):
    suite = load_suite("sorry_bench_202503")
    lines = [json.dumps(r) for r in toy.placeholder_questions(suite)]
    lines[3] = '{"question_id": 4, "category": "1", "turns": ' + DEEP + "}"
    prompts = tmp_path / "question.jsonl"
    prompts.write_text("\n".join(lines))
    with pytest.raises(SftSafetyError, match=r"question.jsonl row 4: JSON nested too deeply to read; each line must "
                                             r"be one flat question object$"):
        load_prompts(suite, str(prompts))
    deep = tmp_path / "deep.json"
    deep.write_text('{"schema": ' + DEEP + "}")
    for load in (load_baseline, load_report, parse_judge_error):
        with pytest.raises(SftSafetyError) as caught:
            load(str(deep))
        assert "\n" not in str(caught.value) and "deep.json" in str(caught.value)
