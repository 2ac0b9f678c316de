"""Tokens <-> words, following the contract's ``word_boundary``.

* ``"space"``: the token ``" "`` separates words; every other token is text.
* ``"sentencepiece"``: a token starting with ``"\u2581"`` starts a new word (the marker
  is dropped); other tokens continue the current word.

Words are returned with the indices of the tokens they are made of, so that timings and
confidences can be taken from those tokens' frames.
"""

from __future__ import annotations

from dataclasses import dataclass

from streamasr.protocol.contract import ModelContract

SPACE = " "
SP_MARK = "\u2581"


@dataclass(frozen=True)
class Word:
    text: str
    tokens: tuple[int, ...]  # positions in the token sequence


class TokenText:
    def __init__(self, contract: ModelContract):
        self.vocabulary = tuple(contract.vocabulary)
        self.blank_id = contract.blank_id
        self.boundary = contract.word_boundary
        self._space_id = (
            self.vocabulary.index(SPACE)
            if self.boundary == "space" and SPACE in self.vocabulary
            else -1
        )
        # Per token: does it start a new word (sentencepiece) / is it a pure separator?
        self.starts_word = [
            self.boundary == "sentencepiece" and t.startswith(SP_MARK) for t in self.vocabulary
        ]
        self.piece = [t[1:] if s else t for t, s in zip(self.vocabulary, self.starts_word)]
        self.is_separator = [
            i == self._space_id or (self.starts_word[i] and not self.piece[i])
            for i in range(len(self.vocabulary))
        ]
        self.is_separator[self.blank_id] = True

    # -- tokens -> words -------------------------------------------------------------------
    def words(self, token_ids: list[int]) -> list[Word]:
        out: list[Word] = []
        text: list[str] = []
        idx: list[int] = []

        def flush() -> None:
            if text and "".join(text):
                out.append(Word("".join(text), tuple(idx)))
            text.clear()
            idx.clear()

        for pos, tok in enumerate(token_ids):
            if tok == self._space_id or tok == self.blank_id:
                flush()
                continue
            if self.starts_word[tok]:
                flush()
                idx.append(pos)  # a bare marker still starts (and times) the word
                text.append(self.piece[tok])
            elif self.piece[tok]:
                text.append(self.piece[tok])
                idx.append(pos)
        flush()
        return out

    def is_text(self, tok: int) -> bool:
        """True for a token that contributes characters to a word."""
        return not self.is_separator[tok]

    # -- words -> tokens (for hotwords) ----------------------------------------------------
    def encode(self, phrase: str) -> tuple[int, ...]:
        """Tokenise ``phrase`` by greedy longest match over the vocabulary.

        The model's own tokeniser may split a word differently; longest match is the
        usual stand-in for hotword lists (it yields the fewest, most specific tokens).
        Raises ValueError if some character cannot be covered by the vocabulary.
        """
        words = phrase.split()
        if not words:
            raise ValueError("empty phrase")
        if self.boundary == "sentencepiece":
            target = "".join(SP_MARK + w for w in words)
        else:
            target = SPACE.join(words)
        index = {t: i for i, t in enumerate(self.vocabulary) if i != self.blank_id and t}
        longest = max(len(t) for t in index)
        out: list[int] = []
        pos = 0
        while pos < len(target):
            for n in range(min(longest, len(target) - pos), 0, -1):
                tok = index.get(target[pos : pos + n])
                if tok is not None:
                    out.append(tok)
                    pos += n
                    break
            else:
                raise ValueError(f"{target[pos]!r} in {phrase!r} is not in the model's vocabulary")
        return tuple(out)
