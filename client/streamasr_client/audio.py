"""Reading audio for the clients: any file soundfile (libsndfile) reads, or raw PCM,
converted to mono float32 at the model's sample rate."""

from __future__ import annotations

import sys
from math import gcd
from pathlib import Path
from typing import BinaryIO

import numpy as np

from streamasr.protocol import pcm16_to_float

#: Audio per request of a live stream (a microphone, paced playback, a pipe): Deepgram's
#: clients send 20-100 ms.  A final can only leave once the request holding the endpoint
#: arrives, so the request size adds up to its own length to every final (p50 last word
#: -> final 477 ms at 100 ms vs 710 ms at the model's 400 ms chunk, one stream,
#: benchmarks/results/finals/).  Requests that complete no model window cost little
#: when the acoustic model answers idle windows without computing (its contract's
#: ``idle_window``; the bundled model does).  Whole files sent as fast as possible use
#: the model's chunk instead: fewer requests.
LIVE_CHUNK_MS = 100


def resample(audio: np.ndarray, rate: int, target: int) -> np.ndarray:
    if rate == target:
        return audio.astype(np.float32, copy=False)
    from scipy.signal import resample_poly

    g = gcd(rate, target)
    return resample_poly(audio, target // g, rate // g).astype(np.float32)


def to_mono(audio: np.ndarray) -> np.ndarray:
    return audio.mean(axis=1) if audio.ndim == 2 else audio


def load_audio(path: str | Path, target_rate: int) -> np.ndarray:
    """A whole file as mono float32 in [-1, 1] at target_rate."""
    import soundfile as sf

    try:
        audio, rate = sf.read(str(path), dtype="float32", always_2d=False)
    except sf.LibsndfileError as exc:
        raise ValueError(f"cannot read audio file {path}: {exc}") from None
    return resample(to_mono(audio), rate, target_rate)


def pcm_chunks(
    stream: BinaryIO, rate: int, target_rate: int, chunk_samples: int, channels: int = 1
):
    """Raw signed 16-bit little-endian PCM from a byte stream (e.g. stdin), yielded as
    float32 chunks at target_rate as it arrives."""
    frame_bytes = 2 * channels
    in_chunk = max(1, chunk_samples * rate // target_rate) * frame_bytes
    pending = b""
    while True:
        data = stream.read(in_chunk)
        if not data:
            break
        pending += data
        usable = len(pending) - len(pending) % frame_bytes
        if usable == 0:
            continue
        pcm = np.frombuffer(pending[:usable], dtype="<i2").reshape(-1, channels)
        pending = pending[usable:]
        yield resample(to_mono(pcm16_to_float(pcm)), rate, target_rate)


def stdin_binary() -> BinaryIO:
    return sys.stdin.buffer
