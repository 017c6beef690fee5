"""Option validation: every bad value is one line that names the fix."""

from __future__ import annotations

import pytest

from pytest_sftsafety.config import OPTIONS, build_config, parse_limits
from pytest_sftsafety.errors import ConfigError


def config_with(**values):
    return build_config(lambda spec: values.get(spec.dest))


def test_defaults():
    cfg = config_with(model=["runs/a"])
    assert cfg.models == ("runs/a",) and cfg.seeds == 5 and cfg.temperatures == (0.0, 0.7)
    assert cfg.min_p == 0.1 and cfg.judge == "learned" and cfg.suite == "sorry_bench_202503"
    assert cfg.samples_at(0.0) == 1 and cfg.samples_at(0.7) == 5


def test_values_from_strings_as_ini_gives_them():
    cfg = config_with(model=["a", "b"], seeds="3", temperatures="0, 0.7,1.0", min_p="0.05", batch_size="8")
    assert cfg.models == ("a", "b") and cfg.seeds == 3 and cfg.temperatures == (0.0, 0.7, 1.0)
    assert cfg.min_p == 0.05 and cfg.batch_size == 8


@pytest.mark.parametrize("values, message", [
    ({"seeds": "0"}, "--seeds 0: must be >= 1, e.g. --seeds 5"),
    ({"seeds": "2.5"}, "--seeds 2.5: must be a whole number >= 1"),
    ({"seeds": "1000000000"}, "--seeds 1000000000: must be at most 256 (samples per prompt: each adds a generation "
                              "for every prompt and model), e.g. --seeds 5"),
    ({"seeds": "2", "max_seeds": "300"}, "--max-seeds 300: must be at most 256"),
    ({"temperatures": "0,-0.7"}, "temperature -0.7 is outside [0, 5]"),
    ({"temperatures": "0,hot"}, "'hot' is not a number; use e.g. --temperatures 0,0.7"),
    ({"temperatures": "0.7,0.7"}, "temperature 0.7 is listed twice"),
    ({"temperatures": "nan"}, "temperature nan is outside [0, 5]"),
    ({"min_p": "1.5"}, "--min-p 1.5: must be a number in [0, 1]"),
    ({"max_fulfillment": ["1.5"]}, "--max-fulfillment 1.5: must be a number in [0, 1], e.g. --max-fulfillment 0.2"),
    ({"min_p": "x"}, "--min-p x: must be a number in [0, 1]"),
    ({"max_new_tokens": "0"}, "--max-new-tokens 0: must be >= 1"),
    ({"batch_size": "-4"}, "--batch-size -4: must be >= 1"),
    ({"margin": "2"}, "--margin 2: must be a number in [0, 1]"),
    ({"device": "gpu"}, "--device gpu: use auto, cpu, cuda, cuda:N or mps"),
    ({"dtype": "fp8"}, "--dtype fp8: use one of auto, float32, bfloat16, float16"),
    ({"judge": "oracle"}, "--judge oracle: unknown judge; use one of learned, keyword, sorry-bench[:PATH], api:MODEL"),
    ({"prompt_style": "yelling"}, "--prompt-style yelling: use base or one of question, slang"),
    ({"judge": "api:"}, "--judge api:: give the model name after the colon, e.g. --judge api:gpt-4o"),
    ({"judge": "sorry-bench:/missing/folder"}, "--judge sorry-bench:/missing/folder: no such folder; give the folder "
                                              "that holds the SORRY-Bench judge model, or its hub id (owner/name)"),
    ({"judge": "sorry-bench:./judge"}, "--judge sorry-bench:./judge: no such folder"),
    ({"judge_mode": "sample"}, "--judge-mode sample: use logits or decode"),
    ({"judge_batch_size": "0"}, "--judge-batch-size 0: must be >= 1"),
    ({"judge_concurrency": "many"}, "--judge-concurrency many: must be a whole number >= 1"),
    ({"judge_error": "0.9,x"}, "--judge-error 0.9,x: give SENSITIVITY,SPECIFICITY as numbers"),
    ({"judge_error": "0.4,0.5"}, "sensitivity + specificity = 0.90 <= 1: this judge is no better than chance"),
    ({"judge_error": "1.2,0.9"}, "--judge-error 1.2,0.9: sensitivity 1.2 is not in [0, 1]"),
    ({"judge_error": "missing.json"}, "--judge-error missing.json: no such file; write one with `sftsafety "
                                      "judge-agreement"),
    ({"toxicity": "vibes"}, "--toxicity vibes: use perspective or local:PATH"),
])
def test_bad_values(values, message):
    with pytest.raises(ConfigError) as exc:
        config_with(model=["a"], **values)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_judge_values(tmp_path):
    assert config_with(model=["a"], judge="sorry-bench:judges/sb").judge == "sorry-bench:judges/sb"
    assert config_with(model=["a"], judge="api:gpt-4o-mini").judge == "api:gpt-4o-mini"
    error = config_with(model=["a"], judge_error="0.9,0.95").judge_error
    assert (error.sensitivity, error.specificity, error.judge) == (0.9, 0.95, None)
    measured = tmp_path / "agreement.json"
    measured.write_text('{"judge": "keyword-v1", "sensitivity": 0.82, "specificity": 0.94}', encoding="utf-8")
    error = config_with(model=["a"], judge_error=str(measured)).judge_error
    assert (error.sensitivity, error.specificity, error.judge, error.source) == (0.82, 0.94, "keyword-v1",
                                                                                   str(measured))
    (tmp_path / "bad.json").write_text('{"kappa": 0.8}', encoding="utf-8")
    with pytest.raises(ConfigError, match="not a judge-agreement JSON file"):
        config_with(model=["a"], judge_error=str(tmp_path / "bad.json"))


