"""Voice-activity endpoints: where a stream's speaker stopped, from the audio itself.

The detector is Silero VAD (MIT, PyPI ``silero-vad`` 6.2.3, its
``silero_vad/data/silero_vad_16k_sequence.onnx``, shipped in ``vad_data/`` with its
licence): the same network as the package's ``silero_vad.onnx`` exported to take a block
of 32 ms frames in one call, so a request costs one onnxruntime call whatever its size
(measured on demo.wav: per-frame probabilities equal to the per-frame model's, max
difference 0.0, at 1.3 % of a core per audio second in 0.4 s blocks instead of 3.1 %).

:class:`VadEndpointer` is one stream's detector.  Frames are cut at fixed 512-sample
steps from the stream's first sample and the LSTM state is carried, so the endpoints do
not depend on how the stream was cut into requests (the offline path runs the same
object over the whole recording: tests/unit/test_vad.py).  An endpoint is the end of
the frame at which ``silence_ms`` of non-speech has followed speech (Silero's own
hysteresis: speech from probability 0.5, silence below 0.35).
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

#: The Silero VAD graph (sequence variant) and the one sample rate it takes.
VAD_MODEL = Path(__file__).with_name("vad_data") / "silero_vad_16k_sequence.onnx"
VAD_SAMPLE_RATE = 16000
#: Samples per VAD frame (32 ms) and of the previous frame each frame is given as context.
FRAME_SAMPLES = 512
CONTEXT_SAMPLES = 64
#: LSTM state size (h and c are [1, 1, STATE_SIZE]).
STATE_SIZE = 128
#: A frame is speech from this probability on (Silero's default threshold) ...
SPEECH_THRESHOLD = 0.5
#: ... and silence below this one (Silero's default: threshold - 0.15); in between a
#: silence that has begun goes on counting and speech goes on being speech.
SILENCE_THRESHOLD = 0.35


@lru_cache(maxsize=1)
def vad_session() -> Any:
    """The shared onnxruntime session (read-only, safe to call from several threads;
    one thread: the models share the cores with the Python steps)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(
        str(VAD_MODEL), sess_options=options, providers=["CPUExecutionProvider"]
    )


def silence_frames(silence_ms: float) -> int:
    """VAD frames of silence that make an endpoint (at least one)."""
    return max(1, math.ceil(silence_ms * VAD_SAMPLE_RATE / 1000 / FRAME_SAMPLES - 1e-9))


class VadEndpointer:
    """One stream's endpoint detector: audio in, endpoint sample positions out."""

    def __init__(self, silence_ms: float, sample_rate: int = VAD_SAMPLE_RATE):
        if sample_rate != VAD_SAMPLE_RATE:
            raise ValueError(
                f"endpointing: the voice-activity detector takes {VAD_SAMPLE_RATE} Hz audio, "
                f"the model {sample_rate} Hz; set endpointing=false"
            )
        self.need = silence_frames(silence_ms)
        self._pending = np.zeros(0, np.float32)  # samples of the frame not yet complete
        self._context = np.zeros(CONTEXT_SAMPLES, np.float32)
        self._h = np.zeros((1, 1, STATE_SIZE), np.float32)
        self._c = np.zeros((1, 1, STATE_SIZE), np.float32)
        self.frames = 0  # VAD frames judged
        self.heard = False  # speech since the last endpoint
        self._silence_from: int | None = None  # first silent frame after speech
        self.probabilities: list[float] | None = None  # set to a list to keep them

    def accept(self, audio: np.ndarray) -> list[int]:
        """The endpoints (stream sample positions, at frame ends) this audio completes."""
        a = np.asarray(audio, dtype=np.float32).reshape(-1)
        pending = np.concatenate([self._pending, a]) if len(self._pending) else a
        n = len(pending) // FRAME_SAMPLES
        if n == 0:
            self._pending = pending.copy()
            return []
        frames = pending[: n * FRAME_SAMPLES].reshape(n, FRAME_SAMPLES)
        contexts = np.empty((n, CONTEXT_SAMPLES), np.float32)
        contexts[0] = self._context
        contexts[1:] = frames[:-1, -CONTEXT_SAMPLES:]
        probs, self._h, self._c = vad_session().run(
            ["speech_probs", "hn", "cn"],
            {"input": np.concatenate([contexts, frames], axis=1), "h": self._h, "c": self._c},
        )
        self._context = frames[-1, -CONTEXT_SAMPLES:].copy()
        self._pending = pending[n * FRAME_SAMPLES :].copy()
        if self.probabilities is not None:
            self.probabilities.extend(float(p) for p in probs)
        ends = []
        for p in np.asarray(probs).reshape(-1):
            frame = self.frames
            self.frames += 1
            if p >= SPEECH_THRESHOLD:
                self.heard = True
                self._silence_from = None
            elif p < SILENCE_THRESHOLD and self.heard and self._silence_from is None:
                self._silence_from = frame
            if self._silence_from is not None and self.frames - self._silence_from >= self.need:
                ends.append(self.frames * FRAME_SAMPLES)
                self.heard = False
                self._silence_from = None
        return ends
