"""Whole-recording transcription: the same windows, model and decoder as a stream."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from streamasr.core.decoding import StreamDecoder
from streamasr.core.features import whole_file_windows
from streamasr.core.state import StreamError
from streamasr.core.two_pass import MAX_UTTERANCE_SECONDS, Utterance, chunk_features, worded_finals
from streamasr.core.vad import VAD_SAMPLE_RATE, VadEndpointer
from streamasr.protocol import pcm16_to_float
from streamasr.protocol.contract import ModelContract

RunModel = Callable[[np.ndarray], np.ndarray]  # [N, W, F] features -> [N, T, V] log-probs


def log_probs_for(
    contract: ModelContract, audio: np.ndarray, run_model: RunModel, max_batch: int
) -> np.ndarray:
    """[frames, V] log-probs of a whole recording, window by window as a stream gets them."""
    return _windows_and_log_probs(contract, audio, run_model, max_batch)[1]


def _windows_and_log_probs(
    contract: ModelContract,
    audio: np.ndarray,
    run_model: RunModel,
    max_batch: int,
    vad: VadEndpointer | None = None,
):
    windows = whole_file_windows(contract, audio, vad)
    outs = [
        run_model(windows.features[i : i + max_batch]) for i in range(0, windows.count, max_batch)
    ]
    if not outs:
        return windows, np.zeros((0, len(contract.vocabulary)), np.float32)
    return windows, windows.stream_log_probs(np.concatenate(outs))


def checked_audio(
    contract: ModelContract, audio: np.ndarray, sample_rate: int | None, max_seconds: float
) -> np.ndarray:
    if sample_rate is not None and sample_rate != contract.sample_rate:
        raise StreamError(
            f"SAMPLE_RATE {sample_rate} does not match the model's "
            f"{contract.sample_rate} Hz; resample before sending"
        )
    a = np.asarray(audio)
    if a.ndim != 1:
        raise StreamError(f"audio must be 1-D mono samples, got shape {list(a.shape)}")
    if len(a) == 0:
        raise StreamError("empty audio")
    if len(a) > max_seconds * contract.sample_rate:
        raise StreamError(
            f"audio of {len(a) / contract.sample_rate:.1f} s exceeds the limit of {max_seconds:g} s"
        )
    if a.dtype == np.int16:
        return pcm16_to_float(a, "float64")
    if not np.all(np.isfinite(a)):
        raise StreamError("audio contains NaN or infinite samples")
    return a.astype(np.float64)


def transcribe_with_utterances(
    contract: ModelContract,
    audio: np.ndarray,
    sample_rate: int | None,
    run_model: RunModel,
    defaults,
    options: dict[str, Any],
    max_batch: int,
    max_seconds: float,
    keep_utterances: bool,
) -> tuple[list[dict], list[Utterance]]:
    """All messages for a recording, as a stream of it with END would produce them, and,
    with ``keep_utterances``, the utterance of each final with words, as the decoder step
    attaches them for the two-pass re-decode."""
    a = checked_audio(contract, audio, sample_rate, max_seconds)
    dec_cfg, end_cfg = defaults.configs(options)
    decoder = StreamDecoder(contract, config=dec_cfg, endpoint=end_cfg)
    spans: list[tuple[dict, int, int]] = []
    if keep_utterances:
        decoder.on_final = lambda msg, first, end: spans.append((msg, first, end))
    vad = (
        VadEndpointer(end_cfg.endpointing, contract.sample_rate)
        if end_cfg.endpointing and contract.sample_rate == VAD_SAMPLE_RATE
        else None
    )
    windows, lp = _windows_and_log_probs(contract, a, run_model, max_batch, vad)
    msgs = decoder.accept(lp, windows.endpoints)
    msgs += decoder.close()
    if not spans:
        return msgs, []
    feats = chunk_features(windows.features, windows.valid_outputs, contract)
    sub, limit = contract.subsampling, MAX_UTTERANCE_SECONDS / contract.output_frame_seconds
    utts = [
        Utterance(index, feats[first * sub : end * sub], lp[first:end])
        for index, first, end in worded_finals(spans, msgs)
        if end - first <= limit
    ]
    return msgs, utts