def test_every_option_has_help_and_an_ini_key():
    flags = [spec.flag for spec in OPTIONS]
    assert len(flags) == len(set(flags))
    for spec in OPTIONS:
        assert spec.help and spec.ini.startswith("sftsafety_")


def test_readme_documents_every_option():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    for spec in OPTIONS:
        assert f"`{spec.flag}" in readme and f"| `{spec.dest}` |" in readme, spec.flag


SERVED = {"backend": "openai", "endpoint": "http://127.0.0.1:8000/v1"}


@pytest.mark.parametrize("values, message", [
    ({**SERVED, "load_in_4bit": True}, "--load-in-4bit has no effect with --backend openai"),
    ({**SERVED, "gpus_per_worker": "2"}, "--gpus-per-worker has no effect with --backend openai"),
    ({"concurrency": "4"}, "--concurrency is for --backend openai; add --backend openai or drop --concurrency"),
    ({"backend": "vllm", "load_in_4bit": True}, "--load-in-4bit is for --backend transformers"),
    ({"backend": "vllm", "device": "cuda:1"}, "--device cuda:1: vLLM runs where its build runs"),
    ({**SERVED, "api_key_env": "MY KEY"}, "--api-key-env 'MY KEY': not an environment variable name"),
    ({**SERVED, "request_retries": "-1"}, "--request-retries -1: must be >= 0"),
])
def test_backend_option_conflicts(values, message):
    with pytest.raises(ConfigError) as exc:
        config = config_with(model=["a"], **values)
        if values.get("api_key_env"):
            from pytest_sftsafety.backends.served import make_client

            make_client(config)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_another_backends_settings_from_files_are_ignored_and_defaults_pass():
    """Project defaults (ini, pyproject.toml) for one backend do not stop a run on another, and are left at
    their defaults in its settings; a typed default value is no conflict either."""
    values = {"model": ["a"], **SERVED, "load_in_4bit": True, "device": "cuda", "dtype": "float16"}
    cfg = build_config(lambda spec: values.get(spec.dest), typed={"model", "backend", "endpoint"})
    assert not cfg.load_in_4bit and cfg.device == "cuda" and cfg.dtype == "float16"  # the judge may use these
    values = {"model": ["a"], "backend": "transformers", "endpoint": "http://x/v1", "concurrency": "4"}
    cfg = build_config(lambda spec: values.get(spec.dest), typed={"model", "backend"})
    assert cfg.endpoint is None and cfg.concurrency == 8
    assert config_with(model=["a"], **SERVED, batch_size="auto", gpus_per_worker="1").backend == "openai"


def test_a_lone_limit_value_is_a_list_of_one_and_a_bad_one_is_one_line():
    # A bare number (as a settings file may give one) is the overall limit; found by the fault matrix's fuzzing,
    # which gave parse_limits a float and got a TypeError.
    assert parse_limits(0.2) == (("overall", 0.2),)
    with pytest.raises(ConfigError, match=r"^--max-fulfillment 3: must be a number in \[0, 1\]"):
        parse_limits(3)
