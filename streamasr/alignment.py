"""CTC forced alignment (Viterbi) of a known token sequence to log-probs.

Used to check the decoder's word timings against an alignment computed independently
from the same logits, and available for offline word timing of a known transcript.
"""
from __future__ import annotations

import numpy as np


def forced_align(log_probs: np.ndarray, tokens: list[int], blank: int) -> list[tuple[int, int]]:
    """Best CTC path of ``tokens`` through ``log_probs`` [T, V]: for each token, the
    (first, last) frame it occupies.  Raises ValueError if the tokens cannot fit."""
    T = len(log_probs)
    ext = [blank]
    for tok in tokens:
        ext += [tok, blank]
    S = len(ext)
    neg = -np.inf
    score = np.full((T, S), neg)
    back = np.zeros((T, S), np.int64)
    score[0, 0] = log_probs[0, ext[0]]
    if S > 1:
        score[0, 1] = log_probs[0, ext[1]]
    for t in range(1, T):
        prev = score[t - 1]
        for s in range(S):
            cands = [(prev[s], s)]
            if s >= 1:
                cands.append((prev[s - 1], s - 1))
            if s >= 2 and ext[s] != blank and ext[s] != ext[s - 2]:
                cands.append((prev[s - 2], s - 2))
            best, arg = max(cands)
            score[t, s] = best + log_probs[t, ext[s]]
            back[t, s] = arg
    ends = [S - 1] + ([S - 2] if S > 1 else [])
    s = max(ends, key=lambda e: score[T - 1, e])
    if score[T - 1, s] == neg:
        raise ValueError("token sequence does not fit in the frames")
    path = [s]
    for t in range(T - 1, 0, -1):
        s = back[t, s]
        path.append(s)
    path.reverse()
    spans: dict[int, list[int]] = {}
    for t, s in enumerate(path):
        if ext[s] != blank:
            spans.setdefault(s // 2, []).append(t)   # token index = (s - 1) // 2
    return [(min(spans[k]), max(spans[k])) for k in sorted(spans)]


def word_spans(log_probs: np.ndarray, text: str, vocabulary: tuple[str, ...],
               blank: int) -> list[tuple[str, int, int]]:
    """(word, first frame, last frame + 1) for a space-separated character transcript."""
    index = {t: i for i, t in enumerate(vocabulary)}
    tokens = [index[ch] for ch in text]
    spans = forced_align(log_probs, tokens, blank)
    out, i = [], 0
    for word in text.split(" "):
        if word:
            first, last = spans[i][0], spans[i + len(word) - 1][1]
            out.append((word, first, last + 1))
        i += len(word) + 1
    return out
