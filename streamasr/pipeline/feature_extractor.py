"""Feature step of the `streaming_asr` ensemble: audio chunks -> model windows.

Per stream (Triton CORRID) it keeps a ``FeatureStream``: the audio remainder not yet
framed and the feature context the next window needs.  Each request yields the windows
that became complete (``[N, left+chunk+right, n_mels]``) plus a ``StepInfo`` for the
decoder.  With no complete window the acoustic model still gets one placeholder window,
since Triton cannot send it a batch of zero (``StepInfo.windows`` is then 0): the idle
window its contract declares (``idle_window``: the model answers it without computing,
streamasr.artifacts.idle_window), else a window of silence, computed and discarded.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from streamasr.core import admission as adm
from streamasr.core.decoding import EndpointConfig
from streamasr.core.features import FeatureStream, silence_frame
from streamasr.core.state import StreamError, StreamStore
from streamasr.core.vad import VAD_SAMPLE_RATE, VadEndpointer
from streamasr.pipeline.common import (
    FLAG_END,
    FLAG_START,
    ModelConfig,
    parse_bool,
    parse_float,
    parse_int,
    stream_idle_timeout,
)
from streamasr.pipeline.step_info import MAX_STREAM_ID, StepInfo, check_option_limits
from streamasr.protocol import (
    DEFAULT_MAX_LEAD_SECONDS,
    LEAD_MARKER,
    MAX_LEAD_PARAMETER,
    OFFLINE_MODEL,
    pcm16_to_float,
)
from streamasr.protocol.contract import ModelContract

log = logging.getLogger("streamasr.feature_extractor")

# Request parameters this step acts on; every other key is a per-stream decoder option.
CONTROL_PARAMETERS = ("finalize", "keepalive")
# Audio one stream may carry in all (config parameter `max_stream_seconds`): bounds the
# time a stream holds a sequence slot and the size of every per-stream counter.
DEFAULT_MAX_STREAM_SECONDS = 4 * 3600.0


def normalize_stream_id(corrid: Any) -> int:
    """A request's sequence id as the one integer every step keys its state by.

    Triton passes uint64 ids as ``int`` and string ids as ``str``; the string ``"5"`` and
    the integer 5 are two sequences to Triton but one stream to us (the decoder keys by
    integer), so a string id is accepted only as the decimal form of a valid integer id:
    it then meets the integer stream's duplicate-START check instead of replacing it."""
    refused = StreamError(
        f"sequence id {corrid!r} is not a valid stream id: use an "
        f"integer 1..{MAX_STREAM_ID} (or its decimal string)"
    )
    value = corrid
    if isinstance(value, str):
        if not (value.isascii() and value.isdigit()):
            raise refused
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_STREAM_ID:
        raise refused
    return value


def stream_vad(contract: ModelContract, options: dict[str, Any]) -> VadEndpointer | None:
    """The voice-activity endpointer a stream's options ask for (``endpointing`` in ms,
    its default ``EndpointConfig``'s), or None when endpointing is off or the model's
    sample rate is not the detector's (its streams keep the decoder's silence rules)."""
    try:
        ms = EndpointConfig.from_parameters(
            {k: v for k, v in options.items() if k == "endpointing"}
        ).endpointing
    except ValueError as exc:
        raise StreamError(str(exc)) from None
    if not ms or contract.sample_rate != VAD_SAMPLE_RATE:
        return None
    return VadEndpointer(ms, contract.sample_rate)


@dataclass
class FeatureRequest:
    """One request, as plain data (the adapter extracts it from pb_utils)."""

    corrid: Any
    flags: int
    audio: np.ndarray | None  # float32 / int16 samples, or None (no audio input)
    sample_rate: int | None
    parameters: dict[str, Any]

    @property
    def start(self) -> bool:
        return bool(self.flags & FLAG_START)

    @property
    def end(self) -> bool:
        return bool(self.flags & FLAG_END)


@dataclass
class FeatureResult:
    features: np.ndarray  # [max(N, 1), W, F] float32
    info: StepInfo


