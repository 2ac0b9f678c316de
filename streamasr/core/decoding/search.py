"""Frame-synchronous CTC searches that keep their state between requests.

Both searches consume one output frame at a time (``step``), so that the stream decoder
can check its endpoint rules after every frame and a stream cut into requests of any size
decodes exactly like the whole matrix.  Both keep, for their best hypothesis, a CTC
alignment: a linked list of :class:`Token` nodes (token id, first frame, last frame, peak
posterior), from which word timings and confidences are derived.

* :class:`GreedySearch`: best path.  The previous frame's argmax is stream state, so a
  token whose frames straddle a request boundary -- or an utterance boundary forced by
  endpoint rule 3 -- is emitted once.
* :class:`BeamSearch`: CTC prefix beam search in the log domain.  Per frame only the
  ``beam_top_k`` most likely non-blank tokens are tried, and of those only the ones at
  least ``beam_min_token_logp`` likely (the frame's best always).  Optional hotword boosting
  (:class:`ContextGraph`) and word n-gram shallow fusion (:mod:`.lm`).  A prefix's
  alignment is the one of its most probable single contribution at each frame (a
  Viterbi-style choice inside the prefix sum).

``reset()`` starts a new utterance: the token sequence is emptied but the CTC state that
decides whether the next frame repeats the last emitted token is carried over.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from streamasr.core.decoding.text import TokenText

NEG_INF = -math.inf


class Token:
    """One emitted token of an alignment; ``prev`` links to the token before it."""

    __slots__ = ("tok", "start", "end", "peak", "prev")

    def __init__(self, tok: int, start: int, end: int, peak: float, prev: Optional["Token"]):
        self.tok = tok
        self.start = start  # frame of its first emission
        self.end = end  # its last frame (inclusive)
        self.peak = peak  # max posterior of the token over its frames
        self.prev = prev


def alignment(tail: Optional[Token]) -> list[Token]:
    """The token chain ending at ``tail``, first token first."""
    out = []
    while tail is not None:
        out.append(tail)
        tail = tail.prev
    out.reverse()
    return out


def logaddexp(a: float, b: float) -> float:
    if a < b:
        a, b = b, a
    if b == NEG_INF:
        return a
    return a + math.log1p(math.exp(b - a))


class GreedySearch:
    """Best-path CTC decoding."""

    def __init__(self, text: TokenText):
        self.text = text
        self.blank = text.blank_id
        self.prev = self.blank  # argmax of the previous frame (stream state)
        self.tail: Optional[Token] = None
        self.n_text = 0
        self._argmax: list[int] = []
        self._peak: list[float] = []

    def reset(self) -> None:
        self.tail = None
        self.n_text = 0

    def begin_block(self, log_probs: np.ndarray) -> None:
        am = log_probs.argmax(axis=1)
        self._argmax = am.tolist()
        self._peak = np.exp(log_probs[np.arange(len(am)), am]).tolist()

    def step(self, i: int, t: int) -> None:
        """Consume row ``i`` of the current block, the stream's frame ``t``."""
        a = self._argmax[i]
        if a != self.blank:
            p = self._peak[i]
            if a != self.prev:
                self.tail = Token(a, t, t, p, self.tail)
                if self.text.is_text(a):
                    self.n_text += 1
            elif self.tail is not None and self.tail.end == t - 1:
                self.tail.end = t
                if p > self.tail.peak:
                    self.tail.peak = p
            # else: the tail of a token already finalized with the previous utterance
        self.prev = a

    @property
    def best_tail(self) -> Optional[Token]:
        return self.tail

    def finish(self) -> Optional[Token]:
        """The hypothesis to finalize (the caller then calls ``reset``)."""
        return self.tail


class ContextGraph:
    """Hotword prefix tree.

    Matching a hotword's tokens adds its boost per token to the hypothesis' score as a
    *partial* bonus; completing the phrase makes the bonus permanent; leaving the tree
    before completion takes the partial bonus away again (as sherpa/k2 context graphs).
    """

    ROOT = 0

    def __init__(self, phrases: Sequence[tuple[Sequence[int], float]]):
        self.children: list[dict[int, int]] = [{}]
        self.bonus: list[float] = [0.0]
        self.is_end: list[bool] = [False]
        for tokens, boost in phrases:
            node = self.ROOT
            for tok in tokens:
                nxt = self.children[node].get(tok)
                if nxt is None:
                    nxt = len(self.children)
                    self.children.append({})
                    self.bonus.append(boost)
                    self.is_end.append(False)
                    self.children[node][tok] = nxt
                else:
                    self.bonus[nxt] = max(self.bonus[nxt], boost)
                node = nxt
            self.is_end[node] = True

    def advance(
        self, state: int, partial: float, locked: float, tok: int
    ) -> tuple[int, float, float]:
        child = self.children[state].get(tok)
        if child is None:
            partial = 0.0  # the phrase was not completed: bonus removed
            child = self.children[self.ROOT].get(tok)
            if child is None:
                return self.ROOT, 0.0, locked
        partial += self.bonus[child]
        if self.is_end[child]:
            locked += partial
            partial = 0.0
            return (child if self.children[child] else self.ROOT), partial, locked
        return child, partial, locked


