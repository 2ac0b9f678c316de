"""Accuracy on REAL speech the model never trained on: the bundled evaluation set
(assets/eval/, see assets/README.md) and WER/CER with one text normalisation.

    from streamasr.core.evaluation import load_eval_set, wer_cer
    items = load_eval_set()                       # [EvalItem(name, audio_path, reference)]
    print(wer_cer([i.reference for i in items], hypotheses))
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from streamasr import checkout
from streamasr.core.text import normalize

EVAL_DIR = checkout.ROOT / "assets" / "eval"
REFERENCES = "references.tsv"


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


def caption_quality(clips: list[list[tuple[float, dict]]], references: list[str]) -> dict:
    """What a caption reader sees, from each clip's result messages with the time each was
    shown (``(t, message)``, in order; the caller says what the times mean):

    * ``interim_words_shown`` / ``interim_words_changed``: words shown in interims, and
      the share that differ from the final word at the same position of the same
      utterance;
    * ``first_correct_delays``: for each final word that matches the reference, the time
      from the word's end to the first message showing it at its position;
    * ``last_interims``: per clip, each utterance's last interim before its final, joined
      (what a reader sees just before the finals land).
    """
    import jiwer

    def words(m: dict) -> list[dict]:
        return m["channel"]["alternatives"][0]["words"]

    shown = changed = 0
    delays: list[float] = []
    last_interims = []
    for events, ref in zip(clips, references):
        results = [(t, m) for t, m in events if m.get("type") == "Results"]
        finals = {m["start"]: words(m) for _, m in results if m["is_final"]}
        last: dict[float, str] = {}
        for _, m in results:
            if m["is_final"]:
                continue
            last[m["start"]] = m["channel"]["alternatives"][0]["transcript"]
            fw = finals.get(m["start"], [])
            for k, w in enumerate(words(m)):
                shown += 1
                changed += k >= len(fw) or fw[k]["word"] != w["word"]
        last_interims.append(" ".join(last[u] for u in sorted(last) if last[u]))
        final_words = [(u, k, w) for u, ws in sorted(finals.items()) for k, w in enumerate(ws)]
        hyp = " ".join(w["word"] for _, _, w in final_words)
        if not hyp:
            continue
        correct: set[int] = set()
        for part in jiwer.process_words(normalize(ref), hyp).alignments[0]:
            if part.type == "equal":
                correct.update(range(part.hyp_start_idx, part.hyp_end_idx))
        for idx, (u, k, w) in enumerate(final_words):
            if idx in correct:
                first = next(
                    t
                    for t, m in results
                    if m["start"] == u and len(words(m)) > k and words(m)[k]["word"] == w["word"]
                )
                delays.append(first - w["end"])
    return {
        "interim_words_shown": shown,
        "interim_words_changed": changed / max(shown, 1),
        "first_correct_delays": delays,
        "last_interims": last_interims,
    }