@dataclass
class _Stream:
    features: FeatureStream
    started: float  # the step's clock when its START was served
    requests: int = 0
    # It has run more than max_lead_seconds_at_capacity ahead of real time: it is not a
    # stream the at-capacity check protects, and it may be closed by it.
    ahead: bool = False

    def lead_s(self, now: float, sample_rate: int) -> float:
        """Seconds its audio so far is ahead of the time since its START."""
        return self.features.features.samples_seen / sample_rate - (now - self.started)


class FeatureExtractorStep:
    """All streams of one model instance."""

    def __init__(
        self,
        contract: ModelContract,
        idle_timeout_s: float,
        max_chunk_seconds: float,
        max_windows_per_request: int,
        max_streams: int | None = None,
        validate_options=None,
        max_stream_seconds: float = DEFAULT_MAX_STREAM_SECONDS,
        admission: adm.Admission | None = None,
        max_lead_seconds: float | None = DEFAULT_MAX_LEAD_SECONDS,
        clock=time.monotonic,
        max_lead_seconds_at_capacity: float | None = adm.DEFAULT_LEAD_AT_CAPACITY_S,
    ):
        self.contract = contract
        # How far a stream's audio may run ahead of real time (None: no limit); see
        # streamasr.protocol.DEFAULT_MAX_LEAD_SECONDS.
        self.max_lead_s = max_lead_seconds
        self.clock = clock
        self.lead_closed = 0  # streams closed for running ahead of real time
        self.admission = admission or adm.Admission(None)
        # The admission limit as a rate of model windows (None without a limit or without
        # the at-capacity lead): what real-time streams need, spent by everyone.
        self.lead_at_capacity_s = max_lead_seconds_at_capacity
        self.budget = (
            adm.RealTimeBudget.for_limit(self.admission.limit, contract.chunk_seconds, clock)
            if max_lead_seconds_at_capacity is not None
            else None
        )
        self.max_chunk_samples = int(max_chunk_seconds * contract.sample_rate)
        self.max_stream_seconds = max_stream_seconds
        self.max_stream_samples = int(max_stream_seconds * contract.sample_rate)
        self.max_windows = max_windows_per_request
        # Worst case in one request: the chunk itself, plus context carried over from
        # earlier requests, plus the flush at END.
        need = (
            -(
                -(self.max_chunk_samples // contract.features.hop_length + contract.window_frames)
                // contract.chunk_frames
            )
            + 1
        )
        if need > max_windows_per_request:
            raise ValueError(
                f"max_chunk_seconds {max_chunk_seconds:g} can yield {need} windows in one "
                f"request, more than max_windows_per_request {max_windows_per_request}"
            )
        self.store: StreamStore[_Stream] = StreamStore(
            idle_timeout_s, clock=clock, max_streams=max_streams
        )
        # What a request that completes no window sends the acoustic model: the window
        # its contract says it answers without computing, else a window of silence.
        shape = (1, contract.window_frames, contract.features.n_mels)
        self._placeholder = (
            np.full(shape, contract.idle_window, np.float32)
            if contract.idle_window is not None
            else np.broadcast_to(silence_frame(contract.features), shape).astype(np.float32)
        )
        self._validate_options = validate_options or (lambda options: None)

    # -- validation (before any state changes: a rejected request changes nothing) -------
    def _checked_audio(self, r: FeatureRequest) -> np.ndarray:
        if r.sample_rate is not None and r.sample_rate != self.contract.sample_rate:
            raise StreamError(
                f"SAMPLE_RATE {r.sample_rate} does not match the model's "
                f"{self.contract.sample_rate} Hz; resample before sending"
            )
        if r.audio is None:
            return np.zeros(0, np.float64)
        a = np.asarray(r.audio)
        if a.ndim != 1:
            raise StreamError(f"audio must be 1-D mono samples, got shape {list(a.shape)}")
        if len(a) > self.max_chunk_samples:
            raise StreamError(
                f"audio chunk of {len(a) / self.contract.sample_rate:.2f} s exceeds the "
                f"limit of {self.max_chunk_samples / self.contract.sample_rate:.2f} s per request"
            )
        if a.dtype == np.int16:
            return pcm16_to_float(a, "float64")
        if a.dtype != np.float32:
            raise StreamError(
                f"audio dtype {a.dtype} is not float32 (AUDIO) or int16 (AUDIO_INT16)"
            )
        if not np.all(np.isfinite(a)):
            raise StreamError("audio contains NaN or infinite samples")
        return a.astype(np.float64)

    def _control(self, r: FeatureRequest) -> tuple[bool, bool, dict[str, Any]]:
        p = dict(r.parameters)
        try:
            finalize = parse_bool("finalize", p.pop("finalize", False))
            keepalive = parse_bool("keepalive", p.pop("keepalive", False))
        except ValueError as exc:
            raise StreamError(str(exc)) from None
        if p and not r.start:
            raise StreamError(f"stream options {sorted(p)} are accepted only on the START request")
        if p:
            check_option_limits(p)
            try:
                self._validate_options(p)
            except ValueError as exc:
                raise StreamError(str(exc)) from None
        return finalize, keepalive, p

    # -- processing ----------------------------------------------------------------
    def process(self, r: FeatureRequest) -> FeatureResult:
        corrid = normalize_stream_id(r.corrid)  # before any state is touched
        audio = self._checked_audio(r)
        finalize, keepalive, options = self._control(r)
        if r.audio is not None and len(audio) == 0 and not keepalive:
            raise StreamError(
                "empty audio chunk: send audio, or set keepalive=true to keep an idle stream open"
            )
        if r.audio is None and not (keepalive or finalize or r.end or r.start):
            raise StreamError(
                "request has no audio (AUDIO or AUDIO_INT16) and no keepalive, finalize or END"
            )
        if len(audio) > self.max_stream_samples:
            raise self._too_long()
        if r.start:
            if corrid in self.store:
                # Another client (or a confused one) reusing a live id: refusing keeps the
                # live stream intact; replacing it would silently mix two audio streams.
                raise StreamError(
                    f"stream {corrid} is already open: END it (or let it "
                    "expire) before starting it again, or use another id"
                )
            vad = stream_vad(self.contract, options)
            with self.store.lock:  # count and create at once: no two STARTs share a place
                self.store.sweep()
                self.admission.admit(corrid, len(self.store))
                st = self.store.create(
                    corrid, _Stream(FeatureStream(self.contract, vad), started=self.clock())
                )
        else:
            if corrid not in self.store:
                self.admission.check_refused(corrid, r.end)
            st = self.store.get(corrid)
            if st.features.features.samples_seen + len(audio) > self.max_stream_samples:
                raise self._too_long()
            self._check_lead(corrid, st, len(audio))
        info = StepInfo(
            stream=corrid,
            seq=st.requests,
            start=r.start,
            end=r.end,
            finalize=finalize,
            keepalive=keepalive,
            options=options,
        )
        st.requests += 1
        windows = st.features.accept(audio)
        feats, valid = [windows.features], [windows.valid_outputs]
        if r.end:
            tail = st.features.finish()
            feats.append(tail.features)
            valid.append(tail.valid_outputs)
            self.store.pop(corrid)
        features = np.concatenate(feats)
        info.windows = len(features)
        info.valid_outputs = [int(v) for v in np.concatenate(valid)]
        info.endpoints = [int(e) for e in windows.endpoints]
        if info.windows == 0:
            features = self._placeholder
        elif self.budget is not None:
            self.budget.spend(info.windows)
        return FeatureResult(features, info)

    def _check_lead(self, corrid: int, st: _Stream, samples: int) -> None:
        """Close the stream when this chunk would put its audio more than max_lead_s
        ahead of real time, or when it is already more than max_lead_seconds_at_capacity
        ahead while the real-time budget is spent and another stream is at real time.
        Closed, not refused: refusing one chunk and taking the next would leave a hole in
        the audio that nobody sees."""
        if samples == 0:
            return
        now = self.clock()
        lead = st.lead_s(now, self.contract.sample_rate)  # before this chunk
        at_capacity_lead = self.lead_at_capacity_s
        if self.budget is not None and at_capacity_lead is not None and lead > at_capacity_lead:
            st.ahead = True
            if self.budget.spent() and self._someone_at_real_time(st, now):
                self._close_for_lead(
                    corrid,
                    f"stream {corrid} closed: its audio ran {lead:.1f} s {LEAD_MARKER} while "
                    f"this instance was at capacity (the model time of its "
                    f"{self.admission.limit} streams at real time was spent) and other "
                    f"streams were at real time; {adm.LEAD_AT_CAPACITY_KEY} is "
                    f"{at_capacity_lead:g} s. Send a live stream at real time; whole "
                    f"recordings go to the {OFFLINE_MODEL} model",
                )
        if self.max_lead_s is None:
            return
        lead += samples / self.contract.sample_rate  # with this chunk
        if lead <= self.max_lead_s:
            return
        self._close_for_lead(
            corrid,
            f"stream {corrid} closed: its audio ran {lead:.1f} s {LEAD_MARKER}, more than "
            f"{MAX_LEAD_PARAMETER} ({self.max_lead_s:g} s). Send a live stream at most that "
            f"far ahead of real time; whole recordings go to the {OFFLINE_MODEL} model",
        )

    def _someone_at_real_time(self, st: _Stream, now: float) -> bool:
        """Another stream, open for REALTIME_AFTER_S, that has never run ahead: one the
        at-capacity check protects (a paced client, or one the server keeps waiting)."""
        return any(
            other is not st and not other.ahead and now - other.started >= adm.REALTIME_AFTER_S
            for other in self.store.values()
        )

    def _close_for_lead(self, corrid: int, why: str) -> None:
        self.store.close(corrid, why)
        self.lead_closed += 1
        raise StreamError(why)

    def _too_long(self) -> StreamError:
        return StreamError(
            f"stream exceeds max_stream_seconds ({self.max_stream_seconds:g} s "
            "of audio); end it and start a new stream"
        )


def calibrate(cfg: ModelConfig) -> int:
    """The streams this instance holds, timed now (streamasr.pipeline.calibration; imported
    here so that a server with an overriding limit never loads what it times)."""
    from streamasr.pipeline.calibration import calibrate as run_calibration

    return run_calibration(cfg).limit


def build_step(cfg: ModelConfig, validate_options=None) -> FeatureExtractorStep:
    """The step as configured in config.pbtxt (fails fast on a bad parameter)."""
    contract = cfg.contract()
    try:
        max_chunk = parse_float("max_chunk_seconds", cfg.param("max_chunk_seconds"), 0.01)
        max_windows = parse_int("max_windows_per_request", cfg.param("max_windows_per_request"), 1)
        max_streams = parse_int("max_streams", cfg.param("max_streams", "0"), 0) or None
        max_stream_s = parse_float(
            "max_stream_seconds",
            cfg.param("max_stream_seconds", str(DEFAULT_MAX_STREAM_SECONDS)),
            0.01,
        )
        limit = adm.configured_limit(
            cfg.param(adm.CONFIG_KEY, adm.MEASURED), calibrate=lambda: calibrate(cfg)
        )
        max_lead = parse_float(
            MAX_LEAD_PARAMETER, cfg.param(MAX_LEAD_PARAMETER, str(DEFAULT_MAX_LEAD_SECONDS)), 0.0
        )
        lead_at_capacity = parse_float(
            adm.LEAD_AT_CAPACITY_KEY,
            cfg.param(adm.LEAD_AT_CAPACITY_KEY, str(adm.DEFAULT_LEAD_AT_CAPACITY_S)),
            0.0,
        )
    except ValueError as exc:
        raise ValueError(f"model {cfg.name!r}: {exc}") from None
    return FeatureExtractorStep(
        contract,
        stream_idle_timeout(cfg),
        max_chunk,
        max_windows,
        max_streams,
        validate_options,
        max_stream_s,
        adm.Admission(limit),
        max_lead or None,
        max_lead_seconds_at_capacity=lead_at_capacity or None,
    )
