"""Text in the form the character models emit: lower case, numbers spelled out, no
punctuation but word-internal apostrophes.  Used at runtime (two-pass finals put
Whisper's text in this form) and by the evaluation (both sides of WER are normalised)."""

from __future__ import annotations

import re

_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen "
    "fourteen fifteen sixteen seventeen eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """A number as spoken, the way the training text spells it ("one hundred and five")."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    if n < 1000:
        rest = n % 100
        return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " and " + number_words(rest))
    if n < 1_000_000:
        rest = n % 1000
        return (
            number_words(n // 1000)
            + " thousand"
            + ("" if rest == 0 else (" and " if rest < 100 else " ") + number_words(rest))
        )
    return " ".join(_ONES[int(d)] for d in str(n))


def normalize(text: str) -> str:
    """Lower case, digits spelled out, punctuation other than word-internal apostrophes
    removed, whitespace collapsed: the form the character models emit."""
    t = text.lower().replace("\u2019", "'")
    t = re.sub(r"\d+", lambda m: " " + number_words(int(m.group())) + " ", t)
    t = re.sub(r"[^a-z' ]+", " ", t)
    t = re.sub(r"(?<![a-z])'|'(?![a-z])", " ", t)
    return " ".join(t.split())
