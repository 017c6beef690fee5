"""Toxicity scorers: Perspective against a loopback server, the local scorer on a tiny classifier built here."""

from __future__ import annotations

import time
import traceback

import pytest

from pytest_sftsafety.backends.openai_api import EndpointError
from pytest_sftsafety.errors import ConfigError
from pytest_sftsafety.judges.toxicity import LocalToxicityScorer, PerspectiveScorer, make_toxicity_scorer, toxic_label
from pytest_sftsafety.tools import toy

from .loopback import LoopbackServer, assert_one_line, closed_port

KEY = "perspective-PLANTED-key-456"
PATH = "/v1alpha1/comments:analyze"
TEXTS = ["you are awful and I hate you", "what a nice day", "ok", "awful awful awful people everywhere",
         "a much longer sentence about gardens, rivers and the tea we drink in the afternoon"]




def analysis(value: float) -> dict:
    return {"attributeScores": {"TOXICITY": {"spanScores": [], "summaryScore": {"value": value,
                                                                                "type": "PROBABILITY"}}},
            "languages": ["en"]}


def by_word(index, call):
    return 200, {}, analysis(0.9 if "awful" in call.body["comment"]["text"] else 0.05)


def perspective(server: LoopbackServer, **options) -> PerspectiveScorer:
    return PerspectiveScorer(KEY, **{"url": f"{server.url}{PATH}", "requests_per_s": 100.0, "backoff_s": 0.01,
                                     **options})


# --- Perspective ---------------------------------------------------------------------------------------


def test_perspective_request_format_and_scores(loopback, monkeypatch):
    monkeypatch.setenv("PERSPECTIVE_API_KEY", KEY)
    loopback.respond = by_word
    scorer = make_toxicity_scorer("perspective", url=f"{loopback.url}{PATH}", requests_per_s=100.0)
    assert scorer.score(["you are awful", "", "nice day", "  "]) == [0.9, 0.0, 0.05, 0.0]
    assert len(loopback.calls) == 2  # blank texts need no request
    call = loopback.calls[0]
    assert call.path == PATH and call.query == {"key": [KEY]}
    assert call.body == {"comment": {"text": "you are awful"}, "requestedAttributes": {"TOXICITY": {}},
                         "doNotStore": True}
    assert "authorization" not in call.headers
    assert scorer.id == f"perspective:TOXICITY@127.0.0.1:{loopback.httpd.server_address[1]}{PATH}"


def test_perspective_rate_limit_spaces_requests(loopback):
    loopback.respond = by_word
    scorer = perspective(loopback, requests_per_s=10.0)
    start = time.monotonic()
    scorer.score([f"text {i}" for i in range(6)])
    assert time.monotonic() - start >= 0.5  # 6 requests at 10/s: 5 gaps of 0.1 s
    assert len(loopback.calls) == 6


def test_perspective_retries_429_within_the_rate_limit(loopback):
    script = {0: (429, {"Retry-After": "0"}, {"error": {"code": 429, "message": "Quota exceeded"}}),
              1: (503, {}, {"error": {"message": "unavailable"}})}
    loopback.respond = lambda index, call: script.get(index, by_word(index, call))
    assert perspective(loopback, requests_per_s=5.0).score(["awful"]) == [0.9]
    assert len(loopback.calls) == 3
    assert loopback.calls[1].at - loopback.calls[0].at >= 0.15  # the retry waited for the limiter (0.2 s)


def test_perspective_unsupported_language_is_unscored_not_fatal(loopback):
    import math

    unsupported = {"error": {"code": 400, "message": "Attribute TOXICITY does not support request languages: mr",
                             "status": "INVALID_ARGUMENT"}}
    loopback.respond = lambda index, call: (400, {}, unsupported) if "मराठी" in call.body["comment"]["text"] \
        else by_word(index, call)
    scores = perspective(loopback).score(["awful", "मराठी मजकूर", "fine"])
    assert scores[0] == 0.9 and math.isnan(scores[1]) and scores[2] == 0.05
    assert len(loopback.calls) == 3  # not retried
    loopback.respond = lambda index, call: (400, {}, {"error": {"code": 400, "message": "Comment too long"}})
    with pytest.raises(EndpointError, match="HTTP 400: Comment too long"):
        perspective(loopback).score(["x"])


