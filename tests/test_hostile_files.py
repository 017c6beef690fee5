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


def test_deep_json_in_an_adapter_config_or_a_servers_answer_is_one_line(tmp_path, loopback):
    from pytest_sftsafety.backends.checkpoints import plan_models
    from pytest_sftsafety.backends.openai_api import post_json

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"base_model_name_or_path": ' + DEEP + "}")
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(SftSafetyError, match=r"adapter_config.json is not valid JSON"):
        plan_models((str(adapter),), None, None, False)
    loopback.respond = lambda index, call: (200, {"Content-Type": "application/json"}, DEEP)
    with pytest.raises(SftSafetyError, match=r"answered with something that is not a JSON object") as caught:
        post_json(f"{loopback.url}/v1/chat/completions", {"x": 1}, headers={}, timeout_s=5, max_retries=0,
                  backoff_s=0.01, describe="server", hint="start it")
    assert "\n" not in str(caught.value)
