"""SORRY-Bench's cipher mutations: answers judged decoded, plain answers left alone, translations refused for
English-only judges."""

import json

import pytest

from pytest_sftsafety.ciphers import english_score, readable, unreadable_style
from pytest_sftsafety.suite import load_suite
from pytest_sftsafety.tools import toy

REFUSAL = "I'm sorry, but I cannot help with that request. It is not something I can provide."
HELP = "Sure, here is how you do it: first you take the tools, then you use them with care."
MORSE = {"a": ".-", "b": "-...", "c": "-.-.", "d": "-..", "e": ".", "f": "..-.", "g": "--.", "h": "....", "i": "..",
         "j": ".---", "k": "-.-", "l": ".-..", "m": "--", "n": "-.", "o": "---", "p": ".--.", "q": "--.-", "r": ".-.",
         "s": "...", "t": "-", "u": "..-", "v": "...-", "w": ".--", "x": "-..-", "y": "-.--", "z": "--.."}


def caesar(text: str, shift: int = 3) -> str:
    return "".join(chr((ord(c) - 97 + shift) % 26 + 97) if c.islower() and c.isascii() else
                   chr((ord(c) - 65 + shift) % 26 + 65) if c.isupper() and c.isascii() else c for c in text)


def atbash(text: str) -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz"
    table = str.maketrans(alphabet + alphabet.upper(), alphabet[::-1] + alphabet[::-1].upper())
    return text.translate(table)


def morse(text: str) -> str:
    return " / ".join(" ".join(MORSE[c] for c in word if c in MORSE) for word in text.lower().split())


def ascii_codes(text: str) -> str:
    return " ".join(str(ord(c)) for c in text)


@pytest.mark.parametrize("style, encode", [("caesar", caesar), ("atbash", atbash), ("morse", morse),
                                           ("ascii", ascii_codes)])
def test_cipher_answers_are_judged_decoded_and_plain_ones_as_written(style, encode):
    for answer in (REFUSAL, HELP):
        text, decoded = readable(style, encode(answer))
        assert decoded
        # Morse has no case or apostrophes: compare words.
        assert text.lower().replace("'", "").split() == answer.lower().replace("'", "").replace(",", "").replace(
            ":", "").replace(".", "").split() if style == "morse" else text == answer
        # An answer the model wrote in plain English is not garbled by decoding it.
        assert readable(style, answer) == (answer, False)
    assert readable("base", caesar(REFUSAL)) == (caesar(REFUSAL), False)
    assert english_score(REFUSAL) > 0.3 > english_score(caesar(REFUSAL))


def test_translated_styles_need_a_judge_that_reads_them():
    assert "cannot read" in unreadable_style("translate-fr", "learned")
    assert "cannot read" in unreadable_style("translate-zh-cn", "keyword")
    assert unreadable_style("translate-fr", "api:gpt-4o") is None
    assert unreadable_style("caesar", "learned") is None


def test_a_caesar_run_judges_plain_answers_as_written_and_a_translated_one_is_refused(pytester, toy_models):
    # The toy models answer in English whatever the prompt: nothing is decoded, and the verdicts are those of
    # the same prompts under the base style.
    rows = toy.placeholder_questions(load_suite("sorry_bench_202503"))
    folder = pytester.path / "data"
    toy.write_jsonl(folder / "question.jsonl", rows)
    toy.write_jsonl(folder / "question_caesar.jsonl", [{**r, "prompt_style": "caesar"} for r in rows])
    toy.write_jsonl(folder / "question_translate-fr.jsonl", [{**r, "prompt_style": "translate-fr"} for r in rows])
    args = ["--model", str(toy_models.answer_all), "--sftsafety-data", str(folder), "-k", "01_ or 02_",
            "--temperatures", "0", "-p", "no:cacheprovider", "--max-new-tokens", "24"]
    base = pytester.runpytest(*args, "--sftsafety-json", "base.json")
    styled = pytester.runpytest(*args, "--prompt-style", "caesar", "--sftsafety-json", "caesar.json")
    assert base.ret == styled.ret
    reports = [json.loads((pytester.path / name).read_text()) for name in ("base.json", "caesar.json")]
    assert reports[1]["run"]["decoded_for_judge"] == 0
    assert [e["verdict"] for e in reports[0]["entries"]] == [e["verdict"] for e in reports[1]["entries"]]
    translated = pytester.runpytest(*args, "--prompt-style", "translate-fr")
    assert translated.ret == pytest.ExitCode.USAGE_ERROR
    translated.stderr.fnmatch_lines(["ERROR: --prompt-style translate-fr: answers come in another language, which "
                                     "the learned judge (English only) cannot read*"])


def test_the_runner_judges_cipher_answers_decoded_and_counts_them_once(tmp_path):
    from pytest_sftsafety.backends import GenRow
    from pytest_sftsafety.config import RunConfig
    from pytest_sftsafety.judges import make_judge
    from pytest_sftsafety.runner import RunStats, _judge_all
    from pytest_sftsafety.store import Store

    class Quiet:
        def update(self, rows, tokens=0):
            pass

        def close(self):
            pass

    cfg = RunConfig(models=("m",), prompt_style="caesar")
    rows = [GenRow("Ciphered request", 0.0, 0), GenRow("Another", 0.0, 0)]
    texts = {"candidate:0": [caesar(HELP), REFUSAL]}
    store, judge, stats = Store(tmp_path / "s.sqlite"), make_judge("keyword"), RunStats()
    scores = _judge_all(cfg, judge, rows, ["candidate:0"], texts, store, stats, lambda total, label: Quiet())
    # The ciphered help is judged as the help it decodes to; the plain refusal as the refusal it is.
    assert scores["candidate:0"] == judge.score([r.prompt for r in rows], [HELP, REFUSAL])
    assert stats.decoded_for_judge == 1
    again = RunStats()  # a later stage finds these judgments stored: nothing judged, nothing counted twice
    _judge_all(cfg, judge, rows, ["candidate:0"], texts, store, again, lambda total, label: Quiet())
    assert (again.judged, again.decoded_for_judge) == (0, 0)
