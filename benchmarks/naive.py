"""Peer baseline: "re-transcribe the growing buffer".  Each speaker, at real-time pace,
sends its whole recording so far to `offline_asr` after every chunk (one unary call per
chunk, the next one when both the audio is spoken and the previous call returned) — what a
system without streaming state does.  Same server, same model, same recordings as the
streaming load."""

from __future__ import annotations

import threading
import time

from streamasr_client.stream import AsrConnection, AsrError

from . import metrics
from .load import Clip, Probe, _check_loopback


def _speaker(
    url: str,
    clip: Clip,
    chunk: int,
    rate: int,
    t_start: float,
    deadline: float,
    lat: list,
    late: list,
    errors: list,
) -> None:
    with AsrConnection(url) as conn:
        t_clip = t_start
        while True:
            ends = list(range(chunk, len(clip.audio), chunk)) + [len(clip.audio)]
            for e in ends:
                due = t_clip + e / rate
                if due >= deadline:
                    return
                wait = due - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                t0 = time.perf_counter()
                late.append(max(0.0, t0 - due))
                try:
                    conn.transcribe_file(clip.audio[:e], timeout=120)
                except AsrError as exc:
                    errors.append(str(exc))
                lat.append(time.perf_counter() - t0)
            t_clip = max(time.perf_counter(), t_clip + len(clip.audio) / rate)
            if t_clip >= deadline:
                return


def run(
    url: str,
    clips: list[Clip],
    streams: int,
    *,
    chunk_samples: int,
    sample_rate: int,
    duration_s: float,
    probe: Probe | None = None,
) -> dict:
    _check_loopback(url)
    lat: list[float] = []
    late: list[float] = []
    errors: list[str] = []
    chunk_s = chunk_samples / sample_rate
    t0 = time.perf_counter() + 0.2
    threads = [
        threading.Thread(
            target=_speaker,
            daemon=True,
            args=(
                url,
                clips[i % len(clips)],
                chunk_samples,
                sample_rate,
                t0 + i * chunk_s / streams,
                t0 + duration_s,
                lat,
                late,
                errors,
            ),
        )
        for i in range(streams)
    ]
    if probe:
        probe.start()
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration_s + 300)
    elapsed = time.perf_counter() - started
    extra = probe.stop() if probe else {}
    return {
        "streams": streams,
        "wall_s": round(elapsed, 2),
        "calls": len(lat),
        "call_latency_ms": metrics.summarize(lat),
        "send_lateness_ms": metrics.summarize(late),
        "errors": len(errors),
        **extra,
    }
