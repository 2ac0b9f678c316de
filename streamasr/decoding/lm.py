"""Optional word n-gram language model (KenLM) for the prefix beam search.

Shallow fusion at word level: when a hypothesis completes a word (a separator token in
a "space" vocabulary, a word-starting piece in a "sentencepiece" one) the word is scored
by the LM and ``lm_alpha * ln P(word | history) + lm_beta`` is added to the
hypothesis' score.  When an utterance is finalized the unfinished last word and the
end-of-sentence token are scored too.  The LM's state restarts at each utterance.

Only the ``kenlm`` Python module is needed (``pip install kenlm``; it builds from source
with a C++ compiler).  It is optional: without it ``lm_path`` is rejected with a clear
error and everything else works.  pyctcdecode is not used: its decoder works on whole
matrices, whereas this beam search must carry its state across streaming requests.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path

from .text import SPACE, TokenText

LOG10_TO_LN = math.log(10.0)
END_OF_SENTENCE = "</s>"


def kenlm_available() -> bool:
    try:
        import kenlm  # noqa: F401
    except ImportError:
        return False
    return True


def check_lm_path(key: str, path: str) -> None:
    if not kenlm_available():
        raise ValueError(f"{key}: a word LM needs the 'kenlm' Python module, which is not "
                         "installed (pip install kenlm)")
    if not Path(path).is_file():
        raise ValueError(f"{key}: no such LM file {path!r}")


@functools.lru_cache(maxsize=4)
def _load(path: str):
    import kenlm

    return kenlm.Model(path)


class WordLM:
    """A loaded KenLM model plus the fusion weights; shared by every stream using it."""

    def __init__(self, path: str, alpha: float, beta: float):
        import kenlm

        self._kenlm = kenlm
        self.model = _load(str(path))
        self.alpha = alpha
        self.beta = beta

    def begin(self):
        state = self._kenlm.State()
        self.model.BeginSentenceWrite(state)
        return state

    def _score(self, state, word: str):
        out = self._kenlm.State()
        lp = self.model.BaseScore(state, word, out) * LOG10_TO_LN
        return out, self.alpha * lp + self.beta

    def advance(self, text: TokenText, state, word: str, score: float, tok: int):
        """(state, unfinished word, accumulated score) after appending token ``tok``."""
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
        """Accumulated score plus the unfinished word's and end-of-sentence scores."""
        if word:
            state, s = self._score(state, word)
            score += s
        out = self._kenlm.State()
        return score + self.alpha * self.model.BaseScore(state, END_OF_SENTENCE, out) \
            * LOG10_TO_LN
