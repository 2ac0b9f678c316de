"""Accuracy on REAL speech the model never trained on: the bundled evaluation set
(assets/eval/, see assets/README.md) and WER/CER with one text normalisation.

    from streamasr.evaluation import load_eval_set, wer_cer
    items = load_eval_set()                       # [EvalItem(name, audio_path, reference)]
    print(wer_cer([i.reference for i in items], hypotheses))
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

EVAL_DIR = Path(__file__).resolve().parent.parent / "assets" / "eval"
REFERENCES = "references.tsv"

_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen "
    "fourteen fifteen sixteen seventeen eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


@dataclass(frozen=True)
class EvalItem:
    name: str
    audio_path: Path
    reference: str


def load_eval_set(folder: Path = EVAL_DIR) -> list[EvalItem]:
    items = []
    for line in (folder / REFERENCES).read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, ref = line.split("\t", 1)
        path = folder / name
        if not path.exists():
            raise FileNotFoundError(f"evaluation clip {path} listed in {REFERENCES} is missing")
        items.append(EvalItem(Path(name).stem, path, normalize(ref)))
    return items


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


def wer_cer(references: list[str], hypotheses: list[str]) -> dict[str, float]:
    """Corpus WER and CER (jiwer) after normalising both sides; counts included."""
    import jiwer

    refs = [normalize(r) for r in references]
    hyps = [normalize(h) for h in hypotheses]
    # jiwer refuses empty references; none of ours is empty, an empty hypothesis is fine.
    words = jiwer.process_words(refs, hyps)
    chars = jiwer.process_characters(refs, hyps)
    return {
        "wer": words.wer,
        "cer": chars.cer,
        "words": sum(len(r.split()) for r in refs),
        "substitutions": words.substitutions,
        "deletions": words.deletions,
        "insertions": words.insertions,
    }