class _Hyp:
    __slots__ = (
        "pid",
        "parent",
        "last",
        "p_b",
        "p_nb",
        "node",
        "best",
        "n_text",
        "ctx",
        "ctx_partial",
        "ctx_locked",
        "lm_state",
        "lm_word",
        "lm_score",
        "lm_partial",
    )
    # Declared for the type checker only (no values: __slots__ holds the storage).
    pid: int
    parent: int
    last: int
    p_b: float
    p_nb: float
    node: Any
    best: float
    n_text: int
    ctx: int
    ctx_partial: float
    ctx_locked: float
    lm_state: Any
    lm_word: str
    lm_score: float
    lm_partial: float

    def score(self) -> float:
        return (
            logaddexp(self.p_b, self.p_nb)
            + self.ctx_partial
            + self.ctx_locked
            + self.lm_score
            + self.lm_partial
        )


@dataclass
class BeamOptions:
    beam_size: int
    top_k: int
    #: candidates less likely than this (log) are not tried, except the frame's best
    min_token_logp: float = NEG_INF


class BeamSearch:
    """CTC prefix beam search with optional hotwords and word LM (see module doc)."""

    def __init__(
        self, text: TokenText, options: BeamOptions, context: Optional[ContextGraph] = None, lm=None
    ):
        self.text = text
        self.blank = text.blank_id
        self.options = options
        self.context = context
        self.lm = lm
        self._next_pid = 0
        self._lp: np.ndarray = np.zeros((0, 0), np.float32)
        self._cands: list[list[tuple[int, float, float]]] = []
        self._blank_lp: list[float] = []
        self._chosen: Optional[_Hyp] = None
        self.beams: list[_Hyp] = [self._root(-1, 0.0, NEG_INF)]

    # -- hypotheses ------------------------------------------------------------------------
    def _pid(self) -> int:
        self._next_pid += 1
        return self._next_pid

    def _root(self, last: int, p_b: float, p_nb: float) -> _Hyp:
        h = _Hyp()
        h.pid, h.parent, h.last = self._pid(), -1, last
        h.p_b, h.p_nb, h.node, h.best, h.n_text = p_b, p_nb, None, NEG_INF, 0
        h.ctx, h.ctx_partial, h.ctx_locked = ContextGraph.ROOT, 0.0, 0.0
        h.lm_state = self.lm.begin() if self.lm is not None else None
        h.lm_word, h.lm_score, h.lm_partial = "", 0.0, 0.0
        return h

    @staticmethod
    def _copy(h: _Hyp) -> _Hyp:
        n = _Hyp()
        n.pid, n.parent, n.last = h.pid, h.parent, h.last
        n.p_b = n.p_nb = n.best = NEG_INF
        n.node, n.n_text = h.node, h.n_text
        n.ctx, n.ctx_partial, n.ctx_locked = h.ctx, h.ctx_partial, h.ctx_locked
        n.lm_state, n.lm_word, n.lm_score = h.lm_state, h.lm_word, h.lm_score
        n.lm_partial = h.lm_partial
        return n

    def _extended(self, h: _Hyp, tok: int, pid: int) -> _Hyp:
        n = _Hyp()
        n.pid, n.parent, n.last = pid, h.pid, tok
        n.p_b = n.p_nb = n.best = NEG_INF
        n.node = None
        n.n_text = h.n_text + (1 if self.text.is_text(tok) else 0)
        if self.context is not None:
            n.ctx, n.ctx_partial, n.ctx_locked = self.context.advance(
                h.ctx, h.ctx_partial, h.ctx_locked, tok
            )
        else:
            n.ctx, n.ctx_partial, n.ctx_locked = h.ctx, 0.0, 0.0
        if self.lm is not None:
            n.lm_state, n.lm_word, n.lm_score = self.lm.advance(
                self.text, h.lm_state, h.lm_word, h.lm_score, tok
            )
            n.lm_partial = self.lm.lookahead(n.lm_word)
        else:
            n.lm_state, n.lm_word, n.lm_score, n.lm_partial = None, "", 0.0, 0.0
        return n

    # -- search ----------------------------------------------------------------------------
    def begin_block(self, log_probs: np.ndarray) -> None:
        self._lp = log_probs
        T, V = log_probs.shape
        k = min(self.options.top_k, V - 1)
        self._blank_lp = log_probs[:, self.blank].tolist()
        if T == 0 or k <= 0:
            self._cands = [[] for _ in range(T)]
            return
        nb = log_probs.copy()
        nb[:, self.blank] = NEG_INF
        idx = np.argpartition(-nb, k - 1, axis=1)[:, :k]
        vals = np.take_along_axis(nb, idx, axis=1)
        probs = np.exp(vals)
        floor = self.options.min_token_logp
        best = nb.max(axis=1).tolist()
        # a token is tried if it is at least `floor` likely, or the frame's best
        self._cands = [
            [c for c in zip(r_i, r_v, r_p) if c[1] > NEG_INF and (c[1] >= floor or c[1] == b)]
            for r_i, r_v, r_p, b in zip(idx.tolist(), vals.tolist(), probs.tolist(), best)
        ]

    def step(self, i: int, t: int) -> None:
        lpb = self._blank_lp[i]
        cands = self._cands[i]
        nxt: dict[int, _Hyp] = {}
        # prefix id of "beam prefix + token" where that prefix is itself in the beam
        child_of = {(h.parent, h.last): h.pid for h in self.beams if h.parent >= 0}
        for h in self.beams:
            tot = logaddexp(h.p_b, h.p_nb)
            same = nxt.get(h.pid)
            if same is None:
                same = nxt[h.pid] = self._copy(h)
            v = tot + lpb
            same.p_b = logaddexp(same.p_b, v)
            if v > same.best:
                same.best, same.node = v, h.node
            for c, lc, pc in cands:
                if c == h.last:
                    # c again without a blank in between: the same token continues
                    if h.p_nb > NEG_INF:
                        v = h.p_nb + lc
                        same.p_nb = logaddexp(same.p_nb, v)
                        if v > same.best:
                            node = h.node
                            if node is not None:
                                node = Token(c, node.start, t, max(node.peak, pc), node.prev)
                            same.best, same.node = v, node
                    if h.p_b == NEG_INF:
                        continue
                    v = h.p_b + lc  # blank in between: a new token c
                else:
                    v = tot + lc
                pid = child_of.get((h.pid, c))
                if pid is None:
                    pid = child_of[(h.pid, c)] = self._pid()
                ext = nxt.get(pid)
                if ext is None:
                    ext = nxt[pid] = self._extended(h, c, pid)
                ext.p_nb = logaddexp(ext.p_nb, v)
                if v > ext.best:
                    ext.best, ext.node = v, Token(c, t, t, pc, h.node)
        beams = sorted(nxt.values(), key=_Hyp.score, reverse=True)
        del beams[self.options.beam_size :]
        for h in beams:
            h.best = NEG_INF
        self.beams = beams

    @property
    def best_tail(self) -> Optional[Token]:
        return self.beams[0].node

    @property
    def n_text(self) -> int:
        return self.beams[0].n_text

    def _final_score(self, h: _Hyp) -> float:
        s = logaddexp(h.p_b, h.p_nb) + h.ctx_locked  # unfinished hotword: no bonus
        if self.lm is not None:  # the open word's real score replaces its look-ahead
            s += self.lm.finish(h.lm_state, h.lm_word, h.lm_score)
        return s

    def finish(self) -> Optional[Token]:
        """Pick the hypothesis to finalize (end-of-utterance scores included) and seed
        the next utterance with its CTC state; the caller then calls ``reset``."""
        best = max(self.beams, key=self._final_score)
        self._chosen = best
        return best.node

    def reset(self) -> None:
        chosen = self._chosen or self.beams[0]
        tot = logaddexp(chosen.p_b, chosen.p_nb)
        if tot == NEG_INF:
            self.beams = [self._root(-1, 0.0, NEG_INF)]
        else:
            last = chosen.last if chosen.p_nb > NEG_INF else -1
            self.beams = [
                self._root(last, chosen.p_b - tot, chosen.p_nb - tot if last >= 0 else NEG_INF)
            ]
        self._chosen = None