def test_perspective_key_is_scrubbed_from_every_error(loopback):
    echo = f"API key not valid: {KEY}. Please pass a valid API key. url=...?key={KEY}"
    loopback.respond = lambda index, call: (400 if index == 0 else 503, {}, {"error": {"code": 400, "message": echo}})
    scorer = perspective(loopback, max_retries=1)
    failures = []
    for _ in range(2):  # the 400 (not retried), then the 503s (retried)
        with pytest.raises(EndpointError) as info:
            scorer.score(["hello"])
        failures.append(info.value)
    assert "HTTP 400" in assert_one_line(failures[0]) and len(loopback.calls) == 3
    assert "HTTP 503 after 2 tries" in assert_one_line(failures[1])

    port = closed_port()
    with pytest.raises(EndpointError) as info:
        perspective(loopback, url=f"http://127.0.0.1:{port}{PATH}", max_retries=1).score(["hello"])
    failures.append(info.value)
    assert f"http://127.0.0.1:{port}{PATH} unreachable (connection refused) after 2 tries" in \
        assert_one_line(info.value)

    loopback.respond = lambda index, call: (200, {}, {"unexpected": KEY})
    with pytest.raises(EndpointError) as info:
        scorer.score(["hello"])
    failures.append(info.value)
    assert "TOXICITY summary score" in assert_one_line(info.value)

    seen = [scorer.id, repr(scorer)]
    for exc in failures:
        assert not isinstance(exc.__context__, OSError)  # no chained HTTPError holding the URL and its key
        seen += [str(exc), repr(exc), "".join(traceback.format_exception(exc))]
    for text in seen:
        assert KEY not in text and "PLANTED" not in text


def test_perspective_needs_a_key(monkeypatch):
    monkeypatch.delenv("PERSPECTIVE_API_KEY", raising=False)
    with pytest.raises(ConfigError) as info:
        make_toxicity_scorer("perspective")
    assert "PERSPECTIVE_API_KEY" in assert_one_line(info.value)


def test_bad_specs_are_one_line_errors(tmp_path):
    for spec, needle in [("detoxify", "unknown toxicity scorer; use perspective or local:PATH"),
                         ("local:", "give the model folder"),
                         (f"local:{tmp_path / 'missing'}", "no such folder"),
                         (f"local:{tmp_path}", "no config.json")]:
        with pytest.raises(ConfigError) as info:
            make_toxicity_scorer(spec)
        assert needle in assert_one_line(info.value)


# --- the local scorer ----------------------------------------------------------------------------------


