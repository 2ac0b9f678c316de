"""Pure helpers of the benchmarks: percentiles, latency summaries, lateness, speech onset.

Nothing here talks to a server, so ``tests/unit/test_benchmarks.py`` checks it directly.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation between closest ranks
    (numpy's default "linear" method); ``None`` for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} outside 0..100")
    xs = sorted(float(v) for v in values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(values_s: Iterable[float]) -> dict:
    """Seconds in, milliseconds out: count, p50/p90/p99, mean and max."""
    ms = [float(v) * 1000.0 for v in values_s]
    out: dict = {"n": len(ms)}
    for name, q in (("p50", 50), ("p90", 90), ("p99", 99)):
        v = percentile(ms, q)
        out[name] = None if v is None else round(v, 2)
    out["mean"] = round(sum(ms) / len(ms), 2) if ms else None
    out["max"] = round(max(ms), 2) if ms else None
    return out


def lateness(due: Sequence[float], sent: Sequence[float]) -> list[float]:
    """How late each send was against its real-time schedule (s, never negative): a
    sender that cannot keep up shows growing values."""
    if len(due) != len(sent):
        raise ValueError("due and sent must have one entry per chunk")
    return [max(0.0, s - d) for d, s in zip(due, sent)]


def behind_real_time(
    capture_end: Sequence[float], answered: Sequence[float | None], chunk_s: float
) -> dict:
    """Does a stream's transcript keep up with the speaker?

    ``capture_end[i]`` is the wall time the last sample of chunk ``i`` was spoken (its
    scheduled send time), ``answered[i]`` when its result arrived (``None``: never).  A
    chunk is *late* when its result arrives after the next chunk has been spoken
    (lag > ``chunk_s``); ``growing`` says whether the lag over the last third is larger
    than over the first third by more than one chunk — a backlog that builds up.
    """
    lags = [a - c for c, a in zip(capture_end, answered) if a is not None]
    missing = sum(1 for a in answered if a is None)
    late = sum(1 for x in lags if x > chunk_s) + missing
    n = len(lags)
    growing = False
    if n >= 6:
        third = n // 3
        first = sum(lags[:third]) / third
        last = sum(lags[-third:]) / third
        growing = last - first > chunk_s
    return {
        "chunks": len(answered),
        "late": late,
        "missing": missing,
        "max_lag_s": round(max(lags), 4) if lags else None,
        "growing": growing,
    }


def speech_onset(
    audio: np.ndarray,
    sample_rate: int,
    frame_ms: float = 10.0,
    rel_db: float = -30.0,
    abs_floor: float = 1e-3,
) -> int | None:
    """First sample of the first frame whose RMS is within ``rel_db`` of the loudest
    frame (and above ``abs_floor``); ``None`` for silence."""
    hop = max(1, int(round(sample_rate * frame_ms / 1000.0)))
    n = len(audio) // hop
    if n == 0:
        return None
    frames = np.asarray(audio[: n * hop], dtype=np.float64).reshape(n, hop)
    rms = np.sqrt(np.mean(frames * frames, axis=1))
    peak = float(rms.max())
    if peak <= abs_floor:
        return None
    thresh = max(abs_floor, peak * 10 ** (rel_db / 20.0))
    idx = int(np.argmax(rms >= thresh))
    return idx * hop


def held_level(levels: Sequence[dict], budget_ms: float) -> dict | None:
    """The level with the most streams that met the budget: p99 chunk latency within
    ``budget_ms``, no errors, no missing responses, and a sender that kept real-time
    pace (p99 send lateness within the budget too).  Levels need not be sorted."""
    ok = [lv for lv in levels if level_ok(lv, budget_ms)]
    return max(ok, key=lambda lv: lv["streams"]) if ok else None


def level_ok(level: dict, budget_ms: float) -> bool:
    lat = level.get("chunk_latency_ms", {})
    p99 = lat.get("p99")
    send_late = level.get("send_lateness_ms", {}).get("p99") or 0.0
    return (
        p99 is not None
        and p99 <= budget_ms
        and level.get("errors", 0) == 0
        and not level.get("aborted")
        and level.get("missing", 0) == 0
        and send_late <= budget_ms
    )


def batch_histogram_delta(before: dict[int, int], after: dict[int, int]) -> dict[int, int]:
    """Executions per batch size between two stats snapshots (sizes with none dropped)."""
    out = {}
    for b, n in after.items():
        d = n - before.get(b, 0)
        if d < 0:
            raise ValueError(
                f"batch-size {b} count went down ({before.get(b)} -> {n}): "
                "the server restarted between snapshots?"
            )
        if d:
            out[int(b)] = d
    return dict(sorted(out.items()))


def mixed_throughput(hist: dict[int, int], seconds_per_batch: dict[int, float]) -> float:
    """Windows/s of a device that runs exactly the batches in ``hist`` (size -> count),
    each taking ``seconds_per_batch[size]``."""
    windows = sum(b * n for b, n in hist.items())
    busy = sum(n * seconds_per_batch[b] for b, n in hist.items())
    if busy <= 0:
        raise ValueError("no batches to time")
    return windows / busy
