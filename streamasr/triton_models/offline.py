"""Whole-recording transcription: the same windows, model and decoder as a stream."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ..contract import ModelContract
from ..decoding import StreamDecoder
from ..features import whole_file_windows
from ..state import StreamError

RunModel = Callable[[np.ndarray], np.ndarray]   # [N, W, F] features -> [N, T, V] log-probs


def log_probs_for(contract: ModelContract, audio: np.ndarray, run_model: RunModel,
                  max_batch: int) -> np.ndarray:
    """[frames, V] log-probs of a whole recording, window by window as a stream gets them."""
    windows = whole_file_windows(contract, audio)
    outs = [run_model(windows.features[i:i + max_batch])
            for i in range(0, windows.count, max_batch)]
    if not outs:
        return np.zeros((0, len(contract.vocabulary)), np.float32)
    return windows.stream_log_probs(np.concatenate(outs))


def checked_audio(contract: ModelContract, audio: np.ndarray, sample_rate: int | None,
                  max_seconds: float) -> np.ndarray:
    if sample_rate is not None and sample_rate != contract.sample_rate:
        raise StreamError(f"SAMPLE_RATE {sample_rate} does not match the model's "
                          f"{contract.sample_rate} Hz; resample before sending")
    a = np.asarray(audio)
    if a.ndim != 1:
        raise StreamError(f"audio must be 1-D mono samples, got shape {list(a.shape)}")
    if len(a) == 0:
        raise StreamError("empty audio")
    if len(a) > max_seconds * contract.sample_rate:
        raise StreamError(f"audio of {len(a) / contract.sample_rate:.1f} s exceeds the "
                          f"limit of {max_seconds:g} s")
    if a.dtype == np.int16:
        return a.astype(np.float64) / 32768.0
    if not np.all(np.isfinite(a)):
        raise StreamError("audio contains NaN or infinite samples")
    return a.astype(np.float64)


def transcribe(contract: ModelContract, audio: np.ndarray, sample_rate: int | None,
               run_model: RunModel, defaults, options: dict[str, Any], max_batch: int,
               max_seconds: float) -> list[dict]:
    """All messages for a recording, as a stream of it with END would produce them."""
    a = checked_audio(contract, audio, sample_rate, max_seconds)
    dec_cfg, end_cfg = defaults.configs(options)
    decoder = StreamDecoder(contract, config=dec_cfg, endpoint=end_cfg)
    msgs = decoder.accept(log_probs_for(contract, a, run_model, max_batch))
    return msgs + decoder.close()
