"""Streaming features (log-mel, or raw waveform frames) and model windows.

``StreamingFeatures`` turns audio arriving in pieces of any size into exactly the frames
the whole recording would give (no centre padding: frame ``i`` covers samples
``[i*hop, i*hop + n_fft)``; for ``type="waveform"`` n_fft == hop, so frame ``i`` is just
those ``hop`` samples).  ``WindowAssembler`` cuts those frames into the model's
windows ``[left | chunk | right]``; the first window's missing left context is filled
with the features of digital silence.  ``FeatureStream`` chains the two; the whole-file
path runs the same object over the whole array, which is what makes streamed and offline
results identical.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from streamasr.protocol.contract import FeatureSpec, ModelContract


def _hz_to_mel(f: float | np.ndarray) -> np.ndarray:
    """Slaney mel scale (linear below 1 kHz, logarithmic above), as librosa's default."""
    f = np.asarray(f, dtype=np.float64)
    f_sp = 200.0 / 3
    mels = f / f_sp
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = math.log(6.4) / 27.0
    return np.where(
        f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, mels
    )


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    f_sp = 200.0 / 3
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = math.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


@lru_cache(maxsize=8)
def mel_filterbank(
    sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float
) -> np.ndarray:
    """[n_mels, n_fft//2+1] triangular filters, Slaney-normalised (librosa/Whisper)."""
    fft_freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    mel_pts = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))
    fdiff = np.diff(mel_pts)
    ramps = mel_pts[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_pts[2 : n_mels + 2] - mel_pts[:n_mels]))[:, None]
    return weights


@lru_cache(maxsize=8)
def _hann(n: int) -> np.ndarray:
    return 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)  # periodic, as torch.hann_window


def log_mel_frames(frames: np.ndarray, spec: FeatureSpec) -> np.ndarray:
    """[N, n_fft] float64 audio frames -> [N, n_mels] float32 normalised log-mel."""
    mel_t = mel_filterbank(spec.sample_rate, spec.n_fft, spec.n_mels, spec.fmin, spec.fmax).T
    power = np.abs(np.fft.rfft(frames * _hann(spec.n_fft), axis=-1)) ** 2
    # Not a BLAS matmul: BLAS may sum in a different order for different row counts, and
    # streamed frames must equal whole-file frames bit for bit. einsum without
    # optimisation runs its own loop per output element: the same sums for any number of
    # rows (tests/unit/test_features.py), ~45x faster than a Python loop of row products.
    mel = np.einsum("fb,bm->fm", power, mel_t, optimize=False)
    logm = np.maximum(np.log10(np.maximum(mel, 1e-10)), spec.log_floor)
    return ((logm + spec.offset) / spec.scale).astype(np.float32)


def frame_features(frames: np.ndarray, spec: FeatureSpec) -> np.ndarray:
    """[N, n_fft] float64 audio frames -> [N, n_mels] float32 features of ``spec.type``."""
    if spec.type == "waveform":  # n_fft == n_mels == hop: the samples themselves
        return np.asarray(frames, dtype=np.float32).reshape(len(frames), spec.n_mels)
    return log_mel_frames(frames, spec)


def silence_frame(spec: FeatureSpec) -> np.ndarray:
    """The feature vector of digital silence (used for padding; zeros for waveform)."""
    return frame_features(np.zeros((1, spec.n_fft)), spec)[0]