def test_toxic_label_choice():
    assert toxic_label({0: "non-toxic", 1: "toxic"}, None) == (1, False)
    assert toxic_label({"0": "TOXIC", "1": "NOT_TOXIC"}, "single_label_classification") == (0, False)
    assert toxic_label({0: "nontoxic", 1: "toxicity"}, None) == (1, False)
    assert toxic_label({0: "LABEL_0", 1: "LABEL_1"}, None) == (1, False)
    assert toxic_label({0: "severe_toxic", 1: "toxic", 2: "obscene"}, "multi_label_classification") == (1, True)
    assert toxic_label({0: "score"}, "regression") == (0, True)
    with pytest.raises(ConfigError, match="none names a toxic class"):
        toxic_label({0: "a", 1: "b", 2: "c"}, None)


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory):
    """Two tiny untrained Llama classifiers sharing a tokenizer: a 2-label softmax and a multi-label one."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    root = tmp_path_factory.mktemp("toxicity")
    tokenizer = toy.train_tokenizer(TEXTS * 4, root / "tokenizer", vocab_size=300)
    folders = {}
    for name, labels, problem in [("binary", {0: "non-toxic", 1: "toxic"}, None),
                                  ("multi", {0: "obscene", 1: "toxic", 2: "threat"}, "multi_label_classification")]:
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=2, intermediate_size=64, num_labels=len(labels), id2label=labels,
                             label2id={v: k for k, v in labels.items()}, pad_token_id=tokenizer.pad_token_id,
                             problem_type=problem, initializer_range=0.5)  # wide weights: varied scores
        folder = root / name
        LlamaForSequenceClassification(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[name] = folder
    return folders


def direct_scores(folder, texts, activation):
    """The toxic label's probability from the model's logits, one unpadded text at a time."""
    import torch
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = LlamaForSequenceClassification.from_pretrained(folder).eval()
    index = model.config.label2id["toxic"]
    with torch.no_grad():
        return [float(activation(model(**tokenizer(t, return_tensors="pt")).logits[0])[index]) for t in texts]


def test_local_scorer_matches_the_softmax_of_the_logits(classifiers):
    import torch

    scorer = make_toxicity_scorer(f"local:{classifiers['binary']}")
    assert isinstance(scorer, LocalToxicityScorer) and scorer.id.startswith("local:")
    assert scorer.id != make_toxicity_scorer(f"local:{classifiers['multi']}").id  # other weights, other id
    scores = scorer.score(TEXTS)
    assert all(0.0 <= s <= 1.0 for s in scores) and len(set(scores)) > 1
    assert scores == pytest.approx(direct_scores(classifiers["binary"], TEXTS, lambda x: torch.softmax(x, -1)),
                                   abs=1e-5)
    assert scorer.score([]) == []


def test_local_scorer_is_batch_size_independent(classifiers):
    one = LocalToxicityScorer(classifiers["binary"], batch_size=1).score(TEXTS)
    for size in (2, 5):
        assert LocalToxicityScorer(classifiers["binary"], batch_size=size).score(TEXTS) == pytest.approx(one, abs=1e-5)


def test_local_multi_label_model_uses_the_sigmoid(classifiers):
    import torch

    scores = LocalToxicityScorer(classifiers["multi"], batch_size=2).score(TEXTS)
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert scores == pytest.approx(direct_scores(classifiers["multi"], TEXTS, torch.sigmoid), abs=1e-5)


def test_a_run_reports_toxicity_for_the_configured_categories(pytester, toy_models, classifiers):
    import json

    args = ["--sftsafety-data", str(toy_models.data_202503), "--model", str(toy_models.answers_hate),
            "--max-new-tokens", "24", "--temperatures", "0", "-p", "no:cacheprovider", "--sftsafety-store",
            "store.sqlite", "-k", "01_ or 07_", "--toxicity", f"local:{classifiers['binary']}",
            "--sftsafety-json", "r.json"]
    result = pytester.runpytest(*args)
    report = json.loads((pytester.path / "r.json").read_text())
    by_id = {e["category_id"]: e for e in report["entries"]}
    assert "toxicity" not in by_id[7]  # not a hate-speech category
    toxicity = by_id[1]["toxicity"]
    assert toxicity["scorer"].startswith("local:") and toxicity["reference"]["answers"] == 10
    [candidate] = toxicity["candidates"]
    assert candidate["model"] == str(toy_models.answers_hate) and 0 <= candidate["mean"] <= candidate["max"] <= 1
    result.stdout.fnmatch_lines(["toxicity (local:*) in 1 categories: mean candidate score * vs reference *"])
    # A second run takes the scores from the store; naming category 7 as well scores it too.
    again = pytester.runpytest(*args[:-2], "--toxicity-categories", "hate_speech,7", "--sftsafety-json", "s.json")
    assert again.ret == result.ret
    second = {e["category_id"]: e for e in json.loads((pytester.path / "s.json").read_text())["entries"]}
    assert second[1]["toxicity"] == toxicity and second[7]["toxicity"]["reference"]["answers"] == 10
