"""Audio as clients send it to the gateway: raw PCM (16-bit or float32, interleaved
channels, any rate in range) or a file libsndfile reads, decoded to mono float32 at the
model's rate."""

from __future__ import annotations

from typing import Any

import numpy as np

from streamasr.core.params import parse_int
from streamasr.protocol import PCM16_FULL_SCALE
from streamasr_client.audio import resample, to_mono


def _mulaw_table() -> np.ndarray:
    """G.711 mu-law byte -> 16-bit linear sample (ITU-T G.711; what audioop.ulaw2lin gives)."""
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    exponent, mantissa = (u >> 4) & 0x07, u & 0x0F
    magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
    return np.where(u & 0x80, -magnitude, magnitude).astype(np.int16)


def _alaw_table() -> np.ndarray:
    """G.711 A-law byte -> 16-bit linear sample (ITU-T G.711; what audioop.alaw2lin gives)."""
    a = np.arange(256, dtype=np.int32) ^ 0x55
    exponent, mantissa = (a >> 4) & 0x07, a & 0x0F
    magnitude = np.where(
        exponent == 0, (mantissa << 4) + 8, ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0)
    )
    return np.where(a & 0x80, magnitude, -magnitude).astype(np.int16)


#: Companded 8-bit telephony encodings (one byte a sample): byte -> 16-bit sample.
G711_TABLES = {"mulaw": _mulaw_table(), "alaw": _alaw_table()}

#: Raw encodings a client may stream: numpy dtype of one sample (the wire width) and the
#: full scale of the linear value it decodes to.
ENCODINGS = {
    "linear16": ("<i2", PCM16_FULL_SCALE),
    "float32": ("<f4", 1.0),
    "mulaw": ("u1", PCM16_FULL_SCALE),
    "alaw": ("u1", PCM16_FULL_SCALE),
}


# Client sample rates the gateway resamples from: 8 kHz (telephony) to 192 kHz (studio).
# Resampling multiplies a frame's size by model rate / client rate (x320 at 50 Hz).
MIN_SAMPLE_RATE = 8_000


MAX_SAMPLE_RATE = 192_000


# Interleaved channels a client may send (averaged to mono): up to 7.1 surround.
MAX_CHANNELS = 8


class BadAudio(ValueError):
    pass


def parse_sample_rate(value: Any, key: str = "sample_rate") -> int:
    """A client's sample rate: an integer within [MIN_SAMPLE_RATE, MAX_SAMPLE_RATE]."""
    rate = parse_int(key, value, 1)  # ValueError names the key
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise ValueError(
            f"{key}: must be between {MIN_SAMPLE_RATE} and {MAX_SAMPLE_RATE} Hz, got {rate}"
        )
    return rate


def parse_channels(value: Any, key: str = "channels") -> int:
    channels = parse_int(key, value, 1)
    if channels > MAX_CHANNELS:
        raise ValueError(f"{key}: must be between 1 and {MAX_CHANNELS}, got {channels}")
    return channels


def parse_encoding(value: Any) -> str:
    if value not in ENCODINGS:
        raise ValueError(f"encoding: unknown encoding {value!r} (use {sorted(ENCODINGS)})")
    return value


def decode_pcm(data: bytes, encoding: str, channels: int = 1) -> np.ndarray:
    """Raw PCM bytes -> mono float32 in [-1, 1].  Partial frames are an error (the
    WebSocket path keeps remainders itself)."""
    if encoding not in ENCODINGS:
        raise BadAudio(f"unknown encoding {encoding!r} (use {sorted(ENCODINGS)})")
    dtype, scale = ENCODINGS[encoding]
    width = np.dtype(dtype).itemsize * channels
    if len(data) % width:
        raise BadAudio(f"{len(data)} bytes is not a whole number of {width}-byte frames")
    raw = np.frombuffer(data, dtype=dtype)
    if encoding in G711_TABLES:
        raw = G711_TABLES[encoding][raw]
    a = raw.astype(np.float32) / scale
    return to_mono(a.reshape(-1, channels)) if channels > 1 else a


def parse_content_type(value: str | None) -> tuple[str, dict[str, str]]:
    if not value:
        return "application/octet-stream", {}
    main, *params = [p.strip() for p in value.split(";")]
    out = {}
    for p in params:
        if "=" in p:
            k, v = p.split("=", 1)
            out[k.strip().lower()] = v.strip().strip('"')
    return main.lower(), out


RAW_TYPES = {"audio/l16", "audio/pcm", "audio/x-raw", "audio/raw"}


def decode_body(body: bytes, content_type: str | None, model_rate: int) -> np.ndarray:
    """An /invocations body -> mono float32 at the model rate."""
    if not body:
        raise BadAudio("empty body")
    ctype, params = parse_content_type(content_type)
    if ctype in RAW_TYPES:
        try:
            rate = parse_sample_rate(params.get("rate", model_rate), "rate")
            channels = parse_channels(params.get("channels", 1))
        except ValueError as exc:
            raise BadAudio(f"Content-Type {ctype}: {exc}") from None
        enc = "float32" if params.get("encoding") == "float32" else "linear16"
        return resample(decode_pcm(body, enc, channels), rate, model_rate)
    import io

    import soundfile as sf

    try:
        audio, rate = sf.read(io.BytesIO(body), dtype="float32", always_2d=False)
    except Exception as exc:  # libsndfile's errors vary by version
        raise BadAudio(f"cannot decode the body as an audio file ({ctype}): {exc}") from None
    return resample(to_mono(audio), rate, model_rate)