class StreamingFeatures:
    """Audio pieces in, feature frames out, identical however the audio is cut."""

    def __init__(self, spec: FeatureSpec):
        self.spec = spec
        self._buf = np.zeros(0, dtype=np.float64)  # samples not yet fully framed
        self.samples_seen = 0
        self.frames_emitted = 0
        self.flushed = False

    def accept(self, audio: np.ndarray) -> np.ndarray:
        if self.flushed:
            raise RuntimeError("feature stream already flushed")
        audio = np.asarray(audio, dtype=np.float64).reshape(-1)
        self.samples_seen += len(audio)
        self._buf = np.concatenate([self._buf, audio]) if len(self._buf) else audio.copy()
        return self._drain()

    def _drain(self) -> np.ndarray:
        n_fft, hop = self.spec.n_fft, self.spec.hop_length
        if len(self._buf) < n_fft:
            return np.zeros((0, self.spec.n_mels), np.float32)
        n = 1 + (len(self._buf) - n_fft) // hop
        idx = np.arange(n)[:, None] * hop + np.arange(n_fft)[None, :]
        frames = frame_features(self._buf[idx], self.spec)
        self._buf = self._buf[n * hop :]
        self.frames_emitted += n
        return frames

    def flush(self) -> np.ndarray:
        """Frames for the tail: zero-pad so the stream has ceil(samples / hop) frames."""
        if self.flushed:
            return np.zeros((0, self.spec.n_mels), np.float32)
        self.flushed = True
        total = math.ceil(self.samples_seen / self.spec.hop_length)
        missing = total - self.frames_emitted
        if missing <= 0:
            return np.zeros((0, self.spec.n_mels), np.float32)
        need = (missing - 1) * self.spec.hop_length + self.spec.n_fft
        self._buf = np.concatenate([self._buf, np.zeros(max(0, need - len(self._buf)))])
        return self._drain()[:missing]

    @property
    def buffered_samples(self) -> int:
        return len(self._buf)


@dataclass
class Windows:
    """Model-ready windows from one step: ``features`` [N, W, F]; ``valid_outputs`` [N]
    output frames of each window that hold real audio (the last one may be padding)."""

    features: np.ndarray
    valid_outputs: np.ndarray
    first_output_frame: int  # stream index of the first output frame of window 0
    #: Voice-activity endpoints among these windows' output frames: stream output-frame
    #: indices at which an utterance ends (the decoder finalizes there).
    endpoints: list[int] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.features)

    def stream_log_probs(self, log_probs: np.ndarray) -> np.ndarray:
        """The model's [N, T, V] output for these windows -> the stream's [frames, V]
        (each window's padding frames dropped)."""
        return real_output_frames(log_probs, self.valid_outputs)


def real_output_frames(log_probs: np.ndarray, valid_outputs) -> np.ndarray:
    """[N, T, V] per-window log-probs -> [sum(valid), V]: window i keeps its first
    valid_outputs[i] frames (the rest are padding past the end of the audio)."""
    if len(log_probs) == 0:
        return np.zeros((0, log_probs.shape[-1]), np.float32)
    return np.concatenate([log_probs[i, :n] for i, n in enumerate(valid_outputs)])


