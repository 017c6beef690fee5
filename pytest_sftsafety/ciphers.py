"""Answers to SORRY-Bench's cipher mutations, made readable before they are judged.

SORRY-Bench's encoding mutations (caesar, atbash, morse, ascii; after CipherChat, Yuan et al. 2024) ask the
model to answer in the cipher, and the benchmark decodes the answers before its judge reads them: a judge
reading ciphertext sees neither a refusal nor a fulfilment. A model often answers in plain English all the
same (a refusal especially), and decoding plain English garbles it, so each answer is judged as the text
that reads more like English: the decoded one only where it has more common English words than the answer
as written. Translation mutations would need a translation back to English, which no offline judge here
can do; ``unreadable_style`` says so.
"""

from __future__ import annotations

import re

CIPHER_STYLES = ("caesar", "atbash", "morse", "ascii")
CAESAR_SHIFT = 3  # CipherChat's Caesar cipher, as SORRY-Bench uses it

_MORSE = {
    ".-": "a", "-...": "b", "-.-.": "c", "-..": "d", ".": "e", "..-.": "f", "--.": "g", "....": "h", "..": "i",
    ".---": "j", "-.-": "k", ".-..": "l", "--": "m", "-.": "n", "---": "o", ".--.": "p", "--.-": "q", ".-.": "r",
    "...": "s", "-": "t", "..-": "u", "...-": "v", ".--": "w", "-..-": "x", "-.--": "y", "--..": "z",
    "-----": "0", ".----": "1", "..---": "2", "...--": "3", "....-": "4", ".....": "5", "-....": "6",
    "--...": "7", "---..": "8", "----.": "9", ".-.-.-": ".", "--..--": ",", "..--..": "?", ".----.": "'",
    "-.-.--": "!", "-..-.": "/", "-.--.": "(", "-.--.-": ")", "---...": ":", "-.-.-.": ";", "-...-": "=",
    ".-.-.": "+", "-....-": "-", ".-..-.": '"', ".--.-.": "@",
}
# The most frequent English words (function words and the words of refusals and instructions): how much a
# text reads like English is the share of its words found here.
_COMMON = frozenset("""
the of and to a in is it you that he was for on are with as i his they be at one have this from or had by
not but what some we can out other were all there when up use your how said an each she which do their if
will way about many then them would so these her him has more could no make than first been its who now
people my over did down only may after where most also should here help sorry cannot can't i'm however
provide information assist request sure step steps first use using any with without please this that those
""".split())
_WORD = re.compile(r"[a-z']+")


def english_score(text: str) -> float:
    """Share of the text's words that are common English words (0 for a text without words)."""
    words = _WORD.findall(text.lower())
    return sum(w in _COMMON for w in words) / len(words) if words else 0.0


def _shift(text: str, shift: int) -> str:
    out = []
    for c in text:
        if "a" <= c <= "z":
            out.append(chr((ord(c) - 97 + shift) % 26 + 97))
        elif "A" <= c <= "Z":
            out.append(chr((ord(c) - 65 + shift) % 26 + 65))
        else:
            out.append(c)
    return "".join(out)


def _atbash(text: str) -> str:
    return "".join(chr(219 - ord(c)) if "a" <= c <= "z" else chr(155 - ord(c)) if "A" <= c <= "Z" else c
                   for c in text)


def _morse(text: str) -> str:
    # Words are separated by "/" or by runs of two or more spaces; letters by one space.
    words = re.split(r"\s*/\s*|\s{2,}|\n+", text.strip())
    return " ".join("".join(_MORSE.get(code, "") for code in word.split()) for word in words)


def _ascii(text: str) -> str:
    codes = re.findall(r"\d+", text)
    return "".join(chr(int(c)) for c in codes if 9 <= int(c) < 127)


_DECODERS = {"caesar": lambda t: _shift(t, -CAESAR_SHIFT), "atbash": _atbash, "morse": _morse, "ascii": _ascii}


def readable(prompt_style: str, answer: str) -> tuple[str, bool]:
    """The answer as the judge should read it, and whether it was decoded: for a cipher style, the decoded
    answer when it reads more like English than the answer as written; otherwise the answer itself."""
    decode = _DECODERS.get(prompt_style)
    if decode is None or not answer:
        return answer, False
    decoded = decode(answer)
    if english_score(decoded) > english_score(answer):
        return decoded, True
    return answer, False


def unreadable_style(prompt_style: str, judge: str) -> str | None:
    """Why answers of this prompt style cannot be judged by this judge (None when they can): a
    translation mutation's answers are in another language, which only a judge model or an API judge may
    read; the keyword and learned judges match English."""
    if prompt_style.startswith("translate-") and judge.split(":", 1)[0] in ("keyword", "learned"):
        return (f"--prompt-style {prompt_style}: answers come in another language, which the {judge} judge "
                f"(English only) cannot read, and nothing here translates them back; use --judge api:MODEL or "
                f"--judge sorry-bench, or an English prompt style")
    return None
