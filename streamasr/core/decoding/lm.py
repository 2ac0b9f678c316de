"""Optional word n-gram language model (KenLM) for the prefix beam search.

Shallow fusion at word level: when a hypothesis completes a word (a separator token in
a "space" vocabulary, a word-starting piece in a "sentencepiece" one) the word is scored
by the LM and ``lm_alpha * ln P(word | history) + lm_beta`` is added to the
hypothesis' score.  When an utterance is finalized the unfinished last word and the
end-of-sentence token are scored too.  The LM's state restarts at each utterance.

**Partial words.**  Scoring a word only when a space completes it lets the search keep
letters glued together for as long as the acoustic model likes (``anmistrjondash...``):
nothing charges such a prefix until it ends.  So while a word is open, the hypothesis
carries a look-ahead score: ``lm_alpha * ln`` of the best unigram probability among the
LM's words that start with the open letters (a prefix table over the LM vocabulary), or
the cost of an unknown word once the letters are a prefix of no LM word.  When the word
completes, the look-ahead is replaced by the word's real score in context.

**Unknown words** cost ``P(<unk>)`` times a spelling cost per letter
(``lm_oov_letter_log10``): without it one ``<unk>`` would be cheaper than the several
real words it glues together, and the search would still prefer run-on strings.  The prefix
table comes from the ARPA file's unigrams; a KenLM binary has no readable vocabulary, so
with one the look-ahead is off (completed words are still scored).

Only the ``kenlm`` Python module is needed (``pip install kenlm``; it builds from source
with a C++ compiler).  It is optional: without it ``lm_path`` is rejected with a clear
error and everything else works.  pyctcdecode is not used: its decoder works on whole
matrices, whereas this beam search must carry its state across streaming requests.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

from streamasr.core.decoding.text import SPACE, TokenText

LOG10_TO_LN = math.log(10.0)
END_OF_SENTENCE = "</s>"
UNKNOWN_WORD = "<unk>"
#: KenLM's log10 probability for a word when the model has no ``<unk>`` entry.
KENLM_MISSING_UNK_LOG10 = -100.0
ARPA_MAGIC = "\\data\\"


def kenlm_available() -> bool:
    try:
        import kenlm  # noqa: F401
    except ImportError:
        return False
    return True


def check_lm_path(key: str, path: str) -> None:
    if not kenlm_available():
        raise ValueError(
            f"{key}: a word LM needs the 'kenlm' Python module, which is not "
            "installed (pip install kenlm)"
        )
    if not Path(path).is_file():
        raise ValueError(f"{key}: no such LM file {path!r}")


def is_arpa(path: str | Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096).decode("utf-8", errors="replace")
    return ARPA_MAGIC in head


def read_arpa_unigrams(path: str | Path) -> dict[str, float]:
    """``word -> log10 P(word)`` from an ARPA file's ``\\1-grams:`` section."""
    out: dict[str, float] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("\\1-grams:"):
                break
        else:
            raise ValueError(f"{path}: no \\1-grams: section")
        for line in f:
            line = line.strip()
            if not line:
                continue
            if line.startswith("\\"):
                break
            parts = line.split("\t") if "\t" in line else line.split()
            if len(parts) < 2:
                raise ValueError(f"{path}: malformed unigram line {line!r}")
            out[parts[1]] = float(parts[0])
    return out


class PrefixTable:
    """Best log10 unigram probability of any LM word starting with a given prefix.

    A dict of every prefix of every word (a flattened prefix trie): one lookup per
    extended hypothesis, no node walking.  ``words`` are the LM's spellable words."""

    def __init__(self, unigrams: dict[str, float], alphabet: frozenset[str] | None = None):
        self.words = frozenset(
            w
            for w in unigrams
            if not w.startswith("<") and (alphabet is None or set(w) <= alphabet)
        )
        best: dict[str, float] = {}
        for word, lp in unigrams.items():
            if word.startswith("<") or (alphabet is not None and not set(word) <= alphabet):
                continue  # <s>, </s>, <unk>, or not spellable
            for k in range(1, len(word) + 1):
                p = word[:k]
                if lp > best.get(p, -math.inf):
                    best[p] = lp
        self.best = best
        self.unk_log10 = unigrams.get(UNKNOWN_WORD, KENLM_MISSING_UNK_LOG10)

    def __len__(self) -> int:
        return len(self.best)

    def lookahead_log10(self, prefix: str, oov_letter_log10: float = 0.0) -> float:
        """log10 of the best completion of ``prefix``; an unknown word's if there is none
        (``<unk>`` plus ``oov_letter_log10`` per letter)."""
        best = self.best.get(prefix)
        if best is not None:
            return best
        return self.unk_log10 + oov_letter_log10 * len(prefix)


@functools.lru_cache(maxsize=4)
def _load(path: str):
    import kenlm

    return kenlm.Model(path)


@functools.lru_cache(maxsize=4)
def _prefix_table(path: str, alphabet: frozenset[str] | None) -> PrefixTable | None:
    if not is_arpa(path):
        return None
    return PrefixTable(read_arpa_unigrams(path), alphabet)


class WordLM:
    """A loaded KenLM model plus the fusion weights; shared by every stream using it.

    Hypothesis LM state is ``(kenlm state, open word, completed-words score)``; the
    look-ahead of the open word is recomputed from the word by :meth:`lookahead`."""

    def __init__(
        self,
        path: str,
        alpha: float,
        beta: float,
        partial_words: bool = True,
        alphabet: frozenset[str] | None = None,
        oov_letter_log10: float = 0.0,
    ):
        import kenlm

        self._kenlm = kenlm
        self.model = _load(str(path))
        self.alpha = alpha
        self.beta = beta
        self.oov_letter_log10 = oov_letter_log10
        # alphabet: the characters the acoustic model can spell; LM words outside it can
        # never be produced, so they must not make a prefix look cheap.
        self.prefixes = _prefix_table(str(path), alphabet) if partial_words else None

    @property
    def partial_words(self) -> bool:
        return self.prefixes is not None

    def begin(self):
        state = self._kenlm.State()
        self.model.BeginSentenceWrite(state)
        return state

    def _score(self, state, word: str):
        out = self._kenlm.State()
        lp = self.model.BaseScore(state, word, out)
        if self.oov_letter_log10 and word not in self.model:
            lp += self.oov_letter_log10 * len(word)
        return out, self.alpha * lp * LOG10_TO_LN + self.beta

    def lookahead(self, word: str) -> float:
        """Score carried for an open (unfinished) word: 0 when there is none or when
        partial-word scoring is off."""
        if not word or self.prefixes is None:
            return 0.0
        return self.alpha * self.prefixes.lookahead_log10(word, self.oov_letter_log10) * LOG10_TO_LN

    def advance(self, text: TokenText, state, word: str, score: float, tok: int):
        """(state, open word, completed-words score) after appending token ``tok``."""
        piece = text.piece[tok]
        if text.vocabulary[tok] == SPACE and text.boundary == "space":
            starts, piece = True, ""
        else:
            starts = text.starts_word[tok]
        if starts and word:
            state, s = self._score(state, word)
            return state, piece, score + s
        return state, word + piece, score

    def finish(self, state, word: str, score: float) -> float:
        """Completed-words score plus the open word's and end-of-sentence scores."""
        if word:
            state, s = self._score(state, word)
            score += s
        out = self._kenlm.State()
        return score + self.alpha * self.model.BaseScore(state, END_OF_SENTENCE, out) * LOG10_TO_LN