class WindowAssembler:
    """Feature frames in, ``[left | chunk | right]`` windows out.  ``flush()`` cuts the
    chunk short where a stream's utterance ended (see ``FeatureStream``)."""

    def __init__(self, contract: ModelContract):
        self.c = contract
        self._silence = silence_frame(contract.features)
        # Frames from (next chunk start - left) onwards; starts as left-context padding.
        self._frames = np.tile(self._silence, (contract.left_frames, 1)).astype(np.float32)
        self.next_start = 0  # stream frame index where the next chunk starts
        self.total_frames = 0  # real frames seen so far
        self.finished = False

    def accept(self, frames: np.ndarray) -> Windows:
        if self.finished:
            raise RuntimeError("window stream already finished")
        self.total_frames += len(frames)
        if len(frames):
            self._frames = np.concatenate([self._frames, frames.astype(np.float32)])
        return self._emit(final=False)

    def finish(self, tail_frames: np.ndarray) -> Windows:
        """Flush: the remaining frames, padded with silence, in as many windows as needed."""
        self.total_frames += len(tail_frames)
        if len(tail_frames):
            self._frames = np.concatenate([self._frames, tail_frames.astype(np.float32)])
        self.finished = True
        return self._emit(final=True)

    def flush(self) -> Windows:
        """Windows for the frames seen so far without waiting for their right context
        (silence stands in for it, as at the end of a stream); the next chunk starts
        after them.  Only whole output frames are flushed (an odd frame waits)."""
        c = self.c
        out, valid = [], []
        first = self.next_start // c.subsampling
        while True:
            pending = self.total_frames - self.next_start
            cut = min(c.chunk_frames, pending - pending % c.subsampling)
            if cut <= 0:
                break
            window = self._frames[: c.left_frames + cut]
            pad = np.tile(self._silence, (c.window_frames - len(window), 1))
            out.append(np.concatenate([window, pad]))
            valid.append(cut // c.subsampling)
            self._frames = self._frames[cut:]
            self.next_start += cut
        return self._windows(out, valid, first)

    def _windows(self, out: list, valid: list, first: int) -> Windows:
        c = self.c
        feats = (
            np.stack(out) if out else np.zeros((0, c.window_frames, c.features.n_mels), np.float32)
        )
        return Windows(feats, np.asarray(valid, dtype=np.int64), first)

    def _emit(self, final: bool) -> Windows:
        c = self.c
        out, valid = [], []
        first = self.next_start // c.subsampling
        while True:
            chunk_start = self.next_start  # stream frame index
            if final:
                if chunk_start >= self.total_frames:
                    break
                have = len(self._frames)
                if have < c.window_frames:
                    pad = np.tile(self._silence, (c.window_frames - have, 1))
                    self._frames = np.concatenate([self._frames, pad])
            elif len(self._frames) < c.window_frames:
                break
            out.append(self._frames[: c.window_frames].copy())
            real = min(c.chunk_frames, self.total_frames - chunk_start)
            valid.append(-(-real // c.subsampling))
            self._frames = self._frames[c.chunk_frames :]
            self.next_start += c.chunk_frames
        return self._windows(out, valid, first)


def join_windows(parts: list[Windows]) -> Windows:
    """Consecutive ``Windows`` of one stream as one."""
    if len(parts) == 1:
        return parts[0]
    return Windows(
        np.concatenate([p.features for p in parts]),
        np.concatenate([p.valid_outputs for p in parts]),
        parts[0].first_output_frame,
        [e for p in parts for e in p.endpoints],
    )


@dataclass
class FeatureStream:
    """Audio in, model windows out: what the feature step keeps per stream.

    With ``vad`` (a :class:`streamasr.core.vad.VadEndpointer`), an utterance ends where
    the detector hears ``endpointing`` ms of silence after speech: the windows up to that
    sample are flushed at once (``WindowAssembler.flush``) and the endpoint's output frame
    is listed in ``Windows.endpoints``.  The detector judges fixed frames from the
    stream's first sample, so a recording gives the same windows however it is cut."""

    contract: ModelContract
    vad: Any = None
    features: StreamingFeatures = field(init=False)
    windows: WindowAssembler = field(init=False)

    def __post_init__(self):
        self.features = StreamingFeatures(self.contract.features)
        self.windows = WindowAssembler(self.contract)

    def accept(self, audio: np.ndarray) -> Windows:
        if self.vad is None:
            return self.windows.accept(self.features.accept(audio))
        audio = np.asarray(audio).reshape(-1)
        seen = self.features.samples_seen
        parts = []
        for end in self.vad.accept(audio):
            cut, seen = end - seen, end
            parts.append(self.windows.accept(self.features.accept(audio[:cut])))
            flushed = self.windows.flush()
            flushed.endpoints.append(self.windows.next_start // self.contract.subsampling)
            parts.append(flushed)
            audio = audio[cut:]
        parts.append(self.windows.accept(self.features.accept(audio)))
        return join_windows(parts)

    def finish(self) -> Windows:
        return self.windows.finish(self.features.flush())

    @property
    def seconds_seen(self) -> float:
        return self.features.samples_seen / self.contract.sample_rate


def whole_file_windows(contract: ModelContract, audio: np.ndarray, vad: Any = None) -> Windows:
    """All windows of a complete recording: the offline path, by construction equal to
    any streaming of the same samples (with the same ``vad`` endpointing)."""
    fs = FeatureStream(contract, vad)
    return join_windows([fs.accept(audio), fs.finish()])
