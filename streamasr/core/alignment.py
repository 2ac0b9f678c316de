"""CTC forced alignment (Viterbi) of a known token sequence to log-probs.

Used to check the decoder's word timings against an alignment computed independently
from the same logits, and available for offline word timing of a known transcript.
"""

from __future__ import annotations

import numpy as np


def forced_align(log_probs: np.ndarray, tokens: list[int], blank: int) -> list[tuple[int, int]]:
    """Best CTC path of ``tokens`` through ``log_probs`` [T, V]: for each token, the
    (first, last) frame it occupies.  Raises ValueError if the tokens cannot fit.
    On equal scores the path that stays in its state wins (vectorised over states)."""
    T = len(log_probs)
    ext = [blank]
    for tok in tokens:
        ext += [tok, blank]
    ext_a = np.asarray(ext)
    S = len(ext)
    neg = -np.inf
    emit = np.asarray(log_probs, np.float64)[:, ext_a]  # [T, S]
    # A skip over a blank is allowed into a token that differs from the one before it.
    skip_ok = np.zeros(S, bool)
    skip_ok[2:] = (ext_a[2:] != blank) & (ext_a[2:] != ext_a[:-2])
    score = np.full(S, neg)
    back = np.zeros((T, S), np.int8)  # 0 stay, 1 step, 2 skip
    score[0] = emit[0, 0]
    if S > 1:
        score[1] = emit[0, 1]
    for t in range(1, T):
        step = np.concatenate([[neg], score])[:S]
        skip = np.where(skip_ok, np.concatenate([[neg, neg], score])[:S], neg)
        choice = np.where(score >= step, 0, 1)
        best = np.where(choice == 0, score, step)
        use_skip = skip > best
        back[t] = np.where(use_skip, 2, choice)
        score = np.where(use_skip, skip, best) + emit[t]
    ends = [S - 1] + ([S - 2] if S > 1 else [])
    s = max(ends, key=lambda e: score[e])
    if score[s] == neg:
        raise ValueError("token sequence does not fit in the frames")
    path = [s]
    for t in range(T - 1, 0, -1):
        s -= int(back[t, s])
        path.append(s)
    path.reverse()
    spans: dict[int, list[int]] = {}
    for t, s in enumerate(path):
        if ext[s] != blank:
            spans.setdefault(s // 2, []).append(t)  # token index = (s - 1) // 2
    return [(min(spans[k]), max(spans[k])) for k in sorted(spans)]


def word_spans(
    log_probs: np.ndarray, text: str, vocabulary: tuple[str, ...], blank: int
) -> list[tuple[str, int, int]]:
    """(word, first frame, last frame + 1) for a space-separated character transcript."""
    return [
        (w, first, end) for w, first, end, _ in aligned_words(log_probs, text, vocabulary, blank)
    ]


def aligned_words(
    log_probs: np.ndarray, text: str, vocabulary: tuple[str, ...], blank: int
) -> list[tuple[str, int, int, float]]:
    """``word_spans`` plus each word's confidence: the mean over its characters of their
    peak posterior on the frames aligned to them."""
    index = {t: i for i, t in enumerate(vocabulary)}
    tokens = [index[ch] for ch in text]
    spans = forced_align(log_probs, tokens, blank)
    peaks = [float(np.exp(log_probs[a : b + 1, tok].max())) for tok, (a, b) in zip(tokens, spans)]
    out, i = [], 0
    for word in text.split(" "):
        if word:
            first, last = spans[i][0], spans[i + len(word) - 1][1]
            out.append((word, first, last + 1, sum(peaks[i : i + len(word)]) / len(word)))
        i += len(word) + 1
    return out
